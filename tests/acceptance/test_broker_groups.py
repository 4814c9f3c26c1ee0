"""The whole pipeline on two RocketMQ broker groups behind one gRPC proxy, started by `flashsale stack up`.

The groups are the tests' own (name server, broker-a, broker-b and the proxy on ports of their own);
Redis and MariaDB are the session's. The queues each group carries are read from the brokers
themselves over their admin protocol; the books with the plain-SQL, plain-Redis oracle.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from flashsale import constants as c
from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.config import Settings
from flashsale.ops.setup import init, set_stock
from flashsale.polling import poll_until
from flashsale.stack import procs
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.acceptance.crowd import Crowd
from tests.acceptance.harness import Pipeline
from tests.acceptance.servers import kill_all
from tests.acceptance.test_operations import reconcile_json
from tests.conftest import ROOT, clean_environment
from tests.oracle import balanced

pytestmark = pytest.mark.slow

#: The tests' own RocketMQ: two broker groups (11011 and 11021, each with port-2 and port+1) and a proxy.
GROUPS_ENV = {
    "FLASHSALE_NAMESRV_PORT": "9976",
    "FLASHSALE_BROKER_PORT": "11011",
    "FLASHSALE_PROXY_PORT": "8181",
    "FLASHSALE_PROXY_REMOTING_PORT": "8180",
    "FLASHSALE_BROKER_GROUPS": "2",
}
BROKERS = ("127.0.0.1:11011", "127.0.0.1:11021")


def _env(home: str) -> dict[str, str]:
    return {**clean_environment(), **GROUPS_ENV, "FLASHSALE_HOME": home}


@pytest.fixture(scope="module")
def broker_groups() -> Iterator[StackSettings]:
    """Name server, broker-a, broker-b and the proxy, created new for the module and stopped after it."""
    home = ROOT / ".flashsale" / "test-brokers"
    groups = StackSettings.from_env(_env(str(home)))
    stack = Stack(groups)
    stack.down()  # what an interrupted session left
    shutil.rmtree(home, ignore_errors=True)
    stack.up(["namesrv", "broker"])
    yield groups
    kill_all(stack)


@pytest.fixture(scope="module")
def settings(settings: Settings, broker_groups: StackSettings) -> Iterator[Settings]:
    """The session's namespace, database and Redis, with RocketMQ on the two groups (topics created there)."""
    clients = Settings.from_env(_env(str(broker_groups.home)))
    on_groups = settings.with_overrides(rocketmq_endpoint=clients.rocketmq_endpoint, namesrv_addr=clients.namesrv_addr)
    init(on_groups)
    yield on_groups


def _cli(groups: StackSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashsale", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(str(groups.home)),
    )


def _carried(topic: str) -> dict[str, int]:
    """Messages each broker's queues of `topic` have ever held, read from the broker itself."""
    return {
        broker: sum(rocketmq_admin.max_offset(broker, topic, q) for q in range(c.TOPIC_QUEUES)) for broker in BROKERS
    }


def test_stack_up_runs_two_broker_groups_behind_one_proxy_and_the_topics_span_both(
    broker_groups: StackSettings, settings: Settings
) -> None:
    assert rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME) == list(BROKERS)
    for broker in BROKERS:
        for topic, kind in ((settings.deduction_topic, "TRANSACTION"), (settings.replay_topic, "NORMAL")):
            info = rocketmq_admin.topic_info(broker, topic)
            assert info is not None and info.message_type == kind
            assert info.write_queues == info.read_queues == c.TOPIC_QUEUES

    status = _cli(broker_groups, "stack", "status", "namesrv", "broker", "--probe", "--json")
    assert status.returncode == 0, status.stderr
    rows = {r["name"]: r for r in json.loads(status.stdout)["services"]}
    assert list(rows) == ["namesrv", "broker-a", "broker-b", "proxy"]
    assert all(r["healthy"] for r in rows.values()), rows
    assert rows["broker-b"]["address"] == "127.0.0.1:11021"
    assert rows["proxy"]["note"].startswith("accepted a send")  # --probe: a message went through the proxy
    assert rows["namesrv"]["note"] == "2 broker(s) registered"

    stack = Stack(broker_groups)
    states = stack.status(["broker"])  # reads only
    assert next(s.note for s in states if s.name == "proxy") == "in front of 2 broker groups"
    before = {s.name: s.pid for s in states}
    again = stack.up(["broker"])  # idempotent: the same processes
    assert {s.name: s.pid for s in again} == before and not any(s.started for s in again)

    # A single broker group is another topology: refused while this one runs, nothing started or stopped.
    single = _cli(broker_groups, "stack", "up", "broker", "--broker-groups", "1")
    assert single.returncode != 0 and "of another topology run" in single.stderr
    assert {s.name: s.pid for s in stack.status(["broker"])} == before


