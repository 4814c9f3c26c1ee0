"""Test doubles of the ports (flashsale.ports): they record calls and answer what a test sets.

The producer's ports are coroutines (it runs on an event loop); the checker's and consumer's are plain calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flashsale.errors import BusError
from flashsale.models import Buyer, Purchase, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline.partitions import Placed
from flashsale.records import (
    CheckView,
    Layout,
    LogEntry,
    LookedUp,
    Peek,
    Prededuct,
    PredeductResult,
    Registry,
    Seal,
    Transfer,
    TxRecord,
)


@dataclass
class FakeHalf:
    message_id: str
    calls: list[str]
    fail_commit: bool = False

    async def commit(self) -> None:
        self.calls.append(f"commit {self.message_id}")
        if self.fail_commit:
            raise BusError("commit lost")

    async def rollback(self) -> None:
        self.calls.append(f"rollback {self.message_id}")


@dataclass
class FakeBus:
    calls: list[str] = field(default_factory=list)
    sent: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    fail_send: bool = False
    fail_commit: bool = False
    _ids: int = 0

    def new_message_id(self) -> str:
        self._ids += 1
        return f"msg-{self._ids}"

    async def send_half_async(
        self, topic: str, key: str, body: bytes, tag: str, message_id: str | None = None
    ) -> FakeHalf:
        self.calls.append(f"send_half {key}")
        if self.fail_send:
            raise BusError("broker down")
        self.sent.append((topic, key, body, tag))
        return FakeHalf(message_id or self.new_message_id(), self.calls, self.fail_commit)


@dataclass
class FakeStock:
    """The producer's Redis: answers `result` to every purchase of a pre-deduct (or raises `error`), and
    `stock`, `limit`, `entries` and `bought` to a peek (or raises `peek_error`)."""

    result: PredeductResult = field(default_factory=lambda: PredeductResult(Prededuct.ACCEPTED, 9))
    error: Exception | None = None
    sold_out: bool = False
    stock: int | None = 10
    limit: int = 0
    entries: dict[str, LogEntry] = field(default_factory=dict)
    bought: dict[str, int] = field(default_factory=dict)
    peek_error: Exception | None = None
    unconfirmed: Exception | None = None
    errors: dict[str, Exception] = field(default_factory=dict)  # per SKU or partition, before `error`
    on_ping: Callable[[], None] = lambda: None
    sealed: Seal | None = None
    seal_error: Exception | None = None
    calls: list[str] = field(default_factory=list)
    seals: list[str] = field(default_factory=list)  # apart from `calls`: a seal is asked for in the background

    async def prededuct(
        self, sku: str, gid: str, purchases: Sequence[Purchase], epoch: int = 0
    ) -> list[PredeductResult]:
        self.calls.append(f"prededuct {sku} {' '.join(p.token for p in purchases)} {gid}")
        error = self.errors.get(sku, self.error)
        if error:
            raise error
        return [self.result for _ in purchases]

    async def peek(self, sku: str, purchases: Sequence[Buyer]) -> Peek:
        self.calls.append(f"peek {sku} {' '.join(p.token for p in purchases)}")
        if self.peek_error:
            raise self.peek_error
        return Peek(
            self.stock,
            self.limit,
            {p.token: self.entries.get(p.token) for p in purchases},
            {p.user_id: self.bought.get(p.user_id, 0) for p in purchases},
        )

    async def confirm(self, found: Mapping[str, Mapping[str, LogEntry]]) -> dict[str, dict[str, LogEntry | None]]:
        """Entries a replica holds: with none (one node) no call is made; `unconfirmed` raises as a WAIT
        that no replica answered in time."""
        if self.unconfirmed:
            self.calls.append("confirm " + " ".join(t for entries in found.values() for t in entries))
            raise self.unconfirmed
        return {shard: dict(entries) for shard, entries in found.items()}

    async def is_sold_out(self, sku: str) -> bool:
        self.calls.append(f"is_sold_out {sku}")
        if self.error:
            raise self.error
        return self.sold_out

    async def seal(self, sku: str, trust_ms: int, known_since: str) -> Seal | None:
        """`sealed` (None: the SKU cannot be sealed); a copy of the log is sent unless `known_since` is its run."""
        self.seals.append(f"{sku} {trust_ms} {known_since}")
        if self.seal_error:
            raise self.seal_error
        if self.sealed is None or known_since != self.sealed.since:
            return self.sealed
        return Seal(self.sealed.since, None)

    async def ping(self) -> None:
        self.calls.append("ping")
        self.on_ping()


@dataclass
class FakeCheckStock:
    """The checker's Redis: answers `view` to every check (or raises `error`)."""

    view: CheckView = field(default_factory=lambda: CheckView("young", None, {}))
    error: Exception | None = None
    views: dict[str, CheckView | Exception] = field(default_factory=dict)  # per SKU or partition, before `view`
    calls: list[tuple[str, str, tuple[str, ...], int]] = field(default_factory=list)

    def check(self, sku: str, gid: str, tokens: Sequence[str], *, grace_ms: int) -> CheckView:
        self.calls.append((sku, gid, tuple(tokens), grace_ms))
        if self.error:
            raise self.error
        view = self.views.get(sku, self.view)
        if isinstance(view, Exception):
            raise view
        return view


