"""The Lua scripts, run directly against the stack's Redis."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from flashsale import constants as c
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.keys import USER_HOLDS_KEY, SkuKeys, holds_key
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.config import Settings
from flashsale.errors import StockError
from flashsale.models import Deduction, Purchase
from flashsale.ops.reconcile import reconcile_sku, repair_sku
from flashsale.ops.setup import set_stock
from flashsale.records import Incoming, Prededuct, PredeductResult, StockReturn
from tests.oracle import read_books

GRACE_MS = 3_000
EPOCH = 1_700_000_000_000  # the layout epoch a partition is loaded with


def deduct(stock: RedisStock, sku: str, token: str, qty: int | str = 1, user: str = "u1") -> tuple[Prededuct, int]:
    # Straight to the script, so that arguments the Python API would refuse reach it too.
    code, remaining, _ = stock._scripts["prededuct"](
        keys=SkuKeys.of(sku).all(), args=["m-" + token, sku, "", token, user, str(qty)]
    )
    return Prededuct(code), remaining


def one(stock: RedisStock, sku: str, token: str, user: str, qty: int, gid: str, epoch: int = 0) -> PredeductResult:
    """A pre-deduct of one purchase, in a message of its own (of a partition: placed by layout `epoch`)."""
    return stock.prededuct(sku, gid, [Purchase(token, user, qty)], epoch)[0]


def test_prededuct_sells_exactly_the_stock_then_reports_sold_out(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 3)
    results = [one(redis_stock, sku, f"t{i}", f"u{i}", 1, f"m{i}") for i in range(5)]
    assert [r.code for r in results] == [Prededuct.ACCEPTED] * 3 + [Prededuct.SOLD_OUT] * 2
    assert [r.remaining for r in results] == [2, 1, 0, 0, 0]
    view = redis_stock.view(sku)
    assert (view.stock, view.deducted_qty, view.deducted_count, view.sold_out) == (0, 3, 3, True)


def test_prededuct_refuses_more_than_the_stock_without_writing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 2)
    result = one(redis_stock, sku, "t1", "u1", 3, "m1")
    assert (result.code, result.remaining) == (Prededuct.INSUFFICIENT, 2)
    assert redis_stock.log_entry(sku, "t1") is None
    assert redis_stock.view(sku).stock == 2


@pytest.mark.parametrize("qty", ["0", "-1", "1.5", "abc", "", "1e3", "01", "1234567890"])
def test_prededuct_rejects_a_quantity_that_is_not_a_positive_integer(
    redis_stock: RedisStock, sku: str, qty: str
) -> None:
    redis_stock.load(sku, 10)
    code, _ = deduct(redis_stock, sku, "t1", qty)
    assert code is Prededuct.INVALID_QTY
    assert redis_stock.view(sku).stock == 10
    assert redis_stock.log_entry(sku, "t1") is None


def test_a_repeated_token_returns_the_original_outcome_and_deducts_nothing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 10)
    first = one(redis_stock, sku, "t1", "u1", 2, "m1")
    again = one(redis_stock, sku, "t1", "u1", 2, "m2")
    assert first.code is Prededuct.ACCEPTED and again.code is Prededuct.DUPLICATE
    assert again.entry is not None and again.entry.message_id == "m1" and again.entry.qty == 2
    assert again.remaining == 8
    assert redis_stock.view(sku).deducted_count == 1


def test_per_user_limit_counts_every_purchase_of_the_user(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 10, per_user_limit=3)
    assert one(redis_stock, sku, "t1", "alice", 2, "m1").code is Prededuct.ACCEPTED
    over = one(redis_stock, sku, "t2", "alice", 2, "m2")
    assert (over.code, over.bought) == (Prededuct.LIMIT_EXCEEDED, 2)
    assert one(redis_stock, sku, "t3", "alice", 1, "m3").code is Prededuct.ACCEPTED
    assert one(redis_stock, sku, "t4", "bob", 3, "m4").code is Prededuct.ACCEPTED
    assert redis_stock.view(sku).stock == 4


def test_unknown_sku_is_reported_and_nothing_is_created(redis_stock: RedisStock, sku: str) -> None:
    result = one(redis_stock, sku, "t1", "u1", 1, "m1")
    assert result.code is Prededuct.UNKNOWN_SKU
    assert redis_stock.client.exists(*SkuKeys.of(sku).all()) == 0


def test_the_log_entry_is_json_with_ids_as_strings(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 5)
    one(redis_stock, sku, "123456789012345678", "98765432109876543", 2, "0102FC00")
    raw = json.loads(redis_stock.client.hget(SkuKeys.of(sku).log, "123456789012345678"))
    assert raw["user"] == "98765432109876543" and raw["sku"] == sku and raw["msg"] == "0102FC00"
    assert (raw["state"], raw["qty"], raw["from"], raw["to"]) == (c.STATE_DEDUCTED, 2, 5, 3)
    assert raw["ts"] > 1_700_000_000_000


def test_a_message_that_never_ran_is_young_until_the_grace_has_passed_since_it_was_first_asked_about(
    redis_stock: RedisStock, sku: str
) -> None:
    redis_stock.load(sku, 5)
    view = redis_stock.check(sku, "m1", ["t1"], grace_ms=60_000)
    assert (view.state, view.record, view.entries) == ("young", None, {"t1": None})
    assert redis_stock.client.hlen(SkuKeys.of(sku).tx) == 0
    # The grace runs from that first check, on Redis's clock: no producer's or checker's clock enters it.
    first = int(redis_stock.client.hget(SkuKeys.of(sku).checks, "m1"))
    assert abs(first - int(redis_stock.client.time()[0]) * 1000) < 5_000
    assert redis_stock.check(sku, "m1", ["t1"], grace_ms=60_000).state == c.TX_YOUNG
    assert int(redis_stock.client.hget(SkuKeys.of(sku).checks, "m1")) == first
    redis_stock.client.hset(SkuKeys.of(sku).checks, "m1", first - 61_000)  # as if asked a minute ago
    assert redis_stock.check(sku, "m1", ["t1"], grace_ms=60_000).state == c.TX_FENCED
    assert redis_stock.client.hlen(SkuKeys.of(sku).checks) == 0


def test_check_fences_an_old_message_and_a_late_prededuct_of_it_deducts_nothing(
    redis_stock: RedisStock, sku: str
) -> None:
    redis_stock.load(sku, 5)
    view = redis_stock.check(sku, "m1", ["t1", "t2"], grace_ms=0)
    assert view.state == c.TX_FENCED and view.record is not None and view.record.state == c.TX_FENCED
    late = redis_stock.prededuct(sku, "m1", [Purchase("t1", "u1", 1), Purchase("t2", "u2", 1)])
    assert [r.code for r in late] == [Prededuct.FENCED, Prededuct.FENCED]
    stock_view = redis_stock.view(sku)
    assert (stock_view.stock, stock_view.deducted_count, stock_view.fenced_count) == (5, 0, 1)
    # The tokens themselves are free: a retry in a new message is a purchase like any other.
    assert one(redis_stock, sku, "t1", "u1", 1, "m2").code is Prededuct.ACCEPTED


def test_a_fence_outlives_a_reload_so_a_late_prededuct_of_its_message_still_deducts_nothing(
    redis_stock: RedisStock, sku: str
) -> None:
    """`stock set --reset` discards the sale's history, but not what the checker decided: a message it
    rolled back (fenced, or refused while frozen) may still be in its producer's hands, and its late
    pre-deduct would otherwise deduct on the new load with no message left to carry it."""
    redis_stock.load(sku, 5)
    assert redis_stock.check(sku, "m1", ["t1"], grace_ms=0).state == c.TX_FENCED
    with redis_stock.frozen(sku):
        assert one(redis_stock, sku, "t2", "u2", 1, "m2").code is Prededuct.STALE_LAYOUT
    assert redis_stock.check(sku, "m2", ["t2"], grace_ms=0).state == c.TX_STALE
    redis_stock.load(sku, 5, reset=True)
    assert one(redis_stock, sku, "t1", "u1", 1, "m1").code is Prededuct.FENCED
    assert one(redis_stock, sku, "t2", "u2", 1, "m2").code is Prededuct.STALE_LAYOUT
    assert redis_stock.client.get(SkuKeys.of(sku).stock) == "5"
    assert redis_stock.client.hlen(SkuKeys.of(sku).log) == 0
    # What the new load sells is its own: the same tokens in new messages are purchases like any other.
    assert one(redis_stock, sku, "t1", "u1", 1, "m3").code is Prededuct.ACCEPTED


def test_a_fence_outlives_a_partitioned_load_in_between(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 5)
    assert redis_stock.check(sku, "m1", ["t1"], grace_ms=0).state == c.TX_FENCED
    redis_stock.load_partitioned(sku, 6, partitions=2, refill=2, threshold=0, reset=True)
    assert one(redis_stock, sku, "t1", "u1", 1, "m1").code is Prededuct.FENCED
    redis_stock.load(sku, 5, reset=True)
    assert one(redis_stock, sku, "t1", "u1", 1, "m1").code is Prededuct.FENCED
    assert redis_stock.client.get(SkuKeys.of(sku).stock) == "5"


def test_check_after_the_prededuct_reports_what_it_accepted_and_writes_nothing(
    redis_stock: RedisStock, sku: str
) -> None:
    redis_stock.load(sku, 1)
    redis_stock.prededuct(sku, "m1", [Purchase("t1", "u1", 1), Purchase("t2", "u2", 1)])
    view = redis_stock.check(sku, "m1", ["t1", "t2"], grace_ms=0)
    assert view.state == c.TX_RAN and view.record is not None
    assert (view.record.codes, view.record.accepted) == ((Prededuct.ACCEPTED, Prededuct.SOLD_OUT), 1)
    assert view.entries["t1"] is not None and view.entries["t1"].message_id == "m1"
    assert view.entries["t2"] is None
    assert redis_stock.view(sku).fenced_count == 0


def test_a_group_is_decided_in_arrival_order_with_every_rule(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 4, per_user_limit=2)
    one(redis_stock, sku, "old", "carol", 1, "m0")
    purchases = [
        Purchase("a", "alice", 2),  # accepted
        Purchase("b", "alice", 1),  # alice is at her limit after a
        Purchase("old", "carol", 1),  # seen before, in m0
        Purchase("c", "bob", 1),  # accepted: the last unit
        Purchase("a", "alice", 2),  # the same token twice in one group
        Purchase("d", "dave", 1),  # sold out
    ]
    results = redis_stock.prededuct(sku, "m1", purchases)
    assert [r.code for r in results] == [
        Prededuct.ACCEPTED,
        Prededuct.LIMIT_EXCEEDED,
        Prededuct.DUPLICATE,
        Prededuct.ACCEPTED,
        Prededuct.DUPLICATE,
        Prededuct.SOLD_OUT,
    ]
    assert [r.remaining for r in results] == [1, 1, 1, 0, 0, 0]
    assert results[2].entry is not None and results[2].entry.message_id == "m0"
    assert results[4].entry is not None and results[4].entry.message_id == "m1"
    view = redis_stock.view(sku)
    assert (view.stock, view.deducted_qty, view.deducted_count, view.sold_out) == (0, 4, 3, True)
    assert redis_stock.client.hget(SkuKeys.of(sku).users, "alice") == "2"
    entries = redis_stock.log_entries(sku, ["a", "c", "b", "d"])
    assert [e.message_id if e else None for e in entries.values()] == ["m1", "m1", None, None]


def test_running_a_message_twice_answers_the_same_and_deducts_once(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 2, per_user_limit=1)
    purchases = [Purchase("a", "u1", 1), Purchase("b", "u1", 1), Purchase("c", "u2", 1), Purchase("d", "u3", 1)]
    first = redis_stock.prededuct(sku, "m1", purchases)
    again = redis_stock.prededuct(sku, "m1", purchases)
    assert [r.code for r in first] == [
        Prededuct.ACCEPTED,
        Prededuct.LIMIT_EXCEEDED,
        Prededuct.ACCEPTED,
        Prededuct.SOLD_OUT,
    ]
    assert [(r.code, r.entry, r.bought) for r in again] == [(r.code, r.entry, r.bought) for r in first]
    assert [r.remaining for r in again] == [1, 0, 0, 0]  # an accepted one says what it left; the others, what is left
    view = redis_stock.view(sku)
    assert (view.stock, view.deducted_count) == (0, 2)


def test_a_group_that_fails_while_deciding_writes_nothing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 10)
    redis_stock.client.hset(SkuKeys.of(sku).log, "corrupt", "{not json")
    with pytest.raises(StockError):
        redis_stock.prededuct(sku, "m1", [Purchase("a", "u1", 1), Purchase("corrupt", "u2", 1)])
    assert redis_stock.log_entry(sku, "a") is None
    assert redis_stock.client.hlen(SkuKeys.of(sku).tx) == 0
    assert redis_stock.view(sku).stock == 10


def test_stock_return_gives_back_once(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 1, per_user_limit=1)
    one(redis_stock, sku, "t1", "u1", 1, "m1")
    assert redis_stock.view(sku).sold_out
    assert redis_stock.return_stock(sku, "t1") == (StockReturn.RETURNED, 1)
    assert redis_stock.return_stock(sku, "t1") == (StockReturn.ALREADY_RETURNED, 1)
    view = redis_stock.view(sku)
    assert (view.stock, view.returned_qty, view.returned_count, view.sold_out) == (1, 1, 1, False)
    # the user's limit is freed with the stock
    assert one(redis_stock, sku, "t2", "u1", 1, "m2").code is Prededuct.ACCEPTED


def test_stock_return_of_a_token_never_deducted_changes_nothing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 3)
    assert redis_stock.return_stock(sku, "nope")[0] is StockReturn.NOT_DEDUCTED
    redis_stock.check(sku, "m-fenced", ["fenced"], grace_ms=0)
    assert redis_stock.return_stock(sku, "fenced")[0] is StockReturn.NOT_DEDUCTED
    assert redis_stock.view(sku).stock == 3


def test_load_refuses_a_sku_with_history_unless_reset(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 3)
    one(redis_stock, sku, "t1", "u1", 1, "m1")
    with pytest.raises(StockError, match="1 deduction"):
        redis_stock.load(sku, 10)
    assert redis_stock.view(sku).stock == 2
    redis_stock.load(sku, 10, reset=True)
    assert redis_stock.view(sku).stock == 10 and redis_stock.log_entry(sku, "t1") is None
    assert json.loads(redis_stock.client.hget(SkuKeys.of(sku).tx, "m1"))["state"] == "stale"  # its load replaced


def test_scripts_are_reloaded_after_the_server_forgets_them(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 2)
    redis_stock.client.script_flush()
    assert one(redis_stock, sku, "t1", "u1", 1, "m1").code is Prededuct.ACCEPTED


def test_every_key_of_a_sku_hashes_to_one_cluster_slot(redis_stock: RedisStock) -> None:
    from redis.crc import key_slot

    for sku in ("a", "sku-1", "X.Y:Z@1"):
        slots = {key_slot(k.encode()) for k in SkuKeys.of(sku).every()}
        assert len(slots) == 1


def test_concurrent_prededucts_never_oversell(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 100)
    results: list[Prededuct] = []
    lock = threading.Lock()

    def buyer(n: int) -> None:
        for i in range(25):
            r = one(redis_stock, sku, f"t{n}-{i}", f"u{n}", 1, f"m{n}-{i}")
            with lock:
                results.append(r.code)

    threads = [threading.Thread(target=buyer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(Prededuct.ACCEPTED) == 100
    view = redis_stock.view(sku)
    assert view.stock == 0 and view.deducted_qty == 100
    assert sum(e.qty for e in redis_stock.scan_log(sku, page=7)) == 100


def test_adopt_writes_back_an_entry_or_a_whole_deduction_and_names_each_outcome(
    redis_stock: RedisStock, sku: str
) -> None:
    from flashsale.records import Adopt, DeductionRow

    def row(token: str) -> DeductionRow:
        return DeductionRow(0, token, "u" + token, 1, "m" + token, 5)

    redis_stock.load(sku, 2)
    one(redis_stock, sku, "t1", "u1", 1, "m1")
    assert redis_stock.adopt(sku, row("t1"), deduct=False) == (Adopt.ALREADY_LOGGED, "deducted")
    redis_stock.client.hdel(SkuKeys.of(sku).log, "t1")
    assert redis_stock.adopt(sku, row("t1"), deduct=False) == (Adopt.ADOPTED, "")
    assert redis_stock.view(sku).stock == 1  # the entry alone: the stock already counted it
    assert redis_stock.adopt(sku, row("t2"), deduct=True) == (Adopt.ADOPTED, "")
    assert redis_stock.view(sku).stock == 0
    assert redis_stock.adopt(sku, row("t3"), deduct=True) == (Adopt.NO_STOCK, "0")


def test_adopt_writes_back_an_order_as_mysql_has_it_and_a_returned_one_takes_no_stock(
    redis_stock: RedisStock, sku: str
) -> None:
    from flashsale.records import Adopt, DeductionRow

    redis_stock.load(sku, 2, pay_within_ms=60_000)
    paid = DeductionRow(0, "t1", "u1", 1, "m1", 5, "paid", 60_005, 70)
    expired = DeductionRow(0, "t2", "u2", 1, "m2", 5, "expired", 60_005, 60_010)
    assert redis_stock.adopt(sku, paid, deduct=True) == (Adopt.ADOPTED, "")
    assert redis_stock.adopt(sku, expired, deduct=True) == (Adopt.ADOPTED, "")
    entries = redis_stock.log_entries(sku, ["t1", "t2"])
    assert (entries["t1"].state, entries["t1"].order, entries["t1"].due_ms) == ("deducted", "paid", 60_005)
    assert (entries["t2"].state, entries["t2"].order, entries["t2"].decided_ms) == ("returned", "expired", 60_010)
    view = redis_stock.view(sku)
    # Both deductions count, the expired one's units came back: one unit left.
    assert (view.stock, view.deducted_qty, view.returned_qty) == (1, 2, 1)


@pytest.mark.parametrize("count_survived", [False, True])
def test_a_deduction_written_back_into_a_partitioned_sku_counts_against_its_buyers_limit(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str, count_survived: bool
) -> None:
    """A partitioned SKU counts a buyer's units on a key of their own (user_hold.lua), apart from the
    partitions. A deduction Redis lost entirely may have lost its count there too: written back, it must
    count, once, or its buyer could buy past the limit. On one key adopt.lua counts it with the entry."""
    set_stock(settings, sku, 5, partitions=3, per_user_limit=1)
    # Applied in MySQL, lost entirely by Redis (as in a failover), its count with it or not.
    mysql_store.apply_batch([Incoming(Deduction("t-lost", sku, "u1", 1, 1_000), "m-lost", "t")])
    layout = redis_stock.layout(sku)
    assert layout is not None
    if count_survived:  # the buyer's hold on the token, as the producer took it
        redis_stock.client.hset(holds_key(layout, "u1"), mapping={"b:u1": 1, "h:t-lost": '{"u1":1}'})
    # Run again, it finds the entry and counts nothing more.
    runs = [repair_sku(redis_stock, mysql_store, sku, settle_s=0, replay=lambda entries: 0)[1] for _ in range(2)]
    assert [(r.adopted_deductions, r.needs_operator) for r in runs] == [(1, []), (0, [])]
    assert redis_stock.client.hget(holds_key(layout, "u1"), "b:u1") == "1"
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_deducted, books.redis_stock) == ({"t-lost": 1}, 4)


def test_a_deduction_written_back_into_a_partition_takes_the_units_its_standby_holds(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    """A partition sells from its active sub-domain and its standby (prededuct.lua switches the standby in):
    a deduction Redis lost entirely, written back into a partition whose units wait in its standby, takes
    them from there, where it was refused as if the partition had none."""
    set_stock(settings, sku, 6, partitions=3)
    layout = redis_stock.layout(sku)
    assert layout is not None
    first = SkuKeys.of(next(layout.order("t-lost")))
    units = int(redis_stock.client.get(first.stock))
    assert units > 0
    redis_stock.client.set(first.stock, 0)
    redis_stock.client.hset(first.meta, "standby", units)  # as a refill leaves them: on sale, not active
    mysql_store.apply_batch([Incoming(Deduction("t-lost", sku, "u1", 1, 1_000), "m-lost", "t")])
    report = repair_sku(redis_stock, mysql_store, sku, settle_s=0, replay=lambda entries: 0)[1]
    assert (report.adopted_deductions, report.needs_operator) == (1, [])
    assert int(redis_stock.client.get(first.stock)) + int(redis_stock.client.hget(first.meta, "standby")) == units - 1
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_deducted, books.redis_stock) == ({"t-lost": 1}, 5)


def test_a_deduction_written_back_into_an_empty_partition_takes_units_from_the_pool(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    """The token's first partition, where a write-back goes, sold all it held; the SKU's pool still has units:
    they move to the partition (a transfer, as a producer's scheduler makes), and the deduction takes one,
    where the repair gave it up to an operator with stock left."""
    set_stock(settings, sku, 6, partitions=3)
    layout = redis_stock.layout(sku)
    assert layout is not None
    first, pool = SkuKeys.of(next(layout.order("t-lost"))), SkuKeys.of(sku).pool
    units = int(redis_stock.client.get(first.stock))
    redis_stock.client.set(first.stock, 0)
    redis_stock.client.incrby(pool, units)  # back in the pool: the books still hold 6
    assert read_books(settings.redis_url, settings.mysql_url, sku).redis_stock == 6
    mysql_store.apply_batch([Incoming(Deduction("t-lost", sku, "u1", 1, 1_000), "m-lost", "t")])
    report = repair_sku(redis_stock, mysql_store, sku, settle_s=0, replay=lambda entries: 0)[1]
    assert (report.adopted_deductions, report.needs_operator) == (1, [])
    assert (redis_stock.client.get(first.stock), redis_stock.client.hget(first.meta, "standby")) == ("0", "0")
    assert redis_stock.client.hlen(SkuKeys.of(sku).transfers) == 0  # the transfer is complete
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_deducted, books.redis_stock) == ({"t-lost": 1}, 5)


def test_a_repair_while_the_sale_goes_on_never_takes_a_unit_a_lost_entry_still_counts(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repair reads the counters, then the log a page at a time: a purchase between the two adds an entry
    the counters read first do not count, and the log seemed to explain the units of the entry Redis lost.
    It took that deduction from the stock again: a unit gone for good, the counter past the log. Unsure, it
    now leaves the token to a run once the sale is quiet, which writes the entry alone."""
    set_stock(settings, sku, 10)
    for token in ("t1", "t2"):
        assert redis_stock.prededuct(sku, f"m-{token}", [Purchase(token, "u1", 1)])[0].code is Prededuct.ACCEPTED
        mysql_store.apply_batch([Incoming(Deduction(token, sku, "u1", 1, 1_000), f"m-{token}", "t")])
    redis_stock.client.hdel(SkuKeys.of(sku).log, "t1")  # the entry alone is lost: stock and counters stand
    scan = redis_stock.scan_log

    def a_purchase_then_the_scan(*args: object, **kwargs: object) -> object:
        redis_stock.prededuct(sku, "m-t9", [Purchase("t9", "u9", 1)])  # the sale goes on
        monkeypatch.setattr(redis_stock, "scan_log", scan)
        return scan(*args, **kwargs)

    monkeypatch.setattr(redis_stock, "scan_log", a_purchase_then_the_scan)
    seen, report = repair_sku(redis_stock, mysql_store, sku, settle_s=3600, replay=lambda entries: 0)
    assert (report.adopted_entries, report.adopted_deductions, len(report.needs_operator)) == (0, 0, 1)
    assert "sold as its log was read" in report.needs_operator[0]
    assert not any("counter says" in p for p in seen.problems)  # 2 entries, while the counter went 2 to 3
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_stock, books.redis_counter_qty) == (7, 3)
    _, quiet = repair_sku(redis_stock, mysql_store, sku, settle_s=3600, replay=lambda entries: 0)
    assert (quiet.adopted_entries, quiet.adopted_deductions, quiet.needs_operator) == (1, 0, [])
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_stock, books.redis_counter_qty, books.redis_deducted) == (7, 3, {"t1": 1, "t2": 1, "t9": 1})


