"""kill -9 of the broker, the consumer, the expirer or the producer while deadlines fire and payments arrive.

The sale of tests/acceptance/test_lifecycle_sale.py (buyers who pay, pay late, cancel or never pay, and
buy again until the sale is sold out for good) runs with the producer, consumer, checker and expirer.
Once deadlines are firing and payments are landing, one victim is killed with SIGKILL, stays down a few
seconds and is brought back as an operator would (the broker through `flashsale stack up broker`, a
process started anew). The sale goes on; orders keep being paid, cancelled and expired for a deadline
and more after it is back; then the sale must still end sold out for good, and the books read with plain
SQL and Redis must hold everything the unfaulted sale holds, and: nothing paid is expired, no unit given
back twice, every deadline fired (late by no more than the victim's outage and a received timer's
invisible time), every payer told `paid` has a paid order, and reconcile finds nothing.

On a SKU split into 3 partitions, the four victims are killed one after the other in one sale.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from flashsale import failpoints
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.stack import procs
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.acceptance import lifecycle_books
from tests.acceptance.harness import Child, Pipeline, free_port
from tests.acceptance.lifecycle_books import BY_DEADLINE, LifecycleBooks, percentile
from tests.acceptance.lifecycle_crowd import NO_ANSWER, LifecycleCrowd, Order
from tests.acceptance.servers import kill, up_again
from tests.acceptance.test_lifecycle_sale import (
    DEADLINE_MS,
    PRODUCER_ENV,
    SECRET,
    STOCK,
    Sold,
    assert_in_time,
    judge,
    sell,
    sold_on,
)

pytestmark = pytest.mark.slow


BUYERS = 200
#: A received message stays hidden this long (consumer and expirer): what a killed process held comes
#: back after it. Shorter than the default 30 s so that each test stays within its time.
INVISIBLE_S = 10
#: How long a killed process stays down (the broker: plus its own start, 15 to 55 s on 2 busy cores).
DOWN_S = 3.0
#: After the victim is back, orders keep their fates this long: deadlines fire and payments land again.
AFTER_S = DEADLINE_MS / 1000 + 3
#: Between two victims of one sale: deadlines fire and payments land with nothing down.
BETWEEN_S = DEADLINE_MS / 1000 + 1
#: Every order reaches MySQL, and stops awaiting payment, within this after the latest of its purchase
#: (or its deadline), the victim's return, and for a deadline the moment MySQL received the order (its
#: timer is sent then): what a dead process held comes back after INVISIBLE_S, timers tick by the second.
LATE_BOUND_MS = (INVISIBLE_S + 6) * 1000
#: The consumer and the expirer log this each time a receive fails (every 3 s at most while it does).
RECEIVE_FAILED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+ flashsale\.pipeline\.\w+: receive failed", re.M
)
VICTIMS = ("broker", "consumer", "expirer", "producer")
UNCLEAR = frozenset({"pending", "error", NO_ANSWER, "http_503"})


@dataclass
class Outcome:
    victim: str
    down_s: float  # from its kill until it was back (the broker: serving routes again)
    reconnect_s: float  # then until the consumer and the expirer received again
    orders: int
    expired: int
    final_s: float  # from the victim back until the sale is sold out for good
    settle_s: float  # then until MySQL holds every order as Redis does
    late_p50_ms: int
    late_p99_ms: int
    late_max_ms: int
    #: decisions whose message the checker committed (their producer died before it could)
    checked_decisions: int


RESULTS: list[Outcome] = []


class Sale:
    """The four processes of one test, the victim's kill and its return."""

    def __init__(self, pipeline: Pipeline, stack: StackSettings, settings: Settings) -> None:
        self.pipeline = pipeline
        self.stack = Stack(stack)
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.children: dict[str, Child] = {}
        for role in ("checker", "consumer", "expirer", "producer"):  # side by side: the producer waits for all
            self.start(role, wait=False)
        self.killed_ms = self.back_ms = 0
        #: (victim, killed_ms, back_ms) of each outage, in turn
        self.outages: list[tuple[str, int, int]] = []

    def start(self, role: str, *, wait: bool = True) -> None:
        if role == "producer":
            self.children[role] = self.pipeline.producer(port=self.port, **PRODUCER_ENV)[0]
            return
        hidden = {"FLASHSALE_INVISIBLE_S": str(INVISIBLE_S)} if role in ("consumer", "expirer") else {}
        self.children[role] = self.pipeline.launch(role, **hidden)
        if wait:
            self.pipeline.ready(self.children[role])

    def kill(self, victim: str) -> None:
        self.killed_ms = _now_ms()
        if victim == "broker":
            self._kill_broker()
            return
        child = self.pipeline.doomed(self.children[victim])
        child.popen.send_signal(signal.SIGKILL)
        assert child.popen.wait(10) == -signal.SIGKILL
        if victim == "consumer":
            # And a second one, killed at the worst step: its batch committed, its timers not sent, nothing
            # acked. Not waited on for readiness: it may reach its failpoint first.
            doomed = self.pipeline.doomed(
                self.pipeline.start(
                    "consumer",
                    "--metrics-port",
                    str(free_port()),
                    FLASHSALE_FAILPOINTS=failpoints.AFTER_DB_COMMIT,
                    FLASHSALE_INVISIBLE_S=str(INVISIBLE_S),
                )
            )
            assert doomed.popen.wait(30) == -signal.SIGKILL, "the doomed consumer never reached its failpoint"

    def _kill_broker(self) -> None:
        record = procs.PidRecord.load(self.stack.layout.pid_file("broker"))
        assert record is not None
        # Ours, not another stack's: its command line names this stack's home.
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert f"-Dflashsale.home={self.stack.layout.home}" in cmdline, cmdline[:300]
        kill(self.stack, "broker")

    def receiving_ms(self) -> int:
        """When the consumer and the expirer received again after the victim's kill: their clients find a
        broker back only at their next connection attempt, which gRPC spaces out while it is down."""
        failed = [
            int(datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp() * 1000)  # local time
            for role in ("consumer", "expirer")
            for at in RECEIVE_FAILED.findall(self.children[role].text())
        ]
        first_kill = self.outages[0][1] if self.outages else self.killed_ms
        after = [ms for ms in failed if ms >= first_kill]
        return max(after) + 3_000 if after else 0

    def restore(self, victim: str) -> None:
        started = time.monotonic()
        if victim == "broker":
            up_again(self.stack, "broker", self.settings)
            print(f"\nbroker: up, routes served, in {time.monotonic() - started:.1f} s")
        else:
            self.start(victim)
        self.back_ms = _now_ms()
        self.outages.append((victim, self.killed_ms, self.back_ms))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _firing(settings: Settings, sku: str) -> bool:
    """Deadlines are firing and payments landing: an order expired by its deadline, and one paid."""
    books = lifecycle_books.read(settings.redis_url, settings.mysql_url, sku)
    expired = books.orders_in("expired").values()
    return any(e.get("decision") == BY_DEADLINE for e in expired) and bool(books.orders_in("paid"))


