"""Restocks during a sale: units added to a SKU's stock once per request id, carried to MySQL like a purchase.

The same transaction as a purchase: the half message first (its body names the request and the units),
then add_stock.lua as the local transaction on the SKU's slot, then a commit when this call added the
units and a rollback otherwise (`already_added` adds nothing, so there is nothing to carry). The checker
answers from the message's record, and the consumer applies the record's units, never the body's. A
restock that cannot tell (Redis or the broker did not answer) is asked again with the same request id,
which then hears what the first call did.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flashsale import constants as c
from flashsale import failpoints
from flashsale.errors import BusError, InvalidInput, ServiceUnavailable
from flashsale.logs import ids
from flashsale.models import DeductionMessage, parse_qty, require_id
from flashsale.pipeline import local_tx
from flashsale.ports import HalfMessagePort, RestockPort, TxBusPort
from flashsale.records import Restock, RestockResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestockAnswer:
    outcome: Restock
    qty: int  # units the request added (by this call, or by the first one of its id)
    stock: int | None  # the SKU's stock in Redis after the call, a partitioned SKU's pool (None: not loaded)
    message_id: str | None = None  # the message that carries the addition to MySQL (this call added)


class Restocker:
    def __init__(
        self, stock: RestockPort, bus: TxBusPort, topic: str, *, failpoint_names: frozenset[str] = frozenset()
    ) -> None:
        self._stock = stock
        self._bus = bus
        self._topic = topic
        self._failpoints = failpoint_names

    async def add(self, sku: str, qty: object, *, request_id: str) -> RestockAnswer:
        """Add `qty` units to `sku` on sale; `request_id` makes a retry safe.

        Raises InvalidInput for a bad SKU, quantity or id, and ServiceUnavailable when Redis or the broker
        cannot say: the caller asks again with the same `request_id` and hears what happened.
        """
        sku = require_id(sku, "sku")
        units = parse_qty(qty)
        require_id(request_id, "request id", c.TOKEN_PATTERN)
        gid = self._bus.new_message_id()
        half = await self._send_half(sku, units, request_id, gid)
        try:
            result = await self._stock.add_stock(sku, units, request_id=request_id, message_id=gid)
        except ServiceUnavailable as exc:
            if not exc.reached:
                await local_tx.settle(half.rollback, "rollback", gid)
            # Else it may have run: the checker settles the message from its record (commit if it added).
            raise
        failpoints.hit(self._failpoints, failpoints.AFTER_RESTOCK)
        if result.code is Restock.ADDED:
            await local_tx.settle(half.commit, "commit", gid)
            return _answer(result, gid)
        await local_tx.settle(half.rollback, "rollback", gid)
        if result.code is Restock.INVALID_QTY:  # parse_qty let it through: a bug, never the caller's
            raise InvalidInput(f"Redis refused {units} units as a restock")
        return _answer(result, None)

    async def _send_half(self, sku: str, qty: int, request_id: str, gid: str) -> HalfMessagePort:
        message = DeductionMessage.restock(sku, request_id, qty, gid, int(time.time() * 1000))
        try:
            return await self._bus.send_half_async(self._topic, request_id, message.encode(), c.RESTOCK_TAG, gid)
        except BusError as exc:
            logger.warning("restock %s of sku %s not sent: %s", request_id, sku, exc, extra=ids(sku=sku))
            raise ServiceUnavailable("RocketMQ", self._topic, str(exc), reached=False) from exc


def _answer(result: RestockResult, gid: str | None) -> RestockAnswer:
    return RestockAnswer(result.code, result.qty, result.stock, gid)