@pytest.mark.parametrize("direction", ["refill", "drain"])
def test_a_transfer_that_begins_between_the_reads_of_a_partitioned_view_is_counted_once(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str, direction: str
) -> None:
    """A partitioned SKU is read in snapshots: its own (pool, transfers), then each partition's. A refill
    made whole in between was counted in the pool and in its partition, a drain in neither, and reconcile
    reported drift in books that balance, `GET /stock` the wrong stock: the view is read again."""
    set_stock(settings, sku, 600, partitions=3)
    layout = redis_stock.layout(sku)
    assert layout is not None
    own, name, epoch = SkuKeys.of(sku), layout.parts[0], str(layout.epoch)
    part = SkuKeys.of(name)
    made: list[str] = []  # transfers made; one each time `left` allows, as the SKU's own snapshot is read
    left = [0]

    def transfer(shard: str) -> None:
        if shard != sku or not left[0]:
            return
        left[0] -= 1
        made.append(tid := f"x{len(made)}")
        if direction == "refill":
            assert int(_script(redis_stock, "pool_take", own.pool_take(), [tid, name, 5, epoch])[0]) == 5
            _script(redis_stock, "refill_apply", part.partition_move(), [tid, 5, epoch])
            _script(redis_stock, "refill_end", own.refill_end(), [tid, epoch])
        else:
            _script(redis_stock, "pool_expect", [own.transfers, own.meta, own.done], [tid, name, 5, epoch])
            assert _script(redis_stock, "drain", part.partition_move(), [tid, 5, epoch]) == 5

    read = redis_stock._snapshot

    def then_a_transfer(what: str, shard: str, *, partition: bool = False) -> list[object]:
        found = read(what, shard, partition=partition)
        transfer(shard)
        return found

    redis_stock._snapshot = then_a_transfer  # type: ignore[method-assign]
    left[0] = 1
    assert redis_stock.view(sku).stock == 600
    left[0] = 1
    assert reconcile_sku(redis_stock, mysql_store, sku, settle_s=0).problems == []

    async def producers_view() -> int:  # `GET /stock` reads the same way
        stock = AsyncRedisStock(settings.redis_url)
        read_async = stock._snapshot

        async def then_a_transfer_async(shard: str, *, partition: bool = False) -> list[object]:
            found = await read_async(shard, partition=partition)
            transfer(shard)
            return found

        stock._snapshot = then_a_transfer_async  # type: ignore[method-assign]
        try:
            return (await stock.view(sku)).stock
        finally:
            await stock.close()

    left[0] = 1
    assert asyncio.run(producers_view()) == 600
    assert len(made) == 3 and read_books(settings.redis_url, settings.mysql_url, sku).redis_stock == 600


