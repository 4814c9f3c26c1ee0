"""The whole pipeline on a real Redis Cluster (3 masters, a replica each), created by `flashsale stack up`.

The module's `settings` are the session's, with Redis on the tests' own cluster, so the tests imported
at the bottom run here a second time, unchanged, against the cluster: the same assertions hold there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.stack import procs
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.acceptance.crowd import Crowd
from tests.acceptance.harness import Pipeline, post
from tests.acceptance.test_operations import reconcile_json
from tests.conftest import CLUSTER_ENV, clean_environment, cluster_url
from tests.oracle import balanced, now, redis_client
from tests.protocol.cluster import Failovers, Node

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(settings: Settings, redis_cluster: StackSettings) -> Settings:
    """The session's namespace and database, with Redis on the cluster."""
    return settings.with_overrides(redis_url=cluster_url(redis_cluster))


def _nodes(cluster: StackSettings) -> dict[int, dict[str, object]]:
    """Each node's INFO replication and CLUSTER INFO, by port, read with plain redis-py."""
    found = {}
    for i in range(cluster.topology.redis_nodes):
        port = cluster.ports.redis + i
        client = redis.Redis(port=port, decode_responses=True)
        try:
            found[port] = {**client.info("replication"), **client.cluster("info")}
        finally:
            client.close()
    return found


