"""One pipelined connection to one Redis node, for the producer's reads that run once per group.

redis-py's asyncio client spends about 90 µs of Python on a round trip here (its pool's condition and
timeouts, a task per write, its hooks), hiredis parsing a reply from a bare stream about 9: a group of
a sold-out SKU, which is one read, cost ten times what answering its purchases did, and so had to be
large to be cheap. Over this connection a group costs little at any size, so it can close as soon as
the previous one is answered.

Many callers share the connection: each call writes its commands in one piece and waits for as many
replies, which Redis returns in order. A call that gets no reply in time fails, and so does the
connection (a late reply would answer the next call): every call waiting on it hears that Redis did
not answer, and the next call opens a new one. Errors are raised as redis-py raises them, so callers
classify failures one way whichever client served them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    TryAgainError,
)

#: Error replies redis-py raises as their own classes (by the reply's first word); any other is a ResponseError.
_ERRORS: dict[str, type[redis.RedisError]] = {
    "MOVED": MovedError,
    "ASK": AskError,
    "TRYAGAIN": TryAgainError,
    "CLUSTERDOWN": ClusterDownError,
    "LOADING": BusyLoadingError,
    "NOSCRIPT": NoScriptError,
    "READONLY": ReadOnlyError,
}


def error(reply: hiredis.ReplyError) -> redis.RedisError:
    """The exception redis-py raises for an error reply."""
    text = str(reply)
    code, _, rest = text.partition(" ")
    cls = _ERRORS.get(code)
    if cls is None:
        return redis.ResponseError(text)
    return cls(rest if cls in (MovedError, AskError) else text)


def _packed(commands: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join(hiredis.pack_command(c) for c in commands)


def _first_error(replies: list[Any]) -> redis.RedisError | None:
    return next((error(r) for r in replies if isinstance(r, hiredis.ReplyError)), None)


class _Call:
    __slots__ = ("done", "replies", "timer", "wanted")

    def __init__(self, done: asyncio.Future[list[Any]], wanted: int, timer: asyncio.TimerHandle) -> None:
        self.done = done
        self.wanted = wanted
        self.replies: list[Any] = []
        self.timer = timer


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout_s: float) -> None:
        self._reader = hiredis.Reader(encoding="utf-8", errors="strict")
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._calls: deque[_Call] = deque()  # in the order sent
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, packed: bytes, wanted: int) -> asyncio.Future[list[Any]]:
        if self.lost is not None or self._transport is None:
            raise redis.ConnectionError(f"connection to Redis lost: {self.lost}")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()
        self._transport.write(packed)
        self._calls.append(_Call(done, wanted, loop.call_later(self._timeout_s, self._expire, done)))
        return done

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(redis.ConnectionError(f"Redis sent what is not its protocol: {exc}"))
                return
            if reply is False:
                return
            if not self._calls:
                self.fail(redis.ConnectionError("Redis sent a reply no call asked for"))
                return
            call = self._calls[0]
            call.replies.append(reply)
            if len(call.replies) == call.wanted:
                self._calls.popleft()
                call.timer.cancel()
                if not call.done.done():
                    call.done.set_result(call.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(redis.ConnectionError(f"connection to Redis closed: {exc or 'by the server'}"))

    def _expire(self, done: asyncio.Future[list[Any]]) -> None:
        if not done.done():
            self.fail(redis.TimeoutError(f"Redis did not answer within {self._timeout_s} s"))

    def fail(self, exc: Exception) -> None:
        """Fail every call waiting, and the connection: no reply read on it from now on answers anything."""
        if self.lost is None:
            self.lost = exc
        if self._transport is not None:
            self._transport.abort()
        while self._calls:
            call = self._calls.popleft()
            call.timer.cancel()
            if not call.done.done():
                call.done.set_exception(exc)


class Wire:
    """A pipelined connection to one node, opened on first use and again after it failed."""

    def __init__(self, host: str, port: int, *, timeout_s: float, auth: tuple[str, ...] = (), db: int = 0) -> None:
        self.host = host
        self.port = port
        self._timeout_s = timeout_s
        self.auth = auth  # AUTH's arguments: (password) or (user, password)
        self._db = db
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Future[_Protocol] | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float) -> Wire | None:
        """A wire to the node `url` names; None for what it does not speak (TLS, a Unix socket)."""
        parts = urlsplit(url)
        if parts.scheme != "redis":
            return None
        auth: tuple[str, ...] = ()
        if parts.password:
            auth = (unquote(parts.username), unquote(parts.password)) if parts.username else (unquote(parts.password),)
        db = int(parts.path.strip("/") or 0)
        return cls(parts.hostname or "localhost", parts.port or 6379, timeout_s=timeout_s, auth=auth, db=db)

    def at(self, host: str, port: int) -> Wire:
        """A wire to another node of the same cluster: same credentials and timeout (database 0)."""
        return Wire(host, port, timeout_s=self._timeout_s, auth=self.auth)

    async def call(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The replies of `commands`, sent in one write; raises the first error reply among them, as
        redis-py's pipeline does, after every reply was read."""
        protocol = await self._open()
        replies = await protocol.send(_packed(commands), len(commands))
        if (refused := _first_error(replies)) is not None:
            raise refused
        return replies

    async def _open(self) -> _Protocol:
        if self._protocol is not None and self._protocol.lost is None:
            return self._protocol
        if self._opening is None:  # one connect at a time; the calls meanwhile wait for it
            self._opening = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._opening)
        finally:
            if self._opening is not None and self._opening.done():
                self._opening = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self._timeout_s), self.host, self.port), self._timeout_s
            )
        except (TimeoutError, OSError) as exc:
            raise redis.ConnectionError(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from exc
        hello: list[tuple[Any, ...]] = []
        if self.auth:
            hello.append(("AUTH", *self.auth))
        if self._db:
            hello.append(("SELECT", self._db))
        if hello and (refused := _first_error(await protocol.send(_packed(hello), len(hello)))) is not None:
            protocol.fail(refused)
            raise redis.ConnectionError(f"Redis at {self.host}:{self.port} refused the connection: {refused}")
        self._protocol = protocol
        return protocol

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(redis.ConnectionError("closed"))
            self._protocol = None
