"""Every server and process killed with SIGKILL mid-sale, one at a time, then brought back as an operator would.

The sale is one that can oversell: it sells out during the fault or just after it. Buyers ask for 1 to 3
units, each under a per-user limit, and double-click (one token sent twice at once, the second click
asking one unit more); every unclear answer is asked again with the same token. Each buyer pauses
between purchases, so the stock lasts a few seconds and the victim dies with the sale in full swing. It
runs on one key and on 3 partitions. After each fault, the books are read with plain SQL and Redis commands
(tests/oracle.py): every token ever answered `accepted` or `duplicate` has exactly one order, for its
buyer and a quantity it was sent with, no other token has one, no buyer holds more than the limit,
nothing is oversold, the stock is gone, and the books balance by themselves, with no repair, within two
minutes. The sale goes on through the surviving processes, which are never restarted. Each test also
shows that the recovery path it is about really ran.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis

from flashsale import failpoints
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.stack.manager import Stack
from flashsale.stack.mariadb import MariaDBService
from flashsale.stack.settings import StackSettings
from tests.acceptance.crowd import Crowd
from tests.acceptance.harness import Child, Pipeline, free_port
from tests.acceptance.servers import kill, up_again
from tests.acceptance.test_crashes import buy
from tests.oracle import Books, redis_stock, wait_balanced

pytestmark = pytest.mark.slow

#: Units on sale, and what one buyer may hold: 30 buyers may hold 2,700, so the stock sells out.
STOCK, LIMIT = 1_200, 90
BUYERS = 30
#: The victim dies once this share of the stock is sold, and stays down this long.
KILL_AT, DOWN_S = 0.25, 4.0
#: Each buyer's pause between purchases. Unpaced, the crowd sold the stock in under a second, so a test
#: that looked at the stock a moment late found it sold out: the fault came after the sale, not in it.
PAUSE_S = 0.1
#: How often a test looks at the stock while it waits for KILL_AT.
WATCH_S = 0.02
#: How long a message received by a consumer that died stays hidden.
INVISIBLE_S = 10
#: Sold-out answers after the last unit, before the buyers stop.
AFTER_S = 1.0
#: The books must balance this long after the last answer, with no repair.
CONVERGE_S = 120.0
#: The producer's failpoint kills it after its N-th transaction's pre-deduct: mid-sale, at that exact step.
PRODUCER_DIES_AT = 5

SERVERS = ("redis", "mariadb", "namesrv", "broker")
PROCESSES = ("producer", "consumer", "checker")
SHAPES = {"one-key": 1, "partitions": 3}


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

    def __init__(
        self, pipeline: Pipeline, stack: StackSettings, settings: Settings, sku: str, victim: str = ""
    ) -> None:
        self.pipeline = pipeline
        self.stack = Stack(stack)
        self.settings = settings
        self.sku = sku
        self.port = free_port()
        self.children: dict[str, Child] = {}
        # Side by side: the producer waits for both. A consumer killed with messages in hand lets them be
        # received again after its invisible time: 10 s, not the default 30, keeps each fault test short.
        self.children["checker"] = pipeline.launch("checker")
        self.children["consumer"] = pipeline.launch("consumer", FLASHSALE_INVISIBLE_S=str(INVISIBLE_S))
        # The producer's own death is a failpoint: between one of its pre-deducts and that message's end.
        dies = f"{failpoints.AFTER_PREDEDUCT}@{PRODUCER_DIES_AT}" if victim == "producer" else ""
        self.children["producer"] = pipeline.producer(port=self.port, failpoints=dies)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        if victim == "checker":
            # A producer that dies after its first pre-deduct: its message will need a check.
            self.doomed = pipeline.producer(failpoints=failpoints.AFTER_PREDEDUCT)

    def left(self) -> int | None:
        """Units still on sale; None while Redis cannot say (down, or loading its data after a restart)."""
        try:
            return redis_stock(self.settings.redis_url, self.sku)
        except redis.RedisError:
            return None

    def sold(self, share: float) -> bool:
        """At least this share of the stock is sold (a sold-out SKU too); False while Redis cannot say."""
        left = self.left()
        return left is not None and left <= STOCK * (1 - share)

    def died(self, victim: str) -> bool:
        return victim in PROCESSES and self.children[victim].popen.poll() is not None

    def kill(self, victim: str) -> None:
        if victim == "producer":  # it kills itself, at its failpoint
            assert self.children["producer"].popen.wait(60) == -signal.SIGKILL
            return
        if victim in PROCESSES:
            self.pipeline.doomed(self.children[victim]).popen.send_signal(signal.SIGKILL)
            self.children[victim].popen.wait(10)
            return
        kill(self.stack, victim)

    def restore(self, victim: str) -> None:
        """What an operator does: start the server again, or a new process in place of the dead one."""
        if victim in PROCESSES:
            start: dict[str, Callable[[], Child]] = {
                "checker": self.pipeline.checker,
                "consumer": lambda: self.pipeline.consumer(FLASHSALE_INVISIBLE_S=str(INVISIBLE_S)),
                "producer": lambda: self.pipeline.producer(port=self.port)[0],
            }
            self.children[victim] = start[victim]()
        else:
            up_again(self.stack, victim, self.settings)  # a name server is up once the broker's routes are served

    def logs(self) -> str:
        return "".join(child.text() for child in self.pipeline.children)


@dataclass
class Run:
    crowd: Crowd
    books: Books
    converge_s: float
    #: perf_counter when each victim was killed and when it was back
    down: list[tuple[str, float, float]]


def _crowd(sale: Sale) -> Crowd:
    return Crowd(
        sale.url, sale.sku, buyers=BUYERS, run_id=f"r{os.getpid()}", max_qty=3, double_click=True, pause_s=PAUSE_S
    )


def _run(sale: Sale, faults: list[tuple[str, float]], *, during: Callable[[str], None] = lambda v: None) -> Run:
    """Sell until a quarter of the stock is gone (or the first victim died at its failpoint), then take each
    (victim, seconds down) fault in turn, then sell out; returns what the buyers heard and the books once
    they balance (or as they are after CONVERGE_S)."""
    crowd = _crowd(sale).start()
    down = []
    first = faults[0][0]
    try:
        started = poll_until(lambda: sale.sold(KILL_AT) or sale.died(first), 60, interval_s=WATCH_S)
        assert started, f"the sale did not start: {sale.left()} left, buyers heard {dict(crowd.counts())}"
        for victim, down_s in faults:
            sale.kill(victim)
            killed = time.perf_counter()
            during(victim)
            time.sleep(down_s)
            sale.restore(victim)
            down.append((victim, killed, time.perf_counter()))
        assert poll_until(lambda: sale.left() == 0, 120), f"the stock was not sold out: {sale.left()} left"
        time.sleep(AFTER_S)
    finally:
        crowd.stop()
    books, converge_s = wait_balanced(sale.settings.redis_url, sale.settings.mysql_url, sale.sku, CONVERGE_S)
    return Run(crowd, books, converge_s, down)


def _judge(name: str, run: Run) -> None:
    crowd, books = run.crowd, run.books
    answers = crowd.answers
    lost = books.lost(answers)
    RESULTS.append(Outcome(name, len(crowd.told()), len(lost), books.oversold(), round(run.converge_s, 1)))
    assert not crowd.unclear(), f"buyers never got a clear answer for {crowd.unclear()[:5]}"
    assert books.against(answers, crowd.asked, crowd.users, LIMIT) == []
    assert books.oversold() == 0
    assert books.problems == [], f"books still apart {CONVERGE_S:.0f} s after the sale: {books.problems}"
    # Sold out: the last unit went to a buyer who was told so.
    assert (books.redis_stock, books.mysql_stock, books.sold) == (0, 0, STOCK)
    # The sale went on once the last victim was back, through processes that were never restarted.
    assert crowd.answered_after(run.down[-1][2], "accepted", "sold_out") > 0


def _ran(victim: str, sale: Sale, run: Run) -> None:
    """The recovery path a fault is about ran: what each victim's death leaves behind was taken up."""
    _, killed, back = next(d for d in run.down if d[0] == victim)
    if victim in ("redis", "broker", "producer"):
        # Buyers in flight heard `error`, `pending` or nothing, and asking again with the same token got
        # them a clear answer.
        assert run.crowd.retried_into(), f"no buyer was asked to retry during the {victim} outage"
    if victim == "producer":
        # Its last message was pre-deducted and never ended: the broker asked, and a checker answered it.
        # The broker asks once the message is older than its check interval: maybe after the books balanced.
        settled = poll_until(lambda: " -> commit" in sale.logs() or " -> rollback" in sale.logs(), 60)
        assert settled, "the dead producer's last message was never checked"
    if victim == "checker":
        # A producer died after a pre-deduct while the checker was down: its message was checked once the
        # checker was back (or by a producer: each answers checks too), and committed.
        assert poll_until(lambda: "key t-doomed -> commit" in sale.logs(), 60), "the doomed message was never checked"
        assert "t-doomed" in run.books.orders
    if victim == "mariadb":
        assert "not applied" in sale.children["consumer"].text(), "no batch met the database while it was down"
    if victim in ("consumer", "namesrv"):
        # The sale went on while it was down; what it sold reached MySQL once it was back.
        assert run.crowd.answered_between(killed, back, "accepted") > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("victim", SERVERS + PROCESSES)
