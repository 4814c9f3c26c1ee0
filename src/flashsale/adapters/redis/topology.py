"""Which Redis a URL names, one node or a Redis Cluster, clients that route each key to its node, and
which failures mean that Redis did not answer.

The mode is read from the server (INFO cluster) the first time a client is needed, so one
FLASHSALE_REDIS_URL serves both: any node of a cluster is a seed. Nothing connects before that, so
building a client never fails; using it against a server that is down does, the usual way.

Every key of one SKU carries the SKU's hash tag, so all of a script's or a pipeline's keys live on one
node; the async router below sends them there over that node's own connection pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aredis
from redis.exceptions import AskError, ClusterError, SlotNotCoveredError, TryAgainError

from flashsale.adapters.redis.packing import packed
from flashsale.adapters.redis.wire import Wire
from flashsale.errors import ConfigError, ServiceUnavailable

#: Seconds a cluster's slot map is trusted: replicas that joined since are then seen (and waited for).
MAP_TTL_S = 5.0

#: Replies that mean "this node does not serve that slot now": nothing ran; ask the cluster again. A
#: cluster failing over answers them for a while; redis-py raises them once its own retries are spent
#: (ClusterError: CLUSTERDOWN, MASTERDOWN, and redirections that never settled, "TTL exhausted";
#: SlotNotCoveredError: no node serves the slot yet).
MISROUTED = (AskError, ClusterError, SlotNotCoveredError, TryAgainError)
#: redis-py errors that mean "the server did not answer": the outcome of a write is unknown.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def unavailable(url: str, what: str, exc: Exception, *, reached: bool = True) -> ServiceUnavailable:
    """What a caller hears when Redis did not answer `what` (`reached` False: the request never got there)."""
    return ServiceUnavailable("Redis", url, f"{what}: {exc or type(exc).__name__}", reached=reached)


def _is_cluster(info: dict[str, Any], url: str) -> bool:
    cluster = bool(info.get("cluster_enabled"))
    if cluster and (urlsplit(url).path.strip("/") or "0") != "0":
        raise ConfigError(
            f"{url} names a database other than 0, and a Redis Cluster has only database 0",
            hint="end FLASHSALE_REDIS_URL with /0",
        )
    return cluster


def sync_client(url: str, *, timeout_s: float, max_connections: int) -> redis.Redis | redis.RedisCluster:
    """A client for `url`, single node or cluster as the server says (raises UNREACHABLE if it is down)."""
    probe = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        cluster = _is_cluster(probe.info("cluster"), url)
    finally:
        probe.close()
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "max_connections": max_connections,
        "decode_responses": True,
    }
    if cluster:
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, health_check_interval=30, **options)


class Replicas:
    """How many replicas to wait for on the master of a key: the most its slot has ever had in the cluster's
    map, as this client read it.

    The map can leave a replica out for a while: after a failover, the old master that comes back as the
    new one's replica is listed only once it reports an offset, and a redirect rewrites a slot's entry
    with its master alone. Waiting for fewer replicas then would tell a buyer `accepted` for a
    pre-deduct no replica holds. So the count never goes down: with a replica missing, `WAIT` finds
    fewer than it wants, and the answer is `pending` until the replica is back. (A process started after
    replicas were removed for good waits for the ones left.)
    """

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def read(self, client: Any) -> None:
        """Learn every slot's replicas from the client's map (after the map was read)."""
        for slot, nodes in _slots(client).items():
            self._seen[slot] = max(self._seen.get(slot, 0), len(nodes) - 1)

    def of(self, client: Any, key: str) -> int:
        """Replicas to wait for on the master of `key` (0 for a single node)."""
        cache = _slots(client)
        if not cache:
            return 0
        slot = client.keyslot(key)
        seen = max(self._seen.get(slot, 0), len(cache.get(slot, ())) - 1)
        self._seen[slot] = seen
        return seen


def _slots(client: Any) -> dict[int, list[Any]]:
    return getattr(getattr(client, "nodes_manager", None), "slots_cache", None) or {}


def masters(client: redis.Redis | redis.RedisCluster) -> tuple[list[str], Callable[[int], str]]:
    """The masters' names, and the master of a slot (one unnamed master for a single node)."""
    if not isinstance(client, redis.RedisCluster):
        return [""], lambda slot: ""
    manager = client.nodes_manager
    primaries = client.get_primaries()  # type: ignore[no-untyped-call]
    return sorted(n.name for n in primaries), lambda slot: str(manager.get_node_from_slot(slot).name)


def sync_node(client: redis.Redis | redis.RedisCluster, key: str) -> redis.Redis:
    """A client on the one node that serves `key`: its pipelines use one connection, as WAIT needs."""
    if isinstance(client, redis.RedisCluster):
        return client.get_redis_connection(client.get_node_from_key(key))  # type: ignore[no-untyped-call]
    return client


