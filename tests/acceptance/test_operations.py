"""The operators' commands on the real stack, run as a user runs them: `python -m flashsale ...`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import sqlalchemy as sa

from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock, SkuKeys
from flashsale.config import Settings
from flashsale.ops.load import run_load
from flashsale.ops.setup import set_stock
from tests.acceptance.books import applied_tokens, drained
from tests.acceptance.harness import Pipeline


def flashsale(pipeline: Pipeline, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashsale", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**pipeline.base_env, "FLASHSALE_SETTLE_S": "0", **env},
    )


def reconcile_json(pipeline: Pipeline, *args: str) -> tuple[int, dict]:
    result = flashsale(pipeline, "reconcile", *args, "--json")
    return result.returncode, json.loads(result.stdout)


def test_reconcile_reports_hand_made_drift_and_replay_and_repair_fix_it(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 100)
    url = pipeline.start_all()
    load = asyncio.run(run_load(url, [sku], attempts=30, concurrency=5))
    assert load.statuses["accepted"] == 30
    assert drained(redis_stock, mysql_store, sku).consistent
    code, report = reconcile_json(pipeline, sku)
    assert code == 0 and report["consistent"]

    lost_row, lost_entry, lost_message = sorted(applied_tokens(mysql_store, sku))[:3]
    with mysql_store.transaction("inject drift") as conn:
        # 1. a deduction row deleted in MySQL (its order and stock stay)
        conn.execute(sa.text("DELETE FROM stock_deductions WHERE sku = :s AND token = :t"), {"s": sku, "t": lost_row})
        # 2. a deduction MySQL never applied, whose message was dead-lettered
        body = conn.execute(
            sa.text("SELECT qty FROM stock_deductions WHERE sku = :s AND token = :t"), {"s": sku, "t": lost_message}
        ).scalar_one()
        conn.execute(
            sa.text("DELETE FROM stock_deductions WHERE sku = :s AND token = :t"), {"s": sku, "t": lost_message}
        )
        conn.execute(sa.text("DELETE FROM orders WHERE sku = :s AND token = :t"), {"s": sku, "t": lost_message})
        conn.execute(sa.text("UPDATE inventory SET stock = stock + :q WHERE sku = :s"), {"s": sku, "q": body})
        entry = redis_stock.log_entry(sku, lost_message)
        assert entry is not None
        message = json.dumps(
            {
                "v": 1,
                "token": lost_message,
                "sku": sku,
                "user_id": entry.user,
                "qty": entry.qty,
                "ts_ms": entry.ts_ms,
                "source": "purchase",
            }
        )
        conn.execute(
            sa.text(
                "INSERT INTO dead_letters (message_id, topic, message_key, sku, reason, body) "
                "VALUES (:m, :t, :k, :s, 'injected by the test', :b)"
            ),
            {
                "m": f"dl-{lost_message}",
                "t": settings.deduction_topic,
                "k": lost_message,
                "s": sku,
                "b": message.encode(),
            },
        )
    # 3. a Redis log entry deleted (stock and counters stay)
    redis_stock.client.hdel(SkuKeys.of(sku).log, lost_entry)

    code, report = reconcile_json(pipeline, sku)
    row = report["skus"][0]
    assert code == 1 and not report["consistent"]
    assert row["missing_in_mysql"] == 2 and set(row["missing_tokens"]) == {lost_row, lost_message}
    assert row["mysql_without_log"] == 1 and row["without_log_tokens"] == [lost_entry]
    assert row["orders_without_deduction"] == 1
    assert row["dead_letters"] == 1

    dry = flashsale(pipeline, "replay", "--dead-letters", "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["published"] == 1
    assert reconcile_json(pipeline, sku)[1]["skus"][0]["dead_letters"] == 1  # a dry run changes nothing
    replayed = flashsale(pipeline, "replay", "--dead-letters", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["published"] == 1

    repaired = flashsale(pipeline, "reconcile", sku, "--repair", "--wait", "60", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    fixes = json.loads(repaired.stdout)["repairs"][0]
    assert fixes["adopted_entries"] == 1 and fixes["adopted_deductions"] == 0
    final = json.loads(repaired.stdout)["skus"][0]
    assert final["consistent"] and final["dead_letters"] == 0
    assert (final["mysql_stock"], final["redis_stock"], final["orders"], final["mysql_applied"]) == (70, 70, 30, 30)

    # A second replay of the same deductions is a no-op for the books.
    again = flashsale(pipeline, "replay", "--token", lost_row, "--token", lost_message, "--json")
    assert json.loads(again.stdout)["published"] == 2 and json.loads(again.stdout)["already_applied"] == 2
    replay_all = flashsale(pipeline, "replay", "--sku", sku, "--since", "1h", "--json")
    assert json.loads(replay_all.stdout)["published"] == 30
    pipeline.children[1].wait_for(lambda: pipeline.children[1].text().count("duplicate") > 0, "applying replays")
    books = drained(redis_stock, mysql_store, sku, timeout_s=30)
    assert books.consistent, books.problems
    assert (books.mysql_stock, books.orders) == (70, 30)


def test_repair_puts_back_a_deduction_redis_lost_entirely(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    """As after a Redis failover: the entry, the stock taken and the counter are all gone."""
    set_stock(settings, sku, 10)
    url = pipeline.start_all()
    assert asyncio.run(run_load(url, [sku], attempts=3, concurrency=1)).statuses["accepted"] == 3
    assert drained(redis_stock, mysql_store, sku).consistent
    lost = applied_tokens(mysql_store, sku)[0]
    keys = SkuKeys.of(sku)
    redis_stock.client.hdel(keys.log, lost)
    redis_stock.client.incrby(keys.stock, 1)
    redis_stock.client.hincrby(keys.meta, "deducted_qty", -1)
    redis_stock.client.hincrby(keys.meta, "deducted_count", -1)

    code, report = reconcile_json(pipeline, sku)
    assert code == 1 and report["skus"][0]["mysql_without_log"] == 1
    repaired = flashsale(pipeline, "reconcile", sku, "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout
    assert json.loads(repaired.stdout)["repairs"][0]["adopted_deductions"] == 1
    assert redis_stock.view(sku).stock == 7


@pytest.mark.slow
def test_reconcile_streams_a_sale_of_100k_deductions_in_pages(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    import time
    import tracemalloc

    from flashsale.models import Deduction
    from flashsale.ops.reconcile import reconcile_sku
    from flashsale.records import Incoming

    n = 100_000
    set_stock(settings, sku, n + 5)
    pipe = redis_stock.client.pipeline(transaction=False)
    for i in range(n):
        pipe.evalsha(
            redis_stock._scripts["prededuct"].sha, 5, *SkuKeys.of(sku).all(), f"m{i}", sku, f"t{i}", f"u{i % 997}", "1"
        )
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    ts = int(time.time() * 1000)
    for start in range(0, n, 5000):
        mysql_store.apply_batch(
            [
                Incoming(Deduction(f"t{i}", sku, f"u{i % 997}", 1, ts), f"m{i}", "t")
                for i in range(start, min(n, start + 5000))
            ]
        )
    with mysql_store.transaction("lose one") as conn:
        conn.execute(sa.text("DELETE FROM stock_deductions WHERE sku = :s AND token = 't77777'"), {"s": sku})

    tracemalloc.start()
    report = reconcile_sku(redis_stock, mysql_store, sku, settle_s=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.redis_deducted == n and report.mysql_applied == n - 1
    assert report.missing_in_mysql == 1 and report.missing_tokens == ["t77777"]
    assert report.orders_without_deduction == 1
    # 100k parsed entries held at once would take tens of MB; a page at a time stays far below.
    assert peak < 15 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
