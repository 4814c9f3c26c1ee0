"""Records the stores hand back: Redis log entries and script outcomes, MySQL batch reports and views."""

from __future__ import annotations

import enum
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from flashsale.models import Deduction


class Prededuct(enum.IntEnum):
    ACCEPTED = 1
    DUPLICATE = 2
    SOLD_OUT = 3
    INSUFFICIENT = 4
    LIMIT_EXCEEDED = 5
    INVALID_QTY = 6
    UNKNOWN_SKU = 7
    FENCED = 8
    CLOSED = 9  # a partition closed for good (it was empty, and the pool too): the token goes on to its next one
    STALE_LAYOUT = 10  # the caller's layout is not the partition's load: nothing written, read the layout again
    #: Sold out because the SKU (or a partition a reload carried the seal into) is sealed: prededuct.lua
    #: answers 3 with detail 'sealed' (and records 3). Nothing sells before the seal ends: no pull helps.
    SEALED = 11


class StockReturn(enum.IntEnum):
    RETURNED = 1
    ALREADY_RETURNED = 2
    NOT_DEDUCTED = 3


class Decision(enum.IntEnum):
    """decide.lua's answers: what became of an order awaiting payment."""

    PAID = 1
    CANCELLED = 2  # its units are back on sale
    EXPIRED = 3  # its units are back on sale
    ALREADY_PAID = 4
    ALREADY_CANCELLED = 5
    ALREADY_EXPIRED = 6  # a payment after the deadline hears this too: the order expired then and there
    NOT_DUE = 7  # expire before the deadline: nothing changed
    NO_ORDER = 8  # no deducted entry for the token
    FINAL = 9  # the SKU takes no payments: its orders were final on acceptance
    NOT_YOURS = 10  # cancel by another user: nothing changed
    FROZEN = 11  # the SKU is being loaded again: ask again
    INVALID_ACTION = 12
    FENCED = 13  # the checker rolled the decision's message back before it ran: nothing was decided


class Restock(enum.IntEnum):
    """add_stock.lua's answers."""

    ADDED = 1
    ALREADY_ADDED = 2  # an earlier message of the same request id added the units
    UNKNOWN_SKU = 3
    FROZEN = 4  # the SKU is being loaded again: ask again
    OTHER_QTY = 5  # the request id added another quantity before: nothing more was added
    INVALID_QTY = 6
    FENCED = 7  # the checker rolled the restock's message back before it ran: nothing was added


@dataclass(frozen=True)
class RestockResult:
    """What add_stock.lua answered: its code, the stock after it, and the request's units and message."""

    code: Restock
    stock: int | None  # after the call (a partitioned SKU's pool); None: the SKU is not loaded
    qty: int  # the units the request added (this call, or the first one); 0 when none
    message_id: str  # the message that carries the addition to MySQL ('' when none)


class LoadStock(enum.IntEnum):
    """load_stock.lua's answers."""

    LOADED = 1
    HAS_HISTORY = 2  # deductions on record, and no reset asked
    INVALID = 3
    LAPSED = 4  # the load no longer holds the SKU's freeze


class Adopt(enum.IntEnum):
    """adopt.lua's answers."""

    ALREADY_LOGGED = 0  # the token has a log entry: nothing to do
    ADOPTED = 1
    NO_STOCK = 2  # taking the deduction again needs more stock than Redis has: an operator decides
    SEALED = 3  # the SKU is sealed (seal.lua): nothing written; ask again once the seal ends
    RELOADED = 4  # Redis holds another load of the SKU than the row's: nothing written


