"""On the tests' Redis Cluster: every script whose answer a WAIT then proves writes something, run again too.

A WAIT counts the replicas that hold a connection's writes. On Redis lines where a connection's offset
moves only with a write it propagated, a script run again that writes nothing (it found its record)
would make the WAIT after it return at once and prove nothing. So each of them writes, at least a
counter: the master's replication offset moves with every run, the second as well as the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from flashsale.adapters.redis.keys import USER_HOLDS_KEY, SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.errors import NotReplicated
from flashsale.models import Purchase
from flashsale.records import Prededuct
from flashsale.stack.settings import StackSettings
from tests.conftest import cluster_url
from tests.protocol.cluster import Failovers, Node

EPOCH = 1_700_000_000_000


@pytest.fixture
def stock(redis_cluster: StackSettings) -> Iterator[RedisStock]:
    s = RedisStock(cluster_url(redis_cluster))
    yield s
    s.close()


def _offset(stock: RedisStock, key: str) -> int:
    """The replication offset of the master that serves `key`, read on that node."""
    assert isinstance(stock.client, redis.RedisCluster)
    node = stock.client.get_node_from_key(key)
    client = redis.Redis(host=node.host, port=node.port)
    try:
        return int(client.info("replication")["master_repl_offset"])
    finally:
        client.close()


def _run(stock: RedisStock, name: str, keys: list[str], args: list[object]) -> object:
    _connected = stock.client
    return stock._scripts[name](keys=keys, args=[str(a) for a in args])


def _writes_every_run(stock: RedisStock, key: str, call: Callable[[], object]) -> None:
    call()
    before = _offset(stock, key)
    call()  # run again (its reply lost, or its WAIT short): it finds its own record
    assert _offset(stock, key) > before, "a second run wrote nothing: a WAIT after it would prove nothing"


def test_every_script_a_wait_proves_writes_when_run_again(stock: RedisStock) -> None:
    sku, part = "repl-sku", "repl-hot#0"
    stock.load(sku, 5)
    keys = SkuKeys.of(sku)
    _writes_every_run(stock, keys.stock, lambda: _run(stock, "prededuct", keys.all(), ["m1", sku, "", "t1", "u1", 1]))
    _writes_every_run(
        stock, keys.tx, lambda: _run(stock, "fence", [keys.tx, keys.log, keys.meta, keys.checks], ["m1", 0, "t1"])
    )
    _writes_every_run(stock, keys.log, lambda: _run(stock, "seen", [keys.log, keys.meta], ["t1"]))
    adopt = ["t9", "u9", 1, 1_700_000_000_000, "m9", sku, "deduct", "", "", "", 0]
    _writes_every_run(stock, keys.meta, lambda: _run(stock, "adopt", keys.sale(), adopt))

    base, p = SkuKeys.of("repl-hot"), SkuKeys.of(part)
    stock.client.set(base.pool, 10)
    stock.client.hset(base.meta, mapping={"loaded_ms": EPOCH, "parts": part})
    _run(stock, "load_stock", p.load(), [2, 0, 1, 0, EPOCH])
    take = [base.pool, base.transfers, base.meta, base.done]
    _writes_every_run(stock, base.pool, lambda: _run(stock, "pool_take", take, ["x1", part, 3, EPOCH]))
    _writes_every_run(
        stock, p.meta, lambda: _run(stock, "refill_apply", [p.stock, p.meta, p.refills], ["x1", 3, EPOCH])
    )
    _writes_every_run(
        stock, base.meta, lambda: _run(stock, "refill_end", [base.transfers, base.done, base.meta], ["x1", EPOCH])
    )
    expect = [base.transfers, base.meta, base.done]
    _writes_every_run(stock, base.meta, lambda: _run(stock, "pool_expect", expect, ["d1", part, 1, EPOCH]))
    _writes_every_run(stock, p.meta, lambda: _run(stock, "drain", [p.stock, p.meta, p.refills], ["d1", 1, EPOCH]))
    receive = [base.pool, base.transfers, base.done, base.meta]
    _writes_every_run(stock, base.pool, lambda: _run(stock, "pool_receive", receive, ["d1", 1, EPOCH]))
    _writes_every_run(stock, base.meta, lambda: _run(stock, "transfers_due", [base.transfers, base.meta], [0, EPOCH]))
    pre = p.all()
    _writes_every_run(stock, p.meta, lambda: _run(stock, "prededuct", pre, ["m2", part, EPOCH, "t2", "u2", 4]))
    _writes_every_run(stock, p.meta, lambda: _run(stock, "close", [p.stock, p.meta], [EPOCH]))

    holds = USER_HOLDS_KEY.format(shard=3, sku="repl-hot", epoch=EPOCH)
    _writes_every_run(stock, holds, lambda: _run(stock, "user_hold", [holds], [2, "t3", "u3", 1, "a3"]))
    _writes_every_run(stock, holds, lambda: _run(stock, "user_release", [holds], ["t3", "u3", "a3"]))


def test_a_load_no_replica_holds_is_refused_and_holds_once_run_again(redis_cluster: StackSettings) -> None:
    """A load the master took but no replica holds would come undone in a failover (the old stock back
    on sale after MySQL took the new quantity): `stock set` hears NotReplicated and says to run it again."""
    sku = "repl-load"
    Failovers(Node("127.0.0.1", redis_cluster.ports.redis))  # a cluster just made: until it lists its replicas
    stock = RedisStock(cluster_url(redis_cluster), wait_ms=200)
    try:
        assert isinstance(stock.client, redis.RedisCluster)
        slot = stock.client.keyslot(SkuKeys.of(sku).meta)
        master, replica = stock.client.nodes_manager.slots_cache[slot][:2]
        paused = redis.Redis(host=replica.host, port=replica.port)
        paused.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")  # the replica stops applying its stream
        try:
            with pytest.raises(NotReplicated, match="no replica acknowledged"):
                stock.load(sku, 7, reset=True)
        finally:
            paused.execute_command("CLIENT", "UNPAUSE")
        stock.load(sku, 7, reset=True)  # the operator runs it again, replicas back
        with redis.Redis(host=master.host, port=master.port) as m:
            offset = int(m.info("replication")["master_repl_offset"])
        assert int(paused.info("replication")["slave_repl_offset"]) >= offset  # returned only once held
        paused.execute_command("READONLY")
        assert paused.get(SkuKeys.of(sku).stock) == b"7"
        paused.close()
    finally:
        stock.close()


def test_a_reload_cut_short_and_run_again_leaves_nothing_of_the_old_layout(redis_cluster: StackSettings) -> None:
    """A partitioned SKU loaded again on one key, cut short by NotReplicated after its first write, then
    run again: the old partitions (and the pool) must be gone. Were the SKU's own key rewritten first, the
    run again would read no layout, never drop the partitions, and a lookup would still find the old
    load's deductions there."""
    sku = "repl-reload"
    Failovers(Node("127.0.0.1", redis_cluster.ports.redis))  # a cluster just made: until it lists its replicas
    stock = RedisStock(cluster_url(redis_cluster), wait_ms=200)
    try:
        old = stock.load_partitioned(sku, 30, partitions=3, refill=5, threshold=2, reset=True)
        client = stock.client
        assert isinstance(client, redis.RedisCluster)
        before = [k for part in old.parts for k in SkuKeys.of(part).every() if client.exists(k)]
        assert before, "the partitioned load wrote no partition keys"
        slot = client.keyslot(SkuKeys.of(sku).meta)
        replica = client.nodes_manager.slots_cache[slot][1]
        with redis.Redis(host=replica.host, port=replica.port) as paused:
            paused.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
            try:
                with pytest.raises(NotReplicated):
                    stock.load(sku, 7, reset=True)
            finally:
                paused.execute_command("CLIENT", "UNPAUSE")
        stock.load(sku, 7, reset=True)  # the operator runs it again
        left = [k for part in old.parts for k in SkuKeys.of(part).every() if client.exists(k)]
        assert left == [], f"the old load's partitions survived the reload: {left}"
        keys = SkuKeys.of(sku)
        assert [k for k in (keys.pool, keys.transfers, keys.done) if client.exists(k)] == []
        assert client.get(keys.stock) == "7"  # the client decodes replies
        assert client.hget(keys.meta, "parts") is None
    finally:
        stock.close()


