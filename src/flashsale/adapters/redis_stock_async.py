"""The producer's hot path in Redis, on an asyncio loop: pre-deduct, sold-out flag, stock view, ping.

Same keys, scripts and replies as RedisStock (see redis_stock.py); only the I/O model differs.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aredis

from flashsale import lua
from flashsale.adapters.redis_stock import (
    UNREACHABLE,
    SkuKeys,
    parse_prededuct,
    parse_view,
    prededuct_call,
    unavailable,
)
from flashsale.errors import StockError
from flashsale.records import PredeductResult, StockView


class AsyncRedisStock:
    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> None:
        self.url = url
        # A blocking pool: a burst waits for a free connection instead of failing with "too many".
        pool = aredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        )
        self.client = aredis.Redis(connection_pool=pool)
        self._prededuct = self.client.register_script(lua.source("prededuct"))

    async def close(self) -> None:
        await self.client.aclose()

    async def prededuct(self, sku: str, token: str, user: str, qty: int, message_id: str) -> PredeductResult:
        keys, args = prededuct_call(sku, token, user, qty, message_id)
        try:
            reply: list[Any] = await self._prededuct(keys=keys, args=args)
        except UNREACHABLE as exc:
            raise unavailable(self.url, "prededuct", exc) from exc
        except redis.ResponseError as exc:
            raise StockError(f"Redis script prededuct failed: {exc}") from exc
        return parse_prededuct(token, reply)

    async def is_sold_out(self, sku: str) -> bool:
        try:
            flag = await self.client.hget(SkuKeys.of(sku).meta, "sold_out")
        except UNREACHABLE as exc:
            raise unavailable(self.url, "read sold-out flag", exc) from exc
        return bool(flag == "1")

    async def view(self, sku: str) -> StockView:
        keys = SkuKeys.of(sku)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(keys.stock)
                pipe.hgetall(keys.meta)
                pipe.hlen(keys.log)
                stock, meta, entries = await pipe.execute()
        except UNREACHABLE as exc:
            raise unavailable(self.url, "read stock", exc) from exc
        return parse_view(sku, stock, meta, entries)

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except UNREACHABLE as exc:
            raise unavailable(self.url, "ping", exc) from exc
