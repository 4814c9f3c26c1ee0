"""Decisions on orders awaiting payment: pay, cancel or expire, each carried to MySQL like a purchase.

The same transaction as a purchase: the half message first (its body names the order), then decide.lua
as the local transaction, on the token's own slot, then a commit when this call changed the order (its
log entry names this message as the decision's) and a rollback otherwise (an answer such as
`already_paid` changes nothing, so there is nothing to carry). The checker answers from the same entry,
and the consumer applies the entry's state, never the body's. Whichever decision reaches the script
first wins; a payment that arrives once the deadline has passed expires the order there and then.

A token of a partitioned SKU was sold on one partition, the first of its order (records.Layout.order)
that was open then, and its entry stays there: it is looked up along that order, and decided on that
partition's slot, whose log, records and stock the message names (its `part`) for the checker and the
consumer. Units given back go to that partition; if it closed meanwhile, the scheduler drains them back
to the pool (pipeline/partitions.py), so they sell again either way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flashsale import constants as c
from flashsale.errors import BusError, InvalidInput, ServiceUnavailable
from flashsale.logs import ids
from flashsale.models import SOURCE_DECISION, DeductionMessage, Purchase, require_id
from flashsale.pipeline import local_tx
from flashsale.ports import HalfMessagePort, OrderStockPort, TxBusPort
from flashsale.records import Decision, LogEntry

logger = logging.getLogger(__name__)

ACTIONS = ("pay", "cancel", "expire")
#: The state an order shows: its log entry's, or `final` for a SKU sold without a payment deadline.
FINAL = "final"


def describe(entry: LogEntry) -> dict[str, object]:
    """An order as the HTTP API and the CLI show it."""
    return {
        "token": entry.token,
        "sku": entry.sku,
        "user_id": entry.user,
        "qty": entry.qty,
        "state": entry.order or FINAL,
        "due_ms": entry.due_ms,
        "decided_ms": entry.decided_ms,
    }


@dataclass(frozen=True)
class OrderAnswer:
    decision: Decision
    entry: LogEntry | None  # the order's log entry after the decision (None: no order)
    message_id: str | None = None  # the message that carries this decision to MySQL (it changed the order)


class OrderDesk:
    def __init__(self, stock: OrderStockPort, bus: TxBusPort, topic: str) -> None:
        self._stock = stock
        self._bus = bus
        self._topic = topic

    async def show(self, sku: str, token: str) -> LogEntry | None:
        """The order's log entry: its state, deadline and decision (None: no purchase of that token)."""
        layout = await self._stock.layout(sku)
        shards = list(layout.order(token)) if layout else [sku]
        # Nearly every token was sold on the first partition of its order: one read, then the others at once.
        for wave in (shards[:1], shards[1:]):
            found = await self._stock.entries({shard: [token] for shard in wave}) if wave else {}
            for shard in wave:
                entry = found[shard].get(token)
                if entry is not None and entry.state in c.DEDUCTED_STATES:
                    return entry
        return None

    async def decide(self, sku: str, token: str, action: str, *, decision_id: str, user: str = "") -> OrderAnswer:
        """Pay, cancel (as `user`) or expire the order of `token`; `decision_id` makes a retry safe.

        Raises ServiceUnavailable when Redis or the broker cannot say: the caller asks again with the
        same `decision_id` and hears the first answer.
        """
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action {action!r}", hint=f"one of {', '.join(ACTIONS)}")
        require_id(decision_id, "decision id", c.TOKEN_PATTERN)
        entry = await self.show(sku, token)
        if entry is None:
            return OrderAnswer(Decision.NO_ORDER, None)
        if entry.order is None:
            return OrderAnswer(Decision.FINAL, entry)
        gid = self._bus.new_message_id()
        half = await self._send_half(sku, entry, gid)
        try:
            decision, after = await self._stock.decide(
                entry.part or sku, token, action, user=user, decision_id=decision_id, message_id=gid
            )
        except ServiceUnavailable as exc:
            if not exc.reached:
                await local_tx.settle(half.rollback, "rollback", gid)
            # Else it may have run: the checker settles the message from the log (commit if it decided).
            raise
        if after is not None and after.decided_by == gid:
            await local_tx.settle(half.commit, "commit", gid)
            return OrderAnswer(decision, after, gid)
        await local_tx.settle(half.rollback, "rollback", gid)
        return OrderAnswer(decision, after)

    async def _send_half(self, sku: str, entry: LogEntry, gid: str) -> HalfMessagePort:
        message = DeductionMessage(
            sku,
            (Purchase(entry.token, entry.user, entry.qty),),
            gid,
            int(time.time() * 1000),
            SOURCE_DECISION,
            entry.part or "",
        )
        try:
            half = await self._bus.send_half_async(self._topic, entry.token, message.encode(), c.DECISION_TAG, gid)
        except BusError as exc:
            logger.warning(
                "decision on %s of sku %s not sent: %s", entry.token, sku, exc, extra=ids(sku=sku, token=entry.token)
            )
            raise ServiceUnavailable("RocketMQ", self._topic, str(exc), reached=False) from exc
        return half
