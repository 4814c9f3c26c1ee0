"""The scheduler of partitioned SKUs: which partition sells each purchase, and stock moved to where it sells.

- A purchase goes to a partition picked at random among those that can cover it, from a registry of
  the partitions' stock read at most every REGISTRY_TTL_S. Exhausted partitions are never picked. A
  group of purchases goes to one partition when one can cover the group: one transaction per group,
  as for a SKU that is not partitioned; groups spread over the partitions.
- A token is bound to its partition by a claim (claim.lua) before anything is sent, so a retry with
  the same token goes where its first attempt went, and that partition's log answers `duplicate`.
- With a per-user limit, each token takes a hold on its buyer's count (user_hold.lua, sharded by user)
  before it goes to its partition; a buyer past the limit is answered at once.
- A partition whose standby sub-domain is empty is refilled from the pool in the background. A refill
  is two steps on two slots (pool_take.lua, refill_apply.lua) joined by a transfer record.
- A purchase its partition cannot cover pulls stock there, from the pool, else from the other
  partitions (drain.lua, the stranding rebalance), and is tried again. `sold_out` is answered only when
  that pull finds nothing: no partition and no pool could have covered it, short of a race with
  another purchase for the same last units.
- Transfers older than SWEEP_AGE_MS are completed by whoever reads the layout: a refiller that died
  midway loses nothing, and each step counts once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from flashsale.errors import FlashSaleError
from flashsale.logs import ids
from flashsale.models import Purchase, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.ports import PartitionStockPort
from flashsale.records import Layout, Registry

logger = logging.getLogger(__name__)

#: Seconds a SKU's layout is trusted (a reload is seen within this).
LAYOUT_TTL_S = 2.0
#: Seconds a registry read is trusted when picking partitions.
REGISTRY_TTL_S = 0.05
#: A transfer record older than this belongs to a refiller that died (or is very slow): complete it.
SWEEP_AGE_MS = 5_000
#: Most pulls for one group before the purchases still short are told `sold_out`.
PULLS = 4

Sell = Callable[[str, Sequence[PurchaseRequest]], Awaitable[list[PurchaseResult]]]

_NOT_RUN = "stock could not be checked; nothing was deducted, try again"


class Scheduler:
    def __init__(
        self,
        stock: PartitionStockPort,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stock = stock
        self._rng = rng or random.Random()
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

    async def sell(self, layout: Layout, requests: Sequence[PurchaseRequest], sell: Sell) -> list[PurchaseResult]:
        """Bind each purchase to a partition, sell it there, and pull stock to it while it is short.

        Once the SKU is sold out, a token never seen before is answered from one read of the claims: no
        claim, hold or pre-deduct is written for it. A token seen before goes to its partition, whose log
        gives it its original answer.
        """
        try:
            registry = await self._registry(layout)
            if registry.sold_out:
                claimed = await self._stock.claimed(layout, [r.token for r in requests])
                seen = [r for r in requests if claimed[r.token]]
                answers = iter(await self._place(layout, registry, seen, sell) if seen else [])
                return [
                    next(answers)
                    if claimed[r.token]
                    else PurchaseResult(PurchaseStatus.SOLD_OUT, r.token, 0, message=f"{layout.sku} is sold out")
                    for r in requests
                ]
        except FlashSaleError as exc:
            logger.warning("cannot read the partitions of %s: %s", layout.sku, exc, extra=ids(sku=layout.sku))
            return [PurchaseResult(PurchaseStatus.ERROR, r.token, message=_NOT_RUN) for r in requests]
        return await self._place(layout, registry, requests, sell)

    async def _place(
        self, layout: Layout, registry: Registry, requests: Sequence[PurchaseRequest], sell: Sell
    ) -> list[PurchaseResult]:
        try:
            bound = await self._stock.claim(layout, self.propose(registry, requests))
            held = await self._hold(layout, requests)
        except FlashSaleError as exc:
            logger.warning("cannot place purchases of %s: %s", layout.sku, exc, extra=ids(sku=layout.sku))
            return [PurchaseResult(PurchaseStatus.ERROR, r.token, message=_NOT_RUN) for r in requests]
        if any(not bound[r.token] for r in requests):  # the SKU was loaded again since this layout was read
            self._layouts.pop(layout.sku, None)
            return [PurchaseResult(PurchaseStatus.ERROR, r.token, message=_NOT_RUN) for r in requests]
        answers: list[PurchaseResult | None] = [
            None
            if bought is None
            else PurchaseResult(
                PurchaseStatus.LIMIT_EXCEEDED,
                r.token,
                message=f"user {r.user_id} already bought {bought} of {layout.sku}",
            )
            for r, bought in zip(requests, held, strict=True)
        ]
        await self._sell_at(bound, requests, [i for i, a in enumerate(answers) if a is None], answers, sell)
        for _ in range(PULLS):
            short = [i for i, a in enumerate(answers) if a is not None and a.status is PurchaseStatus.SOLD_OUT]
            if not short:
                break
            again = await self._pull_for(layout, bound, requests, short, answers)
            if not again:
                break
            await self._sell_at(bound, requests, again, answers, sell)
        self._top_up(layout, registry)
        return [a for a in answers if a is not None]

    async def _hold(self, layout: Layout, requests: Sequence[PurchaseRequest]) -> list[int | None]:
        """Per purchase, None when its user may buy it (a hold is taken), else the units the user holds."""
        if not layout.per_user_limit:
            return [None] * len(requests)
        return await self._stock.hold(layout, [Purchase(r.token, r.user_id, r.qty) for r in requests])

    def propose(self, registry: Registry, requests: Sequence[PurchaseRequest]) -> list[tuple[str, str]]:
        """A partition for each purchase: one for the whole group when one can cover it all, so the group
        stays one transaction (the broker's work is per message); else one for each purchase."""
        total = sum(r.qty for r in requests)
        if any(registry.remaining(p) >= total for p in registry.parts):
            part = self.pick(registry, total)
            return [(r.token, part) for r in requests]
        return [(r.token, self.pick(registry, r.qty)) for r in requests]

    def pick(self, registry: Registry, qty: int) -> str:
        """A partition at random among those that can cover `qty`; else the fullest (a pull tops it up)."""
        able = [p for p in registry.parts if registry.remaining(p) >= qty]
        if able:
            return self._rng.choice(able)
        return max(registry.parts, key=registry.remaining)

    async def close(self) -> None:
        """Cancel background refills: a transfer cut short is completed by the next sweep."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- selling ------------------------------------------------------------------------------------
    @staticmethod
    async def _sell_at(
        bound: dict[str, str],
        requests: Sequence[PurchaseRequest],
        indexes: Sequence[int],
        answers: list[PurchaseResult | None],
        sell: Sell,
    ) -> None:
        by_part: dict[str, list[int]] = {}
        for i in indexes:
            by_part.setdefault(bound[requests[i].token], []).append(i)

        async def one(part: str, idxs: list[int]) -> None:
            for i, result in zip(idxs, await sell(part, [requests[i] for i in idxs]), strict=True):
                answers[i] = result

        await asyncio.gather(*(one(p, idxs) for p, idxs in by_part.items()))

    async def _pull_for(
        self,
        layout: Layout,
        bound: dict[str, str],
        requests: Sequence[PurchaseRequest],
        short: list[int],
        answers: list[PurchaseResult | None],
    ) -> list[int]:
        """Pull stock to the partitions of the purchases told sold out; returns those to try again."""
        by_part: dict[str, list[int]] = {}
        for i in short:
            by_part.setdefault(bound[requests[i].token], []).append(i)
        again: list[int] = []
        for part, idxs in by_part.items():
            try:
                moved = await self._pull(layout, part, sum(requests[i].qty for i in idxs))
            except FlashSaleError as exc:
                logger.warning("cannot move stock to %s: %s", part, exc, extra=ids(sku=layout.sku))
                for i in idxs:
                    answers[i] = PurchaseResult(PurchaseStatus.ERROR, requests[i].token, message=_NOT_RUN)
                continue
            if moved:
                again += idxs
        return sorted(again)

    # --- moving stock ---------------------------------------------------------------------------------
    async def _pull(self, layout: Layout, part: str, need: int) -> int:
        """Move at least `need` units to `part` if the SKU has them anywhere; returns the units moved."""
        got = await self._refill(layout, part, max(need, layout.refill))
        if got >= need:
            return got
        registry = await self._registry(layout, fresh=True)
        drained = 0
        for other in sorted(registry.parts, key=registry.remaining, reverse=True):
            if got + drained >= need:
                break
            if other != part and registry.remaining(other) > 0:
                drained += await self._drain(layout, other, need - got - drained)
        if drained:
            got += await self._refill(layout, part, drained)
        return got

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
        """Refill, in the background, the partitions whose standby sub-domain is empty."""
        if registry.pool <= 0:
            return
        for part, (_, standby) in registry.parts.items():
            if standby == 0 and part not in self._refilling:
                self._refilling.add(part)
                self._spawn(self._background_refill(layout, part))

    async def _background_refill(self, layout: Layout, part: str) -> None:
        try:
            await self._refill(layout, part, layout.refill)
        except FlashSaleError as exc:
            logger.warning("refill of %s failed: %s", part, exc, extra=ids(sku=layout.sku))
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