def _checked_decisions(sale: Sale, books: LifecycleBooks) -> int:
    """Decision messages a check committed (the checker's, or a producer's: each answers checks): their
    decide.lua ran, and the producer that sent them never ended them."""
    decided_by = {e.get("decided_msg") for e in books.entries.values()} - {None}
    logs = "".join(child.text() for child in sale.pipeline.children)
    committed = re.findall(r"check message (\S+) key \S+ -> commit", logs)
    return len(decided_by & set(committed))


def _heard(orders: dict[str, Order], answer: str) -> set[str]:
    return {t for t, o in orders.items() if answer in {a for _, a in o.decisions}}


def _retried(orders: dict[str, Order]) -> int:
    """Requests that got an unclear answer (or none) and, asked again with the same id, a clear one."""
    count = 0
    for o in orders.values():
        for said in (o.purchase, [a for _, a in o.decisions]):
            count += any(a in UNCLEAR and set(said[i + 1 :]) - UNCLEAR for i, a in enumerate(said))
    return count


def _recovered(victim: str, killed_ms: int, sale: Sale, sold: Sold) -> None:
    """What the victim's death (at `killed_ms`) left behind was taken up by the path meant for it."""
    books, orders = sold.books, sold.crowd.snapshot()
    down_until = killed_ms + int(DOWN_S * 1000)
    if victim in ("broker", "producer"):
        # Buyers and payers in flight heard an error or nothing, and asking again got them a clear answer.
        assert _retried(orders) > 0, f"nobody was asked to retry while the {victim} was down"
    if victim in ("broker", "expirer"):
        # Deadlines that came due while it was down fired once it was back, none before: the broker kept
        # their timers, and nothing but the timers expired them.
        by_deadline = [e for e in books.orders_in("expired").values() if e.get("decision") == BY_DEADLINE]
        due_while_down = [e for e in by_deadline if killed_ms <= int(e["due"]) <= down_until]
        assert due_while_down, "no deadline came due during the outage"
        assert all(int(e["decided_ts"]) >= down_until for e in due_while_down)
    if victim == "expirer":
        assert "after its deadline" in sale.children["expirer"].text(), "the new expirer expired nothing"
    if victim == "consumer":
        # The sale went on while no consumer ran; what it sold reached MySQL (judge) through the new one.
        sold_meanwhile = [
            e for e in books.entries.values() if e["state"] != "fenced" and killed_ms <= int(e["ts"]) <= down_until
        ]
        assert sold_meanwhile, "nothing was sold while the consumer was down"


