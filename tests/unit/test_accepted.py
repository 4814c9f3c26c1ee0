"""What the consumer applies of a decision on an order: the log's state of the order, never the body's."""

from __future__ import annotations

import dataclasses

from flashsale.models import SOURCE_DECISION, SOURCE_PURCHASE, DeductionMessage, Delivery, Purchase
from flashsale.pipeline import accepted
from flashsale.records import LogEntry, Order

TS = 1_700_000_000_000


def _decoded(gid: str, source: str, token: str = "t1") -> accepted.Decoded:
    message = DeductionMessage("sku", (Purchase(token, "u1", 1),), gid, TS, source)
    return accepted.Decoded(Delivery(gid, "topic", token, message.encode(), TS, 1), message)


def _entry(order: str, decided_by: str | None, state: str = "deducted") -> LogEntry:
    entry = LogEntry("t1", state, "sku", "u1", 1, TS, "m-buy", order=order, due_ms=TS + 5000)
    return dataclasses.replace(entry, decided_ms=TS + 10 if decided_by else None, decided_by=decided_by)


def test_a_decision_applies_its_orders_entry_with_the_deduction_as_a_purchase() -> None:
    entry = _entry("cancelled", "m-cancel", state="returned")
    plan = accepted.plan([_decoded("m-cancel", SOURCE_DECISION)], {"sku": ({"t1": entry}, {})})
    assert [i.order for i in plan.apply] == [Order("cancelled", TS + 5000, TS + 10, "m-cancel")]
    (item,) = plan.apply
    assert (item.message_id, item.deduction.source, item.order and item.order.returned) == (
        "m-buy",
        SOURCE_PURCHASE,
        True,
    )


def test_a_decision_the_log_does_not_name_applies_nothing() -> None:
    plan = accepted.plan([_decoded("m-late", SOURCE_DECISION)], {"sku": ({"t1": _entry("paid", "m-pay")}, {})})
    assert (plan.apply, plan.skipped) == ([], 1)


def test_a_purchase_carries_its_orders_state_as_the_log_has_it_now() -> None:
    # The purchase's message arrives after the order was paid: MySQL gets both in one go.
    entry = dataclasses.replace(_entry("paid", "m-pay"), message_id="m-buy")
    plan = accepted.plan([_decoded("m-buy", SOURCE_PURCHASE)], {"sku": ({"t1": entry}, {})})
    assert [i.order.state if i.order else None for i in plan.apply] == ["paid"]