def test_load_refuses_an_invalid_argument_with_its_name(redis_stock: RedisStock, sku: str) -> None:
    with pytest.raises(StockError, match="invalid per-user limit"):
        redis_stock.load(sku, 5, per_user_limit=10**10)
    assert not redis_stock.exists(sku)


# --- partitions (docs/scaling.md) ----------------------------------------------------------------------
def _script(stock: RedisStock, name: str, keys: list[str], args: list[object]) -> object:
    _connected = stock.client  # the scripts are registered on the client made at first use
    return stock._scripts[name](keys=keys, args=[str(a) for a in args])


def test_a_write_back_into_a_partition_logs_and_flags_what_is_on_sale_in_both_sub_domains(
    redis_stock: RedisStock, sku: str
) -> None:
    """As a pre-deduct's entry, a written-back one says what the partition had on sale before and after it
    (active and standby), and only a partition left with nothing in either is flagged sold out."""
    part = f"{sku}#0"
    keys = SkuKeys.of(part)
    _script(redis_stock, "load_stock", keys.load(), [3, 0, 1, 0, EPOCH])
    _apply(redis_stock, part, "r1", 2)  # active 3, standby 2

    def adopt(token: str, qty: int) -> list[object]:
        args = [token, "u1", qty, 1_000, f"m-{token}", sku, "deduct", "", "", "", 0]
        return _script(redis_stock, "adopt", keys.sale(), args)  # type: ignore[return-value]

    assert adopt("t1", 3) == [1, ""]  # the active sub-domain covers it: no switch
    entry = json.loads(redis_stock.client.hget(keys.log, "t1"))
    assert (entry["from"], entry["to"], redis_stock.client.hget(keys.meta, "sold_out")) == (5, 2, "0")
    assert adopt("t2", 2) == [1, ""]  # the standby is switched in, and the partition is empty then
    entry = json.loads(redis_stock.client.hget(keys.log, "t2"))
    assert (entry["from"], entry["to"], redis_stock.client.hget(keys.meta, "sold_out")) == (2, 0, "1")


