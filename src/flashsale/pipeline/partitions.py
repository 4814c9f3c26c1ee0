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
  their logs (no new token once closed) are read first, and a token found there gets its original answer.
- Units that reach a closed partition (a refill that came late, an order cancelled or expired there:
  pipeline/orders.py) are drained back to the pool in the background, or by a pull's rebalance, and sell
  on an open partition. A pull first waits for the moves this producer has under way, so that units on
  their way are not taken for none: the registry learns them, and a SKU that was sold out sells again.
- With a per-user limit, each token takes a hold on its buyer's count (user_hold.lua, sharded by user)
  before it goes to its partition; a buyer past the limit is answered at once.
- Transfers older than SWEEP_AGE_MS on Redis's clock are completed by whoever reads the layout: a
  refiller that died midway loses nothing, and each step counts once, run again at any time. A pull
  that finds its partition and the pool short completes every transfer under way at once: units on
  their way are not taken for none, whoever moves them.
- A hold taken by a purchase told `sold_out` or `error` (nothing deducted) is given back
  (user_release.lua) once no other attempt of its token rides it: a buyer told `sold_out` keeps the
  share of the limit for units that come back on sale (an order cancelled or expired, a restock), and
  one told `error` (the broker or Redis out of reach) may try again with a new token.
- Every step that moves stock carries the layout's epoch. A step of another load is refused (StaleLayout),
  writing nothing: the scheduler then drops the layout and moves nothing more by it. So does a group one
  of whose pre-deducts reports the layout stale.
- A token found in the log of a partition (a retry) is answered `duplicate` only once a replica holds the
  entry, where there are replicas: else `pending`, and the buyer asks again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flashsale import constants as c
from flashsale.errors import FlashSaleError, StaleLayout
from flashsale.logs import ids
from flashsale.models import Purchase, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline import local_tx
from flashsale.ports import PartitionStockPort
from flashsale.records import Layout, LogEntry, Prededuct, Registry

logger = logging.getLogger(__name__)

#: Seconds a SKU's layout is trusted (a reload is seen within this, or at once by a refused pre-deduct).
LAYOUT_TTL_S = 2.0
#: Seconds a registry read is trusted when placing purchases.
REGISTRY_TTL_S = 0.05
#: A transfer record older than this belongs to a refiller that died (or is very slow): complete it.
SWEEP_AGE_MS = 5_000
#: Most pulls for one group before the purchases still short are told `sold_out`.
PULLS = 4

#: What a transaction told a purchase, and the pre-deduct's code behind it (None: it has none, e.g. pending).
Placed = tuple[PurchaseResult, Prededuct | None]

_NOT_RUN = "stock could not be checked; nothing was deducted, try again"
#: Answers of an attempt that certainly deducted nothing: its hold on the buyer's limit can be given back.
_NOT_SOLD = frozenset({PurchaseStatus.SOLD_OUT, PurchaseStatus.ERROR})


class Sender(Protocol):
    """Sells purchases of one partitioned SKU as one transaction, each on the partition named beside it,
    by `layout` (whose epoch each pre-deduct carries): what each purchase was told, in order. The
    purchase service's `_send_to_parts` is the one the producer passes."""

    async def __call__(
        self, layout: Layout, requests: Sequence[PurchaseRequest], parts: Sequence[str], /
    ) -> list[Placed]: ...


