"""A restock during a sale, in Redis (add_stock.lua): units added once per request id, sold like the rest.

Read back with plain Redis commands where the answer alone could be wrong.
"""

from __future__ import annotations

import json

import pytest
import redis

from flashsale.adapters.redis.keys import SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.config import Settings
from flashsale.models import Purchase
from flashsale.ops.setup import set_stock
from flashsale.records import Prededuct, Restock


@pytest.fixture
def raw(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def _meta(raw: redis.Redis, sku: str) -> dict[str, str]:
    return dict(raw.hgetall(SkuKeys.of(sku).meta))


def test_a_restock_adds_its_units_once_per_request_id_and_a_sold_out_sku_sells_again(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 1)
    assert redis_stock.prededuct(sku, "m-buy", [Purchase("t0", "u0", 1)])[0].code is Prededuct.ACCEPTED
    assert redis_stock.prededuct(sku, "m-late", [Purchase("t1", "u1", 1)])[0].code is Prededuct.SOLD_OUT
    assert _meta(raw, sku)["sold_out"] == "1"

    first = redis_stock.add_stock(sku, 3, request_id="r1", message_id="m-add")
    reruns = int(_meta(raw, sku).get("reruns", 0))
    again = redis_stock.add_stock(sku, 3, request_id="r1", message_id="m-retry")  # a retry, with a new message
    other = redis_stock.add_stock(sku, 5, request_id="r1", message_id="m-other")  # the id, another quantity
    rerun = redis_stock.add_stock(sku, 3, request_id="r1", message_id="m-add")  # the same message run again
    assert (first.code, first.stock, first.qty, first.message_id) == (Restock.ADDED, 3, 3, "m-add")
    assert (again.code, again.stock, again.qty, again.message_id) == (Restock.ALREADY_ADDED, 3, 3, "m-add")
    assert (other.code, other.stock, other.qty) == (Restock.OTHER_QTY, 3, 3)
    assert (rerun.code, rerun.stock) == (Restock.ADDED, 3)
    # Every answer read from a record writes (a counter): a WAIT after it proves a replica holds the record.
    assert int(_meta(raw, sku)["reruns"]) == reruns + 3
    meta = _meta(raw, sku)
    assert (meta["added_qty"], meta["added_count"], meta["sold_out"]) == ("3", "1", "0")
    assert int(raw.get(SkuKeys.of(sku).stock) or -1) == 3
    assert json.loads(raw.hget(SkuKeys.of(sku).added, "r1") or "{}")["qty"] == 3
    # The retry's message decided nothing: no record, so the checker rolls it back.
    assert raw.hget(SkuKeys.of(sku).tx, "m-retry") is None
    assert json.loads(raw.hget(SkuKeys.of(sku).tx, "m-add") or "{}")["code"] == Restock.ADDED

    bought = redis_stock.prededuct(sku, "m-more", [Purchase(f"n{i}", f"v{i}", 1) for i in range(4)])
    assert [r.code for r in bought] == [Prededuct.ACCEPTED] * 3 + [Prededuct.SOLD_OUT]


def test_a_restock_whose_message_the_checker_fenced_adds_nothing(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 2)
    assert redis_stock.check(sku, "m-slow", ["r1"], grace_ms=0).state == "fenced"
    late = redis_stock.add_stock(sku, 4, request_id="r1", message_id="m-slow")
    assert (late.code, late.qty) == (Restock.FENCED, 0)
    assert int(raw.get(SkuKeys.of(sku).stock) or -1) == 2 and raw.hlen(SkuKeys.of(sku).added) == 0
    # The request was never added: asked again (a new message), it is.
    assert redis_stock.add_stock(sku, 4, request_id="r1", message_id="m-new").code is Restock.ADDED
    assert int(raw.get(SkuKeys.of(sku).stock) or -1) == 6


def test_a_restock_is_refused_for_an_unknown_or_a_frozen_sku_and_writes_nothing(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    assert redis_stock.add_stock(sku, 1, request_id="r1", message_id="m1").code is Restock.UNKNOWN_SKU
    assert raw.exists(SkuKeys.of(sku).meta, SkuKeys.of(sku).added, SkuKeys.of(sku).tx) == 0
    redis_stock.load(sku, 2)
    with redis_stock.frozen(sku):
        assert redis_stock.add_stock(sku, 1, request_id="r1", message_id="m2").code is Restock.FROZEN
    assert int(raw.get(SkuKeys.of(sku).stock) or -1) == 2 and raw.hget(SkuKeys.of(sku).tx, "m2") is None
    assert redis_stock.add_stock(sku, 1, request_id="r1", message_id="m3").code is Restock.ADDED
    with redis_stock.frozen(sku):  # what a request did stands, a reload under way or not
        assert redis_stock.add_stock(sku, 1, request_id="r1", message_id="m4").code is Restock.ALREADY_ADDED


def test_a_restock_of_a_partitioned_sku_goes_to_its_pool_once_and_waits_for_a_reload(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    layout = redis_stock.load_partitioned(sku, 10, partitions=2, refill=2, threshold=1)
    pool = SkuKeys.of(sku).pool
    assert int(raw.get(pool) or -1) == 6
    added = redis_stock.add_stock(sku, 5, request_id="r1", message_id="m1")
    retried = redis_stock.add_stock(sku, 5, request_id="r1", message_id="m2")
    assert (added.code, added.stock, retried.code, retried.qty) == (Restock.ADDED, 11, Restock.ALREADY_ADDED, 5)
    assert int(raw.get(pool) or -1) == 11 and _meta(raw, sku)["added_qty"] == "5"
    assert all(raw.get(SkuKeys.of(p).stock) == "2" for p in layout.parts)  # the partitions untouched
    with redis_stock.frozen(sku):
        assert redis_stock.add_stock(sku, 3, request_id="r2", message_id="m3").code is Restock.FROZEN
    assert redis_stock.add_stock(sku, 3, request_id="r2", message_id="m4").code is Restock.ADDED
    assert redis_stock.view(sku).stock == 18 and redis_stock.view(sku).added_qty == 8


def test_a_reload_forgets_the_restocks_of_the_load_before(redis_stock: RedisStock, raw: redis.Redis, sku: str) -> None:
    redis_stock.load(sku, 2)
    assert redis_stock.add_stock(sku, 3, request_id="r1", message_id="m1").code is Restock.ADDED
    redis_stock.load(sku, 7)
    assert raw.hlen(SkuKeys.of(sku).added) == 0 and "added_qty" not in _meta(raw, sku)
    assert redis_stock.add_stock(sku, 3, request_id="r1", message_id="m2").code is Restock.ADDED
    assert int(raw.get(SkuKeys.of(sku).stock) or -1) == 10


def test_a_restock_while_a_reload_turns_partitions_into_one_key_hears_frozen_not_unknown(
    settings: Settings, redis_stock: RedisStock, raw: redis.Redis, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload drops the partitions and the pool before it writes the one key: for a moment neither
    exists. The SKU is frozen by the load all along: a restock then is asked again after it, not told that
    the SKU is not loaded (and sent to `stock set`)."""
    set_stock(settings, sku, 30, partitions=3)
    seen: list[tuple[Restock, bool]] = []
    load_one = RedisStock._load_one

    def restock_first(self: RedisStock, shard: str, args: list[str]) -> None:
        if shard == sku and not seen:  # the one-key load, the partitions and pool dropped already
            answer = redis_stock.add_stock(sku, 4, request_id="r1", message_id="m-r1")
            seen.append((answer.code, raw.hget(SkuKeys.of(sku).meta, "frozen_until") is not None))
        load_one(self, shard, args)

    monkeypatch.setattr(RedisStock, "_load_one", restock_first)
    set_stock(settings, sku, 10)
    assert seen == [(Restock.FROZEN, True)]
    assert raw.get(SkuKeys.of(sku).stock) == "10" and not raw.hexists(SkuKeys.of(sku).added, "r1")