def test_a_partition_switches_to_its_standby_below_the_threshold_and_logs_its_sku_and_partition(
    redis_stock: RedisStock, sku: str
) -> None:
    part = f"{sku}#0"
    keys = SkuKeys.of(part)
    assert _script(redis_stock, "load_stock", keys.load(), [3, 0, 1, 2, EPOCH]) == [1, ""]
    assert _apply(redis_stock, part, "r1", 5) == 1
    results = [one(redis_stock, part, f"t{i}", "u1", 1, f"m{i}", EPOCH) for i in range(3)]
    # Active 3 -> 2 -> 1 sells on; below the threshold of 2 the standby's 5 join it: 1 + 5 - 1 = 5.
    assert [r.remaining for r in results] == [7, 6, 5]
    assert redis_stock.client.get(keys.stock) == "5"
    meta = redis_stock.client.hgetall(keys.meta)
    assert (meta["standby"], meta["switches"], meta["deducted_qty"], meta["sold_out"]) == ("0", "1", "3", "0")
    entry = json.loads(redis_stock.client.hget(keys.log, "t2"))
    assert (entry["sku"], entry["part"], entry["from"], entry["to"]) == (sku, part, 6, 5)


def test_a_purchase_larger_than_the_active_sub_domain_takes_the_standby_too(redis_stock: RedisStock, sku: str) -> None:
    part = f"{sku}#1"
    keys = SkuKeys.of(part)
    _script(redis_stock, "load_stock", keys.load(), [2, 0, 1, 0, EPOCH])
    _apply(redis_stock, part, "r1", 3)
    assert one(redis_stock, part, "t1", "u1", 6, "m1", EPOCH).code is Prededuct.INSUFFICIENT
    result = one(redis_stock, part, "t2", "u1", 5, "m2", EPOCH)
    assert (result.code, result.remaining) == (Prededuct.ACCEPTED, 0)
    assert redis_stock.client.hget(keys.meta, "sold_out") == "1"


