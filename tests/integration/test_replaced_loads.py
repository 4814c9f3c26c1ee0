"""Messages of a load that a reload replaced, met after it, over the real scripts: the consumer's plan
(a message applied before a reset whose ack was lost comes back), the checker's verdict on one still
open, and its pre-deduct asked again. Books are read back with raw Redis commands."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from flashsale import constants as c
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.keys import SkuKeys, holds_key
from flashsale.adapters.redis.stock import RedisStock
from flashsale.config import Settings
from flashsale.errors import LoadUnderWay, NotReplicated
from flashsale.models import Deduction, DeductionMessage, Delivery, Purchase
from flashsale.ops import setup
from flashsale.ops.reconcile import repair_sku
from flashsale.ops.setup import set_stock
from flashsale.pipeline import accepted
from flashsale.pipeline.accepted import Decoded, Plan
from flashsale.records import Adopt, DeductionRow, Incoming, Prededuct
from tests.oracle import mysql_connection, read_books

DAY_MS = 86_400_000


def delivered(stock: RedisStock, message: DeductionMessage) -> Plan:
    """What the consumer would apply of `message`, delivered now."""
    decoded = [Decoded(Delivery(message.gid, "deductions", None, message.encode(), 0, 1), message)]
    return accepted.plan(decoded, stock.lookup(accepted.wanted(decoded)))


def record(stock: RedisStock, shard: str, gid: str) -> dict[str, object]:
    return json.loads(stock.client.hget(SkuKeys.of(shard).tx, gid))


def test_a_message_applied_before_a_reset_and_delivered_again_after_it_is_skipped_not_a_conflict(
    redis_stock: RedisStock, sku: str, caplog: pytest.LogCaptureFixture
) -> None:
    redis_stock.load(sku, 5)
    purchases = [Purchase("t1", "u1", 1), Purchase("t2", "u2", 2)]
    assert [r.code for r in redis_stock.prededuct(sku, "m-1", purchases, 0)] == [Prededuct.ACCEPTED] * 2
    message = DeductionMessage(sku, tuple(purchases), "m-1")
    assert [i.deduction.token for i in delivered(redis_stock, message).apply] == ["t1", "t2"]  # applied; ack lost

    with redis_stock.frozen(sku):
        redis_stock.load(sku, 5, reset=True)

    again = delivered(redis_stock, message)
    assert (again.apply, again.conflicts, again.skipped) == ([], [], 2)
    assert "m-1 had 2 purchase(s)" in caplog.text  # skipped, not silently: the reset discarded them
    retired = record(redis_stock, sku, "m-1")
    assert (retired["state"], retired["accepted"]) == (c.TX_STALE, 2) and retired["replaced"] > 0
    assert redis_stock.check(sku, "m-1", ["t1", "t2"], grace_ms=0).state == c.TX_STALE  # open: rolled back
    assert [r.code for r in redis_stock.prededuct(sku, "m-1", purchases, 0)] == [Prededuct.STALE_LAYOUT] * 2
    assert redis_stock.client.get(SkuKeys.of(sku).stock) == "5"
    assert redis_stock.client.hlen(SkuKeys.of(sku).log) == 0


def test_a_message_of_a_partition_a_reload_dropped_is_skipped_not_a_conflict(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 9, partitions=3)
    layout = redis_stock.layout(sku)
    assert layout is not None
    part = layout.parts[2]
    assert redis_stock.prededuct(part, "m-1", [Purchase("t1", "u1", 1)], layout.epoch)[0].code is Prededuct.ACCEPTED
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1", part=part)
    assert apply(mysql_store, delivered(redis_stock, message)) == ["t1"]

    set_stock(settings, sku, 9, partitions=2, reset=True, force=True)
    assert part not in redis_stock.shards(sku)

    again = delivered(redis_stock, message)  # its meta is gone: no load to wait for, and nothing to write
    assert (apply(mysql_store, again), again.conflicts, again.skipped) == ([], [], 1)
    keys = SkuKeys.of(part)
    assert redis_stock.client.exists(keys.stock, keys.meta, keys.log) == 0
    assert record(redis_stock, part, "m-1")["state"] == c.TX_STALE
    assert 0 < redis_stock.client.pttl(keys.tx) <= DAY_MS  # kept a day, not for ever
    assert mysql(settings, sku)[0] == {}


def test_a_reload_keeps_what_the_checker_decided_and_forgets_records_retired_over_a_day_ago(
    redis_stock: RedisStock, sku: str
) -> None:
    redis_stock.load(sku, 5)
    redis_stock.check(sku, "m-fenced", ["t1"], grace_ms=0)  # never ran: fenced
    now_ms = int(redis_stock.client.time()[0]) * 1000
    long_ago = now_ms - DAY_MS - 60_000
    tx = SkuKeys.of(sku).tx
    redis_stock.client.hset(tx, "m-fenced-long-ago", json.dumps({"state": "fenced", "ts": long_ago}))
    redis_stock.client.hset(tx, "m-retired", json.dumps({"state": "stale", "ts": long_ago, "replaced": long_ago}))
    redis_stock.client.hset(tx, "m-just-retired", json.dumps({"state": "stale", "ts": long_ago, "replaced": now_ms}))
    redis_stock.load(sku, 5)
    assert sorted(redis_stock.client.hkeys(tx)) == ["m-fenced", "m-fenced-long-ago", "m-just-retired"]


def mysql(settings: Settings, sku: str) -> tuple[dict[str, int], int, int]:
    """MySQL's deduction rows (token -> qty), initial stock and stock of the SKU, read with raw SQL."""
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    return books.mysql_deducted, books.mysql_initial, books.mysql_stock


