"""The protocol's state machine (tests/protocol/machine.py), a bounded run in `make test`.

On the stack's Redis (one node), then on the tests' Redis Cluster with failovers to replicas that missed
the last writes. `make fuzz` runs the same machines for longer, from a seed (tests/protocol/fuzz.py).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

from flashsale.adapters.redis import stock as redis_stock
from flashsale.adapters.redis import topology as redis_topology
from flashsale.config import Settings
from flashsale.stack.settings import StackSettings
from tests.conftest import cluster_url
from tests.protocol.cluster import Failovers, Node
from tests.protocol.machine import ProtocolMachine

#: Examples and steps of the bounded run on one node (an eighth of the examples on the cluster, where
#: failovers take seconds); `make fuzz` runs the same machines for as long as it is given.
EXAMPLES = int(os.environ.get("PROTOCOL_EXAMPLES", "150"))
STEPS = int(os.environ.get("PROTOCOL_STEPS", "40"))
#: How long the cluster machine's producers and loads wait for a replica. A WAIT there must time out only
#: where the machine paused a replica: one cut short by a busy machine would change which rules come
#: next (a failed load heals the replicas), and Hypothesis could not replay or shrink the run.
WAIT_MS = 500


def run_settings(examples: int = EXAMPLES, steps: int = STEPS) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


class ClusterMachine(ProtocolMachine):
    """The machine on a Redis Cluster with a replica per master, producers waiting for a replica (WAIT)."""

    def __init__(self) -> None:
        assert self.failovers is not None
        self.failovers.restore()  # every example starts from the same topology, replicas in sync
        super().__init__()

    # Masters are named from the SKU's own: 0 holds its stock (or its layout and pool), 1 and 2 the others.
    @rule(i=st.integers(0, 2))
    def replica_lags(self, i: int) -> None:
        """The replica of a master stops applying its writes: a WAIT there finds no replica."""
        assert self.failovers is not None
        self.failovers.lag(self.home + i)

    @precondition(lambda self: self.failovers is not None and bool(self.failovers.paused))
    @rule(data=st.data())
    def failover(self, data: st.DataObject) -> None:
        """A master whose replica lags dies; the replica takes over without the writes it missed."""
        assert self.failovers is not None
        lagging = sorted((i - self.home) % 3 for i in self.failovers.lagging())
        if self.failovers.failover(self.home + data.draw(st.sampled_from(lagging))):
            self.raw.nodes_manager.initialize()  # type: ignore[union-attr]

    @rule()
    def replicas_catch_up(self) -> None:
        assert self.failovers is not None
        self.failovers.heal()


def single(redis_url: str) -> type[ProtocolMachine]:
    return type("SingleNodeMachine", (ProtocolMachine,), {"url": redis_url})


def on_cluster(cluster: StackSettings) -> type[ProtocolMachine]:
    failovers = Failovers(Node("127.0.0.1", cluster.ports.redis))
    return type(
        "OnCluster", (ClusterMachine,), {"url": cluster_url(cluster), "wait_ms": WAIT_MS, "failovers": failovers}
    )


def test_the_protocol_keeps_its_invariants_on_one_redis_node(settings: Settings) -> None:
    run_state_machine_as_test(single(settings.redis_url), settings=run_settings())


@pytest.mark.slow
def test_the_protocol_keeps_its_invariants_on_a_redis_cluster_through_failovers(
    redis_cluster: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The clients read the map again only when a reply says it moved, never on a timer: a run then
    # depends on its steps alone, so that a failing one replays the same way and can be shrunk.
    monkeypatch.setattr(redis_topology, "MAP_TTL_S", 1e9)
    monkeypatch.setattr(redis_stock, "MAP_TTL_S", 1e9)
    machine = on_cluster(redis_cluster)
    try:
        run_state_machine_as_test(machine, settings=run_settings(max(EXAMPLES // 8, 5), STEPS))
    finally:
        assert machine.failovers is not None
        machine.failovers.heal()
