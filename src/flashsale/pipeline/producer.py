"""A purchase: half message, Redis pre-deduct as the local transaction, then commit or roll back.

The service is a coroutine on the producer's event loop (see service/engine.py): a purchase awaits the
broker and Redis without holding a thread.

The order matters. The half message goes first so that a deduction can never exist in Redis without a
message that will carry it to MySQL: if this process dies after the pre-deduct, the broker asks a
checker, which finds the token in the Redis log and commits. A pre-deduct whose outcome is unknown
(Redis timed out) is neither committed nor rolled back: the checker settles it from the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from flashsale import constants as c
from flashsale import failpoints
from flashsale.errors import BusError, FlashSaleError, InvalidInput, ServiceUnavailable
from flashsale.models import Deduction, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.ports import PurchaseStockPort, TxBusPort
from flashsale.records import Prededuct, PredeductResult

logger = logging.getLogger(__name__)

Observer = Callable[[PurchaseResult, float], None]


class SoldOutCache:
    """SKUs known to be sold out, trusted for `ttl_s`; then asked of Redis again (a restock clears it).

    Used from one event loop only, so it needs no lock.
    """

    def __init__(self, stock: PurchaseStockPort, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._stock = stock
        self._ttl_s = ttl_s
        self._clock = clock
        self._until: dict[str, float] = {}

    def mark(self, sku: str) -> None:
        self._until[sku] = self._clock() + self._ttl_s

    async def is_sold_out(self, sku: str) -> bool:
        until = self._until.get(sku)
        if until is None:
            return False
        if self._clock() < until:
            return True
        try:
            still = await self._stock.is_sold_out(sku)
        except FlashSaleError:
            still = False  # cannot tell: let the pre-deduct decide
        if still:
            self._until[sku] = self._clock() + self._ttl_s
        else:
            self._until.pop(sku, None)
        return still


class PurchaseService:
    def __init__(
        self,
        stock: PurchaseStockPort,
        bus: TxBusPort,
        topic: str,
        *,
        sold_out_cache_s: float = 0.5,
        failpoint_names: frozenset[str] = frozenset(),
        observe: Observer | None = None,
    ) -> None:
        self._stock = stock
        self._bus = bus
        self._topic = topic
        self._sold_out = SoldOutCache(stock, sold_out_cache_s)
        self._failpoints = failpoint_names
        self._observe = observe

    async def purchase(self, sku: object, user_id: object, qty: object, token: object) -> PurchaseResult:
        """Validate and submit one purchase. Never raises for a business outcome."""
        started = time.perf_counter()
        try:
            request = PurchaseRequest.build(sku, user_id, qty, token)
        except InvalidInput as exc:
            result = PurchaseResult(PurchaseStatus.INVALID, token=str(token), message=str(exc))
        else:
            result = await self.submit(request)
        if self._observe:
            self._observe(result, time.perf_counter() - started)
        return result

    async def submit(self, request: PurchaseRequest) -> PurchaseResult:
        token, sku = request.token, request.sku
        if await self._sold_out.is_sold_out(sku):
            return PurchaseResult(PurchaseStatus.SOLD_OUT, token, remaining=0, message=f"{sku} is sold out")

        body = Deduction(token, sku, request.user_id, request.qty).encode()
        try:
            half = await self._bus.send_half_async(self._topic, token, body, c.DEDUCTION_TAG)
        except BusError as exc:
            logger.warning("half message for token %s sku %s not sent: %s", token, sku, exc)
            return PurchaseResult(
                PurchaseStatus.ERROR,
                token,
                message="the message broker is unavailable; nothing was deducted, try again",
            )
        failpoints.hit(self._failpoints, failpoints.AFTER_HALF_MESSAGE)

        try:
            outcome = await self._stock.prededuct(sku, token, request.user_id, request.qty, half.message_id)
        except ServiceUnavailable as exc:
            # The script may or may not have run: neither commit nor roll back, the checker will know.
            logger.warning(
                "pre-deduct of token %s sku %s has an unknown outcome (%s); left to the checker", token, sku, exc
            )
            return PurchaseResult(
                PurchaseStatus.PENDING,
                token,
                message_id=half.message_id,
                message="the outcome is not known yet; it will be settled within seconds",
            )
        except FlashSaleError as exc:
            # A script error writes nothing (every check runs before the first write): roll back.
            logger.error("pre-deduct of token %s sku %s failed: %s", token, sku, exc)
            await self._end(half.rollback, "rollback", token, half.message_id)
            return PurchaseResult(PurchaseStatus.ERROR, token, message="stock could not be checked; try again")
        failpoints.hit(self._failpoints, failpoints.AFTER_PREDEDUCT)

        if outcome.code is Prededuct.ACCEPTED:
            # If the commit is lost, the checker commits from the Redis log: the purchase stands.
            await self._end(half.commit, "commit", token, half.message_id)
            if outcome.remaining == 0:
                self._sold_out.mark(sku)
            return PurchaseResult(PurchaseStatus.ACCEPTED, token, outcome.remaining, half.message_id)

        # A rejection deducted nothing. If this rollback is lost the checker decides from the log:
        # no entry -> fence and roll back; a duplicate's entry -> commit, which the consumer ignores.
        await self._end(half.rollback, "rollback", token, half.message_id)
        return self._rejection(request, outcome)

    def _rejection(self, request: PurchaseRequest, outcome: PredeductResult) -> PurchaseResult:
        token, sku, code = request.token, request.sku, outcome.code
        if code in (Prededuct.SOLD_OUT, Prededuct.INSUFFICIENT):
            if outcome.remaining == 0:
                self._sold_out.mark(sku)
                return PurchaseResult(PurchaseStatus.SOLD_OUT, token, 0, message=f"{sku} is sold out")
            return PurchaseResult(
                PurchaseStatus.SOLD_OUT,
                token,
                outcome.remaining,
                message=f"only {outcome.remaining} left, {request.qty} asked",
            )
        if code is Prededuct.DUPLICATE:
            original = outcome.entry.message_id if outcome.entry else None
            return PurchaseResult(
                PurchaseStatus.DUPLICATE,
                token,
                outcome.remaining,
                original,
                message="this token was accepted before; nothing new was deducted",
            )
        if code is Prededuct.LIMIT_EXCEEDED:
            return PurchaseResult(
                PurchaseStatus.LIMIT_EXCEEDED,
                token,
                outcome.remaining,
                message=f"user {request.user_id} already bought {outcome.bought} of {sku}",
            )
        if code is Prededuct.FENCED:
            return PurchaseResult(
                PurchaseStatus.ERROR,
                token,
                outcome.remaining,
                message="this token timed out and was rolled back; nothing was deducted, retry with a new token",
            )
        if code is Prededuct.UNKNOWN_SKU:
            return PurchaseResult(PurchaseStatus.INVALID, token, message=f"unknown SKU {sku!r}: it is not on sale")
        return PurchaseResult(PurchaseStatus.INVALID, token, message=f"invalid quantity {request.qty}")

    @staticmethod
    async def _end(action: Callable[[], Awaitable[None]], what: str, token: str, message_id: str) -> None:
        try:
            await action()
        except BusError as exc:
            logger.warning(
                "%s of token %s message %s failed (%s); the checker will settle it", what, token, message_id, exc
            )
