"""Fixtures on the real stack: `flashsale stack up` once per session, then a namespace of our own.

Integration and acceptance tests never skip: a server that cannot be started is a failure.
Each session gets its own topics and consumer group (a random namespace) and the `flashsale_test`
database; each test uses SKUs nobody else uses, so tests do not see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flashsale import constants as c
from flashsale.config import Settings

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE = "flashsale_test"
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
def stack_settings() -> Settings:
    return Settings.from_env(clean_environment())


@pytest.fixture(scope="session")
def stack(stack_settings: Settings) -> Settings:
    """The local stack, started (and installed) if it is not running. Left running after the session."""
    from flashsale.stack.manager import Stack

    Stack(stack_settings).up()
    return stack_settings


@pytest.fixture(scope="session")
def settings(stack: Settings) -> Iterator[Settings]:
    """Settings of this session: own namespace (topics, group) and the test database, initialised."""
    from flashsale.adapters import rocketmq_admin
    from flashsale.ops.setup import init

    namespace = f"t{uuid.uuid4().hex[:10]}"
    mysql_url = stack.mysql_url.rsplit("/", 1)[0] + f"/{TEST_DATABASE}"
    session = Settings.from_env(
        {**clean_environment(), "FLASHSALE_NAMESPACE": namespace, "FLASHSALE_MYSQL_URL": mysql_url}
    )
    init(session)
    yield session
    brokers = rocketmq_admin.cluster_brokers(session.namesrv_addr, c.CLUSTER_NAME)
    for topic in (session.deduction_topic, session.replay_topic):
        rocketmq_admin.delete_topic(session.namesrv_addr, brokers, topic)
    for broker in brokers:
        rocketmq_admin.delete_group(broker, session.consumer_group)


@pytest.fixture
def sku() -> str:
    return f"sku-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_stock(settings: Settings) -> Iterator[object]:
    from flashsale.adapters.redis_stock import RedisStock

    stock = RedisStock(settings.redis_url)
    yield stock
    stock.close()


@pytest.fixture
def mysql_store(settings: Settings) -> Iterator[object]:
    from flashsale.adapters.mysql_store import MySQLStore

    store = MySQLStore(settings.mysql_url)
    yield store
    store.close()


@pytest.fixture(autouse=True, scope="session")
def _quiet_rocketmq_client() -> None:
    import logging

    logging.getLogger("rocketmq-python-client").setLevel(logging.WARNING)
