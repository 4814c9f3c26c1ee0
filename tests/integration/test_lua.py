"""The Lua scripts, run directly against the stack's Redis."""

from __future__ import annotations

import json
import threading

import pytest

from flashsale import constants as c
from flashsale.adapters.redis_stock import RedisStock, SkuKeys
from flashsale.errors import StockError
from flashsale.records import Prededuct, StockReturn


def deduct(stock: RedisStock, sku: str, token: str, qty: int | str = 1, user: str = "u1"):
    keys = SkuKeys.of(sku)
    # Straight to the script, so that arguments the Python API would refuse reach it too.
    code, remaining, detail = stock._scripts["prededuct"](
        keys=keys.all(), args=[token, user, str(qty), "m-" + token, sku]
    )
    return Prededuct(code), remaining, detail


def test_prededuct_sells_exactly_the_stock_then_reports_sold_out(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 3)
    results = [redis_stock.prededuct(sku, f"t{i}", f"u{i}", 1, f"m{i}") for i in range(5)]
    assert [r.code for r in results] == [Prededuct.ACCEPTED] * 3 + [Prededuct.SOLD_OUT] * 2
    assert [r.remaining for r in results] == [2, 1, 0, 0, 0]
    view = redis_stock.view(sku)
    assert (view.stock, view.deducted_qty, view.deducted_count, view.sold_out) == (0, 3, 3, True)


def test_prededuct_refuses_more_than_the_stock_without_writing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 2)
    result = redis_stock.prededuct(sku, "t1", "u1", 3, "m1")
    assert (result.code, result.remaining) == (Prededuct.INSUFFICIENT, 2)
    assert redis_stock.log_entry(sku, "t1") is None
    assert redis_stock.view(sku).stock == 2


@pytest.mark.parametrize("qty", ["0", "-1", "1.5", "abc", "", "1e3", "01", "1234567890"])
def test_prededuct_rejects_a_quantity_that_is_not_a_positive_integer(
    redis_stock: RedisStock, sku: str, qty: str
) -> None:
    redis_stock.load(sku, 10)
    code, _, _ = deduct(redis_stock, sku, "t1", qty)
    assert code is Prededuct.INVALID_QTY
    assert redis_stock.view(sku).stock == 10
    assert redis_stock.log_entry(sku, "t1") is None


def test_a_repeated_token_returns_the_original_outcome_and_deducts_nothing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 10)
    first = redis_stock.prededuct(sku, "t1", "u1", 2, "m1")
    again = redis_stock.prededuct(sku, "t1", "u1", 2, "m2")
    assert first.code is Prededuct.ACCEPTED and again.code is Prededuct.DUPLICATE
    assert again.entry is not None and again.entry.message_id == "m1" and again.entry.qty == 2
    assert again.remaining == 8
    assert redis_stock.view(sku).deducted_count == 1


def test_per_user_limit_counts_every_purchase_of_the_user(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 10, per_user_limit=3)
    assert redis_stock.prededuct(sku, "t1", "alice", 2, "m").code is Prededuct.ACCEPTED
    over = redis_stock.prededuct(sku, "t2", "alice", 2, "m")
    assert (over.code, over.bought) == (Prededuct.LIMIT_EXCEEDED, 2)
    assert redis_stock.prededuct(sku, "t3", "alice", 1, "m").code is Prededuct.ACCEPTED
    assert redis_stock.prededuct(sku, "t4", "bob", 3, "m").code is Prededuct.ACCEPTED
    assert redis_stock.view(sku).stock == 4


def test_unknown_sku_is_reported_and_nothing_is_created(redis_stock: RedisStock, sku: str) -> None:
    result = redis_stock.prededuct(sku, "t1", "u1", 1, "m1")
    assert result.code is Prededuct.UNKNOWN_SKU
    assert redis_stock.client.exists(*SkuKeys.of(sku).all()) == 0


def test_the_log_entry_is_json_with_ids_as_strings(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 5)
    redis_stock.prededuct(sku, "123456789012345678", "98765432109876543", 2, "0102FC00")
    raw = json.loads(redis_stock.client.hget(SkuKeys.of(sku).log, "123456789012345678"))
    assert raw["user"] == "98765432109876543" and raw["sku"] == sku and raw["msg"] == "0102FC00"
    assert (raw["state"], raw["qty"], raw["from"], raw["to"]) == (c.STATE_DEDUCTED, 2, 5, 3)
    assert raw["ts"] > 1_700_000_000_000


def test_fence_blocks_a_late_prededuct_of_the_same_token(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 5)
    assert redis_stock.fence(sku, "t1", "u1", 1).state == c.STATE_FENCED
    late = redis_stock.prededuct(sku, "t1", "u1", 1, "m1")
    assert late.code is Prededuct.FENCED
    view = redis_stock.view(sku)
    assert (view.stock, view.deducted_count, view.fenced_count) == (5, 0, 1)


def test_fence_after_a_deduction_reports_the_deduction_and_writes_nothing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 5)
    redis_stock.prededuct(sku, "t1", "u1", 1, "m1")
    assert redis_stock.fence(sku, "t1", "u1", 1).state == c.STATE_DEDUCTED
    assert redis_stock.view(sku).fenced_count == 0


def test_stock_return_gives_back_once(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 1, per_user_limit=1)
    redis_stock.prededuct(sku, "t1", "u1", 1, "m1")
    assert redis_stock.view(sku).sold_out
    assert redis_stock.return_stock(sku, "t1") == (StockReturn.RETURNED, 1)
    assert redis_stock.return_stock(sku, "t1") == (StockReturn.ALREADY_RETURNED, 1)
    view = redis_stock.view(sku)
    assert (view.stock, view.returned_qty, view.returned_count, view.sold_out) == (1, 1, 1, False)
    # the user's limit is freed with the stock
    assert redis_stock.prededuct(sku, "t2", "u1", 1, "m2").code is Prededuct.ACCEPTED


def test_stock_return_of_a_token_never_deducted_changes_nothing(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 3)
    assert redis_stock.return_stock(sku, "nope")[0] is StockReturn.NOT_DEDUCTED
    redis_stock.fence(sku, "fenced", "u1", 1)
    assert redis_stock.return_stock(sku, "fenced")[0] is StockReturn.NOT_DEDUCTED
    assert redis_stock.view(sku).stock == 3


def test_load_refuses_a_sku_with_history_unless_reset(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 3)
    redis_stock.prededuct(sku, "t1", "u1", 1, "m1")
    with pytest.raises(StockError, match="1 deduction"):
        redis_stock.load(sku, 10)
    assert redis_stock.view(sku).stock == 2
    redis_stock.load(sku, 10, reset=True)
    assert redis_stock.view(sku).stock == 10 and redis_stock.log_entry(sku, "t1") is None


def test_scripts_are_reloaded_after_the_server_forgets_them(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 2)
    redis_stock.client.script_flush()
    assert redis_stock.prededuct(sku, "t1", "u1", 1, "m1").code is Prededuct.ACCEPTED


def test_every_key_of_a_sku_hashes_to_one_cluster_slot(redis_stock: RedisStock) -> None:
    from redis.crc import key_slot

    for sku in ("a", "sku-1", "X.Y:Z@1"):
        slots = {key_slot(k.encode()) for k in SkuKeys.of(sku).all()}
        assert len(slots) == 1


def test_concurrent_prededucts_never_oversell(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 100)
    results: list[Prededuct] = []
    lock = threading.Lock()

    def buyer(n: int) -> None:
        for i in range(25):
            r = redis_stock.prededuct(sku, f"t{n}-{i}", f"u{n}", 1, "m")
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