def test_a_sale_over_two_broker_groups_loses_nothing_and_both_groups_carry_it(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 400)
    before = _carried(settings.deduction_topic)
    url = pipeline.start_all()
    crowd = Crowd(url, sku, buyers=16, run_id=f"g{os.getpid()}").start()
    time.sleep(4)
    crowd.stop()

    assert crowd.unclear() == []
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.against(crowd.answers, crowd.asked, crowd.users) == [] and books.oversold() == 0
    assert books.sold == len(crowd.told()) > 0
    # The producer takes the topic's queues in turn, broker-a's then broker-b's: 9 messages reach both.
    carried = {b: n - before[b] for b, n in _carried(settings.deduction_topic).items()}
    assert sum(carried.values()) > c.TOPIC_QUEUES, carried
    assert all(n > 0 for n in carried.values()), f"a broker group carried nothing: {carried}"

    code, report = reconcile_json(pipeline, sku)
    assert code == 0 and report["skus"][0]["consistent"], report


def _kill(groups: StackSettings, name: str) -> None:
    record = procs.PidRecord.load(Stack(groups).layout.pid_file(name))
    assert record is not None and procs.is_alive(record)
    os.kill(record.pid, signal.SIGKILL)
    assert poll_until(lambda: not procs.is_alive(record), 10)


def _books_exact(settings: Settings, sku: str, crowd: Crowd) -> None:
    assert crowd.unclear() == []
    books = balanced(settings, sku, 180)
    assert books.problems == [], books.problems
    assert books.against(crowd.answers, crowd.asked, crowd.users) == [] and books.oversold() == 0
    assert books.sold == len(crowd.told()) > 0


def test_a_broker_group_killed_mid_sale_loses_nothing_and_oversells_nothing(
    pipeline: Pipeline, settings: Settings, broker_groups: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 600)
    before = _carried(settings.deduction_topic)[BROKERS[1]]
    url = pipeline.start_all()
    # Buyers who pause between purchases make the stock last several seconds: the kill comes mid-sale.
    crowd = Crowd(url, sku, buyers=12, run_id=f"k{os.getpid()}", pause_s=0.1).start()
    assert poll_until(lambda: _carried(settings.deduction_topic)[BROKERS[1]] > before, 30)  # broker-b takes part

    _kill(broker_groups, "broker-b")
    killed = time.perf_counter()
    sold_during = poll_until(lambda: crowd.answered_after(killed, "accepted") >= 20, 30)
    assert sold_during, "nothing sold over broker-a while broker-b was down"
    Stack(broker_groups).up(["broker-b"])  # its half messages are checked again, its messages consumed again
    back = time.perf_counter()
    assert poll_until(lambda: crowd.answered_after(back, "accepted", "sold_out") >= 20, 30), "the sale did not go on"
    crowd.stop()
    _books_exact(settings, sku, crowd)


def test_the_proxy_killed_mid_sale_loses_nothing_and_the_sale_resumes_once_it_is_back(
    pipeline: Pipeline, settings: Settings, broker_groups: StackSettings, sku: str
) -> None:
    """Every group's half messages wait on their brokers; checks reach the producers again through the
    restarted proxy, and the clients reconnect to it."""
    set_stock(settings, sku, 2000)
    url = pipeline.start_all()
    crowd = Crowd(url, sku, buyers=12, run_id=f"p{os.getpid()}").start()
    assert poll_until(lambda: crowd.counts()["accepted"] >= 40, 30)

    _kill(broker_groups, "proxy")
    time.sleep(3)
    Stack(broker_groups).up(["proxy"])
    back = crowd.counts()["accepted"]
    assert poll_until(lambda: crowd.counts()["accepted"] > back + 40, 90), "the sale did not resume"
    crowd.stop()
    _books_exact(settings, sku, crowd)
