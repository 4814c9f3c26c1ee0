"""Transactional messages through the real broker and gRPC proxy, from Python.

These prove the stack itself: what the pipeline relies on is what RocketMQ actually does.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from flashsale import constants as c
from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.adapters.rocketmq.consumer import RocketMQConsumer
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.config import Settings
from flashsale.models import Delivery, Resolution


class Decisions:
    """A checker that answers from the message key and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def check(self, delivery: Delivery) -> Resolution:
        with self.lock:
            self.asked.append(delivery.key or "")
        key = delivery.key or ""
        return Resolution.COMMIT if key.startswith("commit") else Resolution.ROLLBACK


@pytest.fixture(scope="module")
def topic(settings: Settings) -> Iterator[str]:
    name = f"{settings.namespace}-smoke"
    brokers = rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME)
    for broker in brokers:
        rocketmq_admin.create_topic(broker, name, queues=4, message_type="TRANSACTION")
    yield name
    rocketmq_admin.delete_topic(settings.namesrv_addr, brokers, name)


@pytest.fixture(scope="module")
def decisions() -> Decisions:
    return Decisions()


@pytest.fixture(scope="module")
def producer(settings: Settings, topic: str, decisions: Decisions) -> Iterator[RocketMQProducer]:
    client = RocketMQProducer(settings.rocketmq_endpoint, [topic], decisions.check).start()
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def consumer(settings: Settings, topic: str) -> Iterator[RocketMQConsumer]:
    client = RocketMQConsumer(
        settings.rocketmq_endpoint, f"{settings.namespace}-smoke", [topic], poll_wait_s=1, invisible_s=10
    ).start()
    yield client
    client.shutdown()


def receive_keys(consumer: RocketMQConsumer, wanted: set[str], timeout_s: float) -> set[str]:
    """Receive (and ack) until every wanted key arrived or the time is up; returns the keys seen."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not wanted <= seen:
        batch = consumer.receive(64)
        seen |= {d.key or "" for d in batch}
        consumer.ack(batch)
    return seen


def test_a_committed_half_message_is_delivered(
    producer: RocketMQProducer, consumer: RocketMQConsumer, topic: str
) -> None:
    key = f"commit-{uuid.uuid4().hex}"
    half = producer.send_half(topic, key, b'{"hello": 1}', "smoke")
    half.commit()
    assert key in receive_keys(consumer, {key}, 30)


def test_a_rolled_back_half_message_is_never_delivered(
    producer: RocketMQProducer, consumer: RocketMQConsumer, topic: str
) -> None:
    rolled_back = f"rollback-{uuid.uuid4().hex}"
    producer.send_half(topic, rolled_back, b"{}", "smoke").rollback()
    # A committed message sent afterwards proves the consumer was listening the whole time.
    marker = f"commit-{uuid.uuid4().hex}"
    producer.send_half(topic, marker, b"{}", "smoke").commit()
    seen = receive_keys(consumer, {marker}, 30)
    seen |= receive_keys(consumer, {rolled_back}, 12)  # and give the rolled-back one time to (not) show up
    assert marker in seen
    assert rolled_back not in seen


DYING_PRODUCER = textwrap.dedent("""
    import os, signal, sys
    from flashsale.adapters.rocketmq.producer import RocketMQProducer
    from flashsale.models import Resolution
    endpoint, topic, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
    producer = RocketMQProducer(endpoint, [topic], lambda d: Resolution.UNKNOWN).start()
    for key in keys:
        producer.send_half(topic, key, b"{}", "smoke")
    print("sent", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no commit, no rollback, no goodbye
""")


def test_half_messages_of_a_killed_producer_are_settled_by_a_checker_in_another_process(
    settings: Settings, producer: RocketMQProducer, consumer: RocketMQConsumer, decisions: Decisions, topic: str
) -> None:
    commit, rollback = f"commit-{uuid.uuid4().hex}", f"rollback-{uuid.uuid4().hex}"
    result = subprocess.run(
        [sys.executable, "-c", DYING_PRODUCER, settings.rocketmq_endpoint, topic, commit, rollback],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "sent" in result.stdout
    seen = receive_keys(consumer, {commit}, 60)
    assert commit in seen
    # Checks come in rounds (every few seconds) and a round may first pick the dead producer's channel.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not {commit, rollback} <= set(decisions.asked):
        time.sleep(0.5)
    assert {commit, rollback} <= set(decisions.asked)
    seen |= receive_keys(consumer, {rollback}, 5)
    assert rollback not in seen
