"""The order lifecycle and restocks in the consumer's transaction: each order follows its state in the
Redis log, and each restock adds its units once.

An order of a SKU sold with a payment deadline is `awaiting_payment`, then `paid`, `cancelled` or
`expired`, once: a state is only ever written over `created` or `awaiting_payment`, so a message that
arrives late (a purchase redelivered after its payment) never takes an order back. A cancelled or expired
order gives its units back: one stock_returns row per token (a redelivery inserts nothing) and, in the
same transaction, the units of the rows new in this batch added to the SKU's stock, before the batch's
new deductions are taken from it. A restock likewise: one stock_additions row per request id, its units
added to the stock before the batch's deductions are taken.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.engine import Connection

from flashsale import constants as c
from flashsale.adapters.mysql.statements import query
from flashsale.records import Addition, ApplyReport, Incoming


def lifecycle_skus(items: Iterable[Incoming]) -> list[str]:
    """The SKUs of a batch sold with a payment deadline (their purchases carry an order), sorted."""
    return sorted({i.deduction.sku for i in items if i.order is not None})


def give_back(conn: Connection, items: Iterable[Incoming], batch_id: str, report: ApplyReport) -> None:
    """The units of the orders cancelled or expired, back in their SKUs' stock: one stock_returns row per
    token (a redelivery inserts nothing), made from its deduction row (a deduction not applied gives
    nothing back). Run before the batch's new deductions are taken, so that a unit given back and sold
    again in the same batch is there for its new buyer."""
    returned = sorted(
        (i for i in items if i.order is not None and i.order.returned),
        key=lambda i: (i.deduction.sku, i.deduction.token),
    )
    if not returned:
        return
    conn.execute(
        query("insert_returns"),
        [
            {
                "sku": i.deduction.sku,
                "token": i.deduction.token,
                "reason": i.order.state,
                "message_id": i.order.decided_by or i.message_id,
                "batch_id": batch_id,
                "created_ms": i.order.decided_ms or 0,
            }
            for i in returned
            if i.order is not None
        ],
    )
    report.returned_qty += _raise_stock(conn, "batch_returns", batch_id)


def set_states(conn: Connection, items: Iterable[Incoming]) -> None:
    """Each order's status, as the log has it (never back from a decision: see the module's docstring)."""
    tracked = sorted((i for i in items if i.order is not None), key=lambda i: (i.deduction.sku, i.deduction.token))
    if not tracked:
        return
    conn.execute(
        query("set_order_states"),
        [
            {
                "sku": i.deduction.sku,
                "token": i.deduction.token,
                "status": c.ORDER_STATUS[i.order.state],
                "due_ms": i.order.due_ms,
                "decided_ms": i.order.decided_ms,
            }
            for i in tracked
            if i.order is not None
        ],
    )


def add_units(conn: Connection, additions: Iterable[Addition], batch_id: str, report: ApplyReport) -> None:
    """The units of the batch's restocks added to their SKUs' stock: one stock_additions row per request id
    (a redelivery inserts nothing), and the units of the rows new in this batch added."""
    rows = [
        {
            "sku": a.sku,
            "request_id": a.request_id,
            "qty": a.qty,
            "message_id": a.message_id,
            "batch_id": batch_id,
            "created_ms": a.ts_ms,
        }
        for a in sorted(additions, key=lambda a: (a.sku, a.request_id))
    ]
    if not rows:
        return
    conn.execute(query("insert_additions"), rows)
    report.added_qty += _raise_stock(conn, "batch_additions", batch_id)


def _raise_stock(conn: Connection, per_sku: str, batch_id: str) -> int:
    """Each SKU's stock raised by the units of the rows this batch inserted (query `per_sku`: sku, units);
    returns the units in all. Rows a redelivery found already there were not inserted, and add nothing."""
    total = 0
    for sku, qty in conn.execute(query(per_sku), {"batch_id": batch_id}).all():
        conn.execute(query("give_stock_back"), {"sku": sku, "total": int(qty)})
        total += int(qty)
    return total