def _apply(stock: RedisStock, part: str, transfer_id: str, qty: int, epoch: int = EPOCH) -> object:
    keys = SkuKeys.of(part)
    return _script(stock, "refill_apply", [keys.stock, keys.meta, keys.refills], [transfer_id, qty, epoch])


def _pool(stock: RedisStock, sku: str, units: int, parts: int = 1) -> tuple[SkuKeys, SkuKeys]:
    """A SKU's pool and layout as load_pool.lua writes them (epoch EPOCH), and its first partition loaded empty."""
    base, part = SkuKeys.of(sku), SkuKeys.of(f"{sku}#0")
    stock.client.set(base.pool, units)
    stock.client.hset(base.meta, mapping={"loaded_ms": EPOCH, "parts": " ".join(f"{sku}#{n}" for n in range(parts))})
    _script(stock, "load_stock", part.load(), [0, 0, 1, 0, EPOCH])
    return base, part


def _take(stock: RedisStock, sku: str, transfer_id: str, want: int, epoch: int = EPOCH, part: str = "") -> list[object]:
    base = SkuKeys.of(sku)
    keys = [base.pool, base.transfers, base.meta, base.done]
    return _script(stock, "pool_take", keys, [transfer_id, part or f"{sku}#0", want, epoch])  # type: ignore[return-value]


def _end(stock: RedisStock, sku: str, transfer_id: str, epoch: int = EPOCH) -> object:
    base = SkuKeys.of(sku)
    return _script(stock, "refill_end", [base.transfers, base.done, base.meta], [transfer_id, epoch])


def _expect(stock: RedisStock, sku: str, transfer_id: str, want: int, epoch: int = EPOCH) -> object:
    base = SkuKeys.of(sku)
    return _script(stock, "pool_expect", [base.transfers, base.meta, base.done], [transfer_id, f"{sku}#0", want, epoch])


def _drain(stock: RedisStock, part: str, transfer_id: str, want: int, epoch: int = EPOCH) -> object:
    keys = SkuKeys.of(part)
    return _script(stock, "drain", [keys.stock, keys.meta, keys.refills], [transfer_id, want, epoch])