def test_a_server_or_process_killed_mid_sale_loses_nothing_and_the_books_converge(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str, victim: str, shape: str
) -> None:
    set_stock(settings, sku, STOCK, per_user_limit=LIMIT, partitions=SHAPES[shape])
    sale = Sale(pipeline, stack_settings, settings, sku, victim)

    def doom_a_producer(victim: str) -> None:
        if victim == "checker":  # a message that needs a check while no checker runs
            doomed, url = sale.doomed
            buy(url, sku, "t-doomed", user="doomed")
            assert doomed.wait_exit(10) != 0

    run = _run(sale, [(victim, DOWN_S)], during=doom_a_producer)
    _judge(f"{victim} ({shape})", run)
    _ran(victim, sale, run)


def test_soak_several_faults_in_a_row_lose_nothing(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, STOCK, per_user_limit=LIMIT, partitions=3)
    sale = Sale(pipeline, stack_settings, settings, sku)
    faults = [("consumer", 1.0), ("broker", 2.0), ("redis", 1.0), ("checker", 1.0), ("mariadb", 2.0)]
    run = _run(sale, faults)
    _judge("soak: " + ", ".join(v for v, _ in faults), run)


def test_a_read_only_database_pauses_the_consumer_without_burning_delivery_attempts(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, STOCK, per_user_limit=LIMIT)
    sale = Sale(pipeline, stack_settings, settings, sku)
    mariadb = MariaDBService(Stack(stack_settings).layout, stack_settings)
    consumer = sale.children["consumer"]
    crowd = _crowd(sale).start()
    try:
        assert poll_until(lambda: sale.sold(KILL_AT), 60, interval_s=WATCH_S)
        mariadb._root_sql("SET GLOBAL read_only = 1")
        try:
            consumer.wait_log("receipt paused", timeout_s=30)
            time.sleep(DOWN_S)
            failed_batches = consumer.text().count("not applied")
        finally:
            mariadb._root_sql("SET GLOBAL read_only = 0")
        consumer.wait_log("resuming receipt", timeout_s=30)
        back = time.perf_counter()
        assert poll_until(lambda: sale.left() == 0, 120), f"the stock was not sold out: {sale.left()} left"
        time.sleep(AFTER_S)
    finally:
        crowd.stop()
    # One batch met the read-only server; then receipt stopped until it took writes again.
    assert failed_batches == 1, consumer.text()[-3000:]
    assert "refuses writes (read-only)" in consumer.text()
    books, converge_s = wait_balanced(settings.redis_url, settings.mysql_url, sku, CONVERGE_S)
    _judge("mariadb read-only", Run(crowd, books, converge_s, [("mariadb", back, back)]))
