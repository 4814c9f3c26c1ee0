"""A retry with the same token hears its original outcome (`duplicate` for one accepted), whatever path
answers it (SPEC): the producer's read ahead of a group, the per-user holds of a partitioned SKU. Over the
real scripts on the stack's Redis, the broker faked (FakeBus): what is asserted is the answer."""

from __future__ import annotations

import asyncio

import pytest
import redis

from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.adapters.redis.topology import AsyncRouter
from flashsale.config import Settings
from flashsale.errors import ServiceUnavailable
from flashsale.models import Purchase, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline.partitions import Scheduler
from flashsale.pipeline.producer import PurchaseService
from flashsale.records import Prededuct
from tests.unit.fakes import FakeBus


@pytest.mark.parametrize("after", [1, 2, 3, 4])
def test_a_retry_of_a_token_accepted_between_two_reads_of_its_peek_hears_duplicate(
    settings: Settings, redis_stock: RedisStock, sku: str, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """The peek reads the stock, the limit, the buyers' counts and the tokens' entries in one pipeline, which
    is no transaction (Redis may run another client's commands between two of its reads, when they arrive in
    two reads of the socket). The token's first attempt accepted between two of them, its retry must hear
    `duplicate` (SPEC: a retry gets the original outcome, whatever path answers it): never `limit_exceeded`
    from a count that holds the token beside a log read without it."""
    redis_stock.load(sku, 5, per_user_limit=1)
    raw = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    class OneByOne:
        async def call(self, *commands: tuple[object, ...]) -> list[object]:
            replies = []
            for n, command in enumerate(commands, 1):
                replies.append(raw.execute_command(*command))
                if n == after:  # the token's first attempt, on another producer
                    first = redis_stock.prededuct(sku, "m-first", [Purchase("t1", "u1", 1)])[0]
                    assert first.code is Prededuct.ACCEPTED
            return replies

    async def wire(self: AsyncRouter, key: str) -> OneByOne:
        return OneByOne()

    async def retry() -> PurchaseStatus:
        stock = AsyncRedisStock(settings.redis_url)
        try:
            service = PurchaseService(stock, FakeBus(), "ns-deductions")
            return (await service.submit(PurchaseRequest(sku, "u1", 1, "t1"))).status
        finally:
            await stock.close()

    monkeypatch.setattr(AsyncRouter, "wire", wire)
    status = asyncio.run(retry())
    raw.close()
    assert redis_stock.log_entry(sku, "t1") is not None
    assert status is PurchaseStatus.DUPLICATE


@pytest.mark.parametrize("partitions", [1, 2])
@pytest.mark.parametrize(("user", "qty", "other_first"), [("u1", 2, False), ("u2", 1, True)])
def test_a_retry_of_an_accepted_token_past_the_per_user_limit_hears_duplicate(
    settings: Settings, redis_stock: RedisStock, sku: str, partitions: int, user: str, qty: int, other_first: bool
) -> None:
    """A retry of an accepted token asking another quantity, or under another user's id (at the limit with a
    purchase of their own), is the same purchase: `duplicate`. A partitioned SKU counts the buyers' units on
    holds apart from its partitions, and the hold refused the retry as a new purchase past the limit: it
    heard `limit_exceeded`, where one key looks the token up first."""
    if partitions > 1:
        redis_stock.load_partitioned(sku, 20, partitions=partitions, refill=2, threshold=0, per_user_limit=1)
    else:
        redis_stock.load(sku, 20, per_user_limit=1)

    async def sale() -> list[PurchaseResult]:
        stock = AsyncRedisStock(settings.redis_url)
        scheduler = Scheduler(stock)
        service = PurchaseService(stock, FakeBus(), "ns-deductions", sold_out_cache_s=0.5, scheduler=scheduler)
        try:
            said = [await service.submit(PurchaseRequest(sku, "u1", 1, "tok-1"))]
            if other_first:
                said.append(await service.submit(PurchaseRequest(sku, "u2", 1, "tok-2")))
            return [*said, await service.submit(PurchaseRequest(sku, user, qty, "tok-1"))]
        finally:
            await scheduler.close()
            await stock.close()

    *first, again = asyncio.run(sale())
    assert [r.status for r in first] == [PurchaseStatus.ACCEPTED] * len(first)
    assert again.status is PurchaseStatus.DUPLICATE, again
    assert again.message_id == first[0].message_id


def test_a_buyer_past_the_limit_whose_token_cannot_be_looked_up_holds_no_one_else_of_the_group_back(
    settings: Settings, redis_stock: RedisStock, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look-up above reads the logs of every partition the refused token may sell on. One of them failing
    over must cost that purchase its answer alone (`pending`: whether it is a retry of a token sold is not
    known), never the group's other buyers, whose partitions serve."""
    layout = redis_stock.load_partitioned(sku, 20, partitions=2, refill=2, threshold=0, per_user_limit=1)
    anchor, other = layout.parts[0], layout.parts[1]
    past_limit = next(t for t in (f"b-{n}" for n in range(10_000)) if next(layout.order(t)) == other)
    healthy = next(t for t in (f"c-{n}" for n in range(10_000)) if next(layout.order(t)) == anchor)
    assert layout.reach(healthy) == [anchor] and other in layout.reach(past_limit)

    async def sale() -> list[PurchaseStatus]:
        stock = AsyncRedisStock(settings.redis_url)
        scheduler = Scheduler(stock)
        service = PurchaseService(stock, FakeBus(), "ns-deductions", scheduler=scheduler)
        read = stock.entries

        async def entries(wanted: dict[str, list[str]]) -> object:
            if other in wanted:  # that partition's master fails over
                raise ServiceUnavailable("Redis", settings.redis_url, "read log: TRYAGAIN", reached=False)
            return await read(wanted)

        try:
            assert (await service.submit(PurchaseRequest(sku, "u1", 1, "tok-a"))).status is PurchaseStatus.ACCEPTED
            monkeypatch.setattr(stock, "entries", entries)
            group = [PurchaseRequest(sku, "u1", 1, past_limit), PurchaseRequest(sku, "u2", 1, healthy)]
            # One group, as the grouper would hand it over.
            return [r.status for r in await scheduler.sell(layout, group, service._send_to_parts)]
        finally:
            await scheduler.close()
            await stock.close()

    assert asyncio.run(sale()) == [PurchaseStatus.PENDING, PurchaseStatus.ACCEPTED]
