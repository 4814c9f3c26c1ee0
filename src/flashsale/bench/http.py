"""A lean HTTP/1.1 client for the bench's buyers: one keep-alive connection per buyer, one request at a time.

The buyers share the machine's cores with the server they measure, so what their client spends per
request is taken from the server: aiohttp spent about 125 µs of CPU per request here, five times what a
bare server spends answering one, and the bench measured its own buyers. This client writes a request
as one buffer and reads the answer's status line, length and body, nothing else: what the producer's
server speaks (a Content-Length or chunked body, keep-alive, `Connection: close`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from urllib.parse import urlsplit


class TransportError(Exception):
    """No complete answer: the connection was refused, reset or closed, or the answer did not come in time."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.close_after = False  # the server said `Connection: close`
        self.deadline = 0.0  # loop time by which the answer must have come
        self.timeout_s = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            try:
                answer = self._answer()
            except (ValueError, TransportError) as exc:  # garbled: this connection cannot be trusted again
                self.closed = True
                self.waiter.set_exception(TransportError(f"unreadable answer: {exc}"))
                return
            if answer is not None:
                self.waiter.set_result(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(TransportError(f"connection closed before the answer ({exc or 'by the server'})"))

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
    """One keep-alive connection to `base_url`, opened on the first request and again after a failure."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> tuple[int, bytes]:
        """The answer's status and body; raises TransportError when there is no complete answer."""
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        if protocol is None or protocol.closed or protocol.close_after:
            protocol = await self._connect(loop)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() if headers else b""
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n".encode()
        waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        protocol.waiter = waiter
        assert protocol.transport is not None
        protocol.transport.write(b"".join((head, self._host_header, extra, b"\r\n", body)))
        protocol.deadline, protocol.timeout_s = loop.time() + self._timeout_s, self._timeout_s
        _watch(loop, protocol)
        try:
            return await waiter
        except BaseException:
            self.close()
            raise
        finally:
            protocol.waiter = None

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        self.close()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(_Protocol, self.host, self.port), self._timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


#: Requests under way by loop, checked against their deadlines once a second: one timer per loop rather
#: than one per request (a timer set and cancelled costs as much as the rest of the request's Python).
_WATCHED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakSet[_Protocol]] = weakref.WeakKeyDictionary()
WATCH_EVERY_S = 1.0


def _watch(loop: asyncio.AbstractEventLoop, protocol: _Protocol) -> None:
    watched = _WATCHED.get(loop)
    if watched is None:
        watched = _WATCHED[loop] = weakref.WeakSet()
        loop.call_later(WATCH_EVERY_S, _time_out, loop, watched)
    watched.add(protocol)


def _time_out(loop: asyncio.AbstractEventLoop, watched: weakref.WeakSet[_Protocol]) -> None:
    now = loop.time()
    for protocol in list(watched):
        waiter = protocol.waiter
        if waiter is None or waiter.done():
            watched.discard(protocol)
        elif now >= protocol.deadline:
            waiter.set_exception(TransportError(f"no answer within {protocol.timeout_s:g} s"))
    if watched:
        loop.call_later(WATCH_EVERY_S, _time_out, loop, watched)
    else:
        del _WATCHED[loop]
