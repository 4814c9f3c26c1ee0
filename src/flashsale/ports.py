"""What the three processes need from the outside world, as Protocols.

The pipeline modules depend on these only; the adapters in flashsale.adapters implement them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from flashsale.models import Buyer, Deadline, Delivery, Purchase
from flashsale.records import (
    Addition,
    ApplyReport,
    CheckView,
    Conflict,
    DeadLetter,
    Decision,
    Incoming,
    Layout,
    LogEntry,
    LookedUp,
    Peek,
    PredeductResult,
    Registry,
    RestockResult,
    Seal,
    Transfer,
)


class HalfMessagePort(Protocol):
    message_id: str

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class TxBusPort(Protocol):
    """The producer's broker, used from its event loop."""

    def new_message_id(self) -> str: ...

    async def send_half_async(
        self, topic: str, key: str, body: bytes, tag: str, message_id: str | None = None
    ) -> HalfMessagePort: ...


class PurchaseStockPort(Protocol):
    """The producer's Redis, used from its event loop."""

    async def prededuct(
        self, sku: str, gid: str, purchases: Sequence[Purchase], epoch: int = 0
    ) -> list[PredeductResult]:
        """Raises ServiceUnavailable with `reached` False when the script certainly did not run. A
        partition's purchases carry the `epoch` of the layout that placed them."""
        ...

    async def peek(self, sku: str, purchases: Sequence[Buyer]) -> Peek: ...

    async def confirm(self, found: Mapping[str, Mapping[str, LogEntry]]) -> dict[str, dict[str, LogEntry | None]]:
        """Per SKU or partition, the log entries of the tokens `found` holds, as a replica holds them: where
        the shard has replicas, read with a write and a WAIT (raises ServiceUnavailable when none
        acknowledged in time); elsewhere `found` itself, with no call."""
        ...

    async def is_sold_out(self, sku: str) -> bool: ...

    async def seal(self, sku: str, trust_ms: int, known_since: str) -> Seal | None:
        """Seal a sold-out SKU for `trust_ms` and a margin (seal.lua): None when it cannot be. Counts once a
        replica holds it (raises ServiceUnavailable when none acknowledged in time)."""
        ...


class OrderStockPort(Protocol):
    """The producer's Redis for decisions on orders (see pipeline/orders.py)."""

    async def layout(self, sku: str) -> Layout | None: ...

    async def entries(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, LogEntry | None]]:
        """Per partition (or SKU), the log entries of some tokens, each naming the partition it was read in."""
        ...

    async def decide(
        self, shard: str, token: str, action: str, *, decision_id: str, message_id: str, user: str = ""
    ) -> tuple[Decision, LogEntry | None]:
        """On the keys of `shard`, the token's partition (or its SKU). Raises ServiceUnavailable with
        `reached` False when the script certainly did not run."""
        ...


class RestockPort(Protocol):
    """The producer's Redis for restocks (see pipeline/restock.py)."""

    async def add_stock(self, sku: str, qty: int, *, request_id: str, message_id: str) -> RestockResult:
        """Raises ServiceUnavailable with `reached` False when the script certainly did not run."""
        ...


class DeadlinePort(Protocol):
    """Where the consumer schedules payment deadlines: timer messages, each due when its orders are."""

    def schedule(self, deadlines: Sequence[Deadline]) -> None:
        """Raises BusError or ServiceUnavailable when the broker did not take them all (the batch is then
        not acked)."""
        ...


class PartitionStockPort(Protocol):
    """The producer's Redis for partitioned SKUs (see pipeline/partitions.py); every call is idempotent.

    Each step that moves stock names the layout it was placed by, and raises StaleLayout, writing nothing,
    when the SKU's load (or the partition) is another one now."""

    async def layout(self, sku: str) -> Layout | None: ...

    async def registry(self, layout: Layout) -> Registry: ...

    async def entries(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, LogEntry | None]]: ...

    async def confirm(self, found: Mapping[str, Mapping[str, LogEntry]]) -> dict[str, dict[str, LogEntry | None]]: ...

    async def close_partition(self, layout: Layout, part: str) -> bool: ...

    async def hold(
        self, layout: Layout, purchases: Sequence[Purchase], attempts: Sequence[str]
    ) -> list[int | None]: ...

    async def release(self, layout: Layout, purchases: Sequence[Purchase], attempts: Sequence[str]) -> int: ...

    async def take(self, layout: Layout, transfer_id: str, part: str, want: int) -> int: ...

    async def give(self, layout: Layout, part: str, transfer_id: str, qty: int) -> None: ...

    async def end_refill(self, layout: Layout, transfer_id: str) -> None: ...

    async def expect(self, layout: Layout, transfer_id: str, part: str, want: int) -> None: ...

    async def drain(self, layout: Layout, part: str, transfer_id: str, want: int) -> int: ...

    async def receive(self, layout: Layout, transfer_id: str, qty: int) -> None: ...

    async def due(self, layout: Layout, age_ms: int) -> list[Transfer]:
        """The transfers under way older than `age_ms` on Redis's clock (their refiller died, or is slow)."""
        ...


class CheckStockPort(Protocol):
    """The checker's Redis (called on the client's check thread)."""

    def check(self, sku: str, gid: str, tokens: Sequence[str], *, grace_ms: int) -> CheckView: ...


class LogPort(Protocol):
    """The consumer's Redis: what the pre-deducts really accepted."""

    def lookup(self, wanted: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, LookedUp]: ...

    def ping(self) -> None: ...


class ReceiverPort(Protocol):
    def receive(self, max_messages: int) -> list[Delivery]: ...

    def ack(self, deliveries: Sequence[Delivery]) -> int: ...

    def nack(self, deliveries: Sequence[Delivery], delay_s: int) -> None:
        """Best effort, never raises: an un-nacked message still comes back when its invisible time ends."""
        ...

    def pause(self) -> None:
        """Stop receiving and hand back whatever was received and not yet taken by `receive`."""
        ...

    def resume(self) -> None: ...

    def wake(self) -> None:
        """A `receive` waiting for its first messages returns at once (with what is there, maybe none):
        a process asked to stop does not wait out the poll wait."""
        ...


class StorePort(Protocol):
    def apply_batch(
        self,
        items: Sequence[Incoming],
        dead: Sequence[DeadLetter] = (),
        conflicts: Sequence[Conflict] = (),
        additions: Sequence[Addition] = (),
        loads: Mapping[str, int] | None = None,
    ) -> ApplyReport: ...

    def ping(self) -> None:
        """Raises unless the database answers and takes a write."""
        ...
