"""Redis of the local stack: one node, or a Redis Cluster of masters and replicas on consecutive ports.

A cluster of M masters with R replicas each is M*(1+R) nodes on REDIS_PORT, REDIS_PORT+1, ...; each
node's cluster bus is its port + 10000. `redis-cli --cluster create` assigns the slots and the replicas
once, when every node is new; after that each node's nodes.conf remembers the cluster, so a node
restarted after a crash rejoins by itself (a dead master's replica has taken over by then).
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from flashsale.errors import StackError
from flashsale.polling import poll_until
from flashsale.stack import install
from flashsale.stack.layout import StackLayout
from flashsale.stack.service import HOST, Service
from flashsale.stack.settings import StackSettings

#: A Redis Cluster node's bus port is its client port plus this (Redis's fixed rule).
BUS_OFFSET = 10000
#: How long a master may be silent before its replica takes over: short, so a failover takes seconds.
NODE_TIMEOUT_MS = 3000
#: Seconds `up` waits for a newly created cluster to agree on its slots.
FORM_TIMEOUT_S = 60.0


class RedisNode(Service):
    ready_timeout_s = 30.0

    def __init__(self, layout: StackLayout, settings: StackSettings, index: int = 0) -> None:
        self.index = index
        self.cluster = settings.topology.redis_cluster
        self.name = f"redis-{index}" if self.cluster else "redis"
        super().__init__(layout, settings)

    @property
    def port(self) -> int:
        return self.settings.ports.redis + self.index

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, self.port + BUS_OFFSET) if self.cluster else (self.port,)

    def prepare(self) -> None:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            f"bind {HOST}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {data}",
            # Deductions must survive a restart: append-only file, fsync every second.
            "appendonly yes",
            "appendfsync everysec",
            # A sale logs every purchase, so under load the file grows by megabytes a second, and each
            # rewrite forks the server and copies its data. With rewrites only past 1 GB (and doubled),
            # they run after a sale rather than during it; `BGREWRITEAOF` compacts the file at once.
            "auto-aof-rewrite-min-size 1gb",
            'save ""',
            "maxmemory-policy noeviction",
            "loglevel notice",
            f"logfile {self.log_file}",
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {NODE_TIMEOUT_MS}",
                # A dead master without a replica stops only its own slots, not every SKU of the cluster.
                "cluster-require-full-coverage no",
                # A replica may always take over: pre-deducts are acknowledged by it (WAIT) before buyers hear.
                "cluster-replica-validity-factor 0",
                # A new replica's first copy starts at once, not after the default 5 s wait for others.
                "repl-diskless-sync-delay 0",
            ]
        (self.dir / "redis.conf").write_text("\n".join([*lines, ""]))

    def command(self) -> list[str]:
        return [install.program("redis-server"), str(self.dir / "redis.conf")]

    def info(self, *sections: str) -> dict[str, str]:
        """INFO sections as text fields (the stack's own probe, independent of the product's client)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One try: the client's own retries (three, with back-off) made a node that does not answer take
        # 26 s to report instead of 2.
        client = redis.Redis(
            host=HOST, port=self.port, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        try:
            fields: dict[str, str] = {}
            for section in sections:
                fields.update({k: str(v) for k, v in client.info(section).items()})
            if self.cluster:
                fields.update(client.cluster("info"))
            return fields
        except redis.RedisError as exc:
            raise StackError(f"{self.name} does not answer: {exc}") from exc
        finally:
            client.close()

    def check(self) -> str:
        fields = self.info("server", "replication")
        note = f"redis {fields.get('redis_version')}"
        if not self.cluster:
            return note
        if fields.get("cluster_state") != "ok":
            raise StackError(f"{self.name}: cluster state is {fields.get('cluster_state')}, not ok")
        known, expected = int(fields.get("cluster_known_nodes", 0)), self.settings.topology.redis_nodes
        if known != expected:  # gossip still spreading: a failover now could not count every vote
            raise StackError(f"{self.name}: knows {known} of the cluster's {expected} nodes so far")
        if fields.get("role") == "slave":
            master = f"{fields.get('master_host')}:{fields.get('master_port')}"
            if fields.get("master_link_status") != "up":  # not a copy yet: its master's failover would lose data
                raise StackError(f"{self.name}: replica of {master}, not in sync yet")
            return f"{note}, replica of {master}"
        return f"{note}, master ({fields.get('cluster_known_nodes')} nodes)"


def nodes(layout: StackLayout, settings: StackSettings) -> list[RedisNode]:
    return [RedisNode(layout, settings, i) for i in range(settings.topology.redis_nodes)]


def form_cluster(members: Sequence[RedisNode], replicas: int) -> bool:
    """Create the cluster if every node is new; returns whether it did. Refuses a cluster of another shape."""
    states = [node.info() for node in members]  # CLUSTER INFO of each
    known = [int(s.get("cluster_known_nodes", 0)) for s in states]
    if all(k == len(members) for k in known):
        return False
    if any(k != 1 or int(s.get("cluster_slots_assigned", 0)) for k, s in zip(known, states, strict=True)):
        raise StackError(
            f"the Redis nodes on ports {members[0].port}-{members[-1].port} belong to a cluster of another "
            f"shape (they know {sorted(set(known))} nodes, not {len(members)})",
            hint="start it with the REDIS_MASTERS and REDIS_REPLICAS it was created with, or stop it and remove "
            "the redis-* folders under FLASHSALE_HOME to create a new one (its data is lost)",
        )
    result = subprocess.run(
        [
            install.program("redis-cli"),
            "--cluster",
            "create",
            *(node.address for node in members),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise StackError(f"redis-cli --cluster create failed:\n{tail}")

    def agreed() -> bool:
        states = [node.info() for node in members]
        return all(
            s.get("cluster_state") == "ok" and int(s.get("cluster_known_nodes", 0)) == len(members) for s in states
        )

    if not poll_until(agreed, FORM_TIMEOUT_S, interval_s=0.2):
        raise StackError(
            f"the new Redis Cluster did not reach state ok, every node knowing the others, "
            f"within {FORM_TIMEOUT_S:.0f} s"
        )
    return True
