"""What the consumer applies of a decision on an order: the log's state of the order, never the body's."""

from __future__ import annotations

from flashsale.models import (
    RESTOCK_USER,
    SOURCE_DECISION,
    SOURCE_PURCHASE,
    SOURCE_RESTOCK,
    DeductionMessage,
    Delivery,
    Purchase,
)
from flashsale.pipeline import accepted
from flashsale.records import Addition, LogEntry, LookedUp, Order, TxRecord

TS = 1_700_000_000_000


def _decoded(gid: str, source: str, token: str = "t1") -> accepted.Decoded:
    message = DeductionMessage("sku", (Purchase(token, "u1", 1),), gid, TS, source)
    return accepted.Decoded(Delivery(gid, "topic", token, message.encode(), TS, 1), message)


def _entry(order: str, decided_by: str | None, state: str = "deducted") -> LogEntry:
    entry = LogEntry("t1", state, "sku", "u1", 1, TS, "m-buy", order=order, due_ms=TS + 5000)
    return entry._replace(decided_ms=TS + 10 if decided_by else None, decided_by=decided_by)


def test_a_decision_applies_its_orders_entry_with_the_deduction_as_a_purchase() -> None:
    entry = _entry("cancelled", "m-cancel", state="returned")
    plan = accepted.plan([_decoded("m-cancel", SOURCE_DECISION)], {"sku": LookedUp({"t1": entry}, {}, 0, 0)})
    assert [i.order for i in plan.apply] == [Order("cancelled", TS + 5000, TS + 10, "m-cancel")]
    (item,) = plan.apply
    assert (item.message_id, item.deduction.source, item.order and item.order.returned) == (
        "m-buy",
        SOURCE_PURCHASE,
        True,
    )


def test_a_decision_on_a_partition_reads_that_partitions_log_and_applies_to_its_sku() -> None:
    message = DeductionMessage("sku", (Purchase("t1", "u1", 1),), "m-expire", TS, SOURCE_DECISION, part="sku#2")
    decoded = accepted.Decoded(Delivery("m-expire", "topic", "t1", message.encode(), TS, 1), message)
    assert accepted.wanted([decoded]) == {"sku#2": (["t1"], ["m-expire"])}
    entry = _entry("expired", "m-expire", state="returned")._replace(part="sku#2")
    (item,) = accepted.plan([decoded], {"sku#2": LookedUp({"t1": entry}, {}, 0, 0)}).apply
    assert (item.deduction.sku, item.order and item.order.state) == ("sku", "expired")


def test_a_decision_the_log_does_not_name_applies_nothing() -> None:
    plan = accepted.plan(
        [_decoded("m-late", SOURCE_DECISION)], {"sku": LookedUp({"t1": _entry("paid", "m-pay")}, {}, 0, 0)}
    )
    assert (plan.apply, plan.skipped) == ([], 1)


def test_a_purchase_carries_its_orders_state_as_the_log_has_it_now() -> None:
    # The purchase's message arrives after the order was paid: MySQL gets both in one go.
    entry = _entry("paid", "m-pay")._replace(message_id="m-buy")
    plan = accepted.plan([_decoded("m-buy", SOURCE_PURCHASE)], {"sku": LookedUp({"t1": entry}, {}, 0, 0)})
    assert [i.order.state if i.order else None for i in plan.apply] == ["paid"]


def _restock(gid: str, request: str = "r1", qty: int = 30) -> accepted.Decoded:
    message = DeductionMessage("sku", (Purchase(request, RESTOCK_USER, qty),), gid, TS, SOURCE_RESTOCK)
    return accepted.Decoded(Delivery(gid, "topic", request, message.encode(), TS, 1), message)


def test_a_restock_applies_the_units_its_record_says_it_added_never_the_bodys() -> None:
    record = TxRecord.parse('{"state": "ran", "kind": "restock", "request": "r1", "qty": 20, "code": 1, "ts": 7}')
    plan = accepted.plan([_restock("m-add", qty=999)], {"sku": LookedUp({}, {"m-add": record}, 20, 0)})
    assert (plan.additions, plan.apply, plan.skipped) == ([Addition("sku", "r1", 20, "m-add", 7)], [], 0)


def test_a_restock_that_added_nothing_or_has_no_record_applies_nothing() -> None:
    already = TxRecord.parse('{"state": "fenced", "ts": 7}')
    plan = accepted.plan(
        [_restock("m-a"), _restock("m-b")], {"sku": LookedUp({}, {"m-a": already, "m-b": None}, 20, 0)}
    )
    assert (plan.additions, plan.skipped) == ([], 2)


def test_deductions_of_a_restocked_sku_may_wait_for_units_on_their_way() -> None:
    entry = LogEntry("t1", "deducted", "sku", "u1", 1, TS, "m-buy")
    restocked = accepted.plan([_decoded("m-buy", SOURCE_PURCHASE)], {"sku": LookedUp({"t1": entry}, {}, 30, 0)})
    plain = accepted.plan([_decoded("m-buy", SOURCE_PURCHASE)], {"sku": LookedUp({"t1": entry}, {}, 0, 0)})
    assert [i.added_qty for i in restocked.apply] == [30]
    assert [i.added_qty for i in plain.apply] == [0]


def test_a_purchase_whose_record_a_reload_retired_is_skipped_even_where_its_entry_was_read() -> None:
    """The log read before a reload emptied it, the record after it retired the message: the entry is of the
    replaced sale, and applied it would land on the new one."""
    entry = LogEntry("t1", "deducted", "sku", "u1", 1, TS, "m-buy")
    record = TxRecord.parse('{"state": "stale", "accepted": 1, "replaced": 1700000000500}')
    looked = {"sku": LookedUp({"t1": entry}, {"m-buy": record}, 0, 3)}
    plan = accepted.plan([_decoded("m-buy", SOURCE_PURCHASE)], looked)
    assert (plan.apply, plan.conflicts, plan.skipped) == ([], [], 1)


def test_a_batch_asks_for_each_token_and_message_once_in_the_order_first_met() -> None:
    def decoded(gid: str, tokens: list[str], source: str = SOURCE_PURCHASE) -> accepted.Decoded:
        message = DeductionMessage("sku", tuple(Purchase(t, "u1", 1) for t in tokens), gid, TS, source)
        return accepted.Decoded(Delivery(gid, "topic", tokens[0], message.encode(), TS, 1), message)

    # A redelivered message and a replay (no gid of its own to look up) share tokens with the others.
    batch = [decoded("m1", ["t3", "t1"]), decoded("m2", ["t2", "t1"]), decoded("m1", ["t3", "t1"])]
    batch.append(decoded("", ["t4", "t2"], "replay"))
    assert accepted.wanted(batch) == {"sku": (["t3", "t1", "t2", "t4"], ["m1", "m2"])}