def test_a_log_read_for_a_replay_counts_only_once_a_replica_holds_it(redis_cluster: StackSettings) -> None:
    """`replay` reads each entry again this way before it publishes it: one only the master holds could be
    undone by a failover after MySQL applied it."""
    sku = "repl-replay"
    Failovers(Node("127.0.0.1", redis_cluster.ports.redis))
    stock = RedisStock(cluster_url(redis_cluster), wait_ms=200)
    try:
        stock.load(sku, 5, reset=True)
        assert stock.prededuct(sku, "m1", [Purchase("t1", "u1", 1)])[0].code is Prededuct.ACCEPTED
        assert isinstance(stock.client, redis.RedisCluster)
        replica = stock.client.nodes_manager.slots_cache[stock.client.keyslot(SkuKeys.of(sku).log)][1]
        paused = redis.Redis(host=replica.host, port=replica.port)
        paused.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
        try:
            with pytest.raises(NotReplicated, match="no replica acknowledged"):
                stock.held_entries(sku, ["t1", "t2"])
        finally:
            paused.execute_command("CLIENT", "UNPAUSE")
            paused.close()
        held = stock.held_entries(sku, ["t1", "t2"])
        assert held["t1"] is not None and held["t1"].state == "deducted" and held["t2"] is None
    finally:
        stock.close()
