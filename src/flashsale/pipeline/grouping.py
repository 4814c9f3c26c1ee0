"""Group commit of purchases: those of one SKU arriving within a few milliseconds travel together.

A group opens with its first purchase and closes when it holds `size` purchases or `wait_s` after it
opened, whichever comes first (the two triggers of seed 000's batched persistence, applied to the
transaction itself). A closed group is handed to `handle`, which answers each purchase; groups of one
SKU may be in flight at once. With `size` 1 every purchase is its own group, at once.

A group whose `wait_s` is up while another group of its SKU is being handled is held: it closes as
soon as a group of its SKU is answered, at its size, or `hold_s` later, whichever comes first. Under
load the purchases that arrive while a transaction is under way then share the next one, rather than
starting transactions of their own beside it: every transaction costs the broker a half message, a
commit, a delivery and an ack whatever it carries (docs/performance.md, run P: under a saturating load,
a median 37% fewer transactions and 11% less of the broker's CPU per purchase, latency no higher). At a
light load with slow transactions a purchase may wait up to `hold_s` longer: `hold_s` bounds the wait
behind a slow transaction; 0 never holds. An eager SKU's groups (below) are never held: they cost no
transaction.

An eager SKU (one the caller knows is sold out, whose groups cost one Redis read and no transaction)
does not wait for the timer when it need not: its group closes at once when none of its groups is being
handled, else as soon as the last one is answered. Under load its purchases gather while the previous
group is read; alone, a purchase is answered without waiting. `wait_s` still bounds the wait.

A group never carries one token twice: a purchase whose token is in the open group already (a double
click) waits until that group is answered and then joins a later one, where it is answered as any
retry is (`duplicate` when the first was accepted). One message's pre-deduct would otherwise accept the
token once and find it a duplicate of itself, and the log entry would name the message for both.

Used from one event loop only, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus

logger = logging.getLogger(__name__)

Handler = Callable[[str, Sequence[PurchaseRequest]], Awaitable[list[PurchaseResult]]]


@dataclass
class _Group:
    answered: asyncio.Future[None]
    requests: list[PurchaseRequest] = field(default_factory=list)
    answers: list[asyncio.Future[PurchaseResult]] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    timer: asyncio.Handle | None = None
    held: bool = False  # its wait is up; it waits for a group of its SKU to be answered


class Grouper:
    def __init__(
        self,
        handle: Handler,
        *,
        size: int,
        wait_s: float,
        hold_s: float = 0.0,
        eager: Callable[[str], bool] = lambda sku: False,
    ) -> None:
        if size < 1:
            raise ValueError("a group holds at least one purchase")
        self._handle = handle
        self.size = size
        self.wait_s = wait_s
        self.hold_s = hold_s
        #: SKUs whose group closes as soon as none of theirs is being handled (within `wait_s` at most)
        self._eager = eager
        self._open: dict[str, _Group] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._handling: dict[str, int] = {}  # SKU -> its groups being handled

    async def submit(self, request: PurchaseRequest) -> PurchaseResult:
        loop = asyncio.get_running_loop()
        while (group := self._open.get(request.sku)) is not None and request.token in group.tokens:
            await asyncio.shield(group.answered)
        if group is None:
            group = self._open[request.sku] = _Group(loop.create_future())
            if self.size > 1 and self._eager(request.sku) and not self._handling.get(request.sku):
                self._close_soon(request.sku, group)
            elif self.size > 1:
                group.timer = loop.call_later(self.wait_s, self._waited, request.sku, group)
        answer: asyncio.Future[PurchaseResult] = loop.create_future()
        group.requests.append(request)
        group.answers.append(answer)
        group.tokens.add(request.token)
        if len(group.requests) >= self.size:
            self._close(request.sku, group)
        return await answer

    @property
    def idle(self) -> bool:
        """No group is open, and none is being handled."""
        return not self._open and not self._running

    def _waited(self, sku: str, group: _Group) -> None:
        """`group`'s wait is up: it closes, or is held while another group of its SKU is being handled."""
        if self.hold_s > 0 and self._handling.get(sku) and self._open.get(sku) is group and not self._eager(sku):
            group.held = True
            group.timer = asyncio.get_running_loop().call_later(self.hold_s, self._close, sku, group)
            return
        self._close(sku, group)

    def _close(self, sku: str, group: _Group) -> None:
        if self._open.get(sku) is group:
            del self._open[sku]
        if group.timer is not None:
            group.timer.cancel()
        self._handling[sku] = self._handling.get(sku, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(sku, group))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, sku: str, group: _Group) -> None:
        try:
            try:
                results = await self._handle(sku, group.requests)
            except Exception:  # the handler answers every failure itself; this is a bug, not an outcome
                logger.exception("a group of %d purchases of %s failed", len(group.requests), sku)
                results = []
            else:
                if len(results) != len(group.requests):  # a bug too: the rest hear `pending`
                    logger.error("%d answers for a group of %d purchases of %s", len(results), len(group.requests), sku)
            for answer, result in zip(group.answers, results, strict=False):
                if not answer.done():
                    answer.set_result(result)
        finally:
            # Even when cancelled: every purchase gets an answer, and the SKU's count of groups being
            # handled comes down (a count left behind would hold each later group of the SKU for hold_s).
            for answer, request in zip(group.answers, group.requests, strict=True):
                if not answer.done():
                    # Whether its pre-deduct ran is not known here: the buyers learn it by asking again.
                    answer.set_result(
                        PurchaseResult(
                            PurchaseStatus.PENDING, request.token, message="the outcome is not known; ask again"
                        )
                    )
            group.answered.set_result(None)
            self._handled(sku)

    def _handled(self, sku: str) -> None:
        """A group of `sku` is answered: the one open now closes at once if it was held for this, or if the
        SKU is eager and none of its groups is left being handled."""
        left = self._handling[sku] = self._handling[sku] - 1
        if not left:
            del self._handling[sku]
        group = self._open.get(sku)
        if group is None:
            return
        if group.held:
            self._close(sku, group)
        elif not left and self._eager(sku):
            self._close_soon(sku, group)

    def _close_soon(self, sku: str, group: _Group) -> None:
        """Close `group` on the loop's next turn (purchases already on their way join it), not at its timer."""
        if group.timer is not None:
            group.timer.cancel()
        group.timer = asyncio.get_running_loop().call_soon(self._close, sku, group)
