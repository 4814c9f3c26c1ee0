"""A lean HTTP/1.1 client for the bench's buyers: one keep-alive connection per buyer, one request at a time.

The buyers share the machine's cores with the server they measure, so what their client spends per
request is taken from the server: aiohttp spent about 125 µs of CPU per request here, five times what a
bare server spends answering one, and the bench measured its own buyers. This client writes a request
as one buffer and reads the answer's status line, length and body, nothing else: what the producer's
server speaks (a Content-Length or chunked body, keep-alive, `Connection: close`).

Two ways to ask: `await request(...)`, or `send(..., answered)`, whose callback gets the answer from the
loop's own read of the socket. A buyer that sends its next attempt from that callback costs no task, no
future and no wake-up per request: about half the CPU of awaiting each answer (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Mapping
from functools import partial
from urllib.parse import urlsplit


class TransportError(Exception):
    """No complete answer: the connection was refused, reset or closed, or the answer did not come in time."""


#: What a sent request's callback gets: the answer's status and body, or why there is none.
Outcome = tuple[int, bytes] | TransportError
Answered = Callable[[Outcome], None]


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answered: Answered | None = None  # the request under way's callback
        self.closed = False
        self.close_after = False  # the server said `Connection: close`
        self.deadline = 0.0  # loop time by which the answer must have come
        self.timeout_s = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _watch(asyncio.get_running_loop(), self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answered is None:
            return
        try:
            answer = self._answer()
        except (ValueError, TransportError) as exc:  # garbled: this connection cannot be trusted again
            self.fail(TransportError(f"unreadable answer: {exc}"))
            return
        if answer is not None:
            self._deliver(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answered is not None:
            self._deliver(TransportError(f"connection closed before the answer ({exc or 'by the server'})"))

    def fail(self, error: TransportError) -> None:
        """Close the connection and give the request under way `error`."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self.answered is not None:
            self._deliver(error)

    def _deliver(self, outcome: Outcome) -> None:
        answered, self.answered = self.answered, None
        assert answered is not None
        answered(outcome)

    def _answer(self) -> tuple[int, bytes] | None:
        """The status and body of the answer in the buffer, taken out of it (None until it is whole)."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        if not buffer.startswith(b"HTTP/1."):
            raise TransportError(f"not an HTTP answer: {bytes(buffer[:40])!r}")
        status = int(buffer[9:12])
        start = end + 4
        # Header names come in lower case from the servers measured here; any case is read, at a copy's cost.
        head = buffer if buffer.find(b"\r\ncontent-length:", 0, end) >= 0 else bytearray(buffer[: end + 2].lower())
        self.close_after = head.find(b"\r\nconnection: close", 0, end) >= 0
        at = head.find(b"\r\ncontent-length:", 0, end)
        if at >= 0:
            eol = head.find(b"\r\n", at + 2, end + 2)
            length = int(head[at + 17 : eol])
            if len(buffer) < start + length:
                return None
            body = bytes(buffer[start : start + length])
            del buffer[: start + length]
            return status, body
        if head.find(b"\r\ntransfer-encoding: chunked", 0, end) >= 0:
            return self._chunked(status, start)
        raise TransportError("an answer with neither Content-Length nor chunked body")

    def _chunked(self, status: int, start: int) -> tuple[int, bytes] | None:
        buffer, at, parts = self.buffer, start, list[bytes]()
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
            if len(buffer) < line_end + 2 + size + 2:
                return None
            if size == 0:
                del buffer[: line_end + 4]
                return status, b"".join(parts)
            parts.append(bytes(buffer[line_end + 2 : line_end + 2 + size]))
            at = line_end + 2 + size + 2


class Connection:
    """One keep-alive connection to `base_url`: `open` it (again after a failure), or let `request` do it."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None

    @property
    def is_open(self) -> bool:
        """Whether a request can be sent now: connected, and not told by the server to close."""
        protocol = self._protocol
        return (
            protocol is not None
            and not protocol.closed
            and not protocol.close_after
            and protocol.transport is not None
            and not protocol.transport.is_closing()
        )

    async def open(self) -> None:
        """A new connection (the old one closed); raises TransportError when the server cannot be reached."""
        self.close()
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(_Protocol, self.host, self.port), self._timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._protocol = protocol

    def head(self, method: str, path: str, headers: Mapping[str, str] | None = None) -> bytes:
        """A request's head up to its Content-Length's value: made once for requests sent many times."""
        lines = [f"{method} {self._prefix}{path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        return "\r\n".join([*lines, "Content-Length: "]).encode()

    def send(self, head: bytes, body: bytes, answered: Answered) -> None:
        """Send a request (`head` from `head()`) on this connection, open (see `is_open`) and with no request
        under way. `answered` is called from the loop with the answer, or with a TransportError once the
        connection failed, was closed, or the answer is late (the connection is closed then: open it again)."""
        protocol = self._protocol
        if protocol is None or not self.is_open:  # closed by the server between its opening and now, say
            _later(answered, TransportError("connection closed before the request was sent"))
            return
        assert protocol.answered is None and protocol.transport is not None, "one request at a time"
        try:
            protocol.transport.write(b"%b%d\r\n\r\n%b" % (head, len(body), body))
        except RuntimeError as exc:  # uvloop's, for a handle closed under it
            protocol.closed = True
            _later(answered, TransportError(f"connection closed before the request was sent ({exc})"))
            return
        protocol.answered = answered
        protocol.deadline, protocol.timeout_s = asyncio.get_running_loop().time() + self._timeout_s, self._timeout_s

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        """The answer's status and body; raises TransportError when there is no complete answer."""
        if not self.is_open:
            await self.open()
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.send(self.head(method, path, headers), body, partial(_settle, waiter))
        try:
            return await waiter
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection; a request under way hears a TransportError."""
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            return
        protocol.closed = True
        if protocol.answered is not None:
            answered, protocol.answered = protocol.answered, None
            _later(answered, TransportError("connection closed before the answer (by this client)"))
        if protocol.transport is not None:
            protocol.transport.close()


def _later(answered: Answered, error: TransportError) -> None:
    """`answered(error)` from the loop, as every answer comes: never within the call that sent the request."""
    asyncio.get_running_loop().call_soon(answered, error)


def _settle(waiter: asyncio.Future[tuple[int, bytes]], outcome: Outcome) -> None:
    if waiter.done():
        return
    if isinstance(outcome, TransportError):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)


#: Open connections by loop, checked against their deadlines once a second: one timer per loop rather
#: than one per request (a timer set and cancelled costs as much as the rest of the request's Python).
_WATCHED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[_Protocol]] = weakref.WeakKeyDictionary()
WATCH_EVERY_S = 1.0


def _watch(loop: asyncio.AbstractEventLoop, protocol: _Protocol) -> None:
    watched = _WATCHED.get(loop)
    if watched is None:
        watched = _WATCHED[loop] = set()
        loop.call_later(WATCH_EVERY_S, _time_out, loop, watched)
    watched.add(protocol)


def _time_out(loop: asyncio.AbstractEventLoop, watched: set[_Protocol]) -> None:
    now = loop.time()
    try:
        for protocol in list(watched):
            if protocol.answered is not None and now >= protocol.deadline:
                watched.discard(protocol)
                protocol.fail(TransportError(f"no answer within {protocol.timeout_s:g} s"))
            elif protocol.closed and protocol.answered is None:
                watched.discard(protocol)
    finally:  # a callback that raised must not end the watch of the others
        if watched:
            loop.call_later(WATCH_EVERY_S, _time_out, loop, watched)
        elif _WATCHED.get(loop) is watched:
            del _WATCHED[loop]
