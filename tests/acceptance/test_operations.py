"""The operators' commands on the real stack, run as a user runs them: `python -m flashsale ...`."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest
import sqlalchemy as sa

from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.codec import prededuct_call
from flashsale.adapters.redis.keys import SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.bench.load import run_load
from flashsale.config import Settings
from flashsale.models import Purchase
from flashsale.ops.setup import set_stock
from tests.acceptance.harness import Pipeline
from tests.oracle import balanced, now


def consumer_counts(log: str) -> tuple[int, int]:
    """(applied, duplicate) summed over the consumer's batch lines."""
    batches = re.findall(r"batch: (\d+) applied, (\d+) duplicate", log)
    return sum(int(a) for a, _ in batches), sum(int(d) for _, d in batches)


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
    assert balanced(settings, sku).problems == []
    code, report = reconcile_json(pipeline, sku)
    assert code == 0 and report["consistent"]

    lost_row, lost_entry, lost_message = sorted(now(settings, sku).applied)[:3]
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
        # A foreign body: another user, five more units. The replay must take the log's values.
        message = json.dumps(
            {
                "v": 1,
                "token": lost_message,
                "sku": sku,
                "user_id": "someone-else",
                "qty": entry.qty + 5,
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

    dry = flashsale(pipeline, "replay", "--dead-letters", "--sku", sku, "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["published"] == 1
    assert reconcile_json(pipeline, sku)[1]["skus"][0]["dead_letters"] == 1  # a dry run changes nothing
    replayed = flashsale(pipeline, "replay", "--dead-letters", "--sku", sku, "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["published"] == 1

    repaired = flashsale(pipeline, "reconcile", sku, "--repair", "--wait", "60", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    fixes = json.loads(repaired.stdout)["repairs"][0]
    assert fixes["adopted_entries"] == 1 and fixes["adopted_deductions"] == 0
    final = json.loads(repaired.stdout)["skus"][0]
    assert final["consistent"] and final["dead_letters"] == 0
    assert (final["mysql_stock"], final["redis_stock"], final["orders"], final["mysql_applied"]) == (70, 70, 30, 30)

    books = balanced(settings, sku, 30)
    assert books.problems == [], books.problems
    assert books.mysql_deducted[lost_message] == entry.qty  # the log's quantity, not the dead letter's
    with mysql_store.transaction("read") as conn:
        user = conn.execute(
            sa.text("SELECT user_id FROM orders WHERE sku = :s AND token = :t"), {"s": sku, "t": lost_message}
        ).scalar_one()
    assert user == entry.user

    # A second replay of the same deductions is a no-op for the books: the consumer counts all 32 as
    # duplicates, and MySQL does not change.
    consumer = pipeline.children[1]
    applied_before, duplicates_before = consumer_counts(consumer.text())
    again = flashsale(pipeline, "replay", "--token", lost_row, "--token", lost_message, "--json")
    assert json.loads(again.stdout)["published"] == 2 and json.loads(again.stdout)["already_applied"] == 2
    replay_all = flashsale(pipeline, "replay", "--sku", sku, "--since", "1h", "--json")
    assert json.loads(replay_all.stdout)["published"] == 30
    consumer.wait_for(
        lambda: consumer_counts(consumer.text())[1] >= duplicates_before + 32, "counting 32 replays as duplicates", 60
    )
    assert consumer_counts(consumer.text()) == (applied_before, duplicates_before + 32)
    after = now(settings, sku)
    assert (after.mysql_deducted, after.orders, after.mysql_stock) == (books.mysql_deducted, books.orders, 70)


def test_repair_puts_back_a_deduction_redis_lost_entirely(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    """As after a Redis failover: the entry, the stock taken and the counter are all gone."""
    set_stock(settings, sku, 10)
    url = pipeline.start_all()
    assert asyncio.run(run_load(url, [sku], attempts=3, concurrency=1)).statuses["accepted"] == 3
    assert balanced(settings, sku).problems == []
    lost = now(settings, sku).applied[0]
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
    books = now(settings, sku)
    assert books.problems == [], books.problems  # the deduction put back agrees with MySQL's, token by token
    assert books.redis_stock == 7 and lost in books.redis_deducted


def _sell(pipeline: Pipeline, settings: Settings, sku: str, stock: int, attempts: int) -> None:
    set_stock(settings, sku, stock)
    url = pipeline.start_all()
    asyncio.run(run_load(url, [sku], attempts=attempts, concurrency=1))
    assert balanced(settings, sku).problems == []


@pytest.mark.parametrize("case", ["entry in another state", "no stock left to take again", "initial differs"])
def test_repair_leaves_what_needs_an_operator_to_the_operator(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str, case: str
) -> None:
    _sell(pipeline, settings, sku, stock=3, attempts=3)
    token = now(settings, sku).applied[0]
    keys = SkuKeys.of(sku)
    if case == "entry in another state":
        redis_stock.client.hset(keys.log, token, json.dumps({"state": "fenced", "sku": sku, "user": "u", "qty": 1}))
        says = f"{token}: applied in MySQL but fenced in Redis"
    elif case == "no stock left to take again":
        # Redis lost the deduction entirely but sold its unit again meanwhile: nothing left to take.
        redis_stock.client.hdel(keys.log, token)
        redis_stock.client.hincrby(keys.meta, "deducted_qty", -1)
        redis_stock.client.hincrby(keys.meta, "deducted_count", -1)
        says = f"{token}: Redis has 0 left, cannot take 1 again"
    else:
        with mysql_store.transaction("change the initial stock") as conn:
            conn.execute(sa.text("UPDATE inventory SET initial_stock = 4, stock = 1 WHERE sku = :s"), {"s": sku})
        says = (
            f"initial stock differs (Redis 3, MySQL 4): nothing repaired; reload the SKU with "
            f"`flashsale stock set {sku} QTY --reset` once its sale is over"
        )
    before = now(settings, sku)
    repaired = flashsale(pipeline, "reconcile", sku, "--repair", "--json")
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout)["repairs"][0]["needs_operator"] == [says]
    assert now(settings, sku) == before  # nothing was guessed


@pytest.mark.slow
def test_reconcile_finds_the_one_deduction_missing_among_100k(
    settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    import time

    from flashsale.models import Deduction
    from flashsale.ops.reconcile import reconcile_sku
    from flashsale.records import Incoming

    n = 100_000
    set_stock(settings, sku, n + 5)
    pipe = redis_stock.client.pipeline(transaction=False)
    for i in range(n):
        pipe.evalsha(
            redis_stock._scripts["prededuct"].sha,
            5,
            *SkuKeys.of(sku).all(),
            *prededuct_call(sku, f"m{i}", [Purchase(f"t{i}", f"u{i % 997}", 1)])[1],
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

    report = reconcile_sku(redis_stock, mysql_store, sku, settle_s=0)
    assert report.redis_deducted == n and report.mysql_applied == n - 1
    assert report.missing_in_mysql == 1 and report.missing_tokens == ["t77777"]
    assert report.orders_without_deduction == 1
