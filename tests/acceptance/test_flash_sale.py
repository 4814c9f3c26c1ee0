"""A whole flash sale over HTTP through the three real processes."""

from __future__ import annotations

import asyncio

from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.config import Settings
from flashsale.ops.load import run_load
from flashsale.ops.setup import set_stock
from tests.acceptance.books import applied_tokens, drained
from tests.acceptance.harness import Pipeline


def test_a_flash_sale_sells_exactly_the_stock_and_the_books_balance(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 1000)
    url = pipeline.start_all()

    load = asyncio.run(run_load(url, [sku], attempts=5000, concurrency=200))

    assert load.attempts == 5000
    assert load.statuses["accepted"] == 1000, load.statuses
    assert load.statuses["sold_out"] == 4000, load.statuses
    books = drained(redis_stock, mysql_store, sku)
    assert books.consistent, books.problems
    assert (books.redis_stock, books.mysql_stock) == (0, 0)
    assert (books.mysql_applied, books.orders, books.redis_deducted) == (1000, 1000, 1000)
    tokens = applied_tokens(mysql_store, sku)
    assert len(tokens) == len(set(tokens)) == 1000
    assert set(tokens) == {token for _, token, _ in load.accepted}
    print(
        f"\n{load.attempts} attempts in {load.elapsed_s:.2f} s = {load.throughput:.0f}/s over HTTP, "
        f"p50 {load.percentile(0.5) * 1000:.1f} ms, p99 {load.percentile(0.99) * 1000:.1f} ms"
    )


def test_the_python_api_purchases_through_the_same_pipeline(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    from flashsale import FlashSale, PurchaseStatus

    set_stock(settings, sku, 2, per_user_limit=1)
    pipeline.consumer()
    with FlashSale(settings) as sale:
        first = sale.purchase(sku, "alice", 1, "tok-1")
        again = sale.purchase(sku, "alice", 1, "tok-1")
        greedy = sale.purchase(sku, "alice", 1, "tok-2")
        bob = sale.purchase(sku, "bob", 1, "tok-3")
        late = sale.purchase(sku, "carol", 1, "tok-4")
        bad = sale.purchase(sku, "carol", 0, "tok-5")
    assert (first.status, first.remaining) == (PurchaseStatus.ACCEPTED, 1)
    assert (again.status, again.message_id) == (PurchaseStatus.DUPLICATE, first.message_id)
    assert greedy.status is PurchaseStatus.LIMIT_EXCEEDED
    assert (bob.status, bob.remaining) == (PurchaseStatus.ACCEPTED, 0)
    assert late.status is PurchaseStatus.SOLD_OUT and bad.status is PurchaseStatus.INVALID
    books = drained(redis_stock, mysql_store, sku)
    assert books.consistent, books.problems
    assert sorted(applied_tokens(mysql_store, sku)) == ["tok-1", "tok-3"]