@dataclass
class FakeLog:
    """The consumer's Redis: log entries and message records set per test."""

    entries: dict[tuple[str, str], LogEntry] = field(default_factory=dict)
    records: dict[tuple[str, str], TxRecord] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)  # sku -> units restocks added
    tickets: dict[str, int] = field(default_factory=dict)  # sku -> the number of the load it holds
    error: Exception | None = None
    lookups: int = 0

    def lookup(self, wanted: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, LookedUp]:
        self.lookups += 1
        if self.error:
            raise self.error
        return {
            sku: LookedUp(
                {t: self.entries.get((sku, t)) for t in tokens},
                {g: self.records.get((sku, g)) for g in gids},
                self.added.get(sku, 0),
                self.tickets.get(sku, 0),
            )
            for sku, (tokens, gids) in wanted.items()
        }

    def ping(self) -> None:
        if self.error:
            raise self.error

    def deducted(self, sku: str, token: str, user: str, qty: int, gid: str) -> None:
        """Record that message `gid` deducted `token`, as prededuct.lua would."""
        self.entries[(sku, token)] = LogEntry(token, "deducted", sku, user, qty, 1_000, message_id=gid)
        record = self.records.get((sku, gid))
        codes = (record.codes if record else ()) + (Prededuct.ACCEPTED,)
        self.records[(sku, gid)] = TxRecord("ran", codes, len(codes), 1_000)


