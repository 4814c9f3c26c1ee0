"""Every server and process killed with SIGKILL mid-sale, one at a time, then brought back as an operator would.

Buyers retry every unclear answer with the same token. After each fault, the books are read with plain
SQL and Redis commands (tests/oracle.py): every token ever answered `accepted` or `duplicate` has
exactly one order, nothing is oversold, and the books balance by themselves, with no repair, within
two minutes. The sale goes on through the surviving processes, which are never restarted.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from flashsale import constants as c
from flashsale.adapters import rocketmq_admin
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.stack import procs
from flashsale.stack.manager import Stack
from flashsale.stack.services import MariaDBService
from tests.acceptance.crowd import Crowd
from tests.acceptance.harness import Child, Pipeline, free_port
from tests.oracle import Books, wait_balanced

pytestmark = pytest.mark.slow

#: Units on sale: more than the crowd can buy, so the sale runs through the whole fault.
STOCK = 100_000
BUYERS = 20
#: Seconds of sale before the fault, the victim stays down, and of sale after it is back.
BEFORE_S, DOWN_S, AFTER_S = 2.0, 5.0, 3.0
#: The books must balance this long after the last answer, with no repair.
CONVERGE_S = 120.0

SERVERS = ("redis", "mariadb", "namesrv", "broker")
PROCESSES = ("producer", "consumer", "checker")


@dataclass
class Outcome:
    victim: str
    accepted: int
    lost: int
    oversold: int
    converge_s: float


RESULTS: list[Outcome] = []


class Sale:
    """The three processes of one test, the victim's kill and its return, and the crowd."""

    def __init__(self, pipeline: Pipeline, stack: Settings, sku: str) -> None:
        self.pipeline = pipeline
        self.stack = Stack(stack)
        self.sku = sku
        self.port = free_port()
        self.children: dict[str, Child] = {}
        self.children["checker"] = pipeline.checker()
        self.children["consumer"] = pipeline.consumer()
        self.children["producer"] = pipeline.producer(port=self.port)[0]
        self.url = f"http://127.0.0.1:{self.port}"

    def kill(self, victim: str) -> None:
        if victim in PROCESSES:
            self.pipeline.doomed(self.children[victim]).popen.send_signal(signal.SIGKILL)
            self.children[victim].popen.wait(10)
            return
        record = procs.PidRecord.load(self.stack.layout.pid_file(victim))
        assert record is not None and procs.is_alive(record), f"{victim} is not running"
        os.kill(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while procs.is_alive(record) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restore(self, victim: str) -> None:
        """What an operator does: start the server again, or a new process in place of the dead one."""
        if victim in PROCESSES:
            start: dict[str, Callable[[], Child]] = {
                "checker": self.pipeline.checker,
                "consumer": self.pipeline.consumer,
                "producer": lambda: self.pipeline.producer(port=self.port)[0],
            }
            self.children[victim] = start[victim]()
        else:
            self.stack.up([victim])
            if victim == "namesrv":
                # Up means routes are served again: the running broker registered with the new name server.
                assert rocketmq_admin.cluster_brokers(self.stack.settings.namesrv_addr, c.CLUSTER_NAME)


def _run(
    sale: Sale, settings: Settings, faults: list[tuple[str, float]], *, after_s: float
) -> tuple[Crowd, Books, float, float]:
    """Sell while each (victim, seconds down) fault happens in turn; returns the crowd, the books, when the
    last victim was back, and how long after the last answer the books balanced."""
    crowd = Crowd(sale.url, sale.sku, buyers=BUYERS, run_id=f"r{os.getpid()}").start()
    restored = time.perf_counter()
    try:
        time.sleep(BEFORE_S)
        for victim, down_s in faults:
            sale.kill(victim)
            time.sleep(down_s)
            sale.restore(victim)
            restored = time.perf_counter()
            time.sleep(after_s)
    finally:
        crowd.stop()
    books, converge_s = wait_balanced(settings.redis_url, settings.mysql_url, sale.sku, CONVERGE_S)
    return crowd, books, restored, converge_s


def _judge(victim: str, crowd: Crowd, books: Books, restored: float, converge_s: float) -> None:
    lost = books.lost(crowd.answers)
    told = {t for t, said in crowd.final.items() if said in ("accepted", "duplicate")}
    outcome = Outcome(victim, len(told), len(lost), books.oversold(), round(converge_s, 1))
    RESULTS.append(outcome)
    assert not crowd.unclear(), f"buyers never got a clear answer for {crowd.unclear()[:5]}"
    assert lost == [], f"{len(lost)} buyers told accepted/duplicate have no single order: {lost[:5]}"
    assert outcome.oversold == 0
    assert books.problems == [], f"books still apart {CONVERGE_S:.0f} s after the sale: {books.problems}"
    # The sale went on once the victim was back, through processes that were never restarted.
    assert crowd.answered_after(restored, "accepted") > 0
    # Nothing was deducted for a buyer who was not told so in the end (every token got a clear answer).
    assert set(books.orders) == told


@pytest.mark.parametrize("victim", SERVERS + PROCESSES)
def test_a_server_or_process_killed_mid_sale_loses_nothing_and_the_books_converge(
    pipeline: Pipeline, settings: Settings, stack: Settings, sku: str, victim: str
) -> None:
    set_stock(settings, sku, STOCK)
    sale = Sale(pipeline, stack, sku)
    crowd, books, restored, converge_s = _run(sale, settings, [(victim, DOWN_S)], after_s=AFTER_S)
    _judge(victim, crowd, books, restored, converge_s)


def test_soak_several_faults_in_a_row_lose_nothing(
    pipeline: Pipeline, settings: Settings, stack: Settings, sku: str
) -> None:
    set_stock(settings, sku, STOCK)
    sale = Sale(pipeline, stack, sku)
    faults = [("consumer", 2.0), ("broker", 3.0), ("redis", 2.0), ("checker", 2.0), ("mariadb", 3.0), ("producer", 2.0)]
    crowd, books, restored, converge_s = _run(sale, settings, faults, after_s=4.0)
    _judge("soak: " + ", ".join(v for v, _ in faults), crowd, books, restored, converge_s)


def test_a_read_only_database_pauses_the_consumer_without_burning_delivery_attempts(
    pipeline: Pipeline, settings: Settings, stack: Settings, sku: str
) -> None:
    set_stock(settings, sku, STOCK)
    sale = Sale(pipeline, stack, sku)
    mariadb = MariaDBService(Stack(stack).layout, stack)
    consumer = sale.children["consumer"]
    crowd = Crowd(sale.url, sku, buyers=BUYERS, run_id=f"ro{os.getpid()}").start()
    try:
        time.sleep(BEFORE_S)
        mariadb._root_sql("SET GLOBAL read_only = 1")
        try:
            consumer.wait_log("receipt paused", timeout_s=30)
            time.sleep(8)
            failed_batches = consumer.text().count("not applied")
        finally:
            mariadb._root_sql("SET GLOBAL read_only = 0")
        consumer.wait_log("resuming receipt", timeout_s=30)
        time.sleep(AFTER_S)
    finally:
        crowd.stop()
    # One batch met the read-only server; then receipt stopped until it took writes again.
    assert failed_batches == 1, consumer.text()[-3000:]
    assert "refuses writes (read-only)" in consumer.text()
    books, converge_s = wait_balanced(settings.redis_url, settings.mysql_url, sku, CONVERGE_S)
    _judge("mariadb read-only", crowd, books, time.perf_counter() - AFTER_S, converge_s)
