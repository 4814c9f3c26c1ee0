"""Orders whose timer or whose Redis entry was lost: reconcile finds them, and the operator's tools make
them good (`flashsale order expire-due`, `reconcile --repair`).

A timer is dead-lettered after 100 deliveries (a long Redis or broker outage): its orders would await
payment for ever, their units off sale. A failover can lose log entries MySQL holds. The books are read
back with plain SQL and Redis commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from flashsale import wiring
from flashsale.config import Settings
from flashsale.models import PurchaseStatus
from flashsale.ops import reconcile
from flashsale.ops.setup import set_stock
from flashsale.records import Decision
from tests.acceptance.harness import Pipeline
from tests.oracle import balanced

DEADLINE_MS = 1_000


def test_orders_whose_timer_was_lost_are_found_by_reconcile_and_expired_by_expire_due_once(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    from flashsale import FlashSale

    set_stock(settings, sku, 3, pay_within_ms=DEADLINE_MS)
    pipeline.launch("checker")
    pipeline.launch("consumer")  # no expirer: every timer fires into nothing, as if it were lost
    pipeline.ready_all()
    with FlashSale(settings) as sale:
        assert all(sale.purchase(sku, f"u{i}", 1, f"t{i}").status is PurchaseStatus.ACCEPTED for i in range(3))
        assert sale.pay(sku, "t0", "p0").decision is Decision.PAID
    time.sleep(DEADLINE_MS / 1000 + 0.5)
    assert balanced(settings, sku).problems == []
    later_ms = int(time.time() * 1000) + (reconcile.OVERDUE_S + 60) * 1000
    with wiring.books(settings) as (stock, store):
        seen_later = reconcile.reconcile_sku(stock, store, sku, settle_s=0, now_ms=later_ms)
        seen_now = reconcile.reconcile_sku(stock, store, sku, settle_s=0)
    assert (seen_later.orders_overdue, sorted(seen_later.overdue_tokens)) == (2, ["t1", "t2"])
    assert any("expire-due" in p for p in seen_later.problems)
    assert seen_now.orders_overdue == 0 and seen_now.problems == []  # not yet: the timers may still fire

    def expire_due() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flashsale", "order", "expire-due", sku],
            capture_output=True,
            text=True,
            env=pipeline.base_env,
            timeout=120,
        )

    first, again = expire_due(), expire_due()
    assert first.returncode == 0 and json.loads(first.stdout) == {"expired": 2}, first.stderr
    assert again.returncode == 0 and json.loads(again.stdout) == {}, again.stderr
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.redis_stock, books.mysql_stock, books.mysql_returned) == (2, 2, {"t1": 1, "t2": 1})
    assert books.order_status == {"t0": "paid", "t1": "expired", "t2": "expired"}


def test_orders_redis_lost_are_written_back_by_repair_in_the_state_mysql_holds(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    import redis

    from flashsale import FlashSale

    set_stock(settings, sku, 3, pay_within_ms=600_000)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    pipeline.ready_all()
    with FlashSale(settings) as sale:
        assert all(sale.purchase(sku, f"u{i}", 1, f"t{i}").status is PurchaseStatus.ACCEPTED for i in range(3))
        assert sale.pay(sku, "t0", "p0").decision is Decision.PAID
        assert sale.cancel(sku, "t1", "u1", "c1").decision is Decision.CANCELLED
    assert balanced(settings, sku).problems == []
    # A failover loses both entries and what they did: the paid unit is back in the stock, the counters
    # forget both deductions and the cancel's return.
    raw = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    tag = "{" + sku + "}"
    raw.hdel(f"fs:{tag}:log", "t0", "t1")
    raw.incrby(f"fs:{tag}:stock", 1)
    for field, by in (("deducted_qty", -2), ("deducted_count", -2), ("returned_qty", -1), ("returned_count", -1)):
        raw.hincrby(f"fs:{tag}:meta", field, by)
    repaired = subprocess.run(
        [sys.executable, "-m", "flashsale", "reconcile", sku, "--repair", "--wait", "60", "--json"],
        capture_output=True,
        text=True,
        env={**pipeline.base_env, "FLASHSALE_SETTLE_S": "0"},
        timeout=180,
    )
    assert repaired.returncode == 0, (repaired.stdout, repaired.stderr[-2000:])
    assert json.loads(repaired.stdout)["repairs"][0]["adopted_deductions"] == 2
    entries = {t: json.loads(v) for t, v in raw.hgetall(f"fs:{tag}:log").items()}
    assert {t: (e["state"], e.get("order")) for t, e in entries.items()} == {
        "t0": ("deducted", "paid"),
        "t1": ("returned", "cancelled"),
        "t2": ("deducted", "awaiting"),
    }
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.redis_stock, books.mysql_stock) == (1, 1)
    assert books.order_status == {"t0": "paid", "t1": "cancelled", "t2": "awaiting_payment"}
    # A give-back counted twice (t1's unit back on sale once more) raises Redis's stock and its returned
    # counter together, so Redis's own equation still balances: reconcile must tell it from the entries.
    raw.incrby(f"fs:{tag}:stock", 1)
    raw.hincrby(f"fs:{tag}:meta", "returned_qty", 1)
    with wiring.books(settings) as (stock, store):
        twice = reconcile.reconcile_sku(stock, store, sku, settle_s=0)
    assert twice.problems == ["Redis log holds 1 units given back, its counter says 2"], twice.problems