class LogEntry(NamedTuple):
    """A token's entry in its SKU's (or partition's) Redis log. A named tuple, not a frozen dataclass: the
    consumer parses one per purchase, and a frozen dataclass's 14 fields took 1.5 µs to set (performance.md,
    run L). Change a field with `_replace`."""

    token: str
    state: str
    sku: str
    user: str
    qty: int
    ts_ms: int
    message_id: str | None = None
    from_stock: int | None = None
    to_stock: int | None = None
    part: str | None = None  # the partition (sku#n) whose log holds it, for a partitioned SKU
    order: str | None = None  # awaiting, paid, cancelled or expired; None: final on acceptance
    due_ms: int | None = None  # the payment deadline, on Redis's clock
    decided_ms: int | None = None  # when the order was paid, cancelled or expired
    decided_by: str | None = None  # the message that carries that decision

    @property
    def shard(self) -> str:
        """The Redis keys it lives under: its partition's, or its SKU's."""
        return self.part or self.sku

    @classmethod
    def parse(cls, token: str, raw: str | bytes) -> LogEntry:
        data = orjson.loads(raw)
        get = data.get
        return cls(  # by position, in the fields' order: keywords cost a tenth more
            token,
            str(data["state"]),
            str(get("sku", "")),
            str(get("user", "")),
            int(get("qty", 0)),
            int(get("ts", 0)),
            get("msg") or None,
            int(data["from"]) if "from" in data else None,
            int(data["to"]) if "to" in data else None,
            str(data["part"]) if get("part") else None,
            str(data["order"]) if get("order") else None,
            int(data["due"]) if "due" in data else None,
            int(data["decided_ts"]) if "decided_ts" in data else None,
            get("decided_msg") or None,
        )


@dataclass(frozen=True)
class PredeductResult:
    """The outcome of one purchase of a pre-deduct (prededuct.lua)."""

    code: Prededuct
    remaining: int | None
    entry: LogEntry | None = None  # a duplicate's: the entry of the message that deducted the token
    bought: int | None = None


@dataclass(frozen=True)
class Peek:
    """What Redis says of some purchases of one SKU before they are sent (one read, no script)."""

    stock: int | None  # None: the SKU is not loaded
    per_user_limit: int
    entries: dict[str, LogEntry | None]  # token -> its log entry
    bought: dict[str, int]  # user -> units bought (only read when there is a limit)


@dataclass(frozen=True)
class Seal:
    """A sold-out SKU sealed for a while (seal.lua): no token is deducted until it ends."""

    since: str  # the run of seals it renews: a copy of the log taken in the same run still holds every token
    tokens: frozenset[str] | None  # every token of the log; None when the caller's copy is of this run


@dataclass(frozen=True)
class TxRecord:
    """What Redis knows of one half message's pre-deduct (fs:{sku}:tx)."""

    state: str  # constants.TX_RAN, TX_FENCED or TX_STALE
    codes: tuple[Prededuct, ...] = ()  # per purchase, in the message's order (ran only)
    accepted: int = 0
    ts_ms: int = 0
    added: int = 0  # a restock (add_stock.lua): the units its message added (0: it added nothing)
    replaced_ms: int = 0  # stale since a load replaced the one it ran on (decided.lua): when; 0 otherwise

    @classmethod
    def parse(cls, raw: str | bytes) -> TxRecord:
        data = orjson.loads(raw)
        restocked = data.get("kind") == "restock" and int(data.get("code", 0)) == Restock.ADDED
        return cls(
            state=str(data["state"]),
            codes=tuple(Prededuct(int(ch)) for ch in str(data.get("codes", ""))),
            accepted=int(data.get("accepted", 0)),
            ts_ms=int(data.get("ts", 0)),
            added=int(data["qty"]) if restocked else 0,
            replaced_ms=int(data.get("replaced", 0)),
        )


class LookedUp(NamedTuple):
    """What the consumer reads of one SKU or partition for a batch (RedisStock.lookup)."""

    entries: dict[str, LogEntry | None]  # token -> its log entry
    records: dict[str, TxRecord | None]  # message id -> its record
    added: int  # units restocks added to its SKU
    ticket: int | None  # the number of the load it belongs to (ticket.lua; None: loaded before numbers)


@dataclass(frozen=True)
class CheckView:
    """The checker's view of a half message (fence.lua): its record, and the log entry of each token it carries."""

    state: str  # constants.TX_RAN, TX_FENCED, TX_STALE, or TX_YOUNG (no record; too young to fence)
    record: TxRecord | None
    entries: dict[str, LogEntry | None]


