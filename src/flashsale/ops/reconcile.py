"""Reconcile a sale: Redis stock and log vs MySQL stock, deductions and orders, per SKU.

Both sides are read in pages (Redis HSCAN, MySQL keyset paging), each page checked against the other
side in one round trip, so a sale with millions of entries never sits in memory at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale import constants as c
from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.errors import UnknownSku

#: Log entries / rows read per round trip.
PAGE = 1000
#: Most tokens listed per kind of drift (the counts are always complete).
SAMPLE = 100
_DEDUCTED = {c.STATE_DEDUCTED, c.STATE_RETURNED}


@dataclass(frozen=True)
class Missing:
    """A deduction in the Redis log that MySQL does not have."""

    token: str
    user: str
    qty: int
    ts_ms: int


@dataclass
class SkuReport:
    sku: str
    initial: int | None = None
    redis_stock: int | None = None
    mysql_stock: int | None = None
    mysql_initial: int | None = None
    redis_deducted: int = 0  # deductions in the Redis log (count)
    redis_deducted_qty: int = 0
    redis_counter_qty: int = 0  # what the Redis counters say was deducted
    redis_returned_qty: int = 0
    redis_fenced: int = 0
    mysql_applied: int = 0
    mysql_applied_qty: int = 0
    orders: int = 0
    ordered_qty: int = 0
    in_flight: int = 0
    in_flight_qty: int = 0
    missing_in_mysql: int = 0
    missing_qty: int = 0
    missing_tokens: list[str] = field(default_factory=list)
    mysql_without_log: int = 0
    mysql_without_log_qty: int = 0
    without_log_tokens: list[str] = field(default_factory=list)
    orders_without_deduction: int = 0
    deductions_without_order: int = 0
    dead_letters: int = 0
    conflicts: int = 0
    conflict_qty: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["consistent"] = self.consistent
        return data


def _pages(entries: Iterator[Any], size: int) -> Iterator[list[Any]]:
    page: list[Any] = []
    for entry in entries:
        page.append(entry)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def reconcile_sku(stock: RedisStock, store: MySQLStore, sku: str, *, settle_s: float,
                  now_ms: int | None = None) -> SkuReport:
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    settle_ms = settle_s * 1000
    report = SkuReport(sku)
    try:
        redis_view = stock.view(sku)
        report.initial, report.redis_stock = redis_view.initial, redis_view.stock
        report.redis_counter_qty, report.redis_returned_qty = redis_view.deducted_qty, redis_view.returned_qty
    except UnknownSku:
        report.problems.append("not loaded in Redis")
    try:
        mysql_view = store.view(sku)
        report.mysql_initial, report.mysql_stock = mysql_view.initial, mysql_view.stock
        report.mysql_applied, report.mysql_applied_qty = mysql_view.deductions, mysql_view.deducted_qty
        report.orders, report.ordered_qty = mysql_view.orders, mysql_view.ordered_qty
        for name, value in store.bookkeeping(sku).items():
            setattr(report, name, value)
    except UnknownSku:
        report.problems.append("not loaded in MySQL")
    if report.problems:
        return report

    # Redis -> MySQL: every deduction in the log must be applied (or still be young: in flight).
    for page in _pages(stock.scan_log(sku, page=PAGE), PAGE):
        deducted = [e for e in page if e.state in _DEDUCTED]
        report.redis_fenced += sum(1 for e in page if e.state == c.STATE_FENCED)
        report.redis_deducted += len(deducted)
        report.redis_deducted_qty += sum(e.qty for e in deducted)
        applied = store.existing_tokens(sku, [e.token for e in deducted])
        for entry in deducted:
            if entry.token in applied:
                continue
            if now_ms - entry.ts_ms < settle_ms:
                report.in_flight += 1
                report.in_flight_qty += entry.qty
            else:
                report.missing_in_mysql += 1
                report.missing_qty += entry.qty
                if len(report.missing_tokens) < SAMPLE:
                    report.missing_tokens.append(entry.token)

    # MySQL -> Redis: every applied deduction must have a deduction in the log.
    after = 0
    while True:
        rows = store.deductions_page(sku, after, PAGE)
        if not rows:
            break
        after = rows[-1].id
        entries = stock.log_entries(sku, [r.token for r in rows])
        for row in rows:
            entry = entries[row.token]
            if entry is None or entry.state not in _DEDUCTED:
                report.mysql_without_log += 1
                report.mysql_without_log_qty += int(row.qty)
                if len(report.without_log_tokens) < SAMPLE:
                    report.without_log_tokens.append(row.token)

    _judge(report)
    return report


def _judge(r: SkuReport) -> None:
    assert r.initial is not None and r.redis_stock is not None and r.mysql_stock is not None
    if r.mysql_initial != r.initial:
        r.problems.append(f"initial stock differs: Redis {r.initial}, MySQL {r.mysql_initial}")
    if r.redis_stock + r.redis_counter_qty - r.redis_returned_qty != r.initial:
        r.problems.append(f"Redis stock {r.redis_stock} + deducted {r.redis_counter_qty} - returned "
                          f"{r.redis_returned_qty} != initial {r.initial}")
    if r.redis_deducted_qty != r.redis_counter_qty:
        r.problems.append(f"Redis log holds {r.redis_deducted_qty} units of deductions, its counter says "
                          f"{r.redis_counter_qty}")
    if r.mysql_stock + r.mysql_applied_qty != r.initial:
        r.problems.append(f"MySQL stock {r.mysql_stock} + applied {r.mysql_applied_qty} != initial {r.initial}")
    if r.missing_in_mysql:
        r.problems.append(f"{r.missing_in_mysql} deduction(s) ({r.missing_qty} units) in Redis are missing in MySQL")
    if r.mysql_without_log:
        r.problems.append(f"{r.mysql_without_log} MySQL deduction(s) ({r.mysql_without_log_qty} units) have no "
                          f"deduction in the Redis log")
    if r.orders_without_deduction or r.deductions_without_order or r.orders != r.mysql_applied:
        r.problems.append(f"{r.mysql_applied} deductions but {r.orders} orders")
    if r.redis_returned_qty:
        r.problems.append(f"{r.redis_returned_qty} units were returned in Redis; MySQL knows of no return")


def reconcile(stock: RedisStock, store: MySQLStore, skus: list[str] | None, *, settle_s: float) -> list[SkuReport]:
    names = skus or sorted(set(stock.skus()) | set(store.skus()))
    return [reconcile_sku(stock, store, sku, settle_s=settle_s) for sku in names]
