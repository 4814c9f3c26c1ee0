"""How flashsale names its Redis keys: the templates, a SKU's (or a partition's) keys, partitions and holds.

Every key of one SKU carries the hash tag {sku}, so every script touches one Redis Cluster slot. A
partition `sku#n` has the keys of a SKU with its own hash tag {sku#n}; `#` is not allowed in a SKU, so
a partition's keys never meet a SKU's. docs/scaling.md has the design.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.crc import key_slot

from flashsale import constants as c
from flashsale.records import Layout

#: Remaining stock (integer string).
STOCK_KEY = "fs:{{{sku}}}:stock"
#: token -> JSON log entry {state, sku, user, qty, from, to, ts, msg}.
LOG_KEY = "fs:{{{sku}}}:log"
#: user_id -> quantity bought (per-user limit).
USERS_KEY = "fs:{{{sku}}}:users"
#: initial, per_user_limit, sold_out and running counters.
META_KEY = "fs:{{{sku}}}:meta"
#: message id -> JSON record of that half message's pre-deduct: {state: ran|fenced|stale, codes, accepted, ts};
#: a load keeps them, a `ran` one as `stale` with `replaced` (when, ms) for a day (lua/decided.lua).
TX_KEY = "fs:{{{sku}}}:tx"
#: message id -> when a transaction check first found no record (ms, Redis's clock): the grace runs from it.
CHECKS_KEY = "fs:{{{sku}}}:checks"
#: request id -> JSON {qty, msg, ts}: the restocks of this load, each added once (add_stock.lua).
ADDED_KEY = "fs:{{{sku}}}:added"
#: The token of a SKU's first load under way (freeze.lua), expiring with its lease: a SKU with no meta yet.
LOADING_KEY = "fs:{{{sku}}}:loading"
#: The number of the last load of a SKU that set out to write MySQL (ticket.lua), never reset: MySQL keeps the
#: number of the load it holds and refuses a lower one, from a load that stalled past its freeze.
TICKET_KEY = "fs:{{{sku}}}:ticket"
#: Set of every SKU loaded into this Redis (no hash tag: operator listing only, never in scripts).
SKUS_KEY = "fs:skus"

# --- Partitioned stock (docs/scaling.md) ----------------------------------------------------------------
# n in `sku#n` is chosen so that the partitions land on different masters (see `place`).
#: (On the SKU's own tag) units not given to a partition yet.
POOL_KEY = "fs:{{{sku}}}:pool"
#: (On the SKU's own tag) transfer id -> JSON {dir, part, qty|want, ts}: moves under way to or from the pool.
TRANSFERS_KEY = "fs:{{{sku}}}:transfers"
#: (On the SKU's own tag) transfer id -> units: completed moves, kept for the life of the load so that a step
#: run again after the end counts nothing.
TRANSFERS_DONE_KEY = "fs:{{{sku}}}:done"
#: (On a partition's tag) transfer id -> units it received (negative: drained out); each applies once.
REFILLS_KEY = "fs:{{{sku}}}:refills"
#: Per-user limit of a partitioned SKU: b:user -> units held, h:token -> units (sharded by the user's crc32).
USER_HOLDS_KEY = "fs:{{#users:{shard}}}:{sku}:{epoch}"
#: Hold shards; a user's shard is the crc32 of the user id modulo this (spread over every master).
HOLD_SHARDS = 64


@dataclass(frozen=True)
class SkuKeys:
    stock: str
    log: str
    users: str
    meta: str
    tx: str
    checks: str
    pool: str
    transfers: str
    done: str
    refills: str
    added: str
    loading: str
    ticket: str

    @classmethod
    def of(cls, sku: str) -> SkuKeys:
        """The keys of a SKU, or of a partition `sku#n`."""
        return cls(
            stock=STOCK_KEY.format(sku=sku),
            log=LOG_KEY.format(sku=sku),
            users=USERS_KEY.format(sku=sku),
            meta=META_KEY.format(sku=sku),
            tx=TX_KEY.format(sku=sku),
            checks=CHECKS_KEY.format(sku=sku),
            pool=POOL_KEY.format(sku=sku),
            transfers=TRANSFERS_KEY.format(sku=sku),
            done=TRANSFERS_DONE_KEY.format(sku=sku),
            refills=REFILLS_KEY.format(sku=sku),
            added=ADDED_KEY.format(sku=sku),
            loading=LOADING_KEY.format(sku=sku),
            ticket=TICKET_KEY.format(sku=sku),
        )

    def sale(self) -> list[str]:
        """KEYS of the scripts that change stock (return_stock, adopt)."""
        return [self.stock, self.log, self.users, self.meta]

    def all(self) -> list[str]:
        """KEYS of prededuct.lua."""
        return [*self.sale(), self.tx]

    def load(self) -> list[str]:
        """KEYS of load_stock.lua."""
        return [*self.all(), self.checks, self.added, self.loading]

    def load_pool(self) -> list[str]:
        """KEYS of load_pool.lua."""
        return [*self.all(), self.pool, self.transfers, self.done, self.checks, self.added, self.loading]

    def restock(self) -> list[str]:
        """KEYS of add_stock.lua."""
        return [self.stock, self.meta, self.tx, self.added, self.pool]

    def pool_take(self) -> list[str]:
        """KEYS of pool_take.lua (a SKU's: refill step 1)."""
        return [self.pool, self.transfers, self.meta, self.done]

    def partition_move(self) -> list[str]:
        """KEYS of refill_apply.lua and drain.lua (a partition's: the step that moves its units)."""
        return [self.stock, self.meta, self.refills]

    def refill_end(self) -> list[str]:
        """KEYS of refill_end.lua (a SKU's: refill step 3)."""
        return [self.transfers, self.done, self.meta]

    def every(self) -> list[str]:
        """Every key a SKU or a partition may have (those of its pool and transfers too)."""
        return [*self.load(), self.pool, self.transfers, self.done, self.refills]


def part_name(sku: str, n: int) -> str:
    return f"{sku}{c.PART_SEP}{n}"


def parent(shard: str) -> str:
    """The SKU a partition belongs to (a SKU is its own)."""
    return shard.split(c.PART_SEP, 1)[0]


def holds_key(layout: Layout, user: str) -> str:
    shard = zlib.crc32(user.encode()) % HOLD_SHARDS
    return USER_HOLDS_KEY.format(shard=shard, sku=layout.sku, epoch=layout.epoch)


def all_holds_keys(layout: Layout) -> list[str]:
    """Every holds key of one load of the SKU (deleted when it is loaded again)."""
    return [USER_HOLDS_KEY.format(shard=n, sku=layout.sku, epoch=layout.epoch) for n in range(HOLD_SHARDS)]


def place(sku: str, count: int, masters: Sequence[str], master_of_slot: Callable[[int], str]) -> list[str]:
    """`count` partition names for `sku`, the i-th on masters[i % len(masters)] (any name on one node)."""
    if len(masters) <= 1:
        return [part_name(sku, n) for n in range(count)]
    names: list[str] = []
    n = 0
    for i in range(count):
        target = masters[i % len(masters)]
        while master_of_slot(key_slot(STOCK_KEY.format(sku=part_name(sku, n)).encode())) != target:
            n += 1
        names.append(part_name(sku, n))
        n += 1
    return names
