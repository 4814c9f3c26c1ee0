"""A sealed SKU's purchases answered from the producer's memory (pipeline/sold_out.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from flashsale import constants as c
from flashsale.errors import ServiceUnavailable
from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline.producer import PurchaseService
from flashsale.records import Seal
from tests.unit.fakes import FakeBus, FakeStock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _sale(stock: FakeStock, clock: Clock, ttl_s: float = 0.5) -> PurchaseService:
    return PurchaseService(stock, FakeBus(), "ns-deductions", sold_out_cache_s=ttl_s, clock=clock)


def _reads(stock: FakeStock) -> list[str]:
    """Its calls but the sold-out flag's (read once the flag's own trust ran out)."""
    return [call for call in stock.calls if not call.startswith("is_sold_out")]


async def _buy(service: PurchaseService, token: str) -> PurchaseResult:
    result = await service.submit(PurchaseRequest("sku-1", "u1", 1, token))
    await asyncio.gather(*service._sold_out.sealing.values())  # the seal asked for in the background
    return result


def test_a_sealed_sku_answers_a_token_its_log_never_held_with_no_redis_call() -> None:
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset({"t-old"}))), Clock()
    service = _sale(stock, clock)

    async def sale() -> list[PurchaseResult]:
        first = await _buy(service, "t1")  # read: sold out, then sealed
        read = list(stock.calls)
        second = await _buy(service, "t2")
        assert stock.calls == read  # answered from memory
        third = await _buy(service, "t-old")  # held by the log: the usual way, to hear its own answer
        assert stock.calls[len(read) :] == ["peek sku-1 t-old"]
        return [first, second, third]

    answers = asyncio.run(sale())
    assert [a.status for a in answers] == [PurchaseStatus.SOLD_OUT] * 3
    assert stock.seals == ["sku-1 500 "]


def test_a_seal_is_trusted_for_the_ttl_from_before_it_was_asked_then_renewed_with_the_copy_kept() -> None:
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset({"t-old"}))), Clock()
    service = _sale(stock, clock)

    async def sale() -> None:
        await _buy(service, "t1")
        clock.now += 0.2
        await _buy(service, "t2")  # trusted, not yet due for renewal
        assert stock.seals == ["sku-1 500 "]
        clock.now += 0.1  # less than half the trust left: renewed in the background, the answer still local
        read = list(_reads(stock))
        assert (await _buy(service, "t3")).status is PurchaseStatus.SOLD_OUT
        assert _reads(stock) == read and stock.seals == ["sku-1 500 ", "sku-1 500 s1"]
        # The renewal sent no tokens (same run): the copy it had still answers, until the renewed trust ends.
        clock.now += 0.45
        await _buy(service, "t4")
        assert _reads(stock) == read
        await _buy(service, "t-old")
        assert _reads(stock)[len(read) :] == ["peek sku-1 t-old"]
        clock.now += 1.0  # past every trust: read again
        await _buy(service, "t5")
        assert _reads(stock)[len(read) + 1 :] == ["peek sku-1 t5"]

    asyncio.run(sale())


def test_a_sku_redis_would_not_seal_or_that_could_not_be_sealed_is_read_for_every_group() -> None:
    for stock in (FakeStock(stock=0), FakeStock(stock=0, seal_error=ServiceUnavailable("Redis", "x:1", "down"))):
        clock = Clock()
        service = _sale(stock, clock)

        async def sale(service: PurchaseService = service, clock: Clock = clock) -> None:
            for token in ("t1", "t2", "t3"):
                assert (await _buy(service, token)).status is PurchaseStatus.SOLD_OUT
            clock.now += 0.5  # a seal refused is asked for again once the trust it would have had passed
            assert (await _buy(service, "t4")).status is PurchaseStatus.SOLD_OUT

        asyncio.run(sale())
        assert _reads(stock) == ["peek sku-1 t1", "peek sku-1 t2", "peek sku-1 t3", "peek sku-1 t4"]
        assert len(stock.seals) == 2  # not one per group meanwhile


def test_a_new_run_of_seals_replaces_the_copy() -> None:
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset())), Clock()
    service = _sale(stock, clock)

    async def sale() -> None:
        await _buy(service, "t1")
        clock.now += 0.3
        stock.sealed = Seal("s2", frozenset({"t2"}))  # the seal ended meanwhile: t2 was sold before it sold out again
        await _buy(service, "t9")  # renews: a new run, with its log
        read = list(stock.calls)
        await _buy(service, "t2")
        assert stock.calls[len(read) :] == ["peek sku-1 t2"]

    asyncio.run(sale())
    assert stock.seals == ["sku-1 500 ", "sku-1 500 s1"]


def test_a_producer_that_trusts_nothing_never_seals() -> None:
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset())), Clock()
    service = _sale(stock, clock, ttl_s=0.0)

    async def sale() -> None:
        for token in ("t1", "t2"):
            await _buy(service, token)

    asyncio.run(sale())
    assert stock.seals == [] and _reads(stock) == ["peek sku-1 t1", "peek sku-1 t2"]


def test_stock_seen_on_sale_drops_the_seal() -> None:
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset())), Clock()
    service = _sale(stock, clock)

    async def sale() -> None:
        await _buy(service, "t1")
        service._sold_out.saw_stock("sku-1")
        stock.stock = 3
        await _buy(service, "t2")

    asyncio.run(sale())
    assert stock.calls[-1].startswith("prededuct sku-1 t2")


def test_a_seal_is_trusted_no_longer_than_the_cap_whatever_the_ttl() -> None:
    # Units given back wait for the seal's end: a long sold-out cache must not keep them off sale as long.
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset())), Clock()
    service = _sale(stock, clock, ttl_s=60.0)

    async def sale() -> None:
        await _buy(service, "t1")
        clock.now += c.SEAL_MAX_TRUST_S - 0.01
        read = list(_reads(stock))
        await _buy(service, "t2")  # still trusted (and renewed in the background)
        assert _reads(stock) == read
        clock.now += c.SEAL_MAX_TRUST_S + 0.1
        await _buy(service, "t3")  # the renewal's trust ran out too: read again
        assert _reads(stock)[len(read) :] == ["peek sku-1 t3"]

    asyncio.run(sale())
    assert stock.seals[0] == f"sku-1 {round(c.SEAL_MAX_TRUST_S * 1000)} "


def test_a_copy_outlives_a_refused_renewal_and_serves_the_same_run_again() -> None:
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset({"t-old"}))), Clock()
    service = _sale(stock, clock)

    async def sale() -> None:
        await _buy(service, "t1")
        sealed, stock.sealed = stock.sealed, None
        clock.now += 0.3
        await _buy(service, "t2")  # renewal refused (units back, say): not trusted from then on
        clock.now += 0.3
        await _buy(service, "t3")  # read, and no seal asked for: the last was refused 0.3 s ago
        assert _reads(stock)[-1] == "peek sku-1 t3"
        stock.sealed = sealed
        clock.now += 0.3
        await _buy(service, "t4")  # sealed again in the same run: no log sent, the copy serves
        read = list(_reads(stock))
        assert (await _buy(service, "t5")).status is PurchaseStatus.SOLD_OUT and _reads(stock) == read
        await _buy(service, "t-old")
        assert _reads(stock)[len(read) :] == ["peek sku-1 t-old"]

    asyncio.run(sale())
    assert stock.seals == ["sku-1 500 ", "sku-1 500 s1", "sku-1 500 s1"]


def test_a_copy_untrusted_for_longer_than_it_is_kept_is_dropped_and_the_next_seal_asks_for_the_log() -> None:
    # A producer that saw thousands of SKUs sell out over a day keeps the copies of the last minute only.
    stock, clock = FakeStock(stock=0, sealed=Seal("s1", frozenset({"t-old"}))), Clock()
    service = _sale(stock, clock)

    async def sale() -> None:
        await _buy(service, "t1")
        clock.now += c.SEAL_COPY_KEEP_S / 2
        await _buy(service, "t2")  # a seal in the same run: the copy serves, no log sent
        clock.now += c.SEAL_COPY_KEEP_S + 1
        await service.submit(PurchaseRequest("sku-2", "u1", 1, "t3"))  # another SKU sealed: the old copy goes
        await asyncio.gather(*service._sold_out.sealing.values())
        await _buy(service, "t4")

    asyncio.run(sale())
    assert stock.seals == ["sku-1 500 ", "sku-1 500 s1", "sku-2 500 ", "sku-1 500 "]


def test_a_seal_is_trusted_by_a_clock_that_counts_a_suspended_machines_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis ends a seal on its own clock: a producer whose clock stopped while the machine slept (as
    # time.monotonic does on Linux) would wake up trusting it still. CLOCK_BOOTTIME keeps counting.
    asked: list[int] = []

    def clock_gettime(clock_id: int) -> float:
        asked.append(clock_id)
        return 100.0

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    service = PurchaseService(FakeStock(stock=0), FakeBus(), "ns-deductions")
    assert service._sold_out._clock() == 100.0 and asked == [time.CLOCK_BOOTTIME]