@dataclass(frozen=True)
class StockView:
    sku: str
    stock: int
    initial: int
    per_user_limit: int
    sold_out: bool
    deducted_qty: int
    deducted_count: int
    returned_qty: int
    returned_count: int
    fenced_count: int
    log_entries: int
    loaded_ms: int
    added_qty: int = 0  # units restocks added during the sale (add_stock.lua)
    #: The number of the load it holds (ticket.lua; 0: loaded without one); None: loaded before loads were
    #: numbered.
    ticket: int | None = None
    #: A partitioned SKU: `stock` is the pool, the partitions and the units moving between them.
    pool: int | None = None
    partitions: tuple[PartitionView, ...] = ()
    moving: int = 0


@dataclass(frozen=True)
class PartitionView:
    """One partition of a SKU: its two sub-domains (the active one sells), and what it sold."""

    part: str
    active: int
    standby: int
    deducted_qty: int
    refilled_qty: int
    drained_qty: int
    switches: int
    node: str = ""
    closed: bool = False

    @property
    def remaining(self) -> int:
        return self.active + self.standby


@dataclass(frozen=True)
class Layout:
    """How a partitioned SKU is spread: its partitions, refill size, switch threshold, and load epoch."""

    sku: str
    parts: tuple[str, ...]
    refill: int
    threshold: int
    epoch: int
    per_user_limit: int = 0

    def order(self, token: str) -> Iterator[str]:
        """The partitions that may sell `token`, in the order it tries them: a permutation fixed by the
        token's crc32, so every attempt of the token, in any producer, walks the same way. Tokens spread
        evenly over the first place, and those of a closed partition evenly over the others."""
        left = list(self.parts)
        code = zlib.crc32(token.encode())
        while left:
            code, i = divmod(code, len(left))
            yield left.pop(i)

    def reach(self, token: str) -> list[str]:
        """Every partition `token` may ever be sold on: its order up to the anchor, which never closes."""
        reach = []
        for part in self.order(token):
            reach.append(part)
            if part == self.anchor:
                return reach
        return reach

    @property
    def anchor(self) -> str:
        """The partition that is never closed, so every token always has one to go to."""
        return self.parts[0]


@dataclass(frozen=True)
class Registry:
    """What a partitioned SKU can sell, as last read: its pool, each partition's (active, standby), and
    the partitions closed for good."""

    pool: int
    parts: dict[str, tuple[int, int]]
    transfers: int = 0  # moves under way between the pool and the partitions
    closed: frozenset[str] = frozenset()

    def remaining(self, part: str) -> int:
        return sum(self.parts.get(part, (0, 0)))

    def target(self, layout: Layout, token: str) -> tuple[str, list[str]]:
        """Where `token` is sold now, its first partition not closed; and the closed ones it passes on the
        way, whose logs may hold an earlier attempt of it."""
        passed: list[str] = []
        for part in layout.order(token):
            if part not in self.closed:
                return part, passed
            passed.append(part)
        return layout.anchor, passed  # the anchor is never closed; a registry that says so is out of date

    @property
    def sold_out(self) -> bool:
        """Nothing left anywhere, and no unit on its way between two places."""
        return self.pool == 0 and self.transfers == 0 and not any(self.remaining(p) for p in self.parts)


@dataclass(frozen=True)
class Transfer:
    """A move between a SKU's pool and one of its partitions, recorded until it is complete."""

    id: str
    dir: str  # "out": pool -> partition (refill); "in": partition -> pool (drain)
    part: str
    qty: int
    ts_ms: int

    @classmethod
    def parse(cls, transfer_id: str, raw: str | bytes) -> Transfer:
        data = orjson.loads(raw)
        return cls(
            transfer_id, str(data["dir"]), str(data["part"]), int(data.get("qty", data.get("want", 0))), int(data["ts"])
        )


