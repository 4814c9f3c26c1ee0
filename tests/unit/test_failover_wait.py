"""A write followed by a WAIT that Redis refuses: cut short by a failover (UNBLOCKED) once the master it ran
on turns replica, or sent to a master that turned replica in between. The write before it may or may not
survive, as when a server does not answer: the adapters say `unavailable` (the write may have run), never
`failed` (which says it wrote nothing), and read the cluster's map again. Only an error of the write itself
says it wrote nothing. No server: the clients' connections are stand-ins that answer as Redis did."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis.exceptions import BusyLoadingError, MasterDownError

from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.errors import ServiceUnavailable, StockError

#: What Redis answered a WAIT in a clean-clone run, mid-failover.
UNBLOCKED = "UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)"
#: What Redis answers a WAIT sent to a replica (a master demoted between the write and its WAIT).
ON_REPLICA = "ERR WAIT cannot be used with replica instances. Please also note that writes to replicas are just local"
#: A write refused inside a script, which then writes nothing (min-replicas-to-write not met).
NOREPLICAS = "NOREPLICAS Not enough good replicas to write."


class _Pipeline:
    """The checker's pipeline of a fence and its WAIT, each answered as Redis did (an error or a reply)."""

    def __init__(self, fence: Any, wait: Any) -> None:
        self.replies = [fence, wait]

    def execute_command(self, *args: Any) -> None:
        pass

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert not raise_on_error, "each reply is looked at: the write's error and the WAIT's mean different things"
        return self.replies


def _checker_stock(fence: Any, wait: Any, monkeypatch: pytest.MonkeyPatch) -> RedisStock:
    stock = RedisStock("redis://127.0.0.1:1/0", wait_ms=500)
    client = stock._client = redis.Redis(host="127.0.0.1", port=1)  # never connects: nothing is sent through it
    stock._scripts = {"fence": lambda **kwargs: None}
    monkeypatch.setattr(stock._replicas, "of", lambda client, key: 1)
    monkeypatch.setattr(client, "pipeline", lambda transaction: _Pipeline(fence, wait))
    return stock


@pytest.mark.parametrize("refusal", [UNBLOCKED, ON_REPLICA])
def test_the_checkers_fence_whose_wait_was_refused_is_unavailable(
    refusal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fence = ["young", "", ""]  # the message is young: no record, and t1 has no entry
    with pytest.raises(ServiceUnavailable, match="WAIT"):
        _checker_stock(fence, redis.ResponseError(refusal), monkeypatch).check("s", "m1", ["t1"], grace_ms=0)


def test_the_checkers_fence_that_failed_itself_is_the_scripts_error(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = redis.ResponseError("ERR user_script:1: bad argument")
    with pytest.raises(StockError, match="fence failed"):
        _checker_stock(failed, 1, monkeypatch).check("s", "m1", ["t1"], grace_ms=0)


class _Conn:
    """A connection that answers each EVALSHA and WAIT in turn from `answers` (an exception is raised)."""

    def __init__(self, answers: list[Any]) -> None:
        self.sent: list[str] = []
        self.answers = answers

    async def send_command(self, *args: Any) -> None:
        self.sent.append(str(args[0]))

    async def read_response(self) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def disconnect(self) -> None:
        pass


class _Pool:
    def __init__(self, answers: list[Any]) -> None:
        self.conn = _Conn(answers)

    async def get_connection(self) -> _Conn:
        return self.conn

    async def release(self, conn: _Conn) -> None:
        pass


class _Router:
    def __init__(self, answers: list[Any]) -> None:
        self.pool_ = _Pool(answers)
        self.stales = 0

    async def pool(self, key: str) -> _Pool:
        return self.pool_

    def replicas(self, key: str) -> int:
        return 1

    def stale(self) -> None:
        self.stales += 1


def _run(answers: list[Any]) -> tuple[_Router, pytest.ExceptionInfo[Exception]]:
    stock = AsyncRedisStock("redis://127.0.0.1:1/0", wait_ms=500)
    router = stock._router = _Router(answers)  # type: ignore[assignment]
    with pytest.raises(Exception) as raised:
        asyncio.run(stock.script("prededuct", ["k"], ["a"]))
    return router, raised


#: How a WAIT on a master turned replica is refused: cut short, on a replica, its data loading (a full
#: resync from its new master), its new master out of reach (replica-serve-stale-data no).
WAIT_REFUSALS = [
    redis.ResponseError(UNBLOCKED),
    redis.ResponseError(ON_REPLICA),
    BusyLoadingError("LOADING Redis is loading the dataset in memory"),
    MasterDownError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
]


@pytest.mark.parametrize("refusal", WAIT_REFUSALS, ids=lambda e: str(e).split()[0])
def test_a_producers_script_whose_wait_was_refused_is_unavailable_and_was_asked_again(refusal: Exception) -> None:
    router, raised = _run([[1], refusal, [1], refusal])
    assert isinstance(raised.value, ServiceUnavailable) and raised.value.reached  # the script may have run
    # Its outcome unknown, it was run once more (each script is idempotent), and the map read again each time.
    assert router.pool_.conn.sent == ["EVALSHA", "WAIT", "EVALSHA", "WAIT"] and router.stales == 2


def test_a_script_asked_again_whose_second_run_was_refused_keeps_the_first_runs_unknown_outcome() -> None:
    """The first run may have deducted (its WAIT went unanswered); the run asked again writes a counter,
    which Redis refuses: that refusal says nothing of the first run, which the buyer must not hear as
    `nothing was deducted`."""
    router, raised = _run([[1], redis.TimeoutError("no answer"), redis.ResponseError(NOREPLICAS)])
    assert isinstance(raised.value, ServiceUnavailable) and raised.value.reached
    assert router.pool_.conn.sent == ["EVALSHA", "WAIT", "EVALSHA"]


def test_a_script_that_failed_itself_on_its_first_run_wrote_nothing() -> None:
    router, raised = _run([redis.ResponseError(NOREPLICAS)])
    assert isinstance(raised.value, StockError) and not isinstance(raised.value, ServiceUnavailable)
    assert router.pool_.conn.sent == ["EVALSHA"]


def test_a_script_a_loading_server_refused_did_not_run() -> None:
    router, raised = _run([BusyLoadingError("LOADING Redis is loading the dataset in memory")])
    assert isinstance(raised.value, ServiceUnavailable) and not raised.value.reached
    assert router.pool_.conn.sent == ["EVALSHA"]
