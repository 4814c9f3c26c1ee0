"""The scheduler of partitioned SKUs: which partition sells each purchase, and stock moved to where it sells.

- Each token has a fixed order of the SKU's partitions (records.Layout.order, from its crc32): it is
  sold on the first one that is not closed. Every attempt of a token, in any producer, goes to the same
  partition, whose log answers `duplicate` to a retry: idempotent across partitions with nothing written
  before the purchase, and tokens spread evenly over the partitions.
- A group of purchases stays one half message, whose pre-deduct runs on every partition it touches.
- The registry of the partitions (active + standby, closed or not) and the pool is read at most every
  REGISTRY_TTL_S. A partition whose standby sub-domain is empty is refilled from the pool in the
  background; a refill is two steps on two slots (pool_take.lua, refill_apply.lua) joined by a transfer
  record.
- A purchase its partition cannot cover pulls stock there from the pool and is tried again. When the
  pool is empty too, an exhausted partition is closed for good (close.lua) and leaves the registry: its
  tokens go on to their next partition. A partition that holds less than the smallest purchase short
  there, or the anchor (which never closes), gets the units of the others instead (drain.lua, the
  stranding rebalance). Once pulled to, a partition's scripts decide what fits: a group larger than
  what is left buys what is left, and the rest find the partition empty and go on once it closes.
  `sold_out` is answered only when that finds nothing: no partition and no pool could have covered the
  purchase, short of a race with another purchase for the same last units.
- A token whose order passes closed partitions may have been sold on one of them before it closed:
  their logs (final once closed) are read first, and a token found there gets its original answer.
- With a per-user limit, each token takes a hold on its buyer's count (user_hold.lua, sharded by user)
  before it goes to its partition; a buyer past the limit is answered at once.
- Transfers older than SWEEP_AGE_MS are completed by whoever reads the layout: a refiller that died
  midway loses nothing, and each step counts once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from flashsale import constants as c
from flashsale.errors import FlashSaleError
from flashsale.logs import ids
from flashsale.models import Purchase, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline import local_tx
from flashsale.ports import PartitionStockPort
from flashsale.records import Layout, Registry

logger = logging.getLogger(__name__)

#: Seconds a SKU's layout is trusted (a reload is seen within this, or at once by a refused pre-deduct).
LAYOUT_TTL_S = 2.0
#: Seconds a registry read is trusted when placing purchases.
REGISTRY_TTL_S = 0.05
#: A transfer record older than this belongs to a refiller that died (or is very slow): complete it.
SWEEP_AGE_MS = 5_000
#: Most pulls for one group before the purchases still short are told `sold_out`.
PULLS = 4

#: Sells purchases of one SKU, each on the partition named beside it, as one transaction.
Sell = Callable[[Sequence[PurchaseRequest], Sequence[str]], Awaitable[list[PurchaseResult]]]

_NOT_RUN = "stock could not be checked; nothing was deducted, try again"


class Scheduler:
    def __init__(self, stock: PartitionStockPort, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stock = stock
        self._clock = clock
        self._layouts: dict[str, tuple[float, Layout | None]] = {}
        self._registries: dict[str, tuple[float, Registry]] = {}
        self._refilling: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def layout(self, sku: str) -> Layout | None:
        """The SKU's layout (None: not partitioned); the last one read when Redis cannot be asked."""
        cached = self._layouts.get(sku)
        if cached and self._clock() - cached[0] < LAYOUT_TTL_S:
            return cached[1]
        try:
            layout = await self._stock.layout(sku)
        except FlashSaleError:
            if cached is None:
                raise
            return cached[1]
        self._layouts[sku] = (self._clock(), layout)
        if layout is not None:
            self._spawn(self._sweep(layout))
        return layout

    def forget(self, sku: str) -> None:
        """A partition refused the layout as another load's: read it again next time."""
        self._layouts.pop(sku, None)
        self._registries.pop(sku, None)

    async def sell(self, layout: Layout, requests: Sequence[PurchaseRequest], sell: Sell) -> list[PurchaseResult]:
        """Sell each purchase on its partition, pulling stock to it while it is short.

        Once the SKU is sold out, a token is answered from a read of the logs it may be in: no hold or
        pre-deduct is written, and a token seen before still gets its original answer.
        """
        answers: list[PurchaseResult | None] = [None] * len(requests)
        looked: list[set[str]] = [set() for _ in requests]  # partitions whose log does not hold the token
        pending = list(range(len(requests)))
        pulled: set[str] = set()  # partitions stock was pulled to: from then on the scripts say what fits
        held = False
        try:
            registry = await self._registry(layout)
            for attempt in range(PULLS + 1):
                targets = await self._answer_seen(layout, registry, requests, pending, looked, answers)
                pending = [i for i in pending if answers[i] is None]
                if registry.sold_out:
                    for i in pending:
                        answers[i] = self._sold_out(requests[i], layout)
                    break
                if not held:
                    await self._hold(layout, requests, pending, answers)
                    pending = [i for i in pending if answers[i] is None]
                    held = True
                if not pending:
                    break
                last = attempt == PULLS
                # A partition the registry says cannot cover its share gets stock first (or is closed): a
                # transaction sent there would only be refused. Once pulled to, or on the last attempt, the
                # scripts decide: a pull that found less than the share leaves some of it that still fits.
                short = {} if last else self._uncovered(registry, requests, pending, targets, pulled)
                sent = [i for i in pending if targets[i] not in short]
                if sent:
                    results = await sell([requests[i] for i in sent], [targets[i] for i in sent])
                    for i, result in zip(sent, results, strict=True):
                        answers[i] = result
                        if result.status is PurchaseStatus.SOLD_OUT and not last:
                            short.setdefault(targets[i], []).append(i)
                if not short:
                    break
                pulled.update(short)
                pending = await self._pull_for(layout, requests, short, answers)
                if not pending:
                    break
                for i in pending:
                    answers[i] = None
                registry = await self._registry(layout, fresh=True)
        except FlashSaleError as exc:
            # What was answered stands; the purchases still pending were not sent, and hear `error`.
            logger.warning("cannot place purchases of %s: %s", layout.sku, exc, extra=ids(sku=layout.sku))
        else:
            self._top_up(layout, registry)
        return [a or self._not_run(r) for a, r in zip(answers, requests, strict=True)]

    async def _answer_seen(
        self,
        layout: Layout,
        registry: Registry,
        requests: Sequence[PurchaseRequest],
        pending: Sequence[int],
        looked: list[set[str]],
        answers: list[PurchaseResult | None],
    ) -> dict[int, str]:
        """Each pending purchase's partition; a token found in the log of a partition it passes (closed),
        or once the SKU is sold out in its own, is answered `duplicate` from that entry."""
        targets: dict[int, str] = {}
        wanted: dict[str, list[int]] = {}
        for i in pending:
            target, passed = registry.target(layout, requests[i].token)
            targets[i] = target
            for part in [*passed, target] if registry.sold_out else passed:
                if part not in looked[i]:
                    wanted.setdefault(part, []).append(i)
        if not wanted:
            return targets
        found = await self._stock.entries({p: [requests[i].token for i in idxs] for p, idxs in wanted.items()})
        for part, idxs in wanted.items():
            for i in idxs:
                entry = found[part][requests[i].token]
                if entry is not None and entry.state in c.DEDUCTED_STATES and answers[i] is None:
                    answers[i] = PurchaseResult(
                        PurchaseStatus.DUPLICATE, entry.token, None, entry.message_id, message=local_tx.DUPLICATE
                    )
                looked[i].add(part)
        return targets

    async def _hold(
        self,
        layout: Layout,
        requests: Sequence[PurchaseRequest],
        pending: Sequence[int],
        answers: list[PurchaseResult | None],
    ) -> None:
        """With a per-user limit, a hold for each pending purchase; a buyer past the limit is answered now."""
        if not layout.per_user_limit or not pending:
            return
        purchases = [Purchase(requests[i].token, requests[i].user_id, requests[i].qty) for i in pending]
        for i, bought in zip(pending, await self._stock.hold(layout, purchases), strict=True):
            if bought is not None:
                answers[i] = PurchaseResult(
                    PurchaseStatus.LIMIT_EXCEEDED,
                    requests[i].token,
                    message=f"user {requests[i].user_id} already bought {bought} of {layout.sku}",
                )

    @staticmethod
    def _uncovered(
        registry: Registry,
        requests: Sequence[PurchaseRequest],
        pending: Sequence[int],
        targets: dict[int, str],
        pulled: set[str],
    ) -> dict[str, list[int]]:
        """The pending purchases of each partition not pulled to yet that, by the registry, cannot cover them all."""
        share: dict[str, list[int]] = {}
        for i in pending:
            if targets[i] not in pulled:
                share.setdefault(targets[i], []).append(i)
        return {p: idxs for p, idxs in share.items() if registry.remaining(p) < sum(requests[i].qty for i in idxs)}

    @staticmethod
    def _sold_out(request: PurchaseRequest, layout: Layout) -> PurchaseResult:
        return PurchaseResult(PurchaseStatus.SOLD_OUT, request.token, 0, message=f"{layout.sku} is sold out")

    @staticmethod
    def _not_run(request: PurchaseRequest) -> PurchaseResult:
        return PurchaseResult(PurchaseStatus.ERROR, request.token, message=_NOT_RUN)

    async def close(self) -> None:
        """Cancel background refills: a transfer cut short is completed by the next sweep."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- moving stock ---------------------------------------------------------------------------------
    async def _pull_for(
        self,
        layout: Layout,
        requests: Sequence[PurchaseRequest],
        short: dict[str, list[int]],
        answers: list[PurchaseResult | None],
    ) -> list[int]:
        """Pull stock to the partitions short of their purchases (or close them); those to try again. A
        purchase whose pull found nothing keeps the answer its partition gave, or hears `sold_out`."""
        again: list[int] = []
        for part, idxs in short.items():
            try:
                qty = [requests[i].qty for i in idxs]
                moved = await self._pull(layout, part, sum(qty), min(qty))
            except FlashSaleError as exc:
                logger.warning("cannot move stock to %s: %s", part, exc, extra=ids(sku=layout.sku))
                for i in idxs:
                    answers[i] = self._not_run(requests[i])
                continue
            if moved:
                again += idxs
            else:
                for i in idxs:
                    answers[i] = answers[i] or self._sold_out(requests[i], layout)
        return sorted(again)

    async def _pull(self, layout: Layout, part: str, need: int, least: int) -> bool:
        """Make `part` able to sell `need` more units, or close it so its tokens sell elsewhere: True when
        the purchases short there are worth trying again, which they are while it holds `least`, the
        smallest of them, even when no more could be moved there."""
        registry = await self._registry(layout, fresh=True)
        have = registry.remaining(part)
        if part in registry.closed or have >= need:
            return True  # closed meanwhile (its tokens go on to their next partition), or refilled meanwhile
        if registry.pool:
            have += await self._refill(layout, part, max(need, layout.refill))
            if have >= need:
                return True
        if part != layout.anchor:
            # With the pool empty, what fits sells here and the rest find it empty next time: it closes
            # and its tokens go on, no unit moved. Only a purchase larger than all it holds, or the
            # anchor (which never closes), gets the other partitions' units.
            if have >= least:
                return True
            if have == 0 and await self._stock.close_partition(layout, part):
                logger.info("closed %s: it is empty, and so is the pool", part, extra=ids(sku=layout.sku))
                return True
        drained = 0
        for other in sorted(registry.parts, key=registry.remaining, reverse=True):
            if have + drained >= need:
                break
            if other != part and registry.remaining(other) > 0:
                drained += await self._drain(layout, other, need - have - drained)
        if drained:
            have += await self._refill(layout, part, drained)
        return have >= least

    async def _refill(self, layout: Layout, part: str, want: int) -> int:
        transfer_id = uuid.uuid4().hex
        taken = await self._stock.take(layout.sku, transfer_id, part, want)
        if taken:
            await self._stock.give(part, transfer_id, taken)
            await self._stock.forget(layout.sku, transfer_id)
        return taken

    async def _drain(self, layout: Layout, part: str, want: int) -> int:
        transfer_id = uuid.uuid4().hex
        await self._stock.expect(layout.sku, transfer_id, part, want)
        qty = await self._stock.drain(part, transfer_id, want)
        await self._stock.receive(layout.sku, transfer_id, qty)
        logger.info("rebalance: %d unit(s) of %s back to the pool", qty, part, extra=ids(sku=layout.sku))
        return qty

    def _top_up(self, layout: Layout, registry: Registry) -> None:
        """In the background: refill the open partitions whose standby sub-domain is empty, and drain
        back to the pool what a refill brought to a partition that had closed meanwhile."""
        for part, (active, standby) in registry.parts.items():
            if part in self._refilling:
                continue
            if part in registry.closed:
                if active + standby:
                    self._refilling.add(part)
                    self._spawn(self._background(layout, part, self._drain(layout, part, active + standby)))
            elif standby == 0 and registry.pool > 0:
                self._refilling.add(part)
                self._spawn(self._background(layout, part, self._refill(layout, part, layout.refill)))

    async def _background(self, layout: Layout, part: str, move: Awaitable[int]) -> None:
        try:
            await move
        except FlashSaleError as exc:
            logger.warning("moving stock of %s failed: %s", part, exc, extra=ids(sku=layout.sku))
        finally:
            self._refilling.discard(part)
            self._registries.pop(layout.sku, None)

    async def _sweep(self, layout: Layout) -> None:
        """Complete the transfers a refiller left behind (each step counts once, so running one again is safe)."""
        try:
            now_ms = int(time.time() * 1000)
            for t in await self._stock.transfers(layout.sku):
                if now_ms - t.ts_ms < SWEEP_AGE_MS:
                    continue
                if t.dir == "out":
                    await self._stock.give(t.part, t.id, t.qty)
                    await self._stock.forget(layout.sku, t.id)
                else:
                    await self._stock.receive(layout.sku, t.id, await self._stock.drain(t.part, t.id, t.qty))
                logger.warning("completed transfer %s (%s %s, %d)", t.id, t.dir, t.part, t.qty)
        except FlashSaleError as exc:
            logger.warning("sweep of %s failed: %s", layout.sku, exc, extra=ids(sku=layout.sku))

    async def _registry(self, layout: Layout, *, fresh: bool = False) -> Registry:
        cached = self._registries.get(layout.sku)
        if cached and not fresh and self._clock() - cached[0] < REGISTRY_TTL_S:
            return cached[1]
        registry = await self._stock.registry(layout)
        self._registries[layout.sku] = (self._clock(), registry)
        return registry

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