@dataclass
class Placement:
    """One group of a partitioned SKU on its way to its partitions, round after round: what each purchase
    was told so far, and what the scheduler learned of where its token is not. Its methods are the steps
    of a round that only read and write this state; the scheduler does the reads and writes of Redis."""

    layout: Layout
    requests: Sequence[PurchaseRequest]
    answers: list[PurchaseResult | None]
    #: Per purchase, the partitions whose log was read and does not hold its token.
    looked: list[set[str]]
    #: The purchases still to place.
    pending: list[int]
    #: Partitions stock was pulled to: from then on their scripts decide what fits.
    pulled: set[str] = field(default_factory=set)
    #: Pulls made for this group so far (at most PULLS).
    pulls: int = 0
    #: Whether the per-user holds were taken (in the first round).
    held: bool = False
    #: The purchases that took (or rode) a hold; those told `sold_out` in the end give it back.
    holding: list[int] = field(default_factory=list)
    #: Names this group's attempts in the records of the holds (see user_hold.lua).
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of(cls, layout: Layout, requests: Sequence[PurchaseRequest]) -> Placement:
        n = len(requests)
        return cls(layout, requests, [None] * n, [set() for _ in range(n)], list(range(n)))

    def attempts(self, idxs: Sequence[int]) -> tuple[list[Purchase], list[str]]:
        """These purchases, as the holds know them, and the id of each one's attempt."""
        requests = self.requests
        purchases = [Purchase(requests[i].token, requests[i].user_id, requests[i].qty) for i in idxs]
        return purchases, [f"{self.attempt}.{i}" for i in idxs]

    def answer(self, i: int, status: PurchaseStatus, **fields: object) -> None:
        self.answers[i] = PurchaseResult(status, self.requests[i].token, **fields)  # type: ignore[arg-type]

    def sold_out(self, idxs: Iterable[int]) -> None:
        """These purchases hear `sold_out`: no partition and no pool could cover them."""
        for i in idxs:
            self.answers[i] = local_tx.sold_out(self.requests[i].token, self.layout.sku)

    @property
    def may_pull(self) -> bool:
        """Whether this round may still pull stock; after the last pull the scripts decide alone."""
        return self.pulls < PULLS

    def place(self, registry: Registry) -> tuple[dict[int, str], dict[str, list[int]]]:
        """Each pending purchase's partition: the first in its token's order that is not closed. And, per
        partition, the purchases whose token may be in its log, not read for them yet: the closed ones
        it passes, and once the SKU is sold out every one it may ever sell on (a registry read before a
        partition closed would name too few: the token may have sold past it since)."""
        targets: dict[int, str] = {}
        wanted: dict[str, list[int]] = {}
        sold_out = registry.sold_out
        for i in self.pending:
            token = self.requests[i].token
            target, passed = registry.target(self.layout, token)
            targets[i] = target
            for part in self.layout.reach(token) if sold_out else passed:
                if part not in self.looked[i]:
                    wanted.setdefault(part, []).append(i)
        return targets, wanted

    def note_logs(
        self, wanted: Mapping[str, list[int]], found: Mapping[str, Mapping[str, LogEntry | None]]
    ) -> dict[str, dict[str, LogEntry]]:
        """Note the logs read for the purchases `wanted` names; the entries found of tokens deducted there,
        by partition."""
        seen: dict[str, dict[str, LogEntry]] = {}
        for part, idxs in wanted.items():
            for i in idxs:
                token = self.requests[i].token
                entry = found[part][token]
                if entry is not None and entry.state in c.DEDUCTED_STATES:
                    seen.setdefault(part, {})[token] = entry
                self.looked[i].add(part)
        return seen

    def uncovered(self, registry: Registry, targets: Mapping[int, str]) -> dict[str, list[int]]:
        """The pending purchases of each partition not pulled to yet that, by the registry, cannot cover them all."""
        share: dict[str, list[int]] = {}
        for i in self.pending:
            if targets[i] not in self.pulled:
                share.setdefault(targets[i], []).append(i)
        return {p: idxs for p, idxs in share.items() if registry.remaining(p) < sum(self.requests[i].qty for i in idxs)}

    def record(
        self, sent: Sequence[int], targets: Mapping[int, str], placed: Sequence[Placed]
    ) -> tuple[list[int], dict[str, list[int]]]:
        """What one transaction told the purchases `sent`: those whose partition closed meanwhile, to place
        on their next one, and those it refused as short, by partition. Raises StaleLayout when a
        pre-deduct refused the layout (what the others were told stands)."""
        closed: list[int] = []
        short: dict[str, list[int]] = {}
        for i, (result, code) in zip(sent, placed, strict=True):
            if code is Prededuct.CLOSED:
                # Its partition closed meanwhile: on to the next one, no pull needed. Its token may have sold
                # past that one, so it has no answer until it is placed again (`error` if it is not).
                closed.append(i)
                continue
            self.answers[i] = result
            # (A sealed partition sells nothing until the seal ends, however much is pulled to it.)
            if result.status is PurchaseStatus.SOLD_OUT and code is not Prededuct.SEALED:
                short.setdefault(targets[i], []).append(i)
        if any(code is Prededuct.STALE_LAYOUT for _, code in placed):
            raise StaleLayout(f"a pre-deduct of {self.layout.sku} refused epoch {self.layout.epoch}")
        return closed, short

    def pulling(self, short: Mapping[str, list[int]]) -> None:
        """One more pull, to the partitions `short`: from then on their scripts decide what fits."""
        self.pulled.update(short)
        self.pulls += 1

    def settle_answered(self) -> None:
        self.pending = [i for i in self.pending if self.answers[i] is None]

    def retry(self, again: Sequence[int]) -> None:
        """These purchases are placed once more (their answers so far are dropped)."""
        self.pending = sorted(again)
        for i in self.pending:
            self.answers[i] = None

    def results(self) -> list[PurchaseResult]:
        """Every purchase's answer; one never sent hears `error` (nothing was deducted)."""
        return [
            a or PurchaseResult(PurchaseStatus.ERROR, r.token, message=_NOT_RUN)
            for a, r in zip(self.answers, self.requests, strict=True)
        ]