@dataclass
class FakePartitions:
    """A partitioned SKU in memory (the scheduler's PartitionStockPort), and `sell`, a transaction that sells
    from it as prededuct.lua would: per partition, its log first, then closed, then its stock."""

    shape: Layout
    pool: int
    stock: dict[str, int]  # per partition, both sub-domains in one
    closed: set[str] = field(default_factory=set)
    logs: dict[str, dict[str, LogEntry]] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)  # user -> units
    attempts: dict[str, Purchase] = field(default_factory=dict)  # attempts holding, by id (one per token here)
    #: Refills under way whose refiller died: their units left the pool and reach no partition until completed.
    moving: dict[str, Transfer] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    sales: list[list[tuple[str, str]]] = field(default_factory=list)  # per transaction: (token, partition)
    registries: list[Registry] = field(default_factory=list)  # out-of-date reads handed out first
    unconfirmed: Exception | None = None  # what confirm raises: no replica acknowledged in time
    stale: set[str] = field(default_factory=set)  # partitions of another load: their pre-deducts are refused
    sealed: set[str] = field(default_factory=set)  # partitions a reload carried a seal into: they sell nothing

    async def layout(self, sku: str) -> Layout | None:
        self.calls.append(f"layout {sku}")
        return self.shape

    async def registry(self, layout: Layout) -> Registry:
        if self.registries:
            return self.registries.pop(0)
        return Registry(self.pool, {p: (n, 0) for p, n in self.stock.items()}, len(self.moving), frozenset(self.closed))

    async def entries(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, LogEntry | None]]:
        self.calls.append("entries " + " ".join(sorted(wanted)))
        return {p: {t: self.logs.get(p, {}).get(t) for t in tokens} for p, tokens in wanted.items()}

    async def close_partition(self, layout: Layout, part: str) -> bool:
        self.calls.append(f"close {part}")
        if self.stock[part]:
            return False
        self.closed.add(part)
        return True

    async def hold(self, layout: Layout, purchases: Sequence[Purchase], attempts: Sequence[str]) -> list[int | None]:
        out: list[int | None] = []
        for p, attempt in zip(purchases, attempts, strict=True):
            bought = self.held.get(p.user_id, 0)
            if bought + p.qty > layout.per_user_limit:
                out.append(bought)
            else:
                self.held[p.user_id] = bought + p.qty
                self.attempts[attempt] = p
                out.append(None)
        return out

    async def release(self, layout: Layout, purchases: Sequence[Purchase], attempts: Sequence[str]) -> int:
        freed = 0
        for attempt in attempts:
            p = self.attempts.pop(attempt)
            self.held[p.user_id] -= p.qty
            freed += p.qty
        self.calls.append(f"release {freed}")
        return freed

    async def confirm(self, found: Mapping[str, Mapping[str, LogEntry]]) -> dict[str, dict[str, LogEntry | None]]:
        if self.unconfirmed:
            raise self.unconfirmed
        return {p: dict(entries) for p, entries in found.items()}

    async def take(self, layout: Layout, transfer_id: str, part: str, want: int) -> int:
        taken = min(self.pool, want)
        self.pool -= taken
        self.calls.append(f"take {part} {taken}")
        return taken

    async def give(self, layout: Layout, part: str, transfer_id: str, qty: int) -> None:
        self.stock[part] += qty

    async def end_refill(self, layout: Layout, transfer_id: str) -> None:
        self.moving.pop(transfer_id, None)

    async def expect(self, layout: Layout, transfer_id: str, part: str, want: int) -> None:
        pass

    async def drain(self, layout: Layout, part: str, transfer_id: str, want: int) -> int:
        qty = min(self.stock[part], want)
        self.stock[part] -= qty
        self.calls.append(f"drain {part} {qty}")
        return qty

    async def receive(self, layout: Layout, transfer_id: str, qty: int) -> None:
        self.moving.pop(transfer_id, None)
        self.pool += qty

    async def due(self, layout: Layout, age_ms: int) -> list[Transfer]:
        self.calls.append(f"due {age_ms}")
        return list(self.moving.values())

    async def sell(self, layout: Layout, requests: Sequence[PurchaseRequest], parts: Sequence[str]) -> list[Placed]:
        """As prededuct.lua would answer, per partition: its log first, then closed, then its stock."""
        self.sales.append([(r.token, part) for r, part in zip(requests, parts, strict=True)])
        gid = f"m{len(self.sales)}"
        out: list[Placed] = []
        for r, part in zip(requests, parts, strict=True):
            seen = self.logs.setdefault(part, {}).get(r.token)
            if part in self.stale:
                out.append((PurchaseResult(PurchaseStatus.ERROR, r.token), Prededuct.STALE_LAYOUT))
            elif seen is not None:
                out.append(
                    (PurchaseResult(PurchaseStatus.DUPLICATE, r.token, message_id=seen.message_id), Prededuct.DUPLICATE)
                )
            elif part in self.closed:
                out.append((PurchaseResult(PurchaseStatus.SOLD_OUT, r.token, self.stock[part]), Prededuct.CLOSED))
            elif part in self.sealed:
                out.append((PurchaseResult(PurchaseStatus.SOLD_OUT, r.token, 0), Prededuct.SEALED))
            elif self.stock[part] < r.qty:
                out.append((PurchaseResult(PurchaseStatus.SOLD_OUT, r.token, self.stock[part]), Prededuct.SOLD_OUT))
            else:
                self.stock[part] -= r.qty
                self.logs[part][r.token] = LogEntry(r.token, "deducted", r.sku, r.user_id, r.qty, 0, gid, part=part)
                out.append(
                    (PurchaseResult(PurchaseStatus.ACCEPTED, r.token, self.stock[part], gid), Prededuct.ACCEPTED)
                )
        return out
