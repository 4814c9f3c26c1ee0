"""A whole flash sale over HTTP through the three real processes."""

from __future__ import annotations

import asyncio

from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.config import Settings
from flashsale.ops.load import run_load
from flashsale.ops.setup import set_stock
from tests.acceptance.books import applied_tokens, drained
from tests.acceptance.harness import Pipeline, post
from tests.oracle import wait_balanced


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


def test_tokens_that_differ_only_in_case_are_two_purchases_in_every_store(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    import json
    import subprocess
    import sys

    set_stock(settings, sku, 10)
    url = pipeline.start_all()
    answers = {t: post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": t})[1]["status"] for t in ("Ab1", "aB1")}
    assert answers == {"Ab1": "accepted", "aB1": "accepted"}
    books, _ = wait_balanced(settings.redis_url, settings.mysql_url, sku, 60)
    assert books.problems == []
    assert dict(books.orders) == {"Ab1": 1, "aB1": 1} and books.mysql_stock == 8

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**pipeline.base_env, "FLASHSALE_SETTLE_S": "0"}
        return subprocess.run([sys.executable, "-m", "flashsale", *args], capture_output=True, text=True, env=env)

    reconciled = cli("reconcile", sku, "--json")
    row = json.loads(reconciled.stdout)["skus"][0]
    assert reconciled.returncode == 0 and (row["redis_deducted"], row["mysql_applied"], row["orders"]) == (2, 2, 2)
    replayed = cli("replay", "--token", "Ab1", "--sku", sku, "--dry-run", "--json")
    report = json.loads(replayed.stdout)
    assert (report["published"], report["already_applied"], report["not_deducted"]) == (1, 1, [])
    assert json.loads(cli("replay", "--token", "AB1", "--sku", sku, "--dry-run", "--json").stdout)["not_deducted"] == [
        "AB1"
    ]


def test_a_retry_after_the_sell_out_gets_duplicate_with_the_original_message_id(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 1)
    url = pipeline.start_all()
    first = post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "tok-1"})[1]
    late = post(url, {"sku": sku, "user_id": "u2", "qty": 1, "token": "tok-2"})[1]
    retry = post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "tok-1"})[1]
    assert (first["status"], late["status"], retry["status"]) == ("accepted", "sold_out", "duplicate")
    assert retry["message_id"] == first["message_id"]
    books, _ = wait_balanced(settings.redis_url, settings.mysql_url, sku, 60)
    assert books.problems == [] and dict(books.orders) == {"tok-1": 1}
