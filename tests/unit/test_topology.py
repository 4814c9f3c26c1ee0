"""How many replicas a pre-deduct waits for: the pure part of adapters/redis/topology.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from flashsale.adapters.redis.topology import Replicas


@dataclass
class _Manager:
    slots_cache: dict[int, list[str]] = field(default_factory=dict)


@dataclass
class _Cluster:
    """What Replicas reads of redis-py's cluster client: its map of slots to [master, replica...]."""

    nodes_manager: _Manager

    @staticmethod
    def keyslot(key: str) -> int:
        return int(key)


def test_a_replica_the_map_leaves_out_for_a_while_is_still_waited_for() -> None:
    client = _Cluster(_Manager({1: ["m1", "r1"], 2: ["m2", "r2"]}))
    replicas = Replicas()
    replicas.read(client)
    # A failover: slot 2's replica took over, and the old master is not listed yet (it has no offset to
    # report until it has caught up). Waiting for no replica then would promise what no replica holds.
    client.nodes_manager.slots_cache = {1: ["m1", "r1"], 2: ["r2"]}
    assert (replicas.of(client, "1"), replicas.of(client, "2")) == (1, 1)
    client.nodes_manager.slots_cache = {1: ["m1", "r1", "r1b"], 2: ["r2", "m2"]}
    assert replicas.of(client, "1") == 2  # a replica that joins is waited for too


def test_a_single_node_waits_for_no_replica() -> None:
    assert Replicas().of(object(), "1") == 0
