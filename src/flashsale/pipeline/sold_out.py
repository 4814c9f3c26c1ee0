"""What the producer knows of a SKU's stock between reads: sold out, in stock, or sealed.

- Sold out: a read or a pre-deduct left no stock. For `ttl_s` the SKU's groups close at once and are
  answered from one Redis read each, with no transaction.
- In stock: stock was left. For `ttl_s` its groups skip that read and go straight to their transactions.
- Sealed: a sold-out SKU whose log this process holds a copy of (seal.lua). For `ttl_s` (at most
  SEAL_MAX_TRUST_S) from before the seal was asked for, a purchase whose token the copy does not hold
  hears `sold_out` at once, with no read and no wait: Redis deducts no token until the seal ends, which
  is later than that trust by a margin (units that come back meanwhile wait for it). A token the copy
  holds goes the way of any other, to hear its original answer. The seal is renewed ahead of its end
  while the SKU stays sold out. A seal refused (units back, say) is not asked for again for `ttl_s`
  (at most SEAL_MAX_TRUST_S); a copy untrusted for SEAL_COPY_KEEP_S is dropped.

Used from one event loop only, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flashsale import constants as c
from flashsale.errors import FlashSaleError
from flashsale.logs import ids
from flashsale.models import PurchaseRequest, PurchaseResult
from flashsale.pipeline import local_tx
from flashsale.ports import PurchaseStockPort

logger = logging.getLogger(__name__)


def boot_clock() -> float:
    """Seconds on a clock that counts the time the machine was suspended. time.monotonic does not: a
    producer woken from a suspend (or a virtual machine resumed) would go on trusting a seal that Redis,
    on its own clock, ended meanwhile, and answer `sold_out` to a token sold since."""
    return time.clock_gettime(_BOOT_CLOCK)


#: CLOCK_BOOTTIME where there is one (Linux); elsewhere the monotonic clock.
_BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class _Sealed:
    until: float  # trusted until then, on this process's clock
    since: str  # the run of seals the copy belongs to
    tokens: frozenset[str]


class SoldOutCache:
    def __init__(
        self,
        stock: PurchaseStockPort,
        ttl_s: float,
        clock: Callable[[], float] = boot_clock,
        seal_cap_s: float = c.SEAL_MAX_TRUST_S,
    ) -> None:
        self._stock = stock
        self._ttl_s = ttl_s
        #: How long a seal is trusted: `ttl_s`, up to the cap.
        self._seal_s = min(ttl_s, seal_cap_s)
        self._clock = clock
        self._until: dict[str, float] = {}
        self._stocked: dict[str, float] = {}
        self._seals: dict[str, _Sealed] = {}
        #: Per SKU, until when a seal is not asked for again: the last was refused (units back, a reload,
        #: a log too large) or failed, and each sold-out group would ask again meanwhile.
        self._refused: dict[str, float] = {}
        #: The seal asked for, per SKU: at most one at a time.
        self.sealing: dict[str, asyncio.Task[None]] = {}

    def mark(self, sku: str) -> None:
        """No stock was left: the SKU is sold out for `ttl_s`."""
        self._until[sku] = self._clock() + self._ttl_s
        self._stocked.pop(sku, None)

    def seal(self, sku: str) -> None:
        """Seal a SKU just seen sold out, in the background, unless a seal of it is trusted already."""
        if not self.trusts(sku) and not self._within(self._refused, sku):
            self._drop_old()
            self._reseal(sku)

    def clear(self, sku: str) -> None:
        """The SKU is not sold out, as far as a flag can tell (not that it has stock left)."""
        self._until.pop(sku, None)

    def saw_stock(self, sku: str) -> None:
        """Stock left was just seen: the SKU is not sold out, and its groups need no read for `ttl_s`."""
        self.clear(sku)
        self._seals.pop(sku, None)  # (stock is only seen on sale once a seal has ended: none is trusted)
        self._stocked[sku] = self._clock() + self._ttl_s

    def forget(self, sku: str) -> None:
        """Whether the SKU has stock is not known (its sold-out flag, when set, stands)."""
        self._stocked.pop(sku, None)

    def in_stock(self, sku: str) -> bool:
        """Seen with stock left within `ttl_s` (no Redis call)."""
        return self._within(self._stocked, sku)

    def marked(self, sku: str) -> bool:
        """Seen sold out within `ttl_s` (no Redis call)."""
        return self._within(self._until, sku)

    def _within(self, seen: dict[str, float], sku: str) -> bool:
        until = seen.get(sku)
        return until is not None and self._clock() < until

    async def is_sold_out(self, sku: str) -> bool:
        if self.marked(sku):
            return True
        if sku not in self._until:
            return False
        try:
            still = await self._stock.is_sold_out(sku)
        except FlashSaleError:
            still = False  # cannot tell: let the pre-deduct decide
        if still:
            self.mark(sku)
        else:
            self.clear(sku)
        return still

    # --- sealed SKUs ----------------------------------------------------------------------------------
    def answer(self, request: PurchaseRequest) -> PurchaseResult | None:
        """`sold_out`, with no Redis call, for a purchase of a sealed SKU whose token its log did not
        hold; None otherwise (the purchase goes the usual way)."""
        sealed = self._seals.get(request.sku)
        if sealed is None:
            return None
        now = self._clock()
        if now >= sealed.until:
            return None
        if now >= sealed.until - self._seal_s / 2:
            self._reseal(request.sku)  # renewed ahead of its end, so that the answers under load stay local
        if request.token in sealed.tokens:
            return None
        return local_tx.sold_out(request.token, request.sku)

    def _drop_old(self) -> None:
        """The copies not trusted for SEAL_COPY_KEEP_S: a producer that saw thousands of SKUs sell out
        keeps only those of the last minute (a SKU sealed again is sent its log again); and the refusals
        past."""
        now = self._clock()
        for sku in [sku for sku, sealed in self._seals.items() if sealed.until < now - c.SEAL_COPY_KEEP_S]:
            del self._seals[sku]
        for sku in [sku for sku, until in self._refused.items() if until <= now]:
            del self._refused[sku]

    def trusts(self, sku: str) -> bool:
        """Whether a seal of the SKU is trusted now."""
        sealed = self._seals.get(sku)
        return sealed is not None and self._clock() < sealed.until

    def _reseal(self, sku: str) -> None:
        if self._seal_s > 0 and sku not in self.sealing:
            task = self.sealing[sku] = asyncio.get_running_loop().create_task(self._seal(sku))
            task.add_done_callback(lambda _: self.sealing.pop(sku, None))

    async def _seal(self, sku: str) -> None:
        known = self._seals.get(sku)
        started = self._clock()  # the trust runs from before the seal was written: it ends before the seal
        try:
            seal = await self._stock.seal(sku, round(self._seal_s * 1000), known.since if known else "")
        except FlashSaleError as exc:
            logger.debug("cannot seal %s: %s", sku, exc, extra=ids(sku=sku))
            seal = None
        if seal is None:
            self._refused[sku] = self._clock() + self._seal_s
            if known is not None:  # not trusted; its copy still serves a renewal in the same run
                self._seals[sku] = _Sealed(started, known.since, known.tokens)
            return
        if seal.tokens is not None:
            tokens = seal.tokens
        elif known is not None and known.since == seal.since:
            tokens = known.tokens
        else:  # (no copy of this run's log was asked for: cannot happen, but trust nothing then)
            self._seals.pop(sku, None)
            return
        self._seals[sku] = _Sealed(started + self._seal_s, seal.since, tokens)