class AsyncRouter:
    """Per-node blocking connection pools: `pool(key)` is the pool of the node that serves the key's slot.

    A single node has one pool. In a cluster, redis-py's cluster client keeps the slot map; after a
    misrouted reply or a node that does not answer, `stale()` makes the next call read the map again
    (a replica that took over a dead master's slots is found that way).
    """

    def __init__(self, url: str, *, timeout_s: float, max_connections: int) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._options: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": timeout_s,  # longest wait for a free connection
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "decode_responses": True,
        }
        self._resolved = False
        self._cluster: aredis.RedisCluster | None = None
        #: node name ("" for a single node) -> its pool and a client on that pool
        self._nodes: dict[str, tuple[aredis.BlockingConnectionPool, aredis.Redis]] = {}
        self._stale = False
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._replicas = Replicas()
        #: node name -> a pipelined connection to it (wire.py); None where the URL's scheme has none
        self._wires: dict[str, Wire | None] = {}

    async def _resolve(self) -> None:
        async with self._lock:
            if self._resolved:
                return
            pool = aredis.BlockingConnectionPool.from_url(self.url, **self._options)
            pool.connection_class = packed(pool.connection_class)  # no connection is made before this
            probe = aredis.Redis(connection_pool=pool)
            try:
                cluster = _is_cluster(await probe.info("cluster"), self.url)
            except BaseException:
                await pool.disconnect()
                raise
            if cluster:
                await pool.disconnect()
                self._cluster = aredis.RedisCluster.from_url(
                    self.url,
                    socket_timeout=self._timeout_s,
                    socket_connect_timeout=self._timeout_s,
                    decode_responses=True,
                )
                await self._cluster.initialize()
                self._replicas.read(self._cluster)
                self._read_at = time.monotonic()
            else:
                self._nodes[""] = (pool, probe)
            self._resolved = True

    async def _where(self, key: str) -> Any:
        """The cluster node that serves `key` now (None for a single node)."""
        if not self._resolved:
            await self._resolve()
        if self._cluster is None:
            return None
        if self._stale or time.monotonic() - self._read_at > MAP_TTL_S:
            async with self._lock:
                if self._stale or time.monotonic() - self._read_at > MAP_TTL_S:
                    self._read_at = time.monotonic()
                    try:
                        await self._cluster.nodes_manager.initialize()
                    except redis.exceptions.RedisClusterException as exc:
                        # Mid-failover ("All slots are not covered"): Redis not serving now, as below, and the
                        # map is read again at the next call.
                        self._stale = True
                        raise redis.ConnectionError(f"the Redis Cluster's map cannot be read now: {exc}") from exc
                    self._replicas.read(self._cluster)
                    self._stale = False
        node = self._cluster.get_node_from_key(key)
        if node is None:  # the slot has no master now (it died, no replica took over yet)
            self._stale = True
            raise redis.ConnectionError(f"no Redis Cluster node serves the slot of {key} now")
        return node

    async def _node(self, key: str) -> tuple[aredis.BlockingConnectionPool, aredis.Redis]:
        node = await self._where(key)
        if node is None:
            return self._nodes[""]
        if node.name not in self._nodes:
            pool = aredis.BlockingConnectionPool(
                host=node.host, port=node.port, connection_class=packed(aredis.Connection), **self._options
            )
            self._nodes[node.name] = (pool, aredis.Redis(connection_pool=pool))
        return self._nodes[node.name]

    async def wire(self, key: str) -> Wire | None:
        """The pipelined connection to the node of `key` (wire.py); None where the URL's scheme has none
        (TLS, a Unix socket): the caller then uses `client(key)`."""
        node = await self._where(key)
        name = "" if node is None else str(node.name)
        if name not in self._wires:
            wire = Wire.from_url(self.url, timeout_s=self._timeout_s)
            self._wires[name] = wire.at(node.host, node.port) if wire is not None and node is not None else wire
        return self._wires[name]

    async def pool(self, key: str) -> aredis.BlockingConnectionPool:
        return (await self._node(key))[0]

    async def client(self, key: str) -> aredis.Redis:
        """A plain client on the node of `key` (for reads and pipelines of one SKU)."""
        return (await self._node(key))[1]

    def replicas(self, key: str) -> int:
        """Replicas to wait for on the master of `key` (see Replicas; 0 for a single node)."""
        return self._replicas.of(self._cluster, key) if self._cluster is not None else 0

    def stale(self) -> None:
        self._stale = self._cluster is not None

    async def close(self) -> None:
        for wire in self._wires.values():
            if wire is not None:
                wire.close()
        for pool, _ in self._nodes.values():
            await pool.disconnect()
        if self._cluster is not None:
            await self._cluster.aclose()
