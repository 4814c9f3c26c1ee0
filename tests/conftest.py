"""Fixtures on the real stack: `flashsale stack up` once per session, then a namespace of our own.

Integration and acceptance tests never skip: a server that cannot be started is a failure.
Each session gets its own topics and consumer group (a random namespace), the `flashsale_test`
database and Redis database 15, emptied before and after the session, so the user's data on the same
stack is never read or written; each test uses SKUs nobody else uses, so tests do not see each other's data.

The servers themselves are not the tests' alone, and the suite takes them over: fault tests kill and
restart Redis, MariaDB, the name server and the broker, set MariaDB's GLOBAL read_only and
max_connections, flush Redis's script cache, pause its writes and hold it with long scripts. A sale
running on the same stack meanwhile would go through all of that (README, "make test takes over the
stack it runs on"): run the suite on a stack of its own (FLASHSALE_HOME and the FLASHSALE_*_PORT
variables below) beside a live one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flashsale import constants as c
from flashsale.config import Settings
from flashsale.stack.settings import StackSettings

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE = "flashsale_test"
#: The tests' own Redis database (the user's sales live in database 0).
TEST_REDIS_DB = 15
#: The only FLASHSALE_* variables a developer's shell may pass on to tests: which stack to use.
_INHERITED = {
    "FLASHSALE_HOME",
    "FLASHSALE_REDIS_PORT",
    "FLASHSALE_MYSQL_PORT",
    "FLASHSALE_NAMESRV_PORT",
    "FLASHSALE_BROKER_PORT",
    "FLASHSALE_PROXY_PORT",
    "FLASHSALE_PROXY_REMOTING_PORT",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath) or "/acceptance/" in str(item.fspath):
            item.add_marker(pytest.mark.stack)


def clean_environment() -> dict[str, str]:
    """os.environ without FLASHSALE_* settings that would change what a test means."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(c.ENV_PREFIX) or k in _INHERITED}
    env.setdefault("FLASHSALE_HOME", str(ROOT / ".flashsale"))
    return env


@pytest.fixture(scope="session")
def stack_settings() -> StackSettings:
    return StackSettings.from_env(clean_environment())


@pytest.fixture(scope="session")
def stack(stack_settings: StackSettings) -> Settings:
    """The local stack, started (and installed) if it is not running, and the settings of its clients. Left
    running after the session."""
    from flashsale.stack.manager import Stack

    Stack(stack_settings).up()
    return Settings.from_env(clean_environment())


def isolated_settings(prefix: str, stack: Settings | None = None, *, database: str = TEST_DATABASE) -> Settings:
    """Settings on the stack with a namespace of their own and the tests' databases, never the user's."""
    stack = stack or Settings.from_env(clean_environment())
    return Settings.from_env(
        {
            **clean_environment(),
            "FLASHSALE_NAMESPACE": f"{prefix}{uuid.uuid4().hex[:10]}",
            "FLASHSALE_MYSQL_URL": stack.mysql_url.rsplit("/", 1)[0] + f"/{database}",
            "FLASHSALE_REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + f"/{TEST_REDIS_DB}",
        }
    )


@pytest.fixture(scope="session")
def settings(stack: Settings) -> Iterator[Settings]:
    """Settings of this session: own namespace (topics, group) and the test database, initialised."""
    from flashsale.ops.setup import init

    session = isolated_settings("t", stack)
    _empty_redis(session)
    _empty_mysql(session)
    init(session)
    yield session
    _empty_redis(session)
    drop_namespace(session)


def drop_namespace(settings: Settings) -> None:
    """Delete the topics and consumer groups of a namespace the tests made."""
    from flashsale.adapters.rocketmq import admin as rocketmq_admin

    brokers = rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME)
    for topic in (settings.deduction_topic, settings.replay_topic, settings.deadline_topic):
        rocketmq_admin.delete_topic(settings.namesrv_addr, brokers, topic)
    for broker in brokers:
        for group in (settings.consumer_group, settings.expiry_group):
            rocketmq_admin.delete_group(broker, group)


#: The tests' own Redis Cluster: 3 masters with a replica each, on ports 7379-7384 (buses 17379-17384).
CLUSTER_ENV = {"FLASHSALE_REDIS_PORT": "7379", "FLASHSALE_REDIS_MASTERS": "3", "FLASHSALE_REDIS_REPLICAS": "1"}


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[StackSettings]:
    """A Redis Cluster of the tests' own, created new for the session and stopped after it (stack settings)."""
    import shutil

    from flashsale.stack.manager import Stack

    home = ROOT / ".flashsale" / "test-cluster"
    cluster = StackSettings.from_env({**clean_environment(), **CLUSTER_ENV, "FLASHSALE_HOME": str(home)})
    stack = Stack(cluster)
    stack.down()  # what an interrupted session left
    shutil.rmtree(home, ignore_errors=True)
    stack.up(["redis"])
    yield cluster
    stack.down()


def cluster_url(cluster: StackSettings) -> str:
    return f"redis://127.0.0.1:{cluster.ports.redis}/0"


def _empty_mysql(settings: Settings) -> None:
    """Drop the tests' database, made again by `init`: each session starts from empty tables, as a clean
    clone does, rather than from the books of every session before it."""
    from tests.oracle import drop_database

    assert settings.mysql_url.endswith(f"/{TEST_DATABASE}")
    drop_database(settings.mysql_url)


def _empty_redis(settings: Settings) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert client.connection_pool.connection_kwargs["db"] == TEST_REDIS_DB
        client.flushdb()
    finally:
        client.close()


def session_env(settings: Settings) -> dict[str, str]:
    """The environment of a flashsale process (or command) of this session: its namespace and databases."""
    return {
        **clean_environment(),
        "FLASHSALE_NAMESPACE": settings.namespace,
        "FLASHSALE_MYSQL_URL": settings.mysql_url,
        "FLASHSALE_REDIS_URL": settings.redis_url,
        "FLASHSALE_ROCKETMQ_ENDPOINT": settings.rocketmq_endpoint,
        "FLASHSALE_NAMESRV_ADDR": settings.namesrv_addr,
    }


@pytest.fixture
def sku() -> str:
    return f"sku-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_stock(settings: Settings) -> Iterator[object]:
    from flashsale.adapters.redis.stock import RedisStock

    stock = RedisStock(settings.redis_url)
    yield stock
    stock.close()


@pytest.fixture
def mysql_store(settings: Settings) -> Iterator[object]:
    from flashsale.adapters.mysql.store import MySQLStore

    store = MySQLStore(settings.mysql_url)
    yield store
    store.close()


@pytest.fixture(autouse=True, scope="session")
def _quiet_rocketmq_client() -> None:
    import logging

    logging.getLogger("rocketmq-python-client").setLevel(logging.WARNING)