def _receive(stock: RedisStock, sku: str, transfer_id: str, qty: int, epoch: int = EPOCH) -> object:
    base = SkuKeys.of(sku)
    return _script(stock, "pool_receive", [base.pool, base.transfers, base.done, base.meta], [transfer_id, qty, epoch])


def test_refill_steps_count_once_per_transfer(redis_stock: RedisStock, sku: str) -> None:
    base, part = _pool(redis_stock, sku, 10)
    taken, record = _take(redis_stock, sku, "x1", 4)
    assert taken == 4 and json.loads(record)["dir"] == "out"  # type: ignore[arg-type]
    assert _take(redis_stock, sku, "x1", 9)[0] == 4
    assert redis_stock.client.get(base.pool) == "6"
    assert _take(redis_stock, sku, "x2", 9)[0] == 6
    assert _take(redis_stock, sku, "x3", 9)[0] == 0
    assert redis_stock.client.hget(base.meta, "moves") == "2"  # x1 and x2 began; x1 again and x3 took nothing
    assert [_apply(redis_stock, f"{sku}#0", "x1", 4) for _ in range(2)] == [1, 0]
    assert redis_stock.client.hget(part.meta, "standby") == "4"
    assert redis_stock.client.hget(part.meta, "sold_out") == "0"


def test_a_refill_step_run_again_after_the_transfer_completed_counts_nothing(redis_stock: RedisStock, sku: str) -> None:
    """A refiller whose reply was lost (or whose WAIT fell short) runs a step again after a sweep has
    completed the whole transfer: the completed transfer is still known, so nothing is taken twice."""
    base, part = _pool(redis_stock, sku, 10)
    assert _take(redis_stock, sku, "x1", 4)[0] == 4
    assert _apply(redis_stock, f"{sku}#0", "x1", 4) == 1
    assert [_end(redis_stock, sku, "x1") for _ in range(2)] == [1, 0]
    assert redis_stock.client.hlen(base.transfers) == 0 and redis_stock.client.hget(base.done, "x1") == "4"
    assert _take(redis_stock, sku, "x1", 4)[0] == 4  # the late step 1: the transfer's own units, none taken
    assert _apply(redis_stock, f"{sku}#0", "x1", 4) == 0
    assert _end(redis_stock, sku, "x1") == 0
    assert (redis_stock.client.get(base.pool), redis_stock.client.hget(part.meta, "standby")) == ("6", "4")
    assert redis_stock.client.hlen(base.transfers) == 0 and redis_stock.client.hget(base.meta, "moves") == "1"


def test_a_refill_of_no_units_leaves_no_record_so_the_units_a_later_take_moves_under_its_id_arrive(
    redis_stock: RedisStock, sku: str
) -> None:
    """A take that found the pool empty writes no record, so one run again later, once units came back,
    moves them under the same id: the partition must not have recorded that id as applied with none."""
    base, part = _pool(redis_stock, sku, 0)
    assert _take(redis_stock, sku, "x1", 4)[0] == 0
    assert _apply(redis_stock, f"{sku}#0", "x1", 0) == 0  # a caller that gave what it was told it took
    assert redis_stock.client.hexists(part.refills, "x1") == 0
    redis_stock.client.set(base.pool, 3)  # units back in the pool (a drain, a restock)
    assert _take(redis_stock, sku, "x1", 4)[0] == 3
    assert _apply(redis_stock, f"{sku}#0", "x1", 3) == 1
    assert (redis_stock.client.get(base.pool), redis_stock.client.hget(part.meta, "standby")) == ("0", "3")


def test_a_drain_takes_standby_first_then_active_once_and_the_pool_receives_it_once(
    redis_stock: RedisStock, sku: str
) -> None:
    base, part = _pool(redis_stock, sku, 0)
    _script(redis_stock, "load_stock", part.load(), [5, 0, 1, 0, EPOCH])
    _apply(redis_stock, f"{sku}#0", "r1", 2)
    assert [_expect(redis_stock, sku, "d1", 4) for _ in range(2)] == [1, 0]
    assert redis_stock.client.hget(base.meta, "moves") == "1"  # one transfer began, however often expected
    assert [_drain(redis_stock, f"{sku}#0", "d1", 4) for _ in range(2)] == [4, 4]
    assert (redis_stock.client.get(part.stock), redis_stock.client.hget(part.meta, "standby")) == ("3", "0")
    assert [_receive(redis_stock, sku, "d1", 4) for _ in range(2)] == [1, 0]
    assert redis_stock.client.get(base.pool) == "4" and redis_stock.client.hlen(base.transfers) == 0
    # Run again after the end, every step counts nothing: the first begins no transfer, the last adds nothing.
    assert _expect(redis_stock, sku, "d1", 4) == 0 and redis_stock.client.hlen(base.transfers) == 0
    assert _drain(redis_stock, f"{sku}#0", "d1", 4) == 4 and redis_stock.client.get(part.stock) == "3"
    assert _receive(redis_stock, sku, "d1", 4) == 0 and redis_stock.client.get(base.pool) == "4"


def test_every_step_that_moves_stock_refuses_another_load_or_a_partition_that_is_gone(
    redis_stock: RedisStock, sku: str
) -> None:
    """A producer that still holds the layout of the load before (or names a partition the new load
    dropped) moves nothing: no unit is stranded in a dropped partition or carried into the new load."""
    base, part = _pool(redis_stock, sku, 10)
    before = {k: redis_stock.client.dump(k) for k in (base.pool, base.meta, part.stock, part.meta)}
    old = EPOCH - 1
    assert _take(redis_stock, sku, "x1", 4, epoch=old) == [-2, ""]
    assert _take(redis_stock, sku, "x1", 4, part=f"{sku}#5") == [-2, ""]  # not in the layout
    assert _apply(redis_stock, f"{sku}#0", "x1", 4, epoch=old) == -2
    assert _apply(redis_stock, f"{sku}#5", "x1", 4) == -2  # a partition that is gone
    assert redis_stock.client.exists(*SkuKeys.of(f"{sku}#5").every()) == 0
    assert _end(redis_stock, sku, "x1", epoch=old) == -2
    assert _expect(redis_stock, sku, "d1", 1, epoch=old) == -2
    assert _drain(redis_stock, f"{sku}#0", "d1", 1, epoch=old) == -2
    assert _drain(redis_stock, f"{sku}#5", "d1", 1) == -2
    assert _receive(redis_stock, sku, "d1", 1, epoch=old) == -2
    assert {k: redis_stock.client.dump(k) for k in before} == before
    assert redis_stock.client.exists(base.transfers, base.done, part.refills) == 0


