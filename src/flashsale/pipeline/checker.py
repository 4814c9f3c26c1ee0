"""The answer to the broker's transaction check of a half message, read from Redis (see adapters/redis/lua/fence.lua).

- the message's pre-deduct ran and accepted purchases whose log entries name this message: COMMIT. A
  body that says another user or quantity than the log is logged, and committed all the same: the
  deduction happened, and the consumer applies the log's values, never the body's;
- it ran and accepted nothing: ROLLBACK;
- it never ran, and the first check that found it so is more recent than the grace period (on Redis's
  clock): UNKNOWN (the producer may still be running it; the broker asks again);
- it never ran, and that first check is older: the fence is written in the same script that looked,
  so either the pre-deduct ran first (answered as above) or the fence did and a late pre-deduct of this
  message deducts nothing: ROLLBACK;
- its pre-deduct was refused as placed by another load (stale): it deducted nothing, as if fenced;
- a decision on an order (pay, cancel, expire: pipeline/orders.py) is looked at the same way, its
  decide.lua in place of the pre-deduct: COMMIT when the order's entry names it as its decision;
- a restock (pipeline/restock.py) likewise, add_stock.lua in its place: COMMIT when its record says it
  added the units;
- Redis unreachable: UNKNOWN.

A message whose purchases are spread over partitions has a pre-deduct (a share) on each: every share
is looked at as above, and the message is committed only once each one ran or is fenced, when the
shares that ran accepted something. Any share too young, or unreachable: UNKNOWN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flashsale import constants as c
from flashsale.errors import FlashSaleError, MalformedMessage
from flashsale.logs import ids
from flashsale.models import SOURCE_RESTOCK, DeductionMessage, Delivery, Resolution
from flashsale.pipeline.accepted import disagrees, naming
from flashsale.ports import CheckStockPort

logger = logging.getLogger(__name__)


class DeductionChecker:
    def __init__(
        self,
        stock: CheckStockPort,
        grace_s: float,
        *,
        observe: Callable[[Resolution, float], None] | None = None,
    ) -> None:
        self._stock = stock
        self._grace_ms = round(grace_s * 1000)
        self._observe = observe

    def check(self, delivery: Delivery) -> Resolution:
        started = time.perf_counter()
        resolution = self._resolve(delivery)
        logger.info(
            "check message %s key %s -> %s",
            delivery.message_id,
            delivery.key,
            resolution.value,
            extra=ids(message_id=delivery.message_id, token=delivery.key),
        )
        if self._observe:
            self._observe(resolution, time.perf_counter() - started)
        return resolution

    def _resolve(self, delivery: Delivery) -> Resolution:
        try:
            message = DeductionMessage.decode(delivery.body, delivery.message_id)
        except MalformedMessage as exc:
            # No producer of ours sent this, and no consumer could apply it: it never becomes visible.
            logger.error(
                "half message %s is malformed (%s); rolling back",
                delivery.message_id,
                exc,
                extra=ids(message_id=delivery.message_id),
            )
            return Resolution.ROLLBACK
        if message.gid != delivery.message_id:
            logger.error("half message %s names message %s in its body; rolling back", delivery.message_id, message.gid)
            return Resolution.ROLLBACK
        ours = []
        restocked = False
        by = naming(message)
        for shard, purchases in message.shards().items():  # each share of the message: its own pre-deduct
            try:
                view = self._stock.check(shard, message.gid, [p.token for p in purchases], grace_ms=self._grace_ms)
            except FlashSaleError as exc:
                logger.warning(
                    "cannot check message %s on %s (%s); answering unknown",
                    delivery.message_id,
                    shard,
                    exc,
                    extra=ids(message_id=delivery.message_id, sku=message.sku),
                )
                return Resolution.UNKNOWN
            if view.state == c.TX_YOUNG:
                return Resolution.UNKNOWN  # the shares fenced already stay fenced: asked again, this one is too
            if view.state == c.TX_STALE:
                continue  # refused as another load's: it deducted nothing
            if view.state == c.TX_FENCED:
                logger.warning(
                    "fenced message %s on %s: no pre-deduct within %.1f s",
                    message.gid,
                    shard,
                    self._grace_ms / 1000,
                    extra=ids(message_id=message.gid, sku=message.sku),
                )
                continue
            if message.source == SOURCE_RESTOCK:
                restocked = restocked or (view.record is not None and view.record.added > 0)
                continue
            ours += [(p, e) for p in purchases if (e := by(view.entries.get(p.token), message.gid))]
        for purchase, entry in ours:
            disagrees(entry, purchase, message)
        return Resolution.COMMIT if ours or restocked else Resolution.ROLLBACK
