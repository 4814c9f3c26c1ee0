"""Failovers on the tests' Redis Cluster to a replica that missed the last writes.

A replica paused for writes (`CLIENT PAUSE ... WRITE`: its link to the master is paused too) stops
applying the master's stream, so a `WAIT` after any later write finds no replica. `CLUSTER FAILOVER
TAKEOVER` then makes it the master with what it had: the writes it missed are gone, and the old master
comes back as its replica, with a full copy of the new master's data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis


@dataclass
class Node:
    host: str
    port: int

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, decode_responses=True, socket_timeout=10)


@dataclass
class Failovers:
    seed: Node
    paused: dict[int, Node] = field(default_factory=dict)  # master port -> its paused replica
    #: The master of each slot range when the run began: each example starts from that topology again,
    #: so that a step does the same thing whatever the examples before it did.
    original: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._wait_in_sync()  # a cluster just made may still be joining its replicas
        self.original = {ranges[0]: port for port, (_, _, ranges) in self._topology().items()}

    def restore(self) -> None:
        """Every replica in sync, and every slot range served by its first master again."""
        self.heal()
        for first_range, port in self.original.items():
            current = next(p for p, (_, _, ranges) in self._topology().items() if ranges[0] == first_range)
            if current != port:
                original = Node(self.seed.host, port)
                with original.client() as c:  # in sync: nothing is lost; no vote, so no wait between failovers
                    c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
                self._wait_converged(original, Node(self.seed.host, current))

    def home(self, i: int) -> tuple[int, int]:
        """The slot range of the i-th master."""
        return sorted(self.original)[i % 3]

    def _topology(self) -> dict[int, tuple[Node, Node | None, list[tuple[int, int]]]]:
        """Master port -> (master, its replica, its slot ranges)."""
        with self.seed.client() as c:
            shards = c.execute_command("CLUSTER", "SHARDS")
        out = {}
        for shard in shards:
            shard = dict(zip(shard[::2], shard[1::2], strict=True)) if isinstance(shard, list) else shard
            nodes = [dict(zip(n[::2], n[1::2], strict=True)) if isinstance(n, list) else n for n in shard["nodes"]]
            master = next((n for n in nodes if n["role"] == "master" and n["health"] == "online"), None)
            if master is None or not shard["slots"]:
                continue  # no master serves it now, or a node that is no master of any slot (yet)
            replica = next((n for n in nodes if n["role"] == "replica"), None)
            slots = shard["slots"]
            ranges = [(int(slots[i]), int(slots[i + 1])) for i in range(0, len(slots), 2)]
            out[int(master["port"])] = (
                Node(master["ip"], int(master["port"])),
                Node(replica["ip"], int(replica["port"])) if replica else None,
                ranges,
            )
        return out

    def masters(self) -> list[int]:
        """The masters' ports, in the order of their slots (a shard keeps its place through failovers)."""
        topology = self._topology()
        return sorted(topology, key=lambda port: topology[port][2][0])

    def lag(self, i: int) -> None:
        """The replica of the i-th master stops applying writes."""
        port = self.masters()[i % 3]
        if port in self.paused:
            return
        _, replica, _ = self._topology()[port]
        assert replica is not None, f"the master on {port} has no replica"
        with replica.client() as c:
            c.execute_command("CLIENT", "PAUSE", 3_600_000, "WRITE")
        self.paused[port] = replica

    def lagging(self) -> list[int]:
        """The masters whose replica lags, by their place in `masters()`."""
        return [i for i, port in enumerate(self.masters()) if port in self.paused]

    def failover(self, i: int) -> bool:
        """The paused replica of the i-th master takes over with what it has; False when none is paused."""
        port = self.masters()[i % 3]
        replica = self.paused.pop(port, None)
        if replica is None:
            return False
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
            c.execute_command("CLIENT", "UNPAUSE")
        self._wait_converged(replica, Node(replica.host, port))
        return True

    def heal(self) -> None:
        """Every paused replica catches up."""
        self.paused.clear()
        for master, replica, _ in self._topology().values():
            for node in (master, replica):
                if node is not None:
                    with node.client() as c:
                        c.execute_command("CLIENT", "UNPAUSE")
        self._wait_in_sync()

    def _wait_converged(self, new_master: Node, old_master: Node) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with new_master.client() as n, old_master.client() as o:
                    info_n, info_o = n.info("replication"), o.info("replication")
                    if (
                        info_n["role"] == "master"
                        and info_o["role"] == "slave"
                        and info_o.get("master_port") == new_master.port
                        and info_o.get("master_link_status") == "up"
                        and info_o.get("master_sync_in_progress") == 0
                        and info_o.get("slave_repl_offset") == info_n.get("master_repl_offset")
                    ):
                        self._wait_in_sync()
                        return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{old_master.port} did not come back as a replica of {new_master.port}")

    def _wait_in_sync(self) -> None:
        """Until every node sees the same masters, every master has its replica, and each replica not
        paused holds all its master wrote."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            topology = self._topology()
            if (
                len(topology) == 3
                and self._agreed(topology)
                and all(self._synced(m, r) for port, (m, r, _) in topology.items() if port not in self.paused)
            ):
                return
            time.sleep(0.05)
        raise AssertionError(f"the cluster did not settle: {self._topology()}")

    @staticmethod
    def _agreed(topology: dict[int, tuple[Node, Node | None, list[tuple[int, int]]]]) -> bool:
        """Does every node route every slot range to the master the seed names, and list its replica?"""
        masters = {ranges[0]: port for port, (_, _, ranges) in topology.items()}
        nodes = [n for m, r, _ in topology.values() for n in (m, r) if n is not None]
        for node in nodes:
            try:
                with node.client() as c:
                    slots = c.execute_command("CLUSTER", "SLOTS")
                seen = {(int(s[0]), int(s[1])): int(s[2][1]) for s in slots}
            except redis.RedisError:
                return False
            if any(seen.get(r) != port for r, port in masters.items()):
                return False
            if any(len(s) < 4 for s in slots):  # a replica the map does not list yet is one a client ignores
                return False
        return True

    @staticmethod
    def _synced(master: Node, replica: Node | None) -> bool:
        if replica is None:
            return False
        try:
            with master.client() as m, replica.client() as r:
                info_r = r.info("replication")
                return bool(
                    info_r.get("master_link_status") == "up"
                    and info_r.get("master_sync_in_progress") == 0
                    and info_r.get("slave_repl_offset") == m.info("replication").get("master_repl_offset")
                )
        except redis.RedisError:
            return False
