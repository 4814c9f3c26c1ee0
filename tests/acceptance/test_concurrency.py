"""Several copies of a process at once, as production runs them."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from flashsale.bench.load import run_load
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from tests.acceptance.harness import Pipeline
from tests.oracle import balanced

pytestmark = pytest.mark.slow


def test_two_consumers_apply_a_sale_of_several_skus_at_once_without_deadlock(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    skus = [f"{sku}-{i}" for i in range(3)]
    for name in skus:
        set_stock(settings, name, 2000)
    # A transaction per purchase: thousands of messages, which both consumers compete for.
    consumers = [pipeline.consumer(FLASHSALE_BATCH_SIZE="64") for _ in range(2)]
    pipeline.launch("checker")
    _, url = pipeline.producer(FLASHSALE_GROUP_SIZE="1")
    load = asyncio.run(run_load(url, skus, attempts=3000, concurrency=40))
    assert load.statuses["accepted"] == 3000
    for name in skus:
        books = balanced(settings, name, 90)
        assert books.problems == [], books.problems
        assert books.order_count == 1000
    for consumer in consumers:
        applied = sum(int(n) for n in re.findall(r"batch: (\d+) applied", consumer.text()))
        assert applied > 0, "both consumers took part"
        assert "Deadlock" not in consumer.text() and "1213" not in consumer.text()


def test_the_per_user_limit_holds_across_two_producer_processes_under_concurrency(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 1000, per_user_limit=3)
    pipeline.launch("consumer")
    pipeline.launch("checker")
    urls = [pipeline.producer()[1] for _ in range(2)]

    async def greedy_buyers() -> list[str]:
        # 5 users, 40 purchases each, all at once, spread over both producers.
        async with aiohttp.ClientSession() as session:

            async def buy(i: int) -> str:
                body = {"sku": sku, "user_id": f"user-{i % 5}", "qty": 1, "token": f"g-{i}"}
                async with session.post(urls[i % 2] + "/purchase", json=body) as resp:
                    return str((await resp.json())["status"])

            return await asyncio.gather(*(buy(i) for i in range(200)))

    answers = asyncio.run(greedy_buyers())
    assert answers.count("accepted") == 15 and answers.count("limit_exceeded") == 185
    books = balanced(settings, sku)
    assert books.problems == []
    assert books.order_count == 15 and books.mysql_stock == 985
