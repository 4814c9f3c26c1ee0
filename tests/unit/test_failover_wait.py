"""A WAIT that a failover cuts short: Redis answers it with an error (UNBLOCKED) once the master it ran on
turns replica. The write before it may or may not survive, as when a server does not answer: the adapters
say `unavailable`, never crash, and read the cluster's map again. No server: the clients' connections are
stand-ins that answer as Redis did."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.errors import ServiceUnavailable, StockError

#: What redis-py raised in a clean-clone run, mid-failover, for a fence followed by its WAIT.
UNBLOCKED = (
    "Command # 2 (WAIT 1 500) of pipeline caused error: UNBLOCKED force unblock from blocking operation, "
    "instance state changed (master -> replica?)"
)


class _Pipeline:
    """The checker's pipeline of a fence and its WAIT, which Redis answers with `error`."""

    def __init__(self, error: str) -> None:
        self.error = error

    def execute_command(self, *args: Any) -> None:
        pass

    def execute(self) -> list[Any]:
        raise redis.ResponseError(self.error)


def _checker_stock(error: str, monkeypatch: pytest.MonkeyPatch) -> RedisStock:
    stock = RedisStock("redis://127.0.0.1:1/0", wait_ms=500)
    client = stock._client = redis.Redis(host="127.0.0.1", port=1)  # never connects: nothing is sent through it
    stock._scripts = {"fence": lambda **kwargs: None}
    monkeypatch.setattr(stock._replicas, "of", lambda client, key: 1)
    monkeypatch.setattr(client, "pipeline", lambda transaction: _Pipeline(error))
    return stock


def test_the_checkers_fence_whose_wait_a_failover_cut_short_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ServiceUnavailable, match="UNBLOCKED"):
        _checker_stock(UNBLOCKED, monkeypatch).check("s", "m1", ["t1"], grace_ms=0)
    # Any other error of the script is the script's own.
    with pytest.raises(StockError, match="fence failed"):
        _checker_stock("ERR user_script:1: bad argument", monkeypatch).check("s", "m1", ["t1"], grace_ms=0)


class _Conn:
    """A connection on which the script runs and its WAIT is cut short."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_command(self, *args: Any) -> None:
        self.sent.append(str(args[0]))

    async def read_response(self) -> Any:
        if self.sent[-1] == "WAIT":
            raise redis.ResponseError(UNBLOCKED.split(": ", 1)[1])
        return [1]

    async def disconnect(self) -> None:
        pass


class _Pool:
    def __init__(self) -> None:
        self.conn = _Conn()

    async def get_connection(self) -> _Conn:
        return self.conn

    async def release(self, conn: _Conn) -> None:
        pass


class _Router:
    def __init__(self) -> None:
        self.pool_ = _Pool()
        self.stales = 0

    async def pool(self, key: str) -> _Pool:
        return self.pool_

    def replicas(self, key: str) -> int:
        return 1

    def stale(self) -> None:
        self.stales += 1


def test_a_producers_script_whose_wait_a_failover_cut_short_is_unavailable_and_was_asked_again() -> None:
    stock = AsyncRedisStock("redis://127.0.0.1:1/0", wait_ms=500)
    router = stock._router = _Router()  # type: ignore[assignment]
    with pytest.raises(ServiceUnavailable, match="UNBLOCKED") as raised:
        asyncio.run(stock.script("pool_take", ["k"], ["a"]))
    assert raised.value.reached  # the script may have run
    # Its outcome unknown, it was run once more (each script is idempotent), and the map read again each time.
    assert router.pool_.conn.sent == ["EVALSHA", "WAIT", "EVALSHA", "WAIT"] and router.stales == 2
