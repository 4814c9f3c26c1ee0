"""Purchases: grouped, answered from one Redis read when they cannot succeed, else one transaction per group.

A transaction is a half message, the Redis pre-deduct of its purchases as the local transaction, then
commit or roll back. The service runs on the producer's event loop (see service/engine.py): a purchase
awaits the broker and Redis without holding a thread.

- Purchases of one SKU arriving within a few milliseconds form a group (grouping.py): one half message
  and one pre-deduct serve them all, each purchase keeping its own rules and answer.
- A SKU sold out, whose log this process holds a copy of (a seal: sold_out.py), answers `sold_out` at
  once to a token the copy does not hold, with no Redis call: Redis sells nothing until the seal ends.
- Before a group is sent, one Redis read answers those that cannot succeed, with no broker call: a
  token seen before (its original answer: `duplicate` once a replica holds its entry, where there are
  replicas, else `pending`), an unknown SKU, a sold-out SKU, a buyer at the limit. A SKU seen with
  stock left within the last moment skips that read: its group goes straight to its transaction, whose
  pre-deduct answers all the read would (the read is a hint, the pre-deduct decides).
- A partitioned SKU's group is placed by the scheduler (partitions.py): still one half message, whose
  pre-deduct runs on each partition its purchases go to (local_tx.py).
- The order of a transaction matters. The half message goes first so that a deduction can never exist
  in Redis without a message that will carry it to MySQL: if this process dies after the pre-deduct,
  the broker asks a checker, which finds the purchases in the Redis log and commits. A pre-deduct whose
  outcome is unknown (Redis timed out) is neither committed nor rolled back: the checker settles it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from flashsale import constants as c
from flashsale import failpoints
from flashsale.errors import BusError, FlashSaleError, InvalidInput
from flashsale.logs import ids
from flashsale.models import DeductionMessage, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline import local_tx
from flashsale.pipeline.grouping import Grouper
from flashsale.pipeline.local_tx import LocalTransaction
from flashsale.pipeline.partitions import Placed, Scheduler
from flashsale.pipeline.sold_out import SoldOutCache, boot_clock
from flashsale.ports import HalfMessagePort, PurchaseStockPort, TxBusPort
from flashsale.records import Layout, LogEntry, Peek

logger = logging.getLogger(__name__)

Observer = Callable[[PurchaseResult, float], None]
#: Called with the size of each group sent to the broker as one transaction.
GroupObserver = Callable[[int], None]

_BROKER_DOWN = "the message broker is unavailable; nothing was deducted, try again"


class PurchaseService:
    def __init__(
        self,
        stock: PurchaseStockPort,
        bus: TxBusPort,
        topic: str,
        *,
        group_size: int = 1,
        group_wait_s: float = 0.0,
        group_hold_s: float = 0.0,
        sold_out_cache_s: float = 0.5,
        seal_cap_s: float = c.SEAL_MAX_TRUST_S,
        failpoint_names: frozenset[str] = frozenset(),
        observe: Observer | None = None,
        observe_group: GroupObserver | None = None,
        scheduler: Scheduler | None = None,
        clock: Callable[[], float] = boot_clock,
    ) -> None:
        self._stock = stock
        #: Places purchases of partitioned SKUs; without one, every SKU is sold from its own keys.
        self._scheduler = scheduler
        self._bus = bus
        self._topic = topic
        self._sold_out = SoldOutCache(stock, sold_out_cache_s, clock, seal_cap_s)
        self._failpoints = failpoint_names
        self._observe = observe
        self._observe_group = observe_group
        # A sold-out SKU's groups are one Redis read each, no transaction: one closes as soon as the last is
        # answered, so a sold-out answer waits for no timer.
        self._grouper = Grouper(
            self._handle_group, size=group_size, wait_s=group_wait_s, hold_s=group_hold_s, eager=self._sold_out.marked
        )

    async def purchase(self, sku: object, user_id: object, qty: object, token: object) -> PurchaseResult:
        """Validate and submit one purchase. Never raises for a business outcome."""
        try:
            request = PurchaseRequest.build(sku, user_id, qty, token)
        except InvalidInput as exc:
            result = PurchaseResult(PurchaseStatus.INVALID, token=str(token), message=str(exc))
            if self._observe:
                self._observe(result, 0.0)
            return result
        return await self.submit(request)

    @property
    def idle(self) -> bool:
        """No purchase waits for its group, no group for its answer, and no seal for Redis."""
        return self._grouper.idle and not self._sold_out.sealing

    async def submit(self, request: PurchaseRequest) -> PurchaseResult:
        """A valid purchase: its answer, at once when its SKU is sealed (sold_out.py), else once its group
        has one."""
        started = time.perf_counter()
        result = self._sold_out.answer(request) or await self._grouper.submit(request)
        if self._observe:
            self._observe(result, time.perf_counter() - started)
        return result

    async def _handle_group(self, sku: str, requests: Sequence[PurchaseRequest]) -> list[PurchaseResult]:
        """A group of one SKU: sold from the SKU's keys, or spread over its partitions by the scheduler."""
        if self._scheduler is None:
            return await self._handle_sku(sku, requests)
        try:
            layout = await self._scheduler.layout(sku)
        except FlashSaleError as exc:
            logger.warning("cannot read the layout of %s: %s", sku, exc, extra=ids(sku=sku))
            return self._all(requests, PurchaseStatus.ERROR, local_tx.NOT_RUN)
        if layout is None:
            return await self._handle_sku(sku, requests)
        return await self._scheduler.sell(layout, requests, self._send_to_parts)

    async def _handle_sku(self, sku: str, requests: Sequence[PurchaseRequest]) -> list[PurchaseResult]:
        """Answer what one Redis read can answer; send the rest as one transaction.

        A SKU seen with stock left (by the last read or pre-deduct, within the cache's time) skips the read:
        its pre-deduct answers a token seen before, a buyer at the limit or the last units gone as the read
        would, and under load the read cost a group about as much CPU as a transaction of rejections saves
        (run Q in docs/performance.md). Once a pre-deduct leaves no stock, the reads come back."""
        if self._sold_out.in_stock(sku):
            return await self.commit_group(sku, requests)
        sold_out = await self._sold_out.is_sold_out(sku)
        try:
            peek = await self._stock.peek(sku, requests)
        except FlashSaleError as exc:
            logger.warning("cannot read %s ahead of its transaction: %s", sku, exc, extra=ids(sku=sku))
            if sold_out:  # no broker call for a sold-out SKU; and no answer for a token not looked up
                return self._all(requests, PurchaseStatus.ERROR, "stock could not be checked; try again")
            return await self.commit_group(sku, requests)
        if peek.stock == 0:
            self._sold_out.mark(sku)
            self._sold_out.seal(sku)
            if not any(peek.entries.values()):  # no token seen before: every answer is the same, in one pass
                return [local_tx.sold_out(r.token, sku) for r in requests]
        elif peek.stock:
            self._sold_out.saw_stock(sku)
        answers = await self._seen(sku, requests, peek)
        answers = [a or self._early(r, peek) for a, r in zip(answers, requests, strict=True)]
        rest = [i for i, a in enumerate(answers) if a is None]
        if rest:
            done = await self.commit_group(sku, [requests[i] for i in rest])
            for i, result in zip(rest, done, strict=True):
                answers[i] = result
        return [a for a in answers if a is not None]

    async def _seen(self, sku: str, requests: Sequence[PurchaseRequest], peek: Peek) -> list[PurchaseResult | None]:
        """The answers of tokens seen before: `duplicate` from their log entries, once a replica holds them
        (where there are replicas); `pending` when none does yet, for a failover could still lose them."""
        found = {t: e for t, e in peek.entries.items() if e is not None and e.state in c.DEDUCTED_STATES}
        held: dict[str, LogEntry | None] = dict(found)
        confirmed = True
        if found:
            try:
                held = (await self._stock.confirm({sku: found}))[sku]
            except FlashSaleError as exc:
                logger.warning("log entries of %s not confirmed by a replica: %s", sku, exc, extra=ids(sku=sku))
                confirmed = False
        answers: list[PurchaseResult | None] = []
        for r in requests:
            entry = held.get(r.token)
            if entry is not None and entry.state in c.DEDUCTED_STATES:
                answers.append(local_tx.seen(r.token, entry, confirmed=confirmed, remaining=peek.stock))
            else:
                answers.append(None)
        return answers

    def _early(self, request: PurchaseRequest, peek: Peek) -> PurchaseResult | None:
        """The answer of a purchase that cannot succeed, or None: then the pre-deduct decides.

        Sold out is judged by the stock just read, never by the cached flag: units given back or restocked
        sell at once, and a cache that each sold-out answer renewed would never see them under load."""
        token, sku = request.token, request.sku
        if peek.entries.get(token) is not None:
            # Seen before, and not confirmed as deducted: a fence a checker wrote for this very token (before
            # fences named messages), or an entry gone with a failover. The pre-deduct decides.
            return None
        if peek.stock is None:
            return PurchaseResult(PurchaseStatus.INVALID, token, message=f"unknown SKU {sku!r}: it is not on sale")
        if peek.stock == 0:
            return local_tx.sold_out(token, sku)
        bought = peek.bought.get(request.user_id, 0)
        if peek.per_user_limit and bought + request.qty > peek.per_user_limit:
            return PurchaseResult(
                PurchaseStatus.LIMIT_EXCEEDED,
                token,
                peek.stock,
                message=f"user {request.user_id} already bought {bought} of {sku}",
            )
        return None

    async def commit_group(self, sku: str, requests: Sequence[PurchaseRequest]) -> list[PurchaseResult]:
        """One transaction for purchases of one SKU sold from its own keys: an answer for each, in order."""
        return [result for result, _ in await self._transact(sku, requests)]

    async def _send_to_parts(
        self, layout: Layout, requests: Sequence[PurchaseRequest], parts: Sequence[str]
    ) -> list[Placed]:
        """The scheduler's Sender: purchases of a partitioned SKU as one transaction, each on the partition
        the scheduler placed it on by `layout`, whose epoch every share's pre-deduct carries."""
        return await self._transact(layout.sku, requests, parts, layout.epoch)

    async def _transact(
        self, sku: str, requests: Sequence[PurchaseRequest], parts: Sequence[str] | None = None, epoch: int = 0
    ) -> list[Placed]:
        """One half message for purchases of one SKU, then their pre-deduct as its local transaction: on
        the SKU's keys, or on the partition `parts` names for each purchase (placed by the layout of
        `epoch`), every partition's share at once. An answer for each purchase, in order, with the
        pre-deduct's code behind it (None where there is none)."""
        gid = self._bus.new_message_id()
        message = local_tx.message(sku, requests, list(parts) if parts else [sku] * len(requests), gid)
        half = await self._send_half(sku, requests, message, gid)
        if half is None:
            # The next group is read first: with no broker, the read's answers (a token seen before, sold
            # out, the limit) are the only ones a buyer can have.
            self._sold_out.forget(sku)
            return [(r, None) for r in self._all(requests, PurchaseStatus.ERROR, _BROKER_DOWN)]
        run = LocalTransaction(requests, message)
        await run.run(self._stock, gid, 0 if parts is None else epoch)
        failpoints.hit(self._failpoints, failpoints.AFTER_PREDEDUCT)
        await self._settle(sku, gid, run, half)
        if parts is None:
            self._saw(sku, [o.remaining for o in run.outcomes if o is not None and o.remaining is not None])
        return [(run.answer(i, gid), o.code if o else None) for i, o in enumerate(run.outcomes)]

    def _saw(self, sku: str, remaining: Sequence[int]) -> None:
        """What a pre-deduct left of a SKU's stock: none (sold out), some (in stock), or it cannot tell (an
        unknown SKU, a pre-deduct that failed): then the next group reads first."""
        if 0 in remaining:
            self._sold_out.mark(sku)
            self._sold_out.seal(sku)
        elif remaining:
            self._sold_out.saw_stock(sku)
        else:
            self._sold_out.forget(sku)

    async def _send_half(
        self, sku: str, requests: Sequence[PurchaseRequest], message: DeductionMessage, gid: str
    ) -> HalfMessagePort | None:
        """The half message of a transaction, sent ahead of its pre-deduct; None when the broker did not
        take it (then nothing is deducted)."""
        try:
            half = await self._bus.send_half_async(
                self._topic, requests[0].token, message.encode(), c.DEDUCTION_TAG, gid
            )
        except BusError as exc:
            logger.warning(
                "half message for sku %s (%d purchases) not sent: %s",
                sku,
                len(requests),
                exc,
                extra=ids(sku=sku, message_id=gid),
            )
            return None
        if self._observe_group:
            self._observe_group(len(requests))
        failpoints.hit(self._failpoints, failpoints.AFTER_HALF_MESSAGE)
        return half

    async def _settle(self, sku: str, gid: str, run: LocalTransaction, half: HalfMessagePort) -> None:
        """Commit the half message or roll it back, by what its pre-deduct did; or neither, when that is
        not known."""
        if run.unsettled:
            # A share may have deducted with no answer (or did, beside one that did not run): neither
            # commit nor roll back. The checker settles it once every share ran or is fenced.
            logger.warning(
                "pre-deduct of message %s sku %s has an unknown outcome (%s); left to the checker",
                gid,
                sku,
                run.failures,
                extra=ids(sku=sku, message_id=gid),
            )
        elif run.accepted:
            # If the commit is lost, the checker commits from the Redis log: the purchases stand.
            await local_tx.settle(half.commit, "commit", gid)
        else:
            # Nothing was deducted. If this rollback is lost, the checker rolls back too: the log names
            # no purchase of this message.
            if run.failures:
                logger.warning(
                    "pre-deduct of message %s sku %s not run (%s); rolling back",
                    gid,
                    sku,
                    run.failures,
                    extra=ids(sku=sku, message_id=gid),
                )
            await local_tx.settle(half.rollback, "rollback", gid)

    @staticmethod
    def _all(
        requests: Sequence[PurchaseRequest], status: PurchaseStatus, message: str, gid: str | None = None
    ) -> list[PurchaseResult]:
        return [PurchaseResult(status, r.token, message_id=gid, message=message) for r in requests]
