"""What the processes tell a supervisor, on the real stack: /readyz while a server is read-only or down,
the broker's restart and the watchdog that brings every client back, and the producer's load shedding.

Every server is taken away for real (MariaDB set read-only or stopped, the broker killed and started
again) and the books are read back with plain SQL and Redis commands (tests/oracle.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest

from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.stack.manager import Stack
from flashsale.stack.mariadb import MariaDBService
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Child, Pipeline, post
from tests.acceptance.probes import metric, readiness, wait_readiness
from tests.acceptance.servers import kill, routes_served
from tests.oracle import balanced, now

pytestmark = pytest.mark.slow

#: How long a process may take to notice a server went or came back: readiness is asked at most once a second.
NOTICE_S = 10.0
#: Once a process said it is not ready, it keeps saying so this long while the server stays away.
HOLD_S = 3.0
#: docs/operations.md, "The check window": once `stack up` has the broker taking sends again, clients
#: reconnect within 2.5 s and the watchdog re-sends their settings within 2.5 s more.
RESUME_S = 2.5 + 2.5
#: After this long, a RocketMQ client has made its first settings sync of its own (rocketmq-python-client
#: syncs a second after it starts, then every 300 s).
CLIENT_FIRST_SYNC_S = 2.0


def buy(url: str, sku: str, token: str, qty: int = 1) -> tuple[int, dict[str, object]]:
    return post(url, {"sku": sku, "user_id": f"u-{token}", "qty": qty, "token": token})


@contextmanager
def read_only(mariadb: MariaDBService) -> Iterator[None]:
    mariadb._root_sql("SET GLOBAL read_only = 1")
    try:
        yield
    finally:
        mariadb._root_sql("SET GLOBAL read_only = 0")


@contextmanager
def stopped(stack: Stack, service: str) -> Iterator[None]:
    stack.down([service])
    try:
        yield
    finally:
        stack.up([service])


def assert_unready(child: Child, server: str, *reason: str) -> None:
    """`child` answers /readyz 503 naming `server` with every word of `reason`, and only that server; and
    goes on answering so (asked every quarter second for HOLD_S), not only once."""
    status, body = wait_readiness(child.url, 503, NOTICE_S)
    held_until = time.monotonic() + HOLD_S
    while True:
        assert status == 503 and body["status"] == "unavailable", (child.role, body)
        assert all(word in body[server] for word in reason), (child.role, body)
        assert all(state == "ok" for name, state in body.items() if name not in ("status", server)), (child.role, body)
        if time.monotonic() > held_until:
            return
        time.sleep(0.25)
        status, body = readiness(child.url)


def assert_ready(child: Child, timeout_s: float = NOTICE_S) -> None:
    status, body = wait_readiness(child.url, 200, timeout_s)
    assert status == 200 and body["status"] == "ready", (child.role, body)
    assert all(state == "ok" for name, state in body.items() if name != "status"), (child.role, body)


def test_the_consumer_is_not_ready_while_mysql_is_read_only_or_down_and_ready_again_once_it_takes_writes(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 100)
    checker = pipeline.launch("checker")
    consumer = pipeline.launch("consumer")
    producer, url = pipeline.producer()
    stack = Stack(stack_settings)
    mysql = settings.mysql_url.rsplit("@", 1)[1]  # host:port/database, as the reason names it
    told = []
    with read_only(MariaDBService(stack.layout, stack_settings)):
        assert_unready(consumer, "mysql", f"MySQL at {mysql}", "refuses writes (read-only)")
        # The checker and the producer need no MySQL: they stay ready, and the sale goes on.
        assert_ready(checker)
        assert_ready(producer)
        assert buy(url, sku, "t-read-only")[1]["status"] == "accepted"
        told.append("t-read-only")
    assert_ready(consumer)
    with stopped(stack, "mariadb"):
        assert_unready(consumer, "mysql", f"MySQL at {mysql}", "unavailable")
        assert_ready(checker)
        assert_ready(producer)
        assert buy(url, sku, "t-down")[1]["status"] == "accepted"
        told.append("t-down")
    assert_ready(consumer)
    books = balanced(settings, sku, 60)
    assert books.problems == [], books.problems
    assert sorted(books.orders) == sorted(told) and (books.redis_stock, books.mysql_stock) == (98, 98)


def test_every_process_is_not_ready_while_the_broker_is_down_and_sells_again_soon_after_it_restarts(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 100)
    children = {"checker": pipeline.checker(), "consumer": pipeline.consumer()}
    children["producer"], url = pipeline.producer()
    started = time.monotonic()
    assert buy(url, sku, "t-before")[1]["status"] == "accepted"
    assert balanced(settings, sku, 30).problems == []
    # The client library re-sends its settings by itself once, a second after it starts (then every 300 s):
    # a broker killed before that would be recovered from by the library, not by the watchdog.
    time.sleep(max(0.0, CLIENT_FIRST_SYNC_S - (time.monotonic() - started)))
    resyncs = {role: metric(child.url, "flashsale_broker_resyncs_total") for role, child in children.items()}
    stack = Stack(stack_settings)
    kill(stack, "broker")
    try:
        for child in children.values():
            assert_unready(child, "broker", "telemetry stream", "is down")
        # Nothing can be sent: the buyer hears `error`, and nothing was deducted for it.
        status, body = buy(url, sku, "t-during")
        assert (status, body["status"]) == (503, "error"), body
    finally:
        stack.up(["broker"])
    back = time.monotonic()  # the broker takes sends again (`stack up` waited for one)
    timeline = _resumed(settings, url, sku, children, back)
    for role, child in children.items():
        assert metric(child.url, "flashsale_broker_resyncs_total") > resyncs[role], f"{role} never resynced"
    books = balanced(settings, sku, 30)
    assert books.problems == [], books.problems
    assert sorted(books.orders) == ["t-after", "t-before"] and books.mysql_stock == 98, timeline
    # The next test's processes ask the proxy for routes it may have cached as missing meanwhile.
    assert poll_until(lambda: routes_served(settings), 60), "the proxy serves no route again"


def _resumed(settings: Settings, url: str, sku: str, children: dict[str, Child], back: float) -> dict[str, float]:
    """Each process ready, a purchase accepted and in MySQL, within RESUME_S of `back`; when each happened."""
    timeline: dict[str, float] = {}

    def left() -> float:
        return max(0.0, RESUME_S - (time.monotonic() - back))

    for role, child in children.items():
        assert_ready(child, left())
        timeline[f"{role} ready"] = round(time.monotonic() - back, 1)

    def sold_again() -> bool:
        status, body = buy(url, sku, "t-after")  # the same token until it is sold: a retry is safe
        return status == 200 and body["status"] in ("accepted", "duplicate")

    assert poll_until(sold_again, left(), interval_s=0.5), f"no sale {RESUME_S} s after the restart: {timeline}"
    timeline["sold"] = round(time.monotonic() - back, 1)
    # The consumer receives again: the purchase reaches MySQL within the documented time too.
    applied = poll_until(lambda: "t-after" in now(settings, sku).mysql_deducted, left())
    assert applied, f"t-after not applied {RESUME_S} s after the broker was back: {timeline}"
    timeline["applied"] = round(time.monotonic() - back, 1)
    return timeline


async def burst(url: str, sku: str, tokens: list[str]) -> dict[str, tuple[int, dict[str, object]]]:
    """Every token's purchase sent at once; token -> (HTTP status, body)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(tokens))) as session:

        async def one(token: str) -> tuple[int, dict[str, object]]:
            body = {"sku": sku, "user_id": f"u-{token}", "qty": 1, "token": token}
            async with session.post(url + "/purchase", json=body) as resp:
                return resp.status, await resp.json()

        answers = await asyncio.gather(*(one(token) for token in tokens))
    return dict(zip(tokens, answers, strict=True))