@dataclass(frozen=True)
class Incoming:
    """A deduction to apply, with the values of its Redis log entry."""

    deduction: Deduction
    message_id: str  # of the half message that deducted it in Redis
    topic: str = ""
    order: Order | None = None  # its order's state in the log, for a SKU sold with a payment deadline
    attempt: int = 1  # deliveries of the message that carries it
    added_qty: int = 0  # units restocks added to its SKU in Redis (MySQL may not hold them all yet)


@dataclass(frozen=True)
class Addition:
    """A restock to apply: units its message added to the SKU's stock in Redis (add_stock.lua)."""

    sku: str
    request_id: str
    qty: int
    message_id: str
    ts_ms: int


@dataclass(frozen=True)
class Order:
    """Where an order awaiting payment stands in the Redis log (decide.lua), for MySQL to follow."""

    state: str  # awaiting, paid, cancelled or expired
    due_ms: int
    decided_ms: int | None = None
    decided_by: str | None = None  # the message that carries the decision

    @property
    def returned(self) -> bool:
        """Cancelled or expired: its units went back on sale."""
        return self.state in ("cancelled", "expired")

    @classmethod
    def of(cls, entry: LogEntry) -> Order | None:
        if entry.order is None or entry.due_ms is None:
            return None
        return cls(entry.order, entry.due_ms, entry.decided_ms, entry.decided_by)


@dataclass(frozen=True)
class Conflict:
    """A deduction MySQL must not apply as it stands; recorded for reconcile and an operator."""

    deduction: Deduction
    message_id: str
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    topic: str
    key: str | None
    reason: str
    body: bytes
    sku: str | None = None
    #: The token (a restock's request id) of a letter that carries one purchase of its message; '' for a
    #: whole message. A message leaves one letter per purchase at most, each kept.
    purchase: str = ""


@dataclass
class ApplyReport:
    applied: list[Deduction] = field(default_factory=list)
    duplicates: int = 0
    restored: int = 0  # rows re-created for orders that existed: their stock was already deducted
    conflicts: list[Deduction] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    skipped: int = 0  # purchases a message carried that its pre-deduct did not accept
    returned_qty: int = 0  # units of cancelled or expired orders given back to MySQL's stock
    added_qty: int = 0  # units restocks added to MySQL's stock

    def add(self, other: ApplyReport) -> None:
        self.applied += other.applied
        self.duplicates += other.duplicates
        self.restored += other.restored
        self.conflicts += other.conflicts
        self.dead_letters += other.dead_letters
        self.skipped += other.skipped
        self.returned_qty += other.returned_qty
        self.added_qty += other.added_qty


@dataclass(frozen=True)
class InventoryView:
    sku: str
    initial: int
    stock: int
    per_user_limit: int
    deductions: int
    deducted_qty: int
    orders: int
    ordered_qty: int
    returns: int = 0
    returned_qty: int = 0
    added_qty: int = 0  # units restocks added (stock_additions)
    order_states: dict[str, tuple[int, int]] = field(default_factory=dict)  # status -> (orders, units)


@dataclass(frozen=True)
class DeductionRow:
    """A row of stock_deductions, as reconcile pages through them."""

    id: int
    token: str
    user_id: str
    qty: int
    message_id: str
    created_ms: int
    #: Its order, for a SKU sold with a payment deadline: the log's name of its state (awaiting, paid,
    #: cancelled, expired), its deadline and when it was decided; None for an order final on acceptance.
    order: str | None = None
    due_ms: int | None = None
    decided_ms: int | None = None
    #: The number of the load MySQL held as the row was read (ticket.lua; 0: loaded without one). Redis
    #: takes a write-back only into that load (adopt.lua).
    load: int = 0


@dataclass(frozen=True)
class DeadLetterRow:
    """A row of dead_letters not replayed yet."""

    id: int
    message_id: str
    topic: str
    message_key: str | None
    sku: str | None
    reason: str
    body: bytes


@dataclass(frozen=True)
class Bookkeeping:
    """Counts reconcile needs besides the totals of InventoryView."""

    orders_without_deduction: int
    deductions_without_order: int
    dead_letters: int
    conflicts: int
    conflict_qty: int
