"""Messages of a load that a reload replaced, met after it, over the real scripts: the consumer's plan
(a message applied before a reset whose ack was lost comes back), the checker's verdict on one still
open, and its pre-deduct asked again. Books are read back with raw Redis commands."""

from __future__ import annotations

import json

import pytest

from flashsale import constants as c
from flashsale.adapters.redis.keys import SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.errors import LoadUnderWay
from flashsale.models import DeductionMessage, Delivery, Purchase
from flashsale.pipeline import accepted
from flashsale.pipeline.accepted import Decoded, Plan
from flashsale.records import Prededuct

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


def test_a_message_of_a_partition_a_reload_dropped_is_skipped_not_a_conflict(redis_stock: RedisStock, sku: str) -> None:
    layout = redis_stock.load_partitioned(sku, 9, partitions=3, refill=3, threshold=0)
    part = layout.parts[2]
    assert redis_stock.prededuct(part, "m-1", [Purchase("t1", "u1", 1)], layout.epoch)[0].code is Prededuct.ACCEPTED
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1", part=part)
    assert [i.deduction.token for i in delivered(redis_stock, message).apply] == ["t1"]

    with redis_stock.frozen(sku):
        assert part not in redis_stock.load_partitioned(sku, 9, partitions=2, refill=3, threshold=0, reset=True).parts

    again = delivered(redis_stock, message)
    assert (again.apply, again.conflicts, again.skipped) == ([], [], 1)
    keys = SkuKeys.of(part)
    assert redis_stock.client.exists(keys.stock, keys.meta, keys.log) == 0
    assert record(redis_stock, part, "m-1")["state"] == c.TX_STALE
    assert 0 < redis_stock.client.pttl(keys.tx) <= DAY_MS  # kept a day, not for ever


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


def test_the_consumers_read_refuses_a_batch_while_a_load_holds_its_sku_frozen(
    redis_stock: RedisStock, sku: str
) -> None:
    """`stock set` writes MySQL before Redis: between the two, a message of the old sale applied to MySQL
    would land on the new load. Frozen, the batch waits; after the load, the message is retired."""
    redis_stock.load(sku, 5)
    assert redis_stock.prededuct(sku, "m-1", [Purchase("t1", "u1", 1)], 0)[0].code is Prededuct.ACCEPTED
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1")
    with redis_stock.frozen(sku):
        with pytest.raises(LoadUnderWay, match=sku):
            delivered(redis_stock, message)
    assert [i.deduction.token for i in delivered(redis_stock, message).apply] == ["t1"]  # no load came: applied
    # A freeze whose loader died and that ran out holds nothing back.
    redis_stock.client.hset(SkuKeys.of(sku).meta, mapping={"frozen_until": 1, "frozen_by": "gone"})
    assert [i.deduction.token for i in delivered(redis_stock, message).apply] == ["t1"]
    with redis_stock.frozen(sku):
        with pytest.raises(LoadUnderWay):
            delivered(redis_stock, message)
        redis_stock.load(sku, 5, reset=True)
        again = delivered(redis_stock, message)  # loaded: no longer frozen, and the message retired
    assert (again.apply, again.conflicts, again.skipped) == ([], [], 1)


def test_the_consumers_read_refuses_a_batch_naming_a_frozen_partition(redis_stock: RedisStock, sku: str) -> None:
    layout = redis_stock.load_partitioned(sku, 9, partitions=2, refill=3, threshold=0)
    part = layout.parts[1]
    assert redis_stock.prededuct(part, "m-1", [Purchase("t1", "u1", 1)], layout.epoch)[0].code is Prededuct.ACCEPTED
    message = DeductionMessage(sku, (Purchase("t1", "u1", 1),), "m-1", part=part)
    with redis_stock.frozen(sku):
        with pytest.raises(LoadUnderWay, match=part):
            delivered(redis_stock, message)
