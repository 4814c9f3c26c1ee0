"""SIGTERM in the middle of a sale: every process stops cleanly and the books stay exact."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flashsale.bench.load import LoadReport, run_load
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Pipeline
from tests.acceptance.test_crashes import stopped_mid_batch
from tests.oracle import balanced, now

pytestmark = pytest.mark.slow


def load_in_background(
    url: str, sku: str, attempts: int, concurrency: int, rate: float | None = None
) -> tuple[threading.Thread, list[LoadReport]]:
    """The load runs on a thread; its report lands in the returned list when it is done."""
    holder: list[LoadReport] = []
    thread = threading.Thread(
        target=lambda: holder.append(
            asyncio.run(run_load(url, [sku], attempts=attempts, concurrency=concurrency, rate=rate, timeout_s=10))
        )
    )
    thread.start()
    return thread, holder


def test_producer_stopped_mid_sale_answers_what_it_started_and_leaves_nothing_unsettled(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 100_000)
    pipeline.launch("consumer")
    pipeline.launch("checker")
    producer, url = pipeline.producer()
    # 1,000 attempts a second: the 3,000 last three seconds, so the stop comes mid-sale.
    thread, holder = load_in_background(url, sku, attempts=3000, concurrency=50, rate=1000)
    # Stop it mid-sale: once Redis holds a few hundred deductions, long before the 3,000 attempts end.
    deadline = time.monotonic() + 60
    while len(now(settings, sku).redis_deducted) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert producer.terminate(timeout_s=60) == 0
    thread.join(60)
    assert not thread.is_alive() and holder, "the buyers never finished"
    load = holder[0]
    assert "producer stopped" in producer.text()
    assert 0 < load.statuses["accepted"] < 3000
    # Every deduction made in Redis was answered as accepted (none cut off before its answer), and the
    # books balance without waiting for a single transaction check.
    books = balanced(settings, sku, 30)
    assert books.problems == [], books.problems
    assert len(books.redis_deducted) == load.statuses["accepted"] == len(books.mysql_deducted)
    assert books.redis_fenced == 0


def test_consumer_stopped_mid_backlog_acks_only_what_it_committed(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 5000)
    # Groups of at most 10 make the backlog at least 300 messages: the consumer's first receive (50 of them)
    # cannot hold it all, however large the groups a fast sale would make.
    _, url = pipeline.producer(FLASHSALE_GROUP_SIZE="10")
    pipeline.checker()
    load = asyncio.run(run_load(url, [sku], attempts=3000, concurrency=50))
    assert load.statuses["accepted"] == 3000  # a backlog: no consumer ran during the sale

    first = pipeline.consumer(FLASHSALE_BATCH_SIZE="50", FLASHSALE_INVISIBLE_S="5")
    assert stopped_mid_batch(first, settings, stack_settings, sku) == 0
    assert "consumer stopped" in first.text()
    applied_at_stop = len(now(settings, sku).mysql_deducted)
    assert 0 < applied_at_stop < 3000

    pipeline.consumer(FLASHSALE_INVISIBLE_S="5")
    books = balanced(settings, sku, 90)
    assert books.problems == [], books.problems
    assert (len(books.mysql_deducted), books.order_count, books.mysql_stock) == (3000, 3000, 2000)


def test_checker_stops_cleanly_on_sigterm(pipeline: Pipeline) -> None:
    checker = pipeline.checker()
    assert checker.terminate(timeout_s=60) == 0
    assert "checker stopped" in checker.text()
