"""An order awaiting payment, decided once in Redis (decide.lua): pay, cancel or expire, whichever comes first.

Read back with plain Redis commands where the answer alone could be wrong.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis

from flashsale.adapters.redis import lua
from flashsale.adapters.redis.keys import SkuKeys, holds_key
from flashsale.adapters.redis.stock import RedisStock
from flashsale.config import Settings
from flashsale.models import Purchase
from flashsale.records import Decision, Layout, Prededuct

MINUTE_MS = 60_000


def buy(stock: RedisStock, sku: str, token: str, user: str = "u1", qty: int = 1, epoch: int = 0) -> Prededuct:
    """A pre-deduct on the SKU's keys, or on a partition's (placed by the layout of `epoch`)."""
    return stock.prededuct(sku, "m-" + token, [Purchase(token, user, qty)], epoch)[0].code


def decide(stock: RedisStock, sku: str, token: str, action: str, *, user: str = "", decision: str = "") -> Decision:
    code, _ = stock.decide(
        sku, token, action, user=user, decision_id=decision or uuid.uuid4().hex, message_id=uuid.uuid4().hex
    )
    return code


@pytest.fixture
def raw(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def _entry(raw: redis.Redis, sku: str, token: str) -> dict[str, object]:
    return dict(json.loads(raw.hget(SkuKeys.of(sku).log, token) or "{}"))


def _stock(raw: redis.Redis, sku: str) -> int:
    return int(raw.get(SkuKeys.of(sku).stock) or -1)


def test_an_accepted_purchase_awaits_payment_until_its_deadline_on_redis_clock(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 5, pay_within_ms=MINUTE_MS)
    redis_time_ms = int(raw.time()[0]) * 1000
    assert buy(redis_stock, sku, "t1") is Prededuct.ACCEPTED
    entry = _entry(raw, sku, "t1")
    assert entry["order"] == "awaiting"
    assert entry["due"] == int(str(entry["ts"])) + MINUTE_MS
    assert abs(int(str(entry["ts"])) - redis_time_ms) < 5_000
    assert redis_stock.log_entry(sku, "t1").due_ms == entry["due"]  # type: ignore[union-attr]


def test_a_sku_without_a_deadline_has_final_orders_and_refuses_every_decision(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 5)
    buy(redis_stock, sku, "t1")
    assert "order" not in _entry(raw, sku, "t1")
    assert [decide(redis_stock, sku, "t1", a, user="u1") for a in ("pay", "cancel", "expire")] == [Decision.FINAL] * 3
    assert _stock(raw, sku) == 4


def test_a_paid_order_stays_paid_and_every_later_decision_says_so(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 5, pay_within_ms=MINUTE_MS)
    buy(redis_stock, sku, "t1")
    assert decide(redis_stock, sku, "t1", "pay", decision="pay-1") is Decision.PAID
    assert decide(redis_stock, sku, "t1", "pay", decision="pay-1") is Decision.PAID  # the same payment again
    assert decide(redis_stock, sku, "t1", "pay", decision="pay-2") is Decision.ALREADY_PAID
    assert decide(redis_stock, sku, "t1", "cancel", user="u1") is Decision.ALREADY_PAID
    assert decide(redis_stock, sku, "t1", "expire") is Decision.ALREADY_PAID
    assert (_entry(raw, sku, "t1")["order"], _stock(raw, sku)) == ("paid", 4)


def test_a_cancel_by_the_buyer_puts_the_units_back_on_sale_once(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 3, per_user_limit=2, pay_within_ms=MINUTE_MS)
    buy(redis_stock, sku, "t1", qty=2)
    assert decide(redis_stock, sku, "t1", "cancel", user="someone-else") is Decision.NOT_YOURS
    assert (_entry(raw, sku, "t1")["order"], _stock(raw, sku)) == ("awaiting", 1)
    assert decide(redis_stock, sku, "t1", "cancel", user="u1", decision="c-1") is Decision.CANCELLED
    assert decide(redis_stock, sku, "t1", "cancel", user="u1", decision="c-1") is Decision.CANCELLED
    assert decide(redis_stock, sku, "t1", "cancel", user="u1", decision="c-2") is Decision.ALREADY_CANCELLED
    assert decide(redis_stock, sku, "t1", "pay") is Decision.ALREADY_CANCELLED
    assert decide(redis_stock, sku, "t1", "expire") is Decision.ALREADY_CANCELLED
    meta = raw.hgetall(SkuKeys.of(sku).meta)
    assert (_stock(raw, sku), meta["returned_qty"], meta["returned_count"]) == (3, "2", "1")
    assert raw.hget(SkuKeys.of(sku).users, "u1") == "0"  # the limit counts what the buyer holds
    assert _entry(raw, sku, "t1")["state"] == "returned"


def test_expiry_before_the_deadline_changes_nothing_and_after_it_returns_the_units(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 2, pay_within_ms=MINUTE_MS)
    buy(redis_stock, sku, "early")
    assert decide(redis_stock, sku, "early", "expire") is Decision.NOT_DUE
    assert (_entry(raw, sku, "early")["order"], _stock(raw, sku)) == ("awaiting", 1)

    redis_stock.load(sku, 2, reset=True, pay_within_ms=1)
    buy(redis_stock, sku, "late")
    time.sleep(0.01)
    assert decide(redis_stock, sku, "late", "expire") is Decision.EXPIRED
    assert decide(redis_stock, sku, "late", "expire") is Decision.ALREADY_EXPIRED
    assert decide(redis_stock, sku, "late", "pay") is Decision.ALREADY_EXPIRED
    assert (_entry(raw, sku, "late")["order"], _stock(raw, sku)) == ("expired", 2)


def test_a_payment_after_the_deadline_never_lands_it_expires_the_order_then_and_there(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 1, pay_within_ms=1)
    buy(redis_stock, sku, "t1")
    time.sleep(0.01)
    assert decide(redis_stock, sku, "t1", "pay", decision="late-payment") is Decision.ALREADY_EXPIRED
    assert decide(redis_stock, sku, "t1", "pay", decision="late-payment") is Decision.ALREADY_EXPIRED
    assert (_entry(raw, sku, "t1")["order"], _stock(raw, sku)) == ("expired", 1)
    assert decide(redis_stock, sku, "t1", "expire") is Decision.ALREADY_EXPIRED
    assert _stock(raw, sku) == 1  # returned once


def test_a_unit_given_back_by_a_sold_out_sku_goes_to_exactly_one_new_buyer(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 1, pay_within_ms=MINUTE_MS)
    buy(redis_stock, sku, "first")
    assert buy(redis_stock, sku, "too-late", user="u2") is Prededuct.SOLD_OUT
    assert redis_stock.is_sold_out(sku)
    assert decide(redis_stock, sku, "first", "cancel", user="u1") is Decision.CANCELLED
    assert not redis_stock.is_sold_out(sku)
    codes = [buy(redis_stock, sku, f"again-{i}", user=f"v{i}") for i in range(5)]
    assert codes.count(Prededuct.ACCEPTED) == 1
    assert _stock(raw, sku) == 0


def test_a_decision_for_a_token_never_accepted_finds_no_order(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 1, pay_within_ms=MINUTE_MS)
    assert decide(redis_stock, sku, "nobody", "pay") is Decision.NO_ORDER
    assert decide(redis_stock, sku, "nobody", "shred") is Decision.INVALID_ACTION


def test_a_decision_message_run_again_gets_its_first_answer_and_still_writes(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 2, pay_within_ms=MINUTE_MS)
    buy(redis_stock, sku, "t1")
    first = redis_stock.decide(sku, "t1", "cancel", user="u1", decision_id="c", message_id="m-decide")
    reruns = int(raw.hget(SkuKeys.of(sku).meta, "reruns") or 0)
    again = redis_stock.decide(sku, "t1", "pay", decision_id="p", message_id="m-decide")
    assert first[0] is again[0] is Decision.CANCELLED
    assert int(raw.hget(SkuKeys.of(sku).meta, "reruns") or 0) == reruns + 1  # a WAIT after it proves something
    assert _stock(raw, sku) == 2


@pytest.mark.parametrize("partitioned", [False, True], ids=["one-key", "partition"])
@pytest.mark.parametrize("rival", ["cancel", "expire"])
def test_a_payment_racing_a_rival_decision_on_the_same_token_loses_or_wins_whole_every_time(
    redis_stock: RedisStock, settings: Settings, raw: redis.Redis, sku: str, rival: str, partitioned: bool
) -> None:
    rounds = 40
    # Expiry races need orders due as the race starts: a deadline of 0 ms is due at once.
    pay_within_ms = 1 if rival == "expire" else MINUTE_MS
    shard, epoch = sku, 0
    if partitioned:  # every order on a partition that is not the anchor, which holds `rounds` units
        layout = redis_stock.load_partitioned(
            sku, 3 * rounds, partitions=3, refill=rounds, threshold=0, pay_within_ms=pay_within_ms
        )
        shard, epoch = layout.parts[1], layout.epoch
    else:
        redis_stock.load(sku, rounds, pay_within_ms=pay_within_ms)
    clients = [RedisStock(settings.redis_url) for _ in range(2)]
    try:
        outcomes = []
        for i in range(rounds):
            token = f"r{i}"
            assert buy(redis_stock, shard, token, epoch=epoch) is Prededuct.ACCEPTED
            if rival == "expire":
                time.sleep(0.005)  # past its 1 ms deadline on Redis's clock before the race starts
            start = threading.Barrier(2)
            answers: dict[str, Decision] = {}

            def run(
                client: RedisStock,
                action: str,
                token: str = token,
                start: threading.Barrier = start,
                answers: dict[str, Decision] = answers,
            ) -> None:
                start.wait()
                answers[action] = decide(client, shard, token, action, user="u1")

            threads = [
                threading.Thread(target=run, args=(clients[0], "pay")),
                threading.Thread(target=run, args=(clients[1], rival)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            outcomes.append((answers["pay"], answers[rival], _entry(raw, shard, token)["order"]))
    finally:
        for client in clients:
            client.close()
    ended = {"cancel": "cancelled", "expire": "expired"}[rival]
    for pay, other, order in outcomes:
        won = [a for a in (pay, other) if a in (Decision.PAID, Decision.CANCELLED, Decision.EXPIRED)]
        if rival == "expire":
            # Every order is past its deadline: the payment never lands, whoever runs first.
            assert order == "expired" and Decision.PAID not in (pay, other)
            assert len(won) <= 1 and pay is Decision.ALREADY_EXPIRED
        else:
            assert len(won) == 1 and order in ("paid", ended)
            assert (pay is Decision.PAID) == (order == "paid") == (other is Decision.ALREADY_PAID)
    returned = sum(1 for *_, order in outcomes if order != "paid")
    assert _stock(raw, shard) == returned  # each unit given back once, none of a paid order


def test_a_decision_whose_message_the_checker_fenced_decides_nothing(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    redis_stock.load(sku, 1, pay_within_ms=MINUTE_MS)
    buy(redis_stock, sku, "t1")
    raw.hset(SkuKeys.of(sku).tx, "m-late", json.dumps({"state": "fenced", "ts": 1}))
    code, _ = redis_stock.decide(sku, "t1", "cancel", user="u1", decision_id="c", message_id="m-late")
    assert code is Decision.FENCED
    assert (_entry(raw, sku, "t1")["order"], _stock(raw, sku)) == ("awaiting", 0)


# --- partitioned SKUs --------------------------------------------------------------------------------
def _holds(raw: redis.Redis, layout: Layout, user: str) -> int:
    return int(raw.hget(holds_key(layout, user), f"b:{user}") or 0)


def test_every_partition_of_a_sku_loaded_with_a_deadline_sells_orders_that_await_payment(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    layout = redis_stock.load_partitioned(sku, 9, partitions=3, refill=2, threshold=0, pay_within_ms=MINUTE_MS)
    for n, part in enumerate(layout.parts):
        assert buy(redis_stock, part, f"t{n}", epoch=layout.epoch) is Prededuct.ACCEPTED
        entry = _entry(raw, part, f"t{n}")
        assert (entry["order"], entry["sku"], entry["part"]) == ("awaiting", sku, part)
        assert entry["due"] == int(str(entry["ts"])) + MINUTE_MS


def test_a_cancel_on_a_partition_gives_the_units_back_to_that_partition_and_keeps_the_buyers_hold(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    layout = redis_stock.load_partitioned(
        sku, 9, partitions=3, refill=3, threshold=0, per_user_limit=2, pay_within_ms=MINUTE_MS
    )
    part = layout.parts[2]
    # The limit of a partitioned SKU is a hold on the buyer's count, taken before the pre-deduct.
    assert raw.eval(lua.source("user_hold"), 1, holds_key(layout, "u1"), 2, "t1", "u1", 2, "a1")[0] == 1
    assert buy(redis_stock, part, "t1", qty=2, epoch=layout.epoch) is Prededuct.ACCEPTED
    assert decide(redis_stock, part, "t1", "cancel", user="u1", decision="c-1") is Decision.CANCELLED
    meta = raw.hgetall(SkuKeys.of(part).meta)
    assert (_stock(raw, part), meta["returned_qty"], meta["returned_count"]) == (3, "2", "1")
    assert [_stock(raw, p) for p in layout.parts[:2]] == [3, 3] and _entry(raw, part, "t1")["state"] == "returned"
    # The hold stays: across partitions the count may run ahead of what the buyer holds, never behind.
    assert _holds(raw, layout, "u1") == 2
    assert decide(redis_stock, part, "t1", "cancel", user="u1", decision="c-1") is Decision.CANCELLED
    assert _stock(raw, part) == 3  # given back once


def test_units_given_back_to_a_closed_partition_are_not_sold_there_and_a_drain_returns_them_to_the_pool(
    redis_stock: RedisStock, raw: redis.Redis, sku: str
) -> None:
    layout = redis_stock.load_partitioned(sku, 2, partitions=2, refill=1, threshold=0, pay_within_ms=MINUTE_MS)
    part, epoch = layout.parts[1], str(layout.epoch)
    keys = SkuKeys.of(part)
    assert buy(redis_stock, part, "t1", epoch=layout.epoch) is Prededuct.ACCEPTED
    assert raw.eval(lua.source("close"), 2, keys.stock, keys.meta, epoch) == 1  # empty, the pool too
    assert decide(redis_stock, part, "t1", "expire") is Decision.NOT_DUE
    assert decide(redis_stock, part, "t1", "cancel", user="u1") is Decision.CANCELLED
    # The unit is back in the partition, which stays closed: a new token is sent on, a bought one hears
    # its first answer.
    assert (_stock(raw, part), raw.hget(keys.meta, "closed")) == (1, "1")
    assert buy(redis_stock, part, "t2", user="u2", epoch=layout.epoch) is Prededuct.CLOSED
    retry = redis_stock.prededuct(part, "m-retry", [Purchase("t1", "u1", 1)], layout.epoch)[0]
    assert retry.code is Prededuct.DUPLICATE
    # The scheduler's drain of a closed partition that holds units (pipeline/partitions.py, _top_up).
    base = SkuKeys.of(sku)
    raw.eval(lua.source("pool_expect"), 3, base.transfers, base.meta, base.done, "d1", part, 1, epoch)
    assert raw.eval(lua.source("drain"), 3, keys.stock, keys.meta, keys.refills, "d1", 1, epoch) == 1
    raw.eval(lua.source("pool_receive"), 4, base.pool, base.transfers, base.done, base.meta, "d1", 1, epoch)
    assert (_stock(raw, part), int(raw.get(base.pool) or -1)) == (0, 1)
    assert decide(redis_stock, part, "t1", "expire") is Decision.ALREADY_CANCELLED and _stock(raw, part) == 0