def test_the_transfers_due_for_a_sweep_are_judged_on_redis_clock(redis_stock: RedisStock, sku: str) -> None:
    base, _ = _pool(redis_stock, sku, 10)
    _take(redis_stock, sku, "x1", 4)
    due = [base.transfers, base.meta]
    assert _script(redis_stock, "transfers_due", due, [60_000, EPOCH]) == []  # a second old, on Redis's clock
    reply = _script(redis_stock, "transfers_due", due, [0, EPOCH])
    assert reply[0] == "x1" and json.loads(reply[1])["qty"] == 4  # type: ignore[index]
    # Its age is in ms of Redis's clock, whatever the clock of the host that began it.
    now_ms = int(redis_stock.client.time()[0]) * 1000
    assert abs(json.loads(reply[1])["ts"] - now_ms) < 5_000  # type: ignore[index]
    assert _script(redis_stock, "transfers_due", due, [0, EPOCH - 1]) == [-2]


def test_only_an_empty_partition_closes_and_then_it_sells_nothing_new_but_answers_what_it_saw(
    redis_stock: RedisStock, sku: str
) -> None:
    part = f"{sku}#0"
    keys = SkuKeys.of(part)
    _script(redis_stock, "load_stock", keys.load(), [1, 0, 1, 0, EPOCH])
    _apply(redis_stock, part, "r1", 1)
    close = [keys.stock, keys.meta]
    assert _script(redis_stock, "close", close, [EPOCH]) == 0  # the standby still holds a unit
    assert one(redis_stock, part, "t1", "u1", 2, "m1", EPOCH).code is Prededuct.ACCEPTED
    assert redis_stock.client.hget(keys.meta, "closed") is None
    assert _script(redis_stock, "close", close, [EPOCH - 1]) == -1  # by the layout of another load
    assert redis_stock.client.hget(keys.meta, "closed") is None
    assert [_script(redis_stock, "close", close, [EPOCH]) for _ in range(2)] == [1, 1]
    assert redis_stock.client.hget(keys.meta, "closed") == "1"
    # A unit a late refill brings is not sold: the token goes on to its next partition.
    _apply(redis_stock, part, "r2", 1)
    late = one(redis_stock, part, "t2", "u2", 1, "m2", EPOCH)
    assert late.code is Prededuct.CLOSED
    assert redis_stock.log_entry(part, "t2") is None and redis_stock.client.hget(keys.meta, "standby") == "1"
    again = one(redis_stock, part, "t1", "u1", 2, "m3", EPOCH)  # a token it sold: its original answer
    assert (again.code, again.entry.message_id if again.entry else None) == (Prededuct.DUPLICATE, "m1")
    assert one(redis_stock, part, "t2", "u2", 1, "m2", EPOCH).code is Prededuct.CLOSED  # run again: the same


def test_a_partition_refuses_purchases_placed_by_another_load_and_deducts_nothing(
    redis_stock: RedisStock, sku: str
) -> None:
    part = f"{sku}#0"
    keys = SkuKeys.of(part)
    assert _script(redis_stock, "load_stock", keys.load(), [5, 0, 1, 0]) == [3, "epoch"]  # a partition needs one
    _script(redis_stock, "load_stock", keys.load(), [5, 0, 1, 0, EPOCH])
    for n, epoch in enumerate((EPOCH - 1, 0)):  # an older layout, or none at all
        assert one(redis_stock, part, "t1", "u1", 1, f"m{n}", epoch).code is Prededuct.STALE_LAYOUT
    assert redis_stock.client.hlen(keys.log) == 0 and redis_stock.client.get(keys.stock) == "5"
    # The message's record says it deducted nothing here, for the checker and the consumer.
    assert json.loads(redis_stock.client.hget(keys.tx, "m0"))["state"] == c.TX_STALE
    gone = one(redis_stock, f"{sku}#7", "t1", "u1", 1, "m7", EPOCH)  # a partition no load has (any more)
    assert (gone.code, gone.remaining) == (Prededuct.STALE_LAYOUT, None)
    assert redis_stock.client.pttl(SkuKeys.of(f"{sku}#7").tx) > 0  # what it wrote there expires
    assert one(redis_stock, part, "t1", "u1", 1, "m9", EPOCH).code is Prededuct.ACCEPTED


def test_a_hold_names_its_user_and_quantity_and_a_larger_retry_of_the_token_holds_the_difference(
    redis_stock: RedisStock,
) -> None:
    """A token sent at qty 1, then at qty 2 (a double click with another quantity), may be deducted at 2:
    the hold must cover 2, or the buyer's fresh tokens would pass the limit."""
    key = USER_HOLDS_KEY.format(shard=1, sku="s", epoch=1)
    redis_stock.client.delete(key)
    assert _script(redis_stock, "user_hold", [key], [2, "t1", "u1", 1, "a1"]) == [1, ""]
    assert _script(redis_stock, "user_hold", [key], [2, "t1", "u1", 2, "a1"]) == [1, ""]  # one more unit held
    assert redis_stock.client.hget(key, "b:u1") == "2"
    assert _script(redis_stock, "user_hold", [key], [2, "t2", "u1", 1, "a1"]) == [5, "2"]  # at the limit
    assert _script(redis_stock, "user_hold", [key], [2, "t1", "u1", 1, "a1"]) == [1, ""]  # within what it holds
    # The same token from another user holds on that user's own count, not on the first one's hold.
    assert _script(redis_stock, "user_hold", [key], [2, "t1", "u2", 2, "a1"]) == [1, ""]
    assert (redis_stock.client.hget(key, "b:u1"), redis_stock.client.hget(key, "b:u2")) == ("2", "2")
    assert _script(redis_stock, "user_hold", [key], [2, "t1", "u2", 3, "a1"]) == [5, "2"]


def test_a_hold_counts_each_token_once_against_its_buyers_limit(redis_stock: RedisStock) -> None:
    key = USER_HOLDS_KEY.format(shard=0, sku="s", epoch=1)
    redis_stock.client.delete(key)
    reply = _script(
        redis_stock,
        "user_hold",
        [key],
        [3, "t1", "u1", 2, "a1", "t2", "u1", 2, "a2", "t3", "u2", 3, "a3", "t1", "u1", 2, "a4"],
    )
    # t2 would take u1 to 4 of 3; t1 again (a retry) is held already and counts once.
    assert reply == [1, "", 5, "2", 1, "", 1, ""]
    assert _script(redis_stock, "user_hold", [key], [3, "t4", "u1", 1, "a1"]) == [1, ""]
    assert redis_stock.client.hget(key, "b:u1") == "3"


def _hold(redis_stock: RedisStock, key: str, limit: int, *purchases: tuple[str, str, int, str]) -> object:
    return _script(redis_stock, "user_hold", [key], [limit, *(v for p in purchases for v in p)])


