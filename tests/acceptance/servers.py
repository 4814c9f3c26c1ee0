"""What a test does to a server of the stack behind the product's back: crash it, or freeze it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from flashsale import constants as c
from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.adapters.rocketmq import internals
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.config import Settings
from flashsale.models import Resolution
from flashsale.polling import poll_until
from flashsale.stack import procs
from flashsale.stack.manager import Stack


def _running(stack: Stack, service: str) -> procs.PidRecord:
    record = procs.PidRecord.load(stack.layout.pid_file(service))
    assert record is not None and procs.is_alive(record), f"{service} is not running"
    return record


def kill(stack: Stack, service: str) -> None:
    """SIGKILL a server, as a crash would."""
    record = _running(stack, service)
    os.kill(record.pid, signal.SIGKILL)
    assert poll_until(lambda: not procs.is_alive(record), 10), f"{service} survived SIGKILL"


def kill_all(stack: Stack) -> None:
    """SIGKILL every server of a stack the tests made for themselves and throw away: its graceful stop (a
    JVM's takes 10 to 20 s) would keep nothing worth keeping. Then `down` finds them gone."""
    for service in stack.services:
        record = procs.PidRecord.load(stack.layout.pid_file(service.name))
        if record is not None and procs.is_alive(record):
            kill(stack, service.name)
    stack.down()


@contextmanager
def frozen(stack: Stack, service: str) -> Iterator[None]:
    """The server stops answering (SIGSTOP) for the block, its connections open, and goes on afterwards."""
    record = _running(stack, service)
    os.kill(record.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(record.pid, signal.SIGCONT)


def up_again(stack: Stack, service: str, settings: Settings) -> None:
    """Start a server again, as an operator would (`stack up SERVICE`); for the name server or the broker,
    return only once the proxy hands out the routes of the session's topics again: it may have cached "no
    route" while no broker was registered (docs/operations.md), and a process started then would exit."""
    stack.up([service])
    if service in ("namesrv", "broker"):
        assert poll_until(lambda: routes_served(settings), 60), "the proxy serves no route again"


def routes_served(settings: Settings) -> bool:
    """Does the proxy hand out the route of each of the session's topics, and the name server know a
    broker? (Asked of the proxy for each topic: the first request after it cached "no route" gets that
    answer once more, and makes it ask the name server.)"""
    topics = [settings.deduction_topic, settings.replay_topic, settings.deadline_topic]
    probe = RocketMQProducer(settings.rocketmq_endpoint, topics, lambda _: Resolution.UNKNOWN)
    try:
        probe.start()
        for topic in topics:
            internals.queue_selector(probe._client, topic)  # raises while the proxy serves no route
        return bool(rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME))
    except Exception:
        return False
    finally:
        probe.shutdown()