class Scheduler:
    def __init__(self, stock: PartitionStockPort, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stock = stock
        self._clock = clock
        self._layouts: dict[str, tuple[float, Layout | None]] = {}
        self._registries: dict[str, tuple[float, Registry]] = {}
        self._refilling: set[str] = set()
        #: Per SKU, the moves this producer makes in the background (see _top_up).
        self._moves: dict[str, set[asyncio.Task[None]]] = {}
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
            self._spawn(self._sweep(layout, SWEEP_AGE_MS))
        return layout

    def forget(self, sku: str) -> None:
        """A partition refused the layout as another load's: read it again next time."""
        self._layouts.pop(sku, None)
        self._registries.pop(sku, None)

    async def sell(self, layout: Layout, requests: Sequence[PurchaseRequest], send: Sender) -> list[PurchaseResult]:
        """Sell each purchase on its partition, pulling stock to it while it is short.

        Once the SKU is sold out, a token is answered from a read of the logs it may be in: no hold or
        pre-deduct is written, and a token seen before still gets its original answer.
        """
        placing = Placement.of(layout, requests)
        try:
            registry = await self._registry(layout)
            # Each round but the last may pull stock; a purchase whose partition closed meanwhile is placed
            # on its next one without a pull, and partitions close only once.
            for _ in range(PULLS + len(layout.parts) + 1):
                if not await self._round(placing, registry, send):
                    break
                registry = await self._registry(layout, fresh=True)
        except StaleLayout as exc:
            # What was answered stands; nothing more moves by this layout.
            logger.info("layout of %s is out of date: %s", layout.sku, exc, extra=ids(sku=layout.sku))
            self.forget(layout.sku)
        except FlashSaleError as exc:
            # What was answered stands; the purchases still pending were not sent, and hear `error`.
            logger.warning("cannot place purchases of %s: %s", layout.sku, exc, extra=ids(sku=layout.sku))
        else:
            self._top_up(layout, registry)
        results = placing.results()
        await self._release(placing, results)
        return results

    async def _round(self, placing: Placement, registry: Registry, send: Sender) -> bool:
        """Place the pending purchases once; True when some are to be placed again."""
        targets = await self._answer_seen(placing, registry)
        if registry.sold_out:
            await self._sold_out(placing, placing.pending)
            return False
        await self._hold(placing)
        if not placing.pending:
            return False
        may_pull = placing.may_pull
        # A partition the registry says cannot cover its share gets stock first (or is closed): a
        # transaction sent there would only be refused. Once pulled to, or on the last pull, the scripts
        # decide: a pull that found less than the share leaves some of it that still fits.
        short = placing.uncovered(registry, targets) if may_pull else {}
        again, refused = await self._send(placing, send, targets, short)
        if may_pull:
            short.update(refused)
        if short:
            placing.pulling(short)
            again += await self._pull_for(placing, short)
        placing.retry(again)
        return bool(again)

    @staticmethod
    async def _send(
        placing: Placement, send: Sender, targets: Mapping[int, str], short: Mapping[str, list[int]]
    ) -> tuple[list[int], dict[str, list[int]]]:
        """The pending purchases whose partition is not `short`, sent as one transaction: those whose
        partition closed meanwhile, and those refused as short, by partition (see Placement.record)."""
        sent = [i for i in placing.pending if targets[i] not in short]
        if not sent:
            return [], {}
        placed = await send(placing.layout, [placing.requests[i] for i in sent], [targets[i] for i in sent])
        return placing.record(sent, targets, placed)

    async def _answer_seen(self, placing: Placement, registry: Registry) -> dict[int, str]:
        """Each pending purchase's partition; a token found in the log of a partition it passes (closed),
        or once the SKU is sold out in any it may sell on, is answered `duplicate` (see _read_logs)."""
        targets, wanted = placing.place(registry)
        if wanted:
            await self._read_logs(placing, wanted)
            placing.settle_answered()
        return targets

    async def _read_logs(self, placing: Placement, wanted: Mapping[str, list[int]]) -> None:
        """Read the logs `wanted` names for its purchases: one whose token was deducted there is answered
        `duplicate` from that entry, once a replica holds it (where there are replicas)."""
        found = await self._stock.entries({p: [placing.requests[i].token for i in idxs] for p, idxs in wanted.items()})
        seen = placing.note_logs(wanted, found)
        if seen:
            await self._answer_duplicates(placing, wanted, seen)

    async def _sold_out(self, placing: Placement, idxs: Sequence[int]) -> None:
        """These purchases hear `sold_out`, once the layout is read again (see _current)."""
        if idxs:
            await self._current(placing.layout)
            placing.sold_out(idxs)

    async def _current(self, layout: Layout) -> None:
        """Raises StaleLayout when the SKU was loaded again since `layout` was read: its logs are not where a
        token sold since would be, so `sold_out` could answer one told `accepted`."""
        now = await self._stock.layout(layout.sku)
        if now is None or now.epoch != layout.epoch:
            raise StaleLayout(f"{layout.sku} was loaded again since its layout of epoch {layout.epoch}")

    async def _answer_duplicates(
        self, placing: Placement, wanted: Mapping[str, list[int]], seen: Mapping[str, Mapping[str, LogEntry]]
    ) -> None:
        held: Mapping[str, Mapping[str, LogEntry | None]] = seen
        confirmed = True
        try:
            held = await self._stock.confirm(seen)
        except FlashSaleError as exc:
            # No replica holds them yet: a failover now could lose them. The buyers ask again.
            logger.warning("log entries of %s not confirmed: %s", placing.layout.sku, exc)
            confirmed = False
        for part, idxs in wanted.items():
            for i in idxs:
                entry = held.get(part, {}).get(placing.requests[i].token)
                if entry is not None and entry.state in c.DEDUCTED_STATES and placing.answers[i] is None:
                    placing.answers[i] = local_tx.seen(entry.token, entry, confirmed=confirmed)

    async def _hold(self, placing: Placement) -> None:
        """In a group's first round, with a per-user limit: a hold for each pending purchase; a buyer past
        the limit is answered now."""
        if placing.held:
            return
        placing.held = True
        layout, pending = placing.layout, placing.pending
        if not layout.per_user_limit or not pending:
            return
        requests = placing.requests
        held = await self._stock.hold(layout, *placing.attempts(pending))
        refused = {i: bought for i, bought in zip(pending, held, strict=True) if bought is not None}
        placing.holding += [i for i in pending if i not in refused]
        try:
            await self._look_up(placing, list(refused))
        except FlashSaleError as exc:
            # Whether they are retries of tokens sold is not known: they alone hear so, the group goes on.
            logger.warning("logs of %s not read for purchases past the limit: %s", layout.sku, exc)
            for i in refused:
                placing.answer(i, PurchaseStatus.PENDING, message=local_tx.PENDING)
        for i, bought in refused.items():
            if placing.answers[i] is None:
                placing.answer(
                    i,
                    PurchaseStatus.LIMIT_EXCEEDED,
                    message=f"user {requests[i].user_id} already bought {bought} of {layout.sku}",
                )
        placing.settle_answered()

    async def _look_up(self, placing: Placement, idxs: Sequence[int]) -> None:
        """The purchases a hold refused, looked for in every partition their token may sell on: a retry of a
        token sold before (asking another quantity, or under another user's id) hears `duplicate`, as on
        one key, where the pre-deduct looks the token up before the limit. The hold counts the buyer's
        units, not tokens: it refused the retry as a new purchase past the limit."""
        wanted: dict[str, list[int]] = {}
        for i in idxs:
            for part in placing.layout.reach(placing.requests[i].token):
                if part not in placing.looked[i]:
                    wanted.setdefault(part, []).append(i)
        if wanted:
            await self._read_logs(placing, wanted)

    async def _release(self, placing: Placement, results: Sequence[PurchaseResult]) -> None:
        """The holds of the purchases told `sold_out` or `error`: neither deducted anything (an `error`
        is only ever answered when no pre-deduct of the attempt ran, or when one refused it), so they give
        their units of the limit back once no other attempt of the token rides the hold. One that cannot
        be given back now stays held: the buyer may buy that much less, never more."""
        done = [i for i in placing.holding if results[i].status in _NOT_SOLD]
        if not done:
            return
        try:
            await self._stock.release(placing.layout, *placing.attempts(done))
        except FlashSaleError as exc:
            logger.warning("holds of %s kept: %s", placing.layout.sku, exc, extra=ids(sku=placing.layout.sku))

    async def close(self) -> None:
        """Cancel background refills: a transfer cut short is completed by the next sweep."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- moving stock ---------------------------------------------------------------------------------
    async def _pull_for(self, placing: Placement, short: dict[str, list[int]]) -> list[int]:
        """Pull stock to the partitions short of their purchases (or close them); those to try again. A
        purchase whose pull found nothing keeps the answer its partition gave, or hears `sold_out`."""
        layout, requests = placing.layout, placing.requests
        again: list[int] = []
        unsent: dict[str, list[int]] = {}
        for part, idxs in short.items():
            try:
                qty = [requests[i].qty for i in idxs]
                moved = await self._pull(layout, part, sum(qty), min(qty))
            except StaleLayout:
                raise
            except FlashSaleError as exc:
                logger.warning("cannot move stock to %s: %s", part, exc, extra=ids(sku=layout.sku))
                for i in idxs:
                    placing.answer(i, PurchaseStatus.ERROR, message=_NOT_RUN)
                continue
            if moved:
                again += idxs
            else:
                unsent[part] = [i for i in idxs if placing.answers[i] is None]
        try:
            await self._answer_unsent(placing, unsent)
        except StaleLayout:
            raise
        except FlashSaleError as exc:
            # Those left unanswered hear `error` and ask again; the purchases pulled for go on.
            logger.warning("cannot read the logs of %s: %s", layout.sku, exc, extra=ids(sku=layout.sku))
        return again

    async def _answer_unsent(self, placing: Placement, unsent: Mapping[str, list[int]]) -> None:
        """Purchases whose pull found nothing before any pre-deduct read their partition's log: one asked
        again (its answer lost) may be there, deducted, when its partition holds less than its quantity.
        Its log is read first, so it hears `duplicate`; the others hear `sold_out`."""
        wanted = {part: idxs for part, idxs in unsent.items() if idxs}
        if not wanted:
            return
        await self._read_logs(placing, wanted)
        await self._sold_out(placing, [i for idxs in wanted.values() for i in idxs if placing.answers[i] is None])

    async def _pull(self, layout: Layout, part: str, need: int, least: int) -> bool:
        """Make `part` able to sell `need` more units, or close it so its tokens sell elsewhere: True when
        the purchases short there are worth trying again, which they are while it holds `least`, the
        smallest of them, even when no more could be moved there."""
        # A move this producer has under way in the background holds its units in neither place: a pull
        # that read the registry meanwhile would find them nowhere, and tell a buyer `sold_out` beside them.
        await self._landed(layout.sku)
        registry = await self._registry(layout, fresh=True)
        if registry.transfers and registry.remaining(part) + registry.pool < need:
            # Units on their way between the pool and a partition, by another producer (or one that died,
            # whose transfers a sweep would complete only once they are SWEEP_AGE_MS old), are in neither
            # place: complete the moves now (each step counts once, whoever runs it) rather than close a
            # partition or tell a buyer `sold_out` beside them.
            await self._sweep(layout, 0)
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
        await self._rebalance(layout, registry, part, need - have)
        # What this rebalance drained is in the pool now, and so is what another producer drained meanwhile
        # (a closed partition's units, in the background: see _top_up), which this one then found gone.
        have += await self._refill(layout, part, need - have)
        return have >= least

    async def _rebalance(self, layout: Layout, registry: Registry, part: str, want: int) -> int:
        """The stranding rebalance: up to `want` units of the other partitions, fullest first, drained back
        to the pool for `part`; the units drained."""
        drained = 0
        for other in sorted(registry.parts, key=registry.remaining, reverse=True):
            if drained >= want:
                break
            if other != part and registry.remaining(other) > 0:
                drained += await self._drain(layout, other, want - drained)
        return drained

    async def _refill(self, layout: Layout, part: str, want: int) -> int:
        transfer_id = uuid.uuid4().hex
        taken = await self._stock.take(layout, transfer_id, part, want)
        if taken:
            await self._stock.give(layout, part, transfer_id, taken)
            await self._stock.end_refill(layout, transfer_id)
        return taken

    async def _drain(self, layout: Layout, part: str, want: int) -> int:
        transfer_id = uuid.uuid4().hex
        await self._stock.expect(layout, transfer_id, part, want)
        qty = await self._stock.drain(layout, part, transfer_id, want)
        await self._stock.receive(layout, transfer_id, qty)
        logger.info("rebalance: %d unit(s) of %s back to the pool", qty, part, extra=ids(sku=layout.sku))
        return qty

    def _top_up(self, layout: Layout, registry: Registry) -> None:
        """In the background: refill the open partitions whose standby sub-domain is empty, and drain
        back to the pool what a refill brought to a partition that had closed meanwhile."""
        for part, (active, standby) in registry.parts.items():
            if part in self._refilling:
                continue
            if part in registry.closed:
                if active + standby:  # a refill that came late, or an order given back there
                    self._move(layout, part, self._drain(layout, part, active + standby))
            elif standby == 0 and registry.pool > 0:
                self._move(layout, part, self._refill(layout, part, layout.refill))

    def _move(self, layout: Layout, part: str, move: Awaitable[int]) -> None:
        self._refilling.add(part)
        task = self._spawn(self._background(layout, part, move))
        moves = self._moves.setdefault(layout.sku, set())
        moves.add(task)
        task.add_done_callback(moves.discard)

    async def _landed(self, sku: str) -> None:
        """Once the moves of `sku` this producer has under way in the background are complete."""
        moves = self._moves.get(sku)
        if moves:
            await asyncio.wait(list(moves))

    async def _background(self, layout: Layout, part: str, move: Awaitable[int]) -> None:
        try:
            await move
        except StaleLayout:
            self.forget(layout.sku)
        except FlashSaleError as exc:
            logger.warning("moving stock of %s failed: %s", part, exc, extra=ids(sku=layout.sku))
        finally:
            self._refilling.discard(part)
            self._registries.pop(layout.sku, None)

    async def _sweep(self, layout: Layout, age_ms: int) -> None:
        """Complete the transfers under way older than `age_ms` on Redis's clock: those a refiller left
        behind, or all of them for a pull (each step counts once, whenever and by whomever it runs)."""
        try:
            for t in await self._stock.due(layout, age_ms):
                if t.dir == "out":
                    await self._stock.give(layout, t.part, t.id, t.qty)
                    await self._stock.end_refill(layout, t.id)
                else:
                    await self._stock.receive(layout, t.id, await self._stock.drain(layout, t.part, t.id, t.qty))
                # One a refiller left behind is worth an operator's eye; one a pull completed is routine.
                level = logging.WARNING if age_ms else logging.INFO
                logger.log(
                    level, "completed transfer %s (%s %s, %d)", t.id, t.dir, t.part, t.qty, extra=ids(sku=layout.sku)
                )
        except StaleLayout:
            self.forget(layout.sku)
        except FlashSaleError as exc:
            logger.warning("sweep of %s failed: %s", layout.sku, exc, extra=ids(sku=layout.sku))

    async def _registry(self, layout: Layout, *, fresh: bool = False) -> Registry:
        cached = self._registries.get(layout.sku)
        if cached and not fresh and self._clock() - cached[0] < REGISTRY_TTL_S:
            return cached[1]
        registry = await self._stock.registry(layout)
        self._registries[layout.sku] = (self._clock(), registry)
        return registry

    def _spawn(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
