"""SIGTERM in the middle of a sale: every process stops cleanly and the books stay exact."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.config import Settings
from flashsale.ops.load import LoadReport, run_load
from flashsale.ops.setup import set_stock
from tests.acceptance.books import drained
from tests.acceptance.harness import Pipeline

pytestmark = pytest.mark.slow


def load_in_background(
    url: str, sku: str, attempts: int, concurrency: int
) -> tuple[threading.Thread, list[LoadReport]]:
    """The load runs on a thread; its report lands in the returned list when it is done."""
    holder: list[LoadReport] = []
    thread = threading.Thread(
        target=lambda: holder.append(
            asyncio.run(run_load(url, [sku], attempts=attempts, concurrency=concurrency, timeout_s=10))
        )
    )
    thread.start()
    return thread, holder


def test_producer_stopped_mid_sale_answers_what_it_started_and_leaves_nothing_unsettled(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 100_000)
    pipeline.consumer()
    pipeline.checker()
    producer, url = pipeline.producer()
    thread, holder = load_in_background(url, sku, attempts=3000, concurrency=50)
    time.sleep(1.0)
    assert producer.terminate(timeout_s=60) == 0
    thread.join(60)
    load = holder[0]
    assert "producer stopped" in producer.text()
    assert 0 < load.statuses["accepted"] < 3000
    # Every deduction made in Redis was answered as accepted (none cut off before its answer), and the
    # books balance without waiting for a single transaction check.
    books = drained(redis_stock, mysql_store, sku, timeout_s=30)
    assert books.consistent, books.problems
    assert books.redis_deducted == load.statuses["accepted"] == books.mysql_applied
    assert books.redis_fenced == 0


def test_consumer_stopped_mid_backlog_acks_only_what_it_committed(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 5000)
    _, url = pipeline.producer()
    pipeline.checker()
    load = asyncio.run(run_load(url, [sku], attempts=3000, concurrency=50))
    assert load.statuses["accepted"] == 3000  # a backlog: no consumer ran during the sale

    first = pipeline.consumer(FLASHSALE_BATCH_SIZE="50", FLASHSALE_INVISIBLE_S="5")
    first.wait_log("applied", timeout_s=30)
    assert first.terminate(timeout_s=30) == 0
    assert "consumer stopped" in first.text()
    applied_at_stop = mysql_store.view(sku).deductions
    assert 0 < applied_at_stop < 3000

    pipeline.consumer(FLASHSALE_INVISIBLE_S="5")
    books = drained(redis_stock, mysql_store, sku, timeout_s=90)
    assert books.consistent, books.problems
    assert (books.mysql_applied, books.orders, books.mysql_stock) == (3000, 3000, 2000)


def test_checker_stops_promptly_on_sigterm(pipeline: Pipeline) -> None:
    checker = pipeline.checker()
    started = time.monotonic()
    assert checker.terminate(timeout_s=30) == 0
    assert time.monotonic() - started < 15
    assert "checker stopped" in checker.text()
