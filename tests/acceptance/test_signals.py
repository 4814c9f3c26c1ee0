"""Signals, on the real stack: what a SIGTERM finishes and hands back, and what a second one cuts short.

docs/operations.md: the consumer finishes the batch in hand and hands back the messages it received and had
not started; a second signal stops any process at once, unfinished, with exit code 130.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading

import pytest

from flashsale.bench.load import run_load
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Child, Pipeline, post
from tests.acceptance.probes import metric
from tests.acceptance.servers import frozen
from tests.acceptance.test_crashes import stopped_mid_batch
from tests.oracle import balanced, now

pytestmark = pytest.mark.slow

#: The invisible time of the consumers below: a message received and not handed back stays hidden this
#: long, far longer than the test waits for the books to balance.
INVISIBLE_S = 300
#: How long the books may take to balance once the second consumer runs (a backlog of a few hundred).
PROMPT_S = 45.0


def test_a_consumer_stopped_by_sigterm_hands_back_what_it_received_and_had_not_started(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 1000)
    _, url = pipeline.producer(FLASHSALE_GROUP_SIZE="1")  # a message per purchase: a backlog of 400
    pipeline.checker()
    load = asyncio.run(run_load(url, [sku], attempts=400, concurrency=20))
    assert load.statuses["accepted"] == 400
    # Batches of 10: the first consumer has many more messages received, waiting in memory, than it applies.
    first = pipeline.consumer(FLASHSALE_BATCH_SIZE="10", FLASHSALE_INVISIBLE_S=str(INVISIBLE_S))
    assert stopped_mid_batch(first, settings, stack_settings, sku) == 0
    applied = len(now(settings, sku).mysql_deducted)
    assert 0 < applied < 400
    handed = [int(n) for n in re.findall(r"handed back (\d+) message", first.text())]
    assert sum(handed) > 0, first.text()[-3000:]
    assert applied + sum(handed) <= 400

    # Messages received by the first consumer and not handed back would stay hidden for INVISIBLE_S: only a
    # hand-back lets a second consumer apply the whole backlog this soon.
    pipeline.consumer(FLASHSALE_INVISIBLE_S=str(INVISIBLE_S))
    books = balanced(settings, sku, PROMPT_S)
    assert books.problems == [], books.problems
    assert (len(books.mysql_deducted), books.order_count, books.mysql_stock) == (400, 400, 600)


def stop_twice(child: Child) -> None:
    """SIGTERM, and once the process took it (it says so), SIGTERM again."""
    child.popen.send_signal(signal.SIGTERM)
    child.wait_for(lambda: "stopping gracefully" in child.text(), "taking the first signal", 10)
    child.popen.send_signal(signal.SIGTERM)


def test_a_second_sigterm_stops_every_process_at_once_unfinished_with_exit_code_130(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 10)
    children = {"checker": pipeline.checker(), "consumer": pipeline.consumer(), "expirer": pipeline.expirer()}
    # A purchase waits for its group to fill for up to a minute: the producer's graceful stop would wait
    # for its answer.
    children["producer"], url = pipeline.producer(FLASHSALE_GROUP_WAIT_MS="60000")
    heard: list[object] = []

    def buy() -> None:
        try:
            heard.append(post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "t-cut"}, timeout_s=60))
        except OSError as exc:
            heard.append(exc)

    buyer = threading.Thread(target=buy)
    buyer.start()
    in_flight = poll_until(lambda: metric(url, "flashsale_purchases_in_flight") == 1, 10)
    assert in_flight, "the purchase never reached the producer"
    # Each process says goodbye to the proxy as it stops gracefully; a frozen proxy keeps each goodbye
    # waiting for the client's request timeout, so every graceful stop is still under way at the second
    # signal.
    with frozen(Stack(stack_settings), "broker"):
        for role, child in children.items():
            pipeline.doomed(child)
            stop_twice(child)
            assert child.wait_exit(10) == 130, (role, child.text()[-2000:])
            assert "stopping now, without finishing" in child.text(), role
            assert f"{role} stopped" not in child.text(), role
    buyer.join(30)
    assert len(heard) == 1 and isinstance(heard[0], OSError), heard  # cut off: no answer
    # The purchase was waiting for its group: nothing of it reached Redis or the broker.
    books = balanced(settings, sku, 10)
    assert books.problems == [] and books.redis_stock == 10 and "t-cut" not in books.redis_deducted
