"""A sold-out SKU sealed (seal.lua): producers answer `sold_out` from memory while Redis sells nothing.

Read back with plain Redis commands where the answer alone could be wrong.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from flashsale.adapters.redis.keys import SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.config import Settings
from flashsale.models import Purchase, PurchaseRequest, PurchaseStatus
from flashsale.pipeline.producer import PurchaseService
from flashsale.records import Adopt, Decision, DeductionRow, Prededuct, Seal
from tests.unit.fakes import FakeBus

#: seal.lua's margin past the caller's trust.
MARGIN_S = 1.0


@pytest.fixture
def raw(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url, decode_responses=True)


def _seal(settings: Settings, sku: str, trust_ms: int, known: str = "") -> Seal | None:
    async def run() -> Seal | None:
        stock = AsyncRedisStock(settings.redis_url)
        try:
            return await stock.seal(sku, trust_ms, known)
        finally:
            await stock.close()

    return asyncio.run(run())


def _sell_out(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 1, pay_within_ms=3_600_000)
    assert redis_stock.prededuct(sku, "m-0", [Purchase("t0", "u0", 1)])[0].code is Prededuct.ACCEPTED


def _sealed_out(redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str, trust_ms: int) -> str:
    """The SKU sold out and sealed: when its seal ends (ms, Redis's clock)."""
    _sell_out(redis_stock, sku)
    assert _seal(settings, sku, trust_ms) is not None
    return raw.hget(SkuKeys.of(sku).meta, "sealed_until") or ""


def test_only_a_sold_out_sku_is_sealed_and_a_copy_of_its_log_is_sent_once_a_run(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    redis_stock.load(sku, 1)
    assert _seal(settings, sku, 300) is None  # units on sale
    assert "sealed_until" not in raw.hgetall(SkuKeys.of(sku).meta)
    assert redis_stock.prededuct(sku, "m-0", [Purchase("t0", "u0", 1)])[0].code is Prededuct.ACCEPTED
    first = _seal(settings, sku, 300)
    assert first is not None and first.tokens == frozenset({"t0"})
    renewed = _seal(settings, sku, 300, first.since)
    assert renewed == Seal(first.since, None)  # the same run: the caller's copy still holds every token
    until = int(raw.hget(SkuKeys.of(sku).meta, "sealed_until") or 0)
    seconds, micros = raw.time()
    assert 0 < until - (seconds * 1000 + micros // 1000) <= 300 + MARGIN_S * 1000
    # Another caller with no copy gets one.
    assert _seal(settings, sku, 300) == Seal(first.since, frozenset({"t0"}))
    time.sleep(0.3 + MARGIN_S + 0.05)  # the seal ran out: a new run, and the log again
    again = _seal(settings, sku, 300, first.since)
    assert again is not None and again.since != first.since and again.tokens == frozenset({"t0"})
    assert _seal(settings, "never-loaded", 300) is None


def test_units_back_during_a_seal_stay_off_sale_until_it_ends(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    _sell_out(redis_stock, sku)
    assert _seal(settings, sku, 200) is not None
    decision, _ = redis_stock.decide(sku, "t0", "cancel", decision_id="d0", message_id="m-c", user="u0")
    assert decision is Decision.CANCELLED
    assert int(raw.get(SkuKeys.of(sku).stock) or -1) == 1  # the unit is back in the stock
    assert _seal(settings, sku, 200) is None  # and renews no seal: it ends by itself

    late = redis_stock.prededuct(sku, "m-1", [Purchase("t1", "u1", 1), Purchase("t0", "u0", 1)])
    assert [(r.code, r.remaining) for r in late] == [(Prededuct.SEALED, 0), (Prededuct.DUPLICATE, 0)]
    assert raw.hget(SkuKeys.of(sku).log, "t1") is None and int(raw.get(SkuKeys.of(sku).stock) or -1) == 1

    time.sleep(0.2 + MARGIN_S + 0.05)
    after = redis_stock.prededuct(sku, "m-2", [Purchase("t1", "u1", 1)])
    assert [(r.code, r.remaining) for r in after] == [(Prededuct.ACCEPTED, 0)]
    assert int(raw.get(SkuKeys.of(sku).stock) or -1) == 0


def test_a_reload_under_its_freeze_keeps_the_seal_for_the_new_stock_and_its_partitions(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    until = _sealed_out(redis_stock, raw, settings, sku, 200)
    with redis_stock.frozen(sku):
        assert _seal(settings, sku, 60_000) is None  # no seal begins or grows while the SKU is loaded
        redis_stock.load(sku, 5, reset=True)
    assert raw.hget(SkuKeys.of(sku).meta, "sealed_until") == until
    assert redis_stock.prededuct(sku, "m-1", [Purchase("t1", "u1", 1)])[0].code is Prededuct.SEALED

    _seal(settings, sku, 0)  # (the stock is on sale: nothing to seal, nothing changes)
    with redis_stock.frozen(sku):
        layout = redis_stock.load_partitioned(sku, 4, partitions=2, refill=2, threshold=0, reset=True)
    for part in layout.parts:
        assert raw.hget(SkuKeys.of(part).meta, "sealed_until") == until
        assert redis_stock.prededuct(part, "m-p", [Purchase("t2", "u2", 1)], layout.epoch)[0].code is Prededuct.SEALED
    time.sleep(0.2 + MARGIN_S + 0.05)
    part = layout.parts[0]
    assert redis_stock.prededuct(part, "m-q", [Purchase("t2", "u2", 1)], layout.epoch)[0].code is Prededuct.ACCEPTED


def test_a_producer_answers_a_sealed_sku_from_memory_and_a_token_sold_before_its_own_answer(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    _sell_out(redis_stock, sku)
    commands: list[int] = []

    async def sale() -> list[PurchaseStatus]:
        stock = AsyncRedisStock(settings.redis_url)
        service = PurchaseService(stock, FakeBus(), "ns-deductions", sold_out_cache_s=0.5)
        try:
            answers = [await service.submit(PurchaseRequest(sku, "u1", 1, "t1"))]  # read: sold out; sealed
            await asyncio.gather(*service._sold_out.sealing.values())
            commands.append(int(raw.info("stats")["total_commands_processed"]))
            answers += [await service.submit(PurchaseRequest(sku, f"u{i}", 1, f"n{i}")) for i in range(50)]
            commands.append(int(raw.info("stats")["total_commands_processed"]))
            answers.append(await service.submit(PurchaseRequest(sku, "u0", 1, "t0")))  # sold before: read
            return [a.status for a in answers]
        finally:
            await stock.close()

    statuses = asyncio.run(sale())
    assert statuses == [PurchaseStatus.SOLD_OUT] * 51 + [PurchaseStatus.DUPLICATE]
    assert commands[1] - commands[0] <= 2  # the INFO itself: 50 answers, no command of theirs


def test_two_reloads_in_a_row_keep_the_seal_through_the_partitions(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    # The partitioned load carries the seal into its partitions alone; the next load finds it there.
    until = _sealed_out(redis_stock, raw, settings, sku, 300)
    with redis_stock.frozen(sku):
        redis_stock.load_partitioned(sku, 4, partitions=2, refill=2, threshold=0, reset=True)
    with redis_stock.frozen(sku):
        redis_stock.load(sku, 3, reset=True)
    assert raw.hget(SkuKeys.of(sku).meta, "sealed_until") == until
    assert redis_stock.prededuct(sku, "m-1", [Purchase("t1", "u1", 1)])[0].code is Prededuct.SEALED
    time.sleep(0.3 + MARGIN_S + 0.05)
    assert redis_stock.prededuct(sku, "m-2", [Purchase("t1", "u1", 1)])[0].code is Prededuct.ACCEPTED


def test_a_deduction_written_back_by_a_repair_waits_for_the_seal_then_starts_a_new_run(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    # While the seal runs, producers answer from copies that lack the token: written then, a buyer asking
    # again with it would hear `sold_out`. So the repair waits for the seal's end, and no seal is renewed
    # meanwhile (a producer renewing it under load would keep the repair waiting for ever).
    _sell_out(redis_stock, sku)
    first = _seal(settings, sku, 300)
    assert first is not None and first.tokens == frozenset({"t0"})
    row = DeductionRow(1, "t-lost", "u9", 1, "m-lost", 1_000, order="awaiting", due_ms=4_000_000_000_000)
    renewals: list[Seal | None] = []

    keys = SkuKeys.of(sku)

    def renew() -> None:  # a producer renewing its seal once the repair found it sealed, until it wrote
        while not raw.hexists(keys.meta, "seal_barred_until") and not raw.hexists(keys.log, "t-lost"):
            time.sleep(0.01)
        while not raw.hexists(keys.log, "t-lost"):
            renewals.append(_seal(settings, sku, 300, first.since))
            time.sleep(0.05)

    seconds, micros = raw.time()
    left_s = (int(raw.hget(keys.meta, "sealed_until") or 0) - (seconds * 1000 + micros // 1000)) / 1000
    renewing = threading.Thread(target=renew)
    renewing.start()
    started = time.monotonic()
    try:
        assert redis_stock.adopt(sku, row, deduct=False)[0] is Adopt.ADOPTED
    finally:
        renewing.join()
    assert time.monotonic() - started >= left_s - 0.01  # written once the seal had ended
    assert renewals and set(renewals) == {None}  # every renewal meanwhile refused
    # The bar outlives the write by a few seconds (the repair's next tokens need no wait); once it ends, the
    # next seal starts a new run and sends the log with the token.
    assert _seal(settings, sku, 300, first.since) is None
    raw.hdel(keys.meta, "seal_barred_until")
    again = _seal(settings, sku, 300, first.since)
    assert again is not None and again.since != first.since and again.tokens == frozenset({"t0", "t-lost"})


def test_a_repair_that_finds_the_sku_sealed_at_every_try_writes_nothing(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    _sell_out(redis_stock, sku)
    keys, stop = SkuKeys.of(sku), threading.Event()

    def seal_for_another_100_ms() -> None:
        seconds, micros = raw.time()
        raw.hset(keys.meta, "sealed_until", seconds * 1000 + micros // 1000 + 100)

    def keep_sealed() -> None:  # a seal that outlives the bar (one a reload carried over, say)
        while not stop.wait(0.02):
            seal_for_another_100_ms()

    seal_for_another_100_ms()
    sealing = threading.Thread(target=keep_sealed)
    sealing.start()
    try:
        row = DeductionRow(1, "t-lost", "u9", 1, "m-lost", 1_000)
        assert redis_stock.adopt(sku, row, deduct=False)[0] is Adopt.SEALED
    finally:
        stop.set()
        sealing.join()
    assert not raw.hexists(keys.log, "t-lost")


def test_a_message_run_again_during_a_seal_reports_no_stock_on_sale(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    redis_stock.load(sku, 2, pay_within_ms=3_600_000)
    buy = [Purchase("t0", "u0", 1), Purchase("t1", "u1", 1), Purchase("t2", "u2", 1)]
    assert [r.code for r in redis_stock.prededuct(sku, "m-0", buy)][2] is Prededuct.SOLD_OUT
    assert _seal(settings, sku, 300) is not None
    assert (
        redis_stock.decide(sku, "t0", "cancel", decision_id="d0", message_id="m-c", user="u0")[0] is Decision.CANCELLED
    )
    rerun = redis_stock.prededuct(sku, "m-0", buy)
    assert [r.remaining for r in rerun] == [1, 0, 0]  # the first's own `to`; the rest: nothing on sale


def test_a_token_sold_after_a_seal_ended_starts_a_new_run_whatever_the_clock_says(
    redis_stock: RedisStock, raw: redis.Redis, settings: Settings, sku: str
) -> None:
    _sell_out(redis_stock, sku)
    first = _seal(settings, sku, 100)
    assert first is not None
    time.sleep(0.1 + MARGIN_S + 0.05)  # the seal ended
    decision, _ = redis_stock.decide(sku, "t0", "cancel", decision_id="d0", message_id="m-c", user="u0")
    assert decision is Decision.CANCELLED
    assert redis_stock.prededuct(sku, "m-x", [Purchase("tx", "ux", 1)])[0].code is Prededuct.ACCEPTED
    # A node whose clock is behind (a failover, a clock stepped back) still sees the old seal running: the
    # run must end by the deduction, not by the clock.
    raw.hset(SkuKeys.of(sku).meta, "sealed_until", 2 * int(time.time() * 1000))
    again = _seal(settings, sku, 100, first.since)
    assert again is not None and again.since != first.since and again.tokens == frozenset({"t0", "tx"})