def _cli(cluster: StackSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**clean_environment(), **CLUSTER_ENV, "FLASHSALE_HOME": str(cluster.home)}
    return subprocess.run(
        [sys.executable, "-m", "flashsale", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_stack_up_makes_three_masters_with_a_replica_each_that_serve_every_slot(redis_cluster: StackSettings) -> None:
    nodes = _nodes(redis_cluster)
    masters = [p for p, n in nodes.items() if n["role"] == "master"]
    replicas = {p: int(str(n["master_port"])) for p, n in nodes.items() if n["role"] == "slave"}
    assert len(masters) == 3 and len(replicas) == 3
    assert sorted(replicas.values()) == sorted(masters)  # one replica per master
    for node in nodes.values():
        assert node["cluster_state"] == "ok"
        assert int(str(node["cluster_slots_assigned"])) == 16384
        assert int(str(node["cluster_known_nodes"])) == 6

    stack = Stack(redis_cluster)
    before = {s.name: s.pid for s in stack.status(["redis"])}
    again = stack.up(["redis"])  # idempotent: the same processes, no second `--cluster create`
    assert {s.name: s.pid for s in again} == before and not any(s.started for s in again)

    status = _cli(redis_cluster, "stack", "status", "redis", "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)["services"]
    assert [r["name"] for r in rows] == [f"redis-{i}" for i in range(6)]
    assert all(r["healthy"] for r in rows)
    assert sum("replica of" in r["note"] for r in rows) == 3


def test_a_cluster_of_two_masters_is_refused_with_what_to_do_and_nothing_starts(redis_cluster: StackSettings) -> None:
    result = _cli(redis_cluster, "stack", "up", "redis", "--redis-masters", "2")
    assert result.returncode != 0
    assert "at least 3 masters" in result.stderr and "use 1 for a single node" in result.stderr
    assert len(_nodes(redis_cluster)) == 6  # the running cluster is untouched


def _sku_per_master(url: str) -> dict[int, str]:
    """One new SKU whose keys live on each master, by the master's port."""
    client = redis_client(url)
    assert isinstance(client, redis.RedisCluster)
    found: dict[int, str] = {}
    try:
        while len(found) < 3:
            sku = f"sku-{uuid.uuid4().hex[:12]}"
            node = client.get_node_from_key(f"fs:{{{sku}}}:stock")
            found.setdefault(node.port, sku)
    finally:
        client.close()
    return found


def test_a_sale_on_every_master_at_once_loses_nothing_and_every_sku_balances(
    pipeline: Pipeline, settings: Settings
) -> None:
    skus = _sku_per_master(settings.redis_url)
    for sku in skus.values():
        set_stock(settings, sku, 200, per_user_limit=3)
    url = pipeline.start_all()
    crowds = [Crowd(url, sku, buyers=8, run_id=f"c{os.getpid()}").start() for sku in skus.values()]
    time.sleep(3)
    for crowd in crowds:
        crowd.stop()

    for (port, sku), crowd in zip(skus.items(), crowds, strict=True):
        assert crowd.unclear() == []
        books = balanced(settings, sku)
        assert books.problems == [], books.problems
        assert books.against(crowd.answers, crowd.asked, crowd.users, 3) == [] and books.oversold() == 0
        assert books.sold > 0
        # The SKU's keys are on that master itself: a plain client there reads them without a redirect.
        node = redis.Redis(port=port, decode_responses=True)
        try:
            assert int(node.get(f"fs:{{{sku}}}:stock") or -1) == 200 - books.sold
        finally:
            node.close()

    code, report = reconcile_json(pipeline, *skus.values())
    assert code == 0, report
    rows = report["skus"]
    assert sorted(r["sku"] for r in rows) == sorted(skus.values()) and all(r["consistent"] for r in rows)


def _role(port: int) -> str:
    client = redis.Redis(port=port, decode_responses=True, socket_timeout=1)
    try:
        return str(client.info("replication")["role"])
    except redis.RedisError:
        return "down"
    finally:
        client.close()


def kill_master(redis_cluster: StackSettings, port: int, *, takeover: bool) -> None:
    """kill -9 the master on `port`; then its replica takes over, or it is back at once; then it runs again."""
    stack = Stack(redis_cluster)
    name = f"redis-{port - redis_cluster.ports.redis}"
    record = procs.PidRecord.load(stack.layout.pid_file(name))
    assert record is not None and procs.is_alive(record)
    replica = next(p for p, node in _nodes(redis_cluster).items() if node.get("master_port") == port)
    os.kill(record.pid, signal.SIGKILL)
    assert poll_until(lambda: not procs.is_alive(record), 10)
    if takeover:  # the replica notices (node timeout), is elected, and serves the slots
        assert poll_until(lambda: _role(replica) == "master", 60), "the replica never took over"
    else:  # back before the cluster could mark it failed: the master reloads its append-only file
        time.sleep(0.5)
    stack.up([name])  # a master that lost its slots comes back as the new master's replica


@pytest.mark.parametrize("takeover", [True, False], ids=["replica-takes-over", "master-restarts"])
def test_a_master_killed_mid_sale_loses_nothing_and_oversells_nothing(
    pipeline: Pipeline, settings: Settings, redis_cluster: StackSettings, takeover: bool
) -> None:
    skus = _sku_per_master(settings.redis_url)
    masters = sorted(p for p in skus if _role(p) == "master")
    victim_port, bystander_port = masters[0], masters[1]
    victim, bystander = skus[victim_port], skus[bystander_port]
    for sku in (victim, bystander):
        set_stock(settings, sku, 400)
    url = pipeline.start_all()
    # Buyers who pause between purchases make the stock last several seconds: the kill comes mid-sale.
    crowds = {
        sku: Crowd(url, sku, buyers=8, run_id=f"f{os.getpid()}", pause_s=0.05).start() for sku in (victim, bystander)
    }
    assert poll_until(lambda: crowds[victim].counts()["accepted"] >= 30, 30)

    kill_master(redis_cluster, victim_port, takeover=takeover)
    back = time.perf_counter()
    for crowd in crowds.values():  # both SKUs sell on once the victim is back
        assert poll_until(lambda c=crowd: c.answered_after(back, "accepted", "sold_out") >= 10, 60), (
            "the sale did not go on"
        )
    for crowd in crowds.values():
        crowd.stop()

    assert _role(victim_port) == ("slave" if takeover else "master")
    for sku, crowd in crowds.items():
        assert crowd.unclear() == []
        books = balanced(settings, sku, 120)
        assert books.problems == [], books.problems
        assert books.against(crowd.answers, crowd.asked, crowd.users) == [] and books.oversold() == 0
        assert books.sold > 0


def test_a_retry_hears_duplicate_only_once_a_replica_holds_the_purchase(
    pipeline: Pipeline, settings: Settings, redis_cluster: StackSettings
) -> None:
    """A buyer told `pending` (no replica acknowledged the pre-deduct) asks again: while no replica holds
    the purchase the answer stays `pending`, for the master may fail over without it. It does: the
    checker fences the message, and the buyer's next retry is a new purchase, accepted. Told yes, one
    order; never told yes with none."""
    sku = next(iter(_sku_per_master(settings.redis_url).values()))
    set_stock(settings, sku, 10)
    failovers = Failovers(Node("127.0.0.1", redis_cluster.ports.redis))
    home = next(i for i, port in enumerate(failovers.masters()) if port == _master_of(settings.redis_url, sku))
    url = pipeline.start_all()
    said: list[str] = []

    def ask() -> str:
        _, body = post(url, {"sku": sku, "user_id": "u1", "qty": 2, "token": "t-lag"})
        said.append(str(body["status"]))
        return said[-1]

    failovers.lag(home)
    try:
        assert ask() == "pending"
        assert ask() == "pending"  # the master holds the entry, no replica does: not `duplicate`
        assert failovers.failover(home)  # the replica takes over without it
    finally:
        failovers.heal()
    assert poll_until(lambda: ask() not in ("pending", "error"), 90, interval_s=0.5)
    assert said[-1] == "accepted", said
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.against({"t-lag": said}, {"t-lag": {2}}, {"t-lag": "u1"}) == []
    assert (books.order_rows["t-lag"], books.redis_stock) == (("u1", 2), 8)
    # The first attempt's message, which the new master never saw, was fenced and rolled back.
    assert poll_until(lambda: now(settings, sku).redis_fenced == 1, 60)


def _master_of(url: str, sku: str) -> int:
    client = redis_client(url)
    assert isinstance(client, redis.RedisCluster)
    try:
        return int(client.get_node_from_key(f"fs:{{{sku}}}:stock").port)
    finally:
        client.close()


# The same tests as on a single node, run again here on the cluster (they take this module's `settings`).
from tests.acceptance.test_crashes import (  # noqa: E402
    test_producer_killed_after_the_half_message_is_rolled_back_and_its_message_fenced,
    test_producer_killed_after_the_prededuct_is_committed_by_the_checker,
)
from tests.acceptance.test_flash_sale import (  # noqa: E402
    test_a_flash_sale_sells_exactly_the_stock_and_the_books_balance,
    test_a_retry_after_the_sell_out_gets_duplicate_with_the_original_message_id,
)
from tests.acceptance.test_groups import (  # noqa: E402
    test_one_transaction_carries_the_crowd_and_mysql_gets_exactly_what_its_pre_deduct_accepted,
)
from tests.acceptance.test_operations import (  # noqa: E402
    test_reconcile_reports_hand_made_drift_and_replay_and_repair_fix_it,
    test_repair_puts_back_a_deduction_redis_lost_entirely,
)

__all__ = [
    "test_a_flash_sale_sells_exactly_the_stock_and_the_books_balance",
    "test_a_retry_after_the_sell_out_gets_duplicate_with_the_original_message_id",
    "test_one_transaction_carries_the_crowd_and_mysql_gets_exactly_what_its_pre_deduct_accepted",
    "test_producer_killed_after_the_half_message_is_rolled_back_and_its_message_fenced",
    "test_producer_killed_after_the_prededuct_is_committed_by_the_checker",
    "test_reconcile_reports_hand_made_drift_and_replay_and_repair_fix_it",
    "test_repair_puts_back_a_deduction_redis_lost_entirely",
]
