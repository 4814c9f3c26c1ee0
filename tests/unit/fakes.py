"""Test doubles of the ports (flashsale.ports): they record calls and answer what a test sets.

The producer's ports are coroutines (it runs on an event loop); the checker's are plain calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flashsale.errors import BusError
from flashsale.records import LogEntry, Prededuct, PredeductResult


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

    async def send_half_async(self, topic: str, key: str, body: bytes, tag: str) -> FakeHalf:
        self.calls.append(f"send_half {key}")
        if self.fail_send:
            raise BusError("broker down")
        self.sent.append((topic, key, body, tag))
        return FakeHalf(f"msg-{len(self.sent)}", self.calls, self.fail_commit)


@dataclass
class FakeStock:
    """Answers `result` to every pre-deduct (or raises `error`); log and fence answers are set per test."""

    result: PredeductResult = field(default_factory=lambda: PredeductResult(Prededuct.ACCEPTED, 9))
    error: Exception | None = None
    sold_out: bool = False
    entry: LogEntry | None = None
    fence_state: str = "fenced"
    on_ping: Callable[[], None] = lambda: None
    calls: list[str] = field(default_factory=list)

    async def prededuct(self, sku: str, token: str, user: str, qty: int, message_id: str) -> PredeductResult:
        self.calls.append(f"prededuct {sku} {token} {message_id}")
        if self.error:
            raise self.error
        return self.result

    async def is_sold_out(self, sku: str) -> bool:
        self.calls.append(f"is_sold_out {sku}")
        if self.error:
            raise self.error
        return self.sold_out

    def log_entry(self, sku: str, token: str) -> LogEntry | None:
        self.calls.append(f"log_entry {sku} {token}")
        if self.error:
            raise self.error
        return self.entry

    def fence(self, sku: str, token: str, user: str, qty: int) -> LogEntry:
        self.calls.append(f"fence {sku} {token}")
        return LogEntry(token, self.fence_state, sku, user, qty, ts_ms=0)

    async def ping(self) -> None:
        self.calls.append("ping")
        self.on_ping()
