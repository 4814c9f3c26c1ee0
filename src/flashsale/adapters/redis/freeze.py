"""The freeze a reload holds on a SKU: taken on every shard, renewed while the load runs, thawed after.

A freeze is a lease with a name (freeze.lua): it runs out by itself, so a `stock set` that died never stops
a sale for good, and the load's own scripts write only while the lease they were given still holds
(held.lua). Renewing keeps a slow load (a long history to read, a replica slow to acknowledge) inside its
lease; a load that stalled past it anyway is refused rather than discarding purchases that landed since.
"""

from __future__ import annotations

import enum
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flashsale.errors import FlashSaleError, StockError

logger = logging.getLogger(__name__)


class Frozen(enum.IntEnum):
    """freeze.lua's answers."""

    HELD = 1
    NOTHING = 0  # no such SKU or partition: nothing to protect
    TAKEN = 2  # another load holds it
    LAPSED = 3  # this load's lease ran out, or was replaced


#: What one freeze covers, freeze.lua's KEYS: the key that must exist, the meta, and the first-load lease
#: (taken instead while neither of the others exists).
Target = tuple[str, str, str]
#: A freeze script call: (its target, ms, token, mode) -> its answer.
Run = Callable[[Target, int, str, str], int]


@dataclass
class Freeze:
    """One load's lease on the shards of `sku`, each a Target, the SKU's own last. `held` runs
    the script and waits for a replica to hold what it wrote (a failover must not undo a freeze taken);
    `run` does not wait (a renewal a failover loses only ends the lease sooner)."""

    sku: str
    targets: list[Target]
    ms: int
    held: Run
    run: Run
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: The load's number (ticket.lua), once it took one: MySQL holds it, and so will each meta it loads.
    number: int = 0
    #: When the SKU's seal ends (seal.lua), read once the freeze was taken: every meta the load writes keeps it.
    sealed_until: str = ""
    #: Partitions no layout named, frozen on the way (`claim`).
    claimed: list[Target] = field(default_factory=list)

    def take(self) -> None:
        for target in self.targets:
            self._take(target)

    def claim(self, target: Target) -> None:
        """Take the freeze of a partition no layout names (a load cut short left it, loaded, with no
        freeze), once the SKU's own freeze is renewed: no other load can have named it since, and none
        can before the renewed lease runs out."""
        self._renew(self.targets[-1])
        self.claimed.append(target)
        self._take(target)

    def confirm(self) -> None:
        """Renew the lease before the load writes anything; raises when it has run out on a shard."""
        for target in self.targets:
            self._renew(target)

    def _take(self, target: Target) -> None:
        if Frozen(self.held(target, self.ms, self.token, "")) is Frozen.TAKEN:
            raise taken(self.sku, self.ms)

    def _renew(self, target: Target) -> None:
        if Frozen(self.held(target, self.ms, self.token, "renew")) is Frozen.LAPSED:
            raise lapsed(self.sku)

    def renew(self) -> None:
        """Renew the lease where it still holds (a shard already loaded holds none: its meta is new). A
        node that does not answer costs its own shards' lease only."""
        for target in self.targets:
            try:
                self.run(target, self.ms, self.token, "renew")
            except FlashSaleError as exc:
                logger.warning("could not renew the freeze of %s on %s: %s", self.sku, target[1], exc)

    def thaw(self, targets: Sequence[Target]) -> None:
        for target in targets:
            self.run(target, 0, self.token, "")


def taken(sku: str, ms: int) -> StockError:
    return StockError(
        f"another `stock set` is loading {sku} right now",
        hint=f"wait for it to end (at most {ms // 1000} s if it died) and run this one again",
    )


def lapsed(sku: str) -> StockError:
    return StockError(
        f"the load of {sku} outlived its freeze (it stalled longer than the freeze lasts): purchases may have "
        "landed since it read the sale's history, so Redis refused the rest of it",
        hint="run `flashsale reconcile` to see what each side holds, then `flashsale stock set` again",
    )


class Renewal:
    """Renews a freeze every `every_s` on a thread of its own while a load runs. A renewal refused or
    failed is only logged: the load's scripts refuse to write once the lease is gone."""

    def __init__(self, renew: Callable[[], None], every_s: float) -> None:
        self._renew = renew
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freeze-renewal", daemon=True)

    def __enter__(self) -> Renewal:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self._renew()
            except Exception:  # the lease runs out by itself, and the load's scripts then refuse
                logger.exception("could not renew the freeze")