def apply(store: MySQLStore, plan: Plan) -> list[str]:
    """Apply a plan as the consumer does; the tokens applied."""
    return [d.token for d in store.apply_batch(plan.apply, conflicts=plan.conflicts, loads=plan.loads).applied]


def test_a_message_of_the_old_sale_waits_while_a_stock_set_stopped_between_mysql_and_redis(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stock set` writes MySQL before Redis. Stopped between the two (a replica that did not acknowledge, a
    kill), MySQL holds the new load and Redis the old sale: a message of that sale delivered again (applied
    before, its ack lost) must not land on the new load, until the load is run again and retires it."""
    set_stock(settings, sku, 5)
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1")
    assert redis_stock.prededuct(sku, "m-1", list(message.purchases), 0)[0].code is Prededuct.ACCEPTED
    assert apply(mysql_store, delivered(redis_stock, message)) == ["t1"]

    def refused(*_: object, **__: object) -> None:
        raise NotReplicated("no replica acknowledged the load")

    monkeypatch.setattr(setup, "_load_redis", refused)
    with pytest.raises(NotReplicated):
        set_stock(settings, sku, 5, reset=True, force=True)
    monkeypatch.undo()
    with pytest.raises(LoadUnderWay, match=sku):
        apply(mysql_store, delivered(redis_stock, message))
    assert mysql(settings, sku) == ({}, 5, 5)

    set_stock(settings, sku, 5, reset=True, force=True)  # run again, to its end
    again = delivered(redis_stock, message)
    assert (apply(mysql_store, again), again.conflicts, again.skipped) == ([], [], 1)
    assert mysql(settings, sku) == ({}, 5, 5)


def test_a_batch_read_before_a_load_and_applied_after_it_is_refused(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 5)
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1")
    assert redis_stock.prededuct(sku, "m-1", list(message.purchases), 0)[0].code is Prededuct.ACCEPTED
    read = delivered(redis_stock, message)  # the consumer read Redis ...
    set_stock(settings, sku, 5, reset=True, force=True)  # ... a load ran from start to end ...
    with pytest.raises(LoadUnderWay):
        apply(mysql_store, read)  # ... and then its transaction began
    assert mysql(settings, sku) == ({}, 5, 5)


class _ReadsOneByOne:
    """Pipelines whose reads reach Redis one at a time, and a reload that runs once, after the `after`-th
    read of all of them: Redis may run another client's commands between two of a pipeline's (it is not a
    transaction, and a cluster's nodes answer each their part in any order)."""

    def __init__(self, client: Any, after: int, reload: Callable[[], None]) -> None:
        self.client, self.after, self.reload, self.reads = client, after, reload, 0

    def pipeline(self, transaction: bool = False) -> Any:
        calls: list[tuple[str, tuple[Any, ...]]] = []
        outer = self

        class Pipe:
            def __getattr__(self, name: str) -> Callable[..., Pipe]:
                return lambda *args: calls.append((name, args)) or self  # type: ignore[func-returns-value]

            def execute(self) -> list[Any]:
                replies = []
                for name, args in calls:
                    replies.append(getattr(outer.client, name)(*args))
                    outer.reads += 1
                    if outer.reads == outer.after:
                        outer.reload()
                return replies

        return Pipe()


@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("after", [1, 2, 3])
def test_a_reload_between_two_reads_of_the_consumers_look_up_never_lands_the_old_sale_on_the_new_one(
    settings: Settings,
    redis_stock: RedisStock,
    mysql_store: MySQLStore,
    sku: str,
    monkeypatch: pytest.MonkeyPatch,
    parts: int,
    after: int,
) -> None:
    """The consumer reads a shard's log, its message's record and its load's number: a reload landing between
    two of those reads must not leave an entry of the old sale beside the new load's number, or the old
    deduction is applied to the new load in MySQL (a row Redis has no entry for, a unit taken twice)."""
    set_stock(settings, sku, 6, partitions=parts)
    layout = redis_stock.layout(sku)
    shard, epoch = (layout.parts[1], layout.epoch) if layout else (sku, 0)
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1", part="" if shard == sku else shard)
    assert redis_stock.prededuct(shard, "m-1", list(message.purchases), epoch)[0].code is Prededuct.ACCEPTED
    reads = _ReadsOneByOne(
        redis_stock.client, after, lambda: set_stock(settings, sku, 6, partitions=parts, reset=True, force=True)
    )
    monkeypatch.setattr(redis_stock.client, "pipeline", reads.pipeline)
    plan = delivered(redis_stock, message)
    monkeypatch.undo()
    assert reads.reads > after  # the reload ran between two reads
    try:
        applied = apply(mysql_store, plan)
    except LoadUnderWay:
        applied = []
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_stock, books.redis_deducted) == (6, {})  # the new load sold nothing
    assert (applied, books.mysql_deducted, books.mysql_stock) == ([], {}, 6)


def test_a_batch_waits_for_a_load_holding_its_row_and_then_finds_it(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    """The load locks the inventory row before it deletes anything; the batch locks it before it writes
    anything: a batch that began while the load held it sees the load once it commits."""
    set_stock(settings, sku, 5)
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1")
    assert redis_stock.prededuct(sku, "m-1", list(message.purchases), 0)[0].code is Prededuct.ACCEPTED
    read = delivered(redis_stock, message)
    load = mysql_connection(settings.mysql_url)
    try:
        with load.cursor() as cur, ThreadPoolExecutor(1) as pool:
            cur.execute("SELECT load_ticket FROM inventory WHERE sku = %s FOR UPDATE", (sku,))
            batch = pool.submit(apply, mysql_store, read)
            time.sleep(0.5)
            assert not batch.done()  # waits for the row
            cur.execute("UPDATE inventory SET load_ticket = load_ticket + 1 WHERE sku = %s", (sku,))
            load.commit()
            with pytest.raises(LoadUnderWay):
                batch.result(timeout=30)
    finally:
        load.close()
    assert mysql(settings, sku)[0] == {}


def _lost_by_redis(store: MySQLStore, sku: str, *tokens: str) -> None:
    """Deductions MySQL applied and Redis lost entirely (as in a failover)."""
    store.apply_batch([Incoming(Deduction(t, sku, "u1", 1, 1_000), "m-" + t, "t") for t in tokens])


@pytest.mark.parametrize(("parts", "then"), [(1, 1), (3, 3), (1, 3)])
def test_a_repair_whose_row_a_reload_replaced_writes_nothing_into_the_new_load(
    settings: Settings,
    redis_stock: RedisStock,
    mysql_store: MySQLStore,
    sku: str,
    parts: int,
    then: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`reconcile --repair` writes back into Redis a deduction MySQL applied and the log lacks. A reload
    between its read of MySQL and that write (which may wait seconds for a seal to end) replaced the row's
    load: written, the old sale's deduction would take a unit of the new one, and the next repair would
    replay it into the new sale's books as an order nobody placed in it."""
    set_stock(settings, sku, 5, partitions=parts, per_user_limit=1)
    _lost_by_redis(mysql_store, sku, "t-old1", "t-old2")
    adopt = redis_stock.adopt

    def reloaded_first(sku: str, row: DeductionRow, *, deduct: bool) -> tuple[Adopt, str]:
        set_stock(settings, sku, 5, partitions=then, per_user_limit=1, reset=True)
        return adopt(sku, row, deduct=deduct)

    monkeypatch.setattr(redis_stock, "adopt", reloaded_first)
    _, repair = repair_sku(redis_stock, mysql_store, sku, settle_s=0, replay=lambda entries: 0)
    # One line for the SKU: nothing more is written back to it.
    assert repair.needs_operator == [f"t-old1: {sku} was loaded again during the repair; run it again"]
    assert (repair.adopted_entries, repair.adopted_deductions) == (0, 0)
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_deducted, books.redis_stock, books.redis_counter_qty) == ({}, 5, 0)
    assert (books.mysql_deducted, books.mysql_stock, books.order_count) == ({}, 5, 0)
    layout = redis_stock.layout(sku)
    if layout is not None:  # the buyer's count in the new sale is untouched
        assert not redis_stock.client.hexists(holds_key(layout, "u1"), "b:u1")


def test_a_row_of_a_load_after_the_one_whose_counters_the_repair_read_is_not_judged_by_them(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repair writes the entry alone where Redis's counters still count units no entry explains, else
    the whole deduction. Counters read under the load before a reload must not judge a row of the new one:
    its deduction, lost entirely, would come back as an entry that took no stock, and that unit would sell
    twice."""
    set_stock(settings, sku, 5)
    assert redis_stock.prededuct(sku, "m-a", [Purchase("t-a", "u1", 1)], 0)[0].code is Prededuct.ACCEPTED
    redis_stock.client.hdel(SkuKeys.of(sku).log, "t-a")  # counted, its entry lost
    pages = mysql_store.deductions_page

    def reloaded_first(sku: str, after: int, limit: int) -> list[DeductionRow]:
        if not after:  # the repair has read Redis's counters: a reload, and a sale of the new load
            set_stock(settings, sku, 5, reset=True, force=True)
            _lost_by_redis(mysql_store, sku, "t-new")
        return pages(sku, after, limit)

    monkeypatch.setattr(mysql_store, "deductions_page", reloaded_first)
    _, repair = repair_sku(redis_stock, mysql_store, sku, settle_s=0, replay=lambda entries: 0)
    assert repair.needs_operator == [f"t-new: {sku} was loaded again during the repair; run it again"]
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_deducted, books.redis_stock, books.redis_counter_qty) == ({}, 5, 0)


def test_a_repair_writes_back_into_a_sku_loaded_before_loads_were_numbered(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    """A meta with no `ticket` was loaded by a version that numbered loads in MySQL alone: any row of the
    SKU is written back to it (the consumer applies such a load's messages the same way)."""
    set_stock(settings, sku, 5)
    redis_stock.client.hdel(SkuKeys.of(sku).meta, "ticket")
    _lost_by_redis(mysql_store, sku, "t-lost")
    _, repair = repair_sku(redis_stock, mysql_store, sku, settle_s=0, replay=lambda entries: 0)
    assert (repair.needs_operator, repair.adopted_deductions) == ([], 1)
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    assert (books.redis_deducted, books.redis_stock) == ({"t-lost": 1}, 4)
