"""Checks of the books after a test: the reconcile report, waited for until the pipeline has drained."""

from __future__ import annotations

import time

from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.ops.reconcile import SkuReport, reconcile_sku


def drained(stock: RedisStock, store: MySQLStore, sku: str, timeout_s: float = 90) -> SkuReport:
    """Reconcile (settle time 0: anything not applied counts as missing) until consistent or out of time."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = reconcile_sku(stock, store, sku, settle_s=0)
        if report.consistent or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def applied_tokens(store: MySQLStore, sku: str) -> list[str]:
    tokens: list[str] = []
    after = 0
    while rows := store.deductions_page(sku, after, 1000):
        tokens += [r.token for r in rows]
        after = rows[-1].id
    return tokens
