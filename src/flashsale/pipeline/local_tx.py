"""The local transaction of one half message: the pre-deduct of its purchases, and what each buyer is told.

A message's purchases are on the SKU's keys, or spread over its partitions: one share per partition,
each a pre-deduct of its own on its own slot, all sent at once. A share that fails says whether its
script may have run (ServiceUnavailable.reached). The producer settles the message itself only when it
knows what every share did:

- every share answered: commit if any purchase was accepted, else roll back;
- no purchase was accepted and every failed share certainly did not run: roll back;
- otherwise (a share may have run unanswered, or one deducted beside one that did not run): neither.
  The checker settles it once every share ran or is fenced, so that a committed message always has a
  record on each of its partitions; the buyers of its accepted purchases hear `pending`, and a retry
  with the same token hears `duplicate`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from flashsale.errors import BusError, FlashSaleError, ServiceUnavailable
from flashsale.logs import ids
from flashsale.models import DeductionMessage, Purchase, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.ports import PurchaseStockPort
from flashsale.records import LogEntry, Prededuct, PredeductResult

logger = logging.getLogger(__name__)

DUPLICATE = "this token was accepted before; nothing new was deducted"
NOT_RUN = "stock could not be reached; nothing was deducted, try again"
PENDING = "the outcome is not known yet; it will be settled within seconds: retry with the same token to learn it"
_NOT_CHECKED = "stock could not be checked; nothing was deducted, try again"


def message(sku: str, requests: Sequence[PurchaseRequest], shards: Sequence[str], gid: str) -> DeductionMessage:
    """The body of the half message: purchases of one shard name it once (a version 2 body, as every
    message was before groups spread over partitions); purchases spread over several name their own."""
    first = shards[0]
    if all(s == first for s in shards):
        purchases = tuple(Purchase(r.token, r.user_id, r.qty) for r in requests)
        return DeductionMessage(sku, purchases, gid, part="" if first == sku else first)
    spread = tuple(Purchase(r.token, r.user_id, r.qty, s) for r, s in zip(requests, shards, strict=True))
    return DeductionMessage(sku, spread, gid)


class LocalTransaction:
    """The pre-deduct of one message's purchases (`requests`, in the order its body carries them), share
    by share, each on the keys the body names for it."""

    def __init__(self, requests: Sequence[PurchaseRequest], body: DeductionMessage) -> None:
        self._requests = requests
        self._purchases = body.purchases
        self._by_shard: dict[str, list[int]] = {}
        for i, purchase in enumerate(body.purchases):
            self._by_shard.setdefault(body.shard_of(purchase), []).append(i)
        self.outcomes: list[PredeductResult | None] = [None] * len(requests)
        self._unknown: set[int] = set()  # purchases whose share may have run unanswered
        self._not_run: dict[int, str] = {}  # purchases whose share certainly did not run: why
        self.failures: list[str] = []

    async def run(self, stock: PurchaseStockPort, gid: str, epoch: int) -> None:
        shares = list(self._by_shard.items())
        if len(shares) == 1:  # the common case, without a task per share
            await self._share(stock, gid, epoch, *shares[0])
        else:
            await asyncio.gather(*(self._share(stock, gid, epoch, shard, idxs) for shard, idxs in shares))

    async def _share(self, stock: PurchaseStockPort, gid: str, epoch: int, shard: str, idxs: list[int]) -> None:
        try:
            results = await stock.prededuct(shard, gid, [self._purchases[i] for i in idxs], epoch)
        except ServiceUnavailable as exc:
            if exc.reached:
                self._unknown.update(idxs)
            else:
                self._not_run.update(dict.fromkeys(idxs, NOT_RUN))
            self.failures.append(f"{shard}: {exc}")
            return
        except FlashSaleError as exc:
            # A script error writes nothing: every purchase is decided before the first write.
            logger.error("pre-deduct of message %s on %s failed: %s", gid, shard, exc, extra=ids(message_id=gid))
            self._not_run.update(dict.fromkeys(idxs, _NOT_CHECKED))
            self.failures.append(f"{shard}: {exc}")
            return
        for i, result in zip(idxs, results, strict=True):
            self.outcomes[i] = result

    @property
    def accepted(self) -> bool:
        return any(o is not None and o.code is Prededuct.ACCEPTED for o in self.outcomes)

    @property
    def unsettled(self) -> bool:
        """Left to the checker: the producer can neither commit nor roll back."""
        return bool(self._unknown) or (bool(self._not_run) and self.accepted)

    def answer(self, i: int, gid: str) -> PurchaseResult:
        request = self._requests[i]
        if i in self._unknown:
            return PurchaseResult(PurchaseStatus.PENDING, request.token, message_id=gid, message=PENDING)
        if i in self._not_run:
            return PurchaseResult(PurchaseStatus.ERROR, request.token, message=self._not_run[i])
        outcome = self.outcomes[i]
        assert outcome is not None
        if outcome.code is Prededuct.ACCEPTED and self.unsettled:
            return PurchaseResult(PurchaseStatus.PENDING, request.token, message_id=gid, message=PENDING)
        return answer(request, outcome, gid)


def seen(token: str, entry: LogEntry, *, confirmed: bool, remaining: int | None = None) -> PurchaseResult:
    """The answer to a token found deducted in the log before its transaction: `duplicate`, with the
    message that deducted it, once a replica holds the entry (`confirmed`); until then `pending`."""
    if confirmed:
        return PurchaseResult(PurchaseStatus.DUPLICATE, token, remaining, entry.message_id, message=DUPLICATE)
    return PurchaseResult(PurchaseStatus.PENDING, token, message_id=entry.message_id, message=PENDING)


def sold_out(token: str, sku: str) -> PurchaseResult:
    """What a buyer hears when nothing of the SKU is left."""
    return PurchaseResult(PurchaseStatus.SOLD_OUT, token, 0, message=f"{sku} is sold out")


def answer(request: PurchaseRequest, outcome: PredeductResult, gid: str) -> PurchaseResult:
    """What a buyer is told of their purchase's pre-deduct."""
    token, sku, code = request.token, request.sku, outcome.code
    if code is Prededuct.ACCEPTED:
        return PurchaseResult(PurchaseStatus.ACCEPTED, token, outcome.remaining, gid)
    if code in (Prededuct.SOLD_OUT, Prededuct.SEALED, Prededuct.INSUFFICIENT, Prededuct.CLOSED):
        if not outcome.remaining:
            return sold_out(token, sku)
        return PurchaseResult(
            PurchaseStatus.SOLD_OUT,
            token,
            outcome.remaining,
            message=f"only {outcome.remaining} left, {request.qty} asked",
        )
    if code is Prededuct.DUPLICATE:
        original = outcome.entry.message_id if outcome.entry else None
        return PurchaseResult(PurchaseStatus.DUPLICATE, token, outcome.remaining, original, message=DUPLICATE)
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
            message="this attempt timed out and was rolled back; nothing was deducted, try again",
        )
    if code is Prededuct.STALE_LAYOUT:
        return PurchaseResult(
            PurchaseStatus.ERROR, token, message=f"{sku} was loaded again meanwhile; nothing was deducted, try again"
        )
    if code is Prededuct.UNKNOWN_SKU:
        return PurchaseResult(PurchaseStatus.INVALID, token, message=f"unknown SKU {sku!r}: it is not on sale")
    return PurchaseResult(PurchaseStatus.INVALID, token, message=f"invalid quantity {request.qty}")


async def settle(action: Callable[[], Awaitable[None]], what: str, gid: str) -> None:
    """Commit or roll back a half message; one the broker did not take is left to the checker, which
    answers from the same record (so what the local transaction did stands either way)."""
    try:
        await action()
    except BusError as exc:
        logger.warning(
            "%s of message %s failed (%s); the checker will settle it", what, gid, exc, extra=ids(message_id=gid)
        )
