"""A second stack beside the first: own home, own ports, started and stopped without touching the first."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashsale.net import port_open
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.conftest import clean_environment

pytestmark = pytest.mark.slow

#: Every port of the second stack, shifted away from the defaults.
PORTS = {
    "FLASHSALE_REDIS_PORT": "16379",
    "FLASHSALE_MYSQL_PORT": "13306",
    "FLASHSALE_NAMESRV_PORT": "19876",
    "FLASHSALE_BROKER_PORT": "20911",
    "FLASHSALE_PROXY_PORT": "18081",
    "FLASHSALE_PROXY_REMOTING_PORT": "18080",
}


@pytest.mark.usefixtures("stack")
def test_a_second_stack_runs_beside_the_first_and_stops_alone(stack_settings: StackSettings, tmp_path: Path) -> None:
    env = {k: v for k, v in clean_environment().items() if not k.endswith("_PORT")}
    second = StackSettings.from_env({**env, **PORTS, "FLASHSALE_HOME": str(tmp_path / "second")})
    first_before = {s.name: s.pid for s in Stack(stack_settings).status()}
    assert all(first_before.values())

    stack2 = Stack(second)
    try:
        states = stack2.up()
        assert all(s.healthy and s.started for s in states), [(s.name, s.note) for s in states]
        for state in states:
            assert state.pid not in first_before.values()
            assert state.address.endswith(f":{second.ports.__dict__[_port_field(state.name)]}")
        again = stack2.up()  # idempotent: the same processes
        assert [s.pid for s in again] == [s.pid for s in states] and not any(s.started for s in again)
    finally:
        stopped = stack2.down()
    assert not any(s.running for s in stopped)
    assert not any(port_open("127.0.0.1", int(port)) for port in PORTS.values())
    first_after = Stack(stack_settings).status()
    assert {s.name: s.pid for s in first_after} == first_before and all(s.healthy for s in first_after)


def _port_field(service: str) -> str:
    return {"redis": "redis", "mariadb": "mysql", "namesrv": "namesrv", "broker": "proxy_grpc"}[service]
