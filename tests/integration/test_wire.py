"""The producer's pipelined Redis connection (adapters/redis/wire.py) against the real server: many
callers on one connection, error replies raised as redis-py raises them, and a connection that failed
(unanswered, dropped) failing every call that waits on it and giving way to a new one."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
from redis.exceptions import NoScriptError

from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.adapters.redis.topology import UNREACHABLE, AsyncRouter
from flashsale.adapters.redis.wire import Wire
from flashsale.bench.fleet import free_port
from flashsale.config import Settings
from flashsale.models import Purchase
from tests.integration.test_adapter_contracts import _BUSY, until_busy

T = TypeVar("T")


def _run(settings: Settings, body: Callable[[Wire], Awaitable[T]], *, timeout_s: float = 1.0) -> T:
    async def go() -> T:
        wire = Wire.from_url(settings.redis_url, timeout_s=timeout_s)
        assert wire is not None
        try:
            return await body(wire)
        finally:
            wire.close()

    return asyncio.run(go())


def test_many_callers_on_one_connection_each_get_their_own_replies(settings: Settings) -> None:
    plain = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    prefix = uuid.uuid4().hex
    plain.mset({f"{prefix}:{i}": f"v{i}" for i in range(300)})

    async def body(wire: Wire) -> tuple[list[list[object]], set[int]]:
        calls = [wire.call(("GET", f"{prefix}:{i}"), ("STRLEN", f"{prefix}:{i}"), ("CLIENT", "ID")) for i in range(300)]
        replies = await asyncio.gather(*calls)
        return replies, {int(r[2]) for r in replies}

    replies, connections = _run(settings, body)
    assert [r[:2] for r in replies] == [[f"v{i}", len(f"v{i}")] for i in range(300)]
    assert len(connections) == 1  # one connection served them all
    plain.close()


def test_an_error_reply_raises_as_redis_py_raises_it_and_leaves_the_connection_in_step(settings: Settings) -> None:
    key = f"list-{uuid.uuid4().hex}"

    async def body(wire: Wire) -> tuple[Exception, Exception, list[object], int, int]:
        before = int((await wire.call(("CLIENT", "ID")))[0])
        await wire.call(("RPUSH", key, "x"))
        try:
            await wire.call(("GET", key), ("CLIENT", "ID"))
        except redis.ResponseError as exc:
            wrong = exc
        try:
            await wire.call(("EVALSHA", "0" * 40, 0))
        except NoScriptError as exc:
            missing = exc
        after = await wire.call(("LLEN", key), ("CLIENT", "ID"))
        return wrong, missing, after, before, int(after[1])

    wrong, missing, after, before, now = _run(settings, body)
    assert type(wrong) is redis.ResponseError and "WRONGTYPE" in str(wrong)
    assert isinstance(missing, NoScriptError)
    # The failed calls' other replies were read: the next call gets its own, on the same connection.
    assert after[0] == 1 and now == before


def test_a_call_redis_does_not_answer_in_time_fails_its_connection_and_the_next_call_reads_its_own_reply(
    settings: Settings,
) -> None:
    blocker = redis.Redis.from_url(settings.redis_url)
    key = f"late-{uuid.uuid4().hex}"
    blocker.set(key, "first")

    async def body(wire: Wire) -> tuple[list[BaseException | list[object]], list[object], int, int]:
        before = int((await wire.call(("CLIENT", "ID")))[0])
        busy = threading.Thread(target=lambda: blocker.eval(_BUSY, 0, "1.0"))
        busy.start()
        await asyncio.to_thread(until_busy, settings.redis_url)  # both calls queue behind the script now
        failed = await asyncio.gather(wire.call(("GET", key)), wire.call(("CLIENT", "ID")), return_exceptions=True)
        await asyncio.to_thread(busy.join)
        blocker.set(key, "second")
        # The two calls' replies come late, on the connection that failed: the next call opens another.
        after = await wire.call(("GET", key), ("CLIENT", "ID"))
        return failed, after, before, int(after[1])

    failed, after, before, now = _run(settings, body, timeout_s=0.3)
    assert all(isinstance(f, redis.TimeoutError) for f in failed), failed
    assert all(isinstance(f, UNREACHABLE) for f in failed if isinstance(f, Exception))
    assert after[0] == "second" and now != before
    blocker.close()


def test_a_connection_the_server_drops_fails_its_calls_and_the_next_call_opens_another(settings: Settings) -> None:
    admin = redis.Redis.from_url(settings.redis_url)

    async def body(wire: Wire) -> tuple[BaseException, int, int]:
        first = int((await wire.call(("CLIENT", "ID")))[0])
        pending = asyncio.ensure_future(wire.call(("BLPOP", f"never-{uuid.uuid4().hex}", 0)))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(admin.client_kill_filter, _id=first)
        try:
            await pending
        except redis.ConnectionError as exc:
            lost = exc
        return lost, first, int((await wire.call(("CLIENT", "ID")))[0])

    lost, first, second = _run(settings, body, timeout_s=5.0)
    assert isinstance(lost, UNREACHABLE) and second != first
    admin.close()


def test_a_server_that_is_not_there_is_unreachable() -> None:
    async def body() -> BaseException:
        wire = Wire("127.0.0.1", free_port(), timeout_s=0.5)
        try:
            await wire.call(("PING",))
        except redis.ConnectionError as exc:
            return exc
        raise AssertionError("an answer from nowhere")

    assert isinstance(asyncio.run(body()), UNREACHABLE)


def test_the_urls_database_and_credentials_are_the_connections(settings: Settings) -> None:
    admin = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    user, secret, key = f"wire-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, f"db-{uuid.uuid4().hex}"
    admin.acl_setuser(user, enabled=True, passwords=[f"+{secret}"], keys=["*"], commands=["+@all"])
    admin.set(key, "here")
    base = settings.redis_url.split("://", 1)[1]
    try:

        async def body() -> tuple[list[object], BaseException]:
            wire = Wire.from_url(f"redis://{user}:{secret}@{base}", timeout_s=1.0)
            wrong = Wire.from_url(f"redis://{user}:not-{secret}@{base}", timeout_s=1.0)
            assert wire is not None and wrong is not None
            found = await wire.call(("GET", key), ("ACL", "WHOAMI"))
            try:
                await wrong.call(("PING",))
            except redis.ConnectionError as exc:
                refused = exc
            wire.close()
            return found, refused

        found, refused = asyncio.run(body())
    finally:
        admin.acl_deluser(user)
        admin.close()
    # Read in the URL's database (the test database, not 0), as the URL's user.
    assert found == ["here", user]
    assert "refused the connection" in str(refused)
    assert Wire.from_url("rediss://127.0.0.1:6380/0", timeout_s=1.0) is None


def test_a_peek_over_the_wire_reads_what_redis_pys_pipeline_reads(
    settings: Settings, redis_stock: RedisStock, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_stock.load(sku, 5, per_user_limit=2)
    redis_stock.prededuct(sku, "m1", [Purchase("t1", "u1", 2)])
    buyers = [Purchase("t1", "u1", 1), Purchase("t2", "u2", 1), Purchase("t3", "u1", 1)]

    async def peek() -> object:
        stock = AsyncRedisStock(settings.redis_url)
        try:
            return await stock.peek(sku, buyers)
        finally:
            await stock.close()

    over_the_wire = asyncio.run(peek())

    async def no_wire(self: AsyncRouter, key: str) -> None:
        return None

    monkeypatch.setattr(AsyncRouter, "wire", no_wire)
    assert asyncio.run(peek()) == over_the_wire
    assert over_the_wire.stock == 3 and over_the_wire.bought == {"u1": 2, "u2": 0}  # type: ignore[attr-defined]
    assert over_the_wire.entries["t1"] is not None and over_the_wire.entries["t2"] is None  # type: ignore[attr-defined]
