"""What the three processes need from the outside world, as Protocols.

The pipeline modules depend on these only; the adapters in flashsale.adapters implement them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from flashsale.models import Delivery
from flashsale.records import ApplyReport, DeadLetter, Incoming, LogEntry, PredeductResult


class HalfMessagePort(Protocol):
    message_id: str

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class TxBusPort(Protocol):
    """The producer's broker, used from its event loop."""

    async def send_half_async(self, topic: str, key: str, body: bytes, tag: str) -> HalfMessagePort: ...


class PurchaseStockPort(Protocol):
    """The producer's Redis, used from its event loop."""

    async def prededuct(self, sku: str, token: str, user: str, qty: int, message_id: str) -> PredeductResult: ...

    async def is_sold_out(self, sku: str) -> bool: ...


class CheckStockPort(Protocol):
    """The checker's Redis (called on the client's check thread)."""

    def log_entry(self, sku: str, token: str) -> LogEntry | None: ...

    def fence(self, sku: str, token: str, user: str, qty: int) -> LogEntry: ...


class ReceiverPort(Protocol):
    def receive(self, max_messages: int) -> list[Delivery]: ...

    def ack(self, deliveries: Sequence[Delivery]) -> int: ...

    def nack(self, deliveries: Sequence[Delivery], delay_s: int) -> None:
        """Best effort, never raises: an un-nacked message still comes back when its invisible time ends."""
        ...


class StorePort(Protocol):
    def apply_batch(self, items: Sequence[Incoming], dead: Sequence[DeadLetter] = ()) -> ApplyReport: ...

    def ping(self) -> None: ...