def _release(redis_stock: RedisStock, key: str, *attempts: tuple[str, str, str]) -> int:
    return int(str(_script(redis_stock, "user_release", [key], [v for a in attempts for v in a])))


def test_a_hold_is_given_back_once_every_attempt_that_rode_it_was_told_sold_out(redis_stock: RedisStock) -> None:
    """A buyer told `sold_out` was sold nothing: the units held go back to the buyer's limit, but only once
    no other attempt of the token (in flight elsewhere, or unclear) may still deduct it."""
    key = USER_HOLDS_KEY.format(shard=2, sku="s", epoch=1)
    redis_stock.client.delete(key)
    assert _hold(redis_stock, key, 3, ("t1", "u1", 2, "a1"), ("t2", "u1", 1, "a2")) == [1, "", 1, ""]
    assert _hold(redis_stock, key, 3, ("t1", "u1", 2, "a3")) == [1, ""]  # a retry rides the hold
    assert _hold(redis_stock, key, 3, ("t3", "u1", 1, "a4")) == [5, "3"]
    assert _release(redis_stock, key, ("t1", "u1", "a1")) == 0  # a3 may still deduct t1
    assert _release(redis_stock, key, ("t1", "u1", "a1")) == 0  # run again: counts once
    assert redis_stock.client.hget(key, "b:u1") == "3"
    assert _release(redis_stock, key, ("t1", "u1", "a3")) == 2
    assert (redis_stock.client.hget(key, "b:u1"), redis_stock.client.hexists(key, "h:t1")) == ("1", 0)
    assert _release(redis_stock, key, ("t1", "u1", "a3")) == 0  # run again: frees nothing more
    assert redis_stock.client.hget(key, "b:u1") == "1"
    assert _hold(redis_stock, key, 3, ("t3", "u1", 2, "a5")) == [1, ""]  # the limit is the buyer's again
    # A later attempt of a freed token holds again, in full.
    assert _hold(redis_stock, key, 3, ("t1", "u1", 1, "a6")) == [5, "3"]


def test_a_release_frees_only_its_users_hold_and_leaves_attempts_not_on_record_alone(redis_stock: RedisStock) -> None:
    key = USER_HOLDS_KEY.format(shard=3, sku="s", epoch=1)
    redis_stock.client.delete(key)
    assert _hold(redis_stock, key, 5, ("t1", "u1", 2, "a1"), ("t1", "u2", 3, "a2")) == [1, "", 1, ""]
    assert _release(redis_stock, key, ("t1", "u1", "a1"), ("t1", "u2", "a9")) == 2  # a9 never held
    assert json.loads(redis_stock.client.hget(key, "h:t1")) == {"u2": 3}
    assert (redis_stock.client.hget(key, "b:u1"), redis_stock.client.hget(key, "b:u2")) == ("0", "3")
    # A hold with no attempt on record (taken by a script that kept none, whose attempts may still ride
    # it) is never freed, even once an attempt that rode it is released; nor is one in the older format.
    redis_stock.client.hset(key, mapping={"h:t7": json.dumps({"u3": 2}), "b:u3": 2, "h:t8": "1", "b:u4": 1})
    assert _hold(redis_stock, key, 5, ("t7", "u3", 2, "a1"), ("t8", "u4", 1, "a2")) == [1, "", 1, ""]
    assert _release(redis_stock, key, ("t7", "u3", "a1"), ("t8", "u4", "a2")) == 0
    assert (redis_stock.client.hget(key, "b:u3"), redis_stock.client.hget(key, "b:u4")) == ("2", "1")


def test_a_token_asked_again_and_again_keeps_its_hold_and_a_small_record(redis_stock: RedisStock) -> None:
    key = USER_HOLDS_KEY.format(shard=4, sku="s", epoch=1)
    redis_stock.client.delete(key)
    attempts = [("t1", "u1", 1, f"a{n}") for n in range(9)]
    assert _hold(redis_stock, key, 3, *attempts) == [1, ""] * 9
    assert json.loads(redis_stock.client.hget(key, "a:t1")) == {"u1": {"*": 1}}
    assert _release(redis_stock, key, *[(t, u, a) for t, u, _, a in attempts]) == 0
    assert redis_stock.client.hget(key, "b:u1") == "1"


def test_a_release_on_holds_a_later_load_dropped_writes_nothing_and_leaves_no_key(redis_stock: RedisStock) -> None:
    """A purchase in flight across a reload releases on the holds of the load before, whose key the
    reload deleted: a counter written there would bring the key back, and nothing would delete it again."""
    key = USER_HOLDS_KEY.format(shard=5, sku="s", epoch=1)
    redis_stock.client.delete(key)
    assert _hold(redis_stock, key, 3, ("t1", "u1", 1, "a1")) == [1, ""]
    redis_stock.client.delete(key)  # what the next load does to the holds of this one
    assert _release(redis_stock, key, ("t1", "u1", "a1")) == 0
    assert redis_stock.client.exists(key) == 0


def test_a_frozen_sku_refuses_every_purchase_until_thawed_however_long_the_load_takes(
    redis_stock: RedisStock, sku: str
) -> None:
    """`stock set` freezes the SKU while it reads its history and loads it: no purchase lands in between."""
    redis_stock.load(sku, 5)
    with redis_stock.frozen(sku):
        refused = one(redis_stock, sku, "t1", "u1", 1, "m1")
        assert (refused.code, redis_stock.view(sku).stock) == (Prededuct.STALE_LAYOUT, 5)
        assert json.loads(redis_stock.client.hget(SkuKeys.of(sku).tx, "m1"))["state"] == c.TX_STALE
    assert one(redis_stock, sku, "t1", "u1", 1, "m2").code is Prededuct.ACCEPTED
    # A load slower than the freeze lasts keeps it: it is renewed while the load runs (test_freeze.py: a
    # `stock set` that died stops the sale only for as long as the freeze lasts).
    with redis_stock.frozen(sku, for_s=1.0):
        time.sleep(2.5)
        assert one(redis_stock, sku, "t2", "u2", 1, "m3").code is Prededuct.STALE_LAYOUT


def test_a_frozen_partitioned_sku_refuses_purchases_on_every_partition(redis_stock: RedisStock, sku: str) -> None:
    layout = redis_stock.load_partitioned(sku, 6, partitions=3, refill=2, threshold=0)
    with redis_stock.frozen(sku):
        for part in layout.parts:
            assert (
                one(redis_stock, part, f"t-{part}", "u1", 1, f"m-{part}", layout.epoch).code is Prededuct.STALE_LAYOUT
            )
    assert one(redis_stock, layout.parts[0], "t9", "u1", 1, "m9", layout.epoch).code is Prededuct.ACCEPTED