def _fault_sale(
    pipeline: Pipeline,
    settings: Settings,
    stack_settings: StackSettings,
    sku: str,
    victims: tuple[str, ...],
    *,
    partitions: int = 1,
) -> None:
    """The lifecycle sale, with each victim in turn killed once deadlines fire, then judged."""
    # On partitions a buyer's hold is not given back with the units: no per-user limit there (see
    # test_lifecycle_sale). Each buyer still holds one unit at a time (the crowd).
    limit = 1 if partitions == 1 else 0
    set_stock(settings, sku, STOCK, per_user_limit=limit, pay_within_ms=DEADLINE_MS, partitions=partitions)
    sale = Sale(pipeline, stack_settings, settings)
    run_id = f"f{os.getpid()}{''.join(v[:2] for v in victims)}{partitions}"
    # One victim after another makes a long sale: few orders paid keep units coming back to the end.
    crowd = LifecycleCrowd(sale.url, sku, SECRET, DEADLINE_MS, buyers=BUYERS, run_id=run_id)
    if len(victims) > 1:
        crowd.never, crowd.late, crowd.cancel = 0.6, 0.15, 0.15

    def faults() -> None:
        assert poll_until(lambda: _firing(settings, sku), 30), "no deadline fired, or nothing was paid"
        for n, victim in enumerate(victims):
            if victim == "producer":  # with payments and cancels in its hands
                assert poll_until(lambda: crowd.deciding() >= 1, 30, interval_s=0.01), "no decision in flight"
            sale.kill(victim)
            time.sleep(DOWN_S)
            sale.restore(victim)
            # Between two outages, a deadline's worth of orders meet their fates with nothing down.
            time.sleep(AFTER_S if n == len(victims) - 1 else BETWEEN_S)

    sold = sell(settings, sku, crowd, fates_s=0, during=faults)
    books, orders = sold.books, sold.crowd.snapshot()
    lateness = books.expiry_lateness_ms()
    RESULTS.append(
        Outcome(
            ", ".join(victims) + (f" ({partitions} partitions)" if partitions > 1 else ""),
            round(sum(back - killed for _, killed, back in sale.outages) / 1000, 1),
            round(max(0, sale.receiving_ms() - sale.back_ms) / 1000, 1),
            len(books.orders),
            len(books.orders_in("expired")),
            round((sold.final_ms - sale.back_ms) / 1000, 1),
            round(sold.settle_s, 1),
            percentile(lateness, 0.5),
            percentile(lateness, 0.99),
            lateness[-1] if lateness else -1,
            _checked_decisions(sale, books),
        )
    )
    judge(settings, sku, sold)
    if partitions > 1:
        assert len(sold_on(settings, books.meta["parts"].split())) > 1, "one partition sold everything"
    # Nothing paid is expired: each payer told `paid` holds a paid order, in Redis and in MySQL.
    paid = _heard(orders, "paid")
    assert paid and all(books.entries[t]["order"] == "paid" and books.orders[t].status == "paid" for t in paid)
    for victim, killed_ms, _ in sale.outages:
        _recovered(victim, killed_ms, sale, sold)
    assert_in_time(books, max(sale.back_ms, sale.receiving_ms()), LATE_BOUND_MS)


@pytest.mark.parametrize("victim", VICTIMS)
def test_a_process_or_the_broker_killed_while_deadlines_fire_loses_nothing_and_gives_nothing_back_twice(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str, victim: str
) -> None:
    _fault_sale(pipeline, settings, stack_settings, sku, (victim,))


def test_on_partitions_each_process_and_the_broker_killed_in_turn_lose_nothing_and_give_nothing_back_twice(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    """The same kills, one after the other in one sale, of a SKU split into 3 partitions: units given back
    go to the pool and partitions, and the books of every partition must hold."""
    _fault_sale(pipeline, settings, stack_settings, sku, VICTIMS, partitions=3)
