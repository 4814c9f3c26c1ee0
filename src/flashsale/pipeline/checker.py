"""The answer to the broker's transaction check, read from the Redis log.

- token logged as deducted (or deducted then returned): COMMIT;
- token fenced: ROLLBACK;
- no entry yet and the half message is younger than the grace period: UNKNOWN (the producer may still
  be running its pre-deduct; the broker asks again);
- no entry and older: write the fence and read the entry in one script, so either the pre-deduct ran
  first (COMMIT) or the fence did and a late pre-deduct will refuse (ROLLBACK);
- Redis unreachable: UNKNOWN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flashsale import constants as c
from flashsale.errors import FlashSaleError, MalformedMessage
from flashsale.models import Deduction, Delivery, Resolution
from flashsale.ports import CheckStockPort

logger = logging.getLogger(__name__)

_COMMIT_STATES = {c.STATE_DEDUCTED, c.STATE_RETURNED}


class DeductionChecker:
    def __init__(
        self,
        stock: CheckStockPort,
        grace_s: float,
        *,
        clock: Callable[[], float] = time.time,
        observe: Callable[[Resolution], None] | None = None,
    ) -> None:
        self._stock = stock
        self._grace_ms = grace_s * 1000
        self._clock = clock
        self._observe = observe

    def check(self, delivery: Delivery) -> Resolution:
        resolution = self._resolve(delivery)
        logger.info("check message %s key %s -> %s", delivery.message_id, delivery.key, resolution.value)
        if self._observe:
            self._observe(resolution)
        return resolution

    def _resolve(self, delivery: Delivery) -> Resolution:
        try:
            deduction = Deduction.decode(delivery.body)
        except MalformedMessage as exc:
            # No producer of ours sent this, and no consumer could apply it: it never becomes visible.
            logger.error("half message %s is malformed (%s); rolling back", delivery.message_id, exc)
            return Resolution.ROLLBACK
        try:
            entry = self._stock.log_entry(deduction.sku, deduction.token)
            if entry is None:
                born_ms = delivery.born_ms or deduction.ts_ms
                if self._clock() * 1000 - born_ms < self._grace_ms:
                    return Resolution.UNKNOWN
                entry = self._stock.fence(deduction.sku, deduction.token, deduction.user_id, deduction.qty)
                if entry.state == c.STATE_FENCED:
                    logger.warning(
                        "fenced token %s sku %s: no pre-deduct within %.1f s",
                        deduction.token,
                        deduction.sku,
                        self._grace_ms / 1000,
                    )
        except FlashSaleError as exc:
            logger.warning("cannot check token %s (%s); answering unknown", deduction.token, exc)
            return Resolution.UNKNOWN
        return Resolution.COMMIT if entry.state in _COMMIT_STATES else Resolution.ROLLBACK
