"""An order whose payment timer was lost: reconcile finds it, and `flashsale order expire-due` expires it.

A timer is dead-lettered after 100 deliveries (a long Redis or broker outage): its orders would await
payment for ever, their units off sale. The books are read back with plain SQL and Redis commands.
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
    pipeline.checker()
    pipeline.consumer()  # no expirer: every timer fires into nothing, as if it were lost
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
