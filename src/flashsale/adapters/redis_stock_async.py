"""The producer's hot path in Redis, on an asyncio loop: peek, pre-deduct, sold-out flag, stock view.

Same keys, scripts and replies as RedisStock (see redis_stock.py); only the I/O model differs, and one
thing is added: a pre-deduct that fails says whether it may have run. The connection is taken from the
pool before the script is sent, so "refused" and "no free connection" are told apart from a timeout
after sending: only the latter leaves the outcome unknown. Because the script is idempotent per message
id, a failure after sending is tried once more on a fresh connection, which turns most unknowns into
an answer, and so is a cluster node's "not my slot" (MOVED), which says the script did not run there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis
from redis.exceptions import BusyLoadingError, NoScriptError

from flashsale import constants as c
from flashsale import lua
from flashsale.adapters.redis_stock import (
    SkuKeys,
    parse_prededuct,
    parse_view,
    prededuct_call,
    unavailable,
)
from flashsale.adapters.redis_topology import MISROUTED, UNREACHABLE, AsyncRouter
from flashsale.errors import StockError
from flashsale.models import Purchase
from flashsale.records import LogEntry, Peek, PredeductResult, StockView


class _Failed(Exception):
    """The pre-deduct failed to reach Redis; `reached` says whether the script may have run, `again`
    whether asking once more may well succeed (a misrouted call, or one whose outcome is unknown)."""

    def __init__(self, cause: Exception, *, reached: bool, again: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.reached = reached
        self.again = again or reached


class AsyncRedisStock:
    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 64, wait_ms: int = 0) -> None:
        self.url = url
        #: With replicas, a pre-deduct counts once one of them holds it (WAIT), within this many ms.
        self._wait_ms = wait_ms
        # Blocking pools: a burst waits for a free connection instead of failing with "too many".
        self._router = AsyncRouter(url, timeout_s=timeout_s, max_connections=max_connections)
        self._source = lua.source("prededuct")
        self._sha = lua.sha1("prededuct")

    async def close(self) -> None:
        await self._router.close()

    async def prededuct(self, sku: str, gid: str, purchases: Sequence[Purchase]) -> list[PredeductResult]:
        keys, args = prededuct_call(sku, gid, purchases)
        try:
            reply = await self._prededuct(keys, args)
        except _Failed as first:
            if not first.again:
                raise unavailable(self.url, "prededuct (not sent)", first.cause, reached=False) from first.cause
            try:  # the script may have run: ask again; a run that happened answers the same, deducting nothing
                reply = await self._prededuct(keys, args)
            except _Failed as second:
                reached = first.reached or second.reached
                what = "prededuct" if reached else "prededuct (not run)"
                raise unavailable(self.url, what, first.cause, reached=reached) from second.cause
        return parse_prededuct(purchases, reply)

    async def _prededuct(self, keys: list[str], args: list[str]) -> list[Any]:
        reply, acked, wanted = await self._send(keys, args)
        if acked < wanted:
            # The master has it, no replica yet: a failover now would lose it. The checker commits it
            # once a replica holds it, or rolls it back if the master that ran it is gone.
            raise _Failed(redis.TimeoutError(f"no replica acknowledged within {self._wait_ms} ms"), reached=True)
        return reply

    async def _send(self, keys: list[str], args: list[str]) -> tuple[list[Any], int, int]:
        """The script's reply, and how many replicas acknowledged it of how many were asked for."""
        try:
            pool = await self._router.pool(keys[0])
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except UNREACHABLE as exc:
            self._router.stale()
            raise _Failed(exc, reached=False) from exc
        try:
            try:
                reply = await self._evalsha(conn, keys, args)
            except NoScriptError:  # a restarted or flushed server: load the script, then run it
                await conn.send_command("SCRIPT", "LOAD", self._source)
                await conn.read_response()
                reply = await self._evalsha(conn, keys, args)
            wanted = self._router.replicas(keys[0]) if self._wait_ms else 0
            acked = 0
            if wanted:  # on the script's own connection: WAIT counts the replicas that have its writes
                await conn.send_command("WAIT", wanted, self._wait_ms)
                acked = int(await conn.read_response())
        except BusyLoadingError as exc:  # a restarted server still reading its data refuses every command
            raise _Failed(exc, reached=False) from exc
        except MISROUTED as exc:  # this node does not serve the slot (now): the script did not run
            self._router.stale()
            raise _Failed(exc, reached=False, again=True) from exc
        except UNREACHABLE as exc:
            await conn.disconnect()
            self._router.stale()
            raise _Failed(exc, reached=True) from exc
        except redis.ResponseError as exc:
            raise StockError(f"Redis script prededuct failed: {exc}") from exc
        finally:
            await pool.release(conn)
        return reply, acked, wanted

    async def _evalsha(self, conn: Any, keys: list[str], args: list[str]) -> list[Any]:
        await conn.send_command("EVALSHA", self._sha, len(keys), *keys, *args)
        reply: list[Any] = await conn.read_response()
        return reply

    async def peek(self, sku: str, purchases: Sequence[Purchase]) -> Peek:
        """Stock, limit, and the purchases' log entries and buyers' counts, in one round trip (a hint: the
        pre-deduct decides)."""
        keys = SkuKeys.of(sku)
        tokens = [p.token for p in purchases]
        users = list(dict.fromkeys(p.user_id for p in purchases))
        async with self._reading("peek"):
            async with (await self._router.client(keys.stock)).pipeline(transaction=False) as pipe:
                pipe.get(keys.stock)
                pipe.hget(keys.meta, "per_user_limit")
                pipe.hmget(keys.log, tokens)
                pipe.hmget(keys.users, users)
                stock, limit, entries, bought = await pipe.execute()
        return Peek(
            stock=int(stock) if stock is not None else None,
            per_user_limit=int(limit or 0),
            entries={t: LogEntry.parse(t, raw) if raw else None for t, raw in zip(tokens, entries, strict=True)},
            bought={u: int(n or 0) for u, n in zip(users, bought, strict=True)},
        )

    async def is_sold_out(self, sku: str) -> bool:
        meta = SkuKeys.of(sku).meta
        async with self._reading("read sold-out flag"):
            flag = await (await self._router.client(meta)).hget(meta, "sold_out")
        return bool(flag == "1")

    async def view(self, sku: str) -> StockView:
        keys = SkuKeys.of(sku)
        async with self._reading("read stock"):
            async with (await self._router.client(keys.stock)).pipeline(transaction=True) as pipe:
                pipe.get(keys.stock)
                pipe.hgetall(keys.meta)
                pipe.hlen(keys.log)
                stock, meta, entries = await pipe.execute()
        return parse_view(sku, stock, meta, entries)

    async def ping(self) -> None:
        async with self._reading("ping"):
            await (await self._router.client(c.SKUS_KEY)).ping()

    @asynccontextmanager
    async def _reading(self, what: str) -> AsyncIterator[None]:
        """A read that fails unanswered or misrouted: the map is read again next time, the caller hears why."""
        try:
            yield
        except (*UNREACHABLE, *MISROUTED) as exc:
            self._router.stale()
            raise unavailable(self.url, what, exc) from exc