def test_a_producer_past_its_in_flight_limit_answers_503_with_a_reason_and_deducts_nothing_for_those(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 1000)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    pipeline.ready_all()
    # Four purchases in flight at most; each waits a second for its group to fill, so a burst of 60
    # finds the first four still in flight.
    _, url = pipeline.producer(FLASHSALE_MAX_IN_FLIGHT="4", FLASHSALE_GROUP_WAIT_MS="1000")
    tokens = [f"t-{i}" for i in range(60)]
    answers = asyncio.run(burst(url, sku, tokens))
    shed = sorted(t for t, (status, _) in answers.items() if status == 503)
    accepted = sorted(t for t, (status, body) in answers.items() if (status, body["status"]) == (200, "accepted"))
    assert shed and accepted and len(shed) + len(accepted) == len(tokens), answers
    for token in shed:
        body = answers[token][1]
        assert body["status"] == "error" and "overloaded" in str(body["message"]), body
        assert body["token"] == token and body["message_id"] is None, body
    books = balanced(settings, sku, 60)
    assert books.problems == [], books.problems
    heard = {token: [str(body["status"])] for token, (_, body) in answers.items()}
    assert books.against(heard, {t: {1} for t in tokens}, {t: f"u-{t}" for t in tokens}) == []
    assert sorted(books.redis_deducted) == sorted(books.orders) == accepted
    assert books.mysql_stock == books.redis_stock == 1000 - len(accepted)
    # Nothing was deducted for them, so asking again with the same token is a purchase of its own.
    for token in shed[:3]:
        status, body = buy(url, sku, token)
        assert (status, body["status"]) == (200, "accepted"), body
    books = balanced(settings, sku, 60)
    assert books.problems == [], books.problems
    assert sorted(books.orders) == sorted(accepted + shed[:3])
