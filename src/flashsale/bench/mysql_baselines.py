"""What a team would build without flashsale: the purchase as one MySQL transaction, for `bench --strategy`.

- mysql-lock: SELECT ... FOR UPDATE on the SKU's row, check, UPDATE, insert the deduction and the order.
- mysql-optimistic: read stock and version, UPDATE ... WHERE version = read version; retry on a lost race.
Both write the same stock_deductions and orders rows as the pipeline, so the same books apply.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flashsale.adapters.mysql.statements import query
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus

#: The purchase as one plain MySQL transaction: with a row lock, or a version check and retries.
BASELINES = ("mysql-lock", "mysql-optimistic")
#: Lost races an optimistic purchase retries before giving up with `error`.
OPTIMISTIC_RETRIES = 50
#: Longest pause between two tries; the pause grows with each lost race, jittered (what anyone would add).
OPTIMISTIC_MAX_BACKOFF_S = 0.05


def _params(request: PurchaseRequest, strategy: str) -> dict[str, object]:
    return {
        "token": request.token,
        "sku": request.sku,
        "user_id": request.user_id,
        "qty": request.qty,
        "source": strategy,
        "created_ms": int(time.time() * 1000),
    }


def _claim(conn: Connection, request: PurchaseRequest, strategy: str) -> bool:
    """Insert the deduction row first: False (and nothing written) when the token was used before."""
    try:
        conn.execute(query("insert_one_deduction"), _params(request, strategy))
    except sa.exc.IntegrityError:
        return False
    return True


def _over_limit(conn: Connection, request: PurchaseRequest, limit: int) -> bool:
    if not limit:
        return False
    bought = int(conn.execute(query("user_bought"), {"sku": request.sku, "user_id": request.user_id}).scalar_one())
    return bought + request.qty > limit


def _unknown(request: PurchaseRequest) -> PurchaseResult:
    return PurchaseResult(
        PurchaseStatus.INVALID, request.token, message=f"unknown SKU {request.sku!r}: it is not on sale"
    )


class _Duplicate(Exception):
    """Leaves a transaction with a rollback."""


class MySQLBaselines:
    """Each SKU's per-user limit is read from its inventory row, in the purchase's own transaction."""

    def __init__(self, store: MySQLStore) -> None:
        self.store = store

    def strategy(self, name: str) -> Callable[[PurchaseRequest], PurchaseResult]:
        strategies = {"mysql-lock": self.locked, "mysql-optimistic": self.optimistic}
        assert set(strategies) == set(BASELINES)
        return strategies[name]

    def locked(self, request: PurchaseRequest) -> PurchaseResult:
        with self.store.transaction("locked purchase") as conn:
            row = conn.execute(query("lock_stock"), {"sku": request.sku}).first()
            if row is None:
                return _unknown(request)
            stock, limit = int(row.stock), int(row.per_user_limit)
            if stock < request.qty:
                return PurchaseResult(PurchaseStatus.SOLD_OUT, request.token, stock)
            if _over_limit(conn, request, limit):
                return PurchaseResult(PurchaseStatus.LIMIT_EXCEEDED, request.token, stock)
            if not _claim(conn, request, "mysql-lock"):
                return PurchaseResult(PurchaseStatus.DUPLICATE, request.token, stock)
            conn.execute(query("take_stock"), {"sku": request.sku, "qty": request.qty})
            conn.execute(query("insert_one_order"), _params(request, "mysql-lock"))
            return PurchaseResult(PurchaseStatus.ACCEPTED, request.token, stock - request.qty)

    def optimistic(self, request: PurchaseRequest) -> PurchaseResult:
        try:
            return self._optimistic(request)
        except _Duplicate:
            return PurchaseResult(PurchaseStatus.DUPLICATE, request.token)

    def _optimistic(self, request: PurchaseRequest) -> PurchaseResult:
        for attempt in range(OPTIMISTIC_RETRIES):
            if attempt:
                time.sleep(random.uniform(0, min(OPTIMISTIC_MAX_BACKOFF_S, 0.001 * 2**attempt)))
            with self.store.transaction("optimistic purchase") as conn:
                row = conn.execute(query("read_stock_version"), {"sku": request.sku}).first()
                if row is None:
                    return _unknown(request)
                stock, version = row.stock, row.version
                if stock < request.qty:
                    return PurchaseResult(PurchaseStatus.SOLD_OUT, request.token, int(stock))
                if _over_limit(conn, request, int(row.per_user_limit)):
                    return PurchaseResult(PurchaseStatus.LIMIT_EXCEEDED, request.token, int(stock))
                won = (
                    conn.execute(
                        query("take_stock_at_version"), {"sku": request.sku, "qty": request.qty, "version": version}
                    ).rowcount
                    == 1
                )
                if not won:
                    continue  # someone else changed the row since we read it: read again
                if not _claim(conn, request, "mysql-optimistic"):
                    raise _Duplicate  # undo the stock taken above
                conn.execute(query("insert_one_order"), _params(request, "mysql-optimistic"))
                return PurchaseResult(PurchaseStatus.ACCEPTED, request.token, int(stock) - request.qty)
        return PurchaseResult(PurchaseStatus.ERROR, request.token, message=f"lost {OPTIMISTIC_RETRIES} races in a row")
