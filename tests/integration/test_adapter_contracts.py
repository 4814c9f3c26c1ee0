"""The failures the unit tests fake, produced for real: each adapter against a real server, or none at all."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from unittest import mock

import pytest
import redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis import lua
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.adapters.rocketmq import base as rocketmq_base
from flashsale.adapters.rocketmq.consumer import RocketMQConsumer
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.bench.fleet import free_port
from flashsale.config import Settings
from flashsale.errors import BusError, ServiceUnavailable, StoreError
from flashsale.models import Deduction, DeductionMessage, Delivery, Purchase, Resolution
from flashsale.pipeline.consumer import DeductionConsumer
from flashsale.polling import poll_until
from flashsale.records import Incoming, Prededuct
from tests.oracle import mysql_connection
from tests.unit.fakes import FakeLog

#: Lua that keeps the (single-threaded) server busy for about this long, so that calls behind it time out.
BUSY_S = 1.5
_BUSY = """
local t = redis.call('TIME')
local start = tonumber(t[1]) + tonumber(t[2]) / 1e6
repeat
  t = redis.call('TIME')
until tonumber(t[1]) + tonumber(t[2]) / 1e6 - start > tonumber(ARGV[1])
return 1
"""


def until_busy(redis_url: str) -> None:
    """Return once the server stops answering: the busy script, sent by another thread, is running."""
    probe = redis.Redis.from_url(redis_url, socket_timeout=0.2)

    def busy() -> bool:
        try:
            probe.ping()
        except redis.TimeoutError:
            return True
        return False

    try:
        assert poll_until(busy, 10, interval_s=0.01), "the busy script never ran"
    finally:
        probe.close()


def test_a_prededuct_against_an_unreachable_redis_certainly_did_not_run() -> None:
    stock = AsyncRedisStock(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)

    async def attempt() -> ServiceUnavailable:
        try:
            await stock.prededuct("sku", "m1", [Purchase("t1", "u1", 1)])
        except ServiceUnavailable as exc:
            return exc
        finally:
            await stock.close()
        raise AssertionError("no error from a Redis that is not there")

    error = asyncio.run(attempt())
    assert error.reached is False and "not sent" in str(error)


def _while_redis_is_busy(settings: Settings, sku: str, *, warm: bool) -> ServiceUnavailable:
    """A pre-deduct of t1 (2 units, message m1) sent while the server runs a long script."""
    stock = AsyncRedisStock(settings.redis_url, timeout_s=0.3)
    blocker = redis.Redis.from_url(settings.redis_url)
    busy = threading.Thread(target=lambda: blocker.eval(_BUSY, 0, str(BUSY_S)))

    async def attempt() -> ServiceUnavailable:
        try:
            if warm:
                await stock.ping()  # a pooled connection, ready: the script itself is what gets sent
                blocker.script_load(lua.source("prededuct"))  # and cached, so it runs once the server is free
            busy.start()
            await asyncio.to_thread(until_busy, settings.redis_url)  # all else queues behind the script now
            await stock.prededuct(sku, "m1", [Purchase("t1", "u1", 2)])
        except ServiceUnavailable as exc:
            return exc
        finally:
            await stock.close()
        raise AssertionError("the pre-deduct answered although Redis was busy")

    try:
        return asyncio.run(attempt())
    finally:
        busy.join()
        blocker.close()


def test_a_prededuct_on_a_new_connection_to_a_busy_redis_certainly_did_not_run(
    redis_stock: RedisStock, settings: Settings, sku: str
) -> None:
    redis_stock.load(sku, 5)
    error = _while_redis_is_busy(settings, sku, warm=False)
    # The connection's own handshake timed out: the script was never sent.
    assert error.reached is False
    assert redis_stock.log_entry(sku, "t1") is None and redis_stock.view(sku).stock == 5


def test_a_prededuct_that_times_out_mid_script_may_have_run_and_ran_exactly_once(
    redis_stock: RedisStock, settings: Settings, sku: str
) -> None:
    redis_stock.load(sku, 5)
    error = _while_redis_is_busy(settings, sku, warm=True)
    assert error.reached is True
    # Both sends (the first and the retry) ran once the server was free: one deduction, not two.
    entry = redis_stock.log_entry(sku, "t1")
    assert entry is not None and entry.message_id == "m1"
    view = redis_stock.view(sku)
    assert (view.stock, view.deducted_count) == (3, 1)
    again = redis_stock.prededuct(sku, "m1", [Purchase("t1", "u1", 2)])
    assert [r.code for r in again] == [Prededuct.ACCEPTED]
    assert redis_stock.view(sku).deducted_count == 1


def test_the_checker_side_of_redis_reports_an_unreachable_server() -> None:
    stock = RedisStock(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(ServiceUnavailable):
        stock.check("sku", "m1", ["t1"], grace_ms=1000)
    stock.close()


def test_an_unreachable_broker_fails_startup_and_sends_with_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing ever answers here: waiting 2 s for the proxy's settings, not 10, tells the same.
    monkeypatch.setattr(rocketmq_base, "SETTINGS_TIMEOUT_S", 2.0)
    endpoint = f"127.0.0.1:{free_port()}"
    producer = RocketMQProducer(endpoint, ["nowhere"], lambda _: Resolution.UNKNOWN)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=endpoint):
        producer.start()
    consumer = RocketMQConsumer(endpoint, "g", ["nowhere"], poll_wait_s=1, invisible_s=10)
    with pytest.raises(ServiceUnavailable, match=endpoint):
        consumer.start()
    assert time.monotonic() - started < 60

    # A half message to a broker that never answered: a BusError, never a hang.
    sender = RocketMQProducer(endpoint, ["nowhere"], lambda _: Resolution.UNKNOWN, request_timeout_s=1)
    loop = sender.loop
    body = DeductionMessage("sku", (Purchase("t1", "u1", 1),), "m1").encode()
    with pytest.raises(BusError):
        asyncio.run_coroutine_threadsafe(sender.send_half_async("nowhere", "t1", body, "d", "m1"), loop).result(60)


class _Receiver:
    def __init__(self) -> None:
        self.acked: list[str] = []

    def receive(self, max_messages: int) -> list[Delivery]:
        return []

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        self.acked += [d.message_id for d in deliveries]
        return len(deliveries)

    def nack(self, deliveries: Sequence[Delivery], delay_s: int) -> None:
        raise AssertionError("nothing should be handed back")

    def pause(self) -> None:
        raise AssertionError("nothing should pause")

    def resume(self) -> None:
        raise AssertionError("nothing should resume")

    def wake(self) -> None:
        pass


def test_mysql_refusing_a_row_for_good_dead_letters_that_message_alone(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 10)
    too_long = "u" * 65  # the user_id column holds 64 characters; strict mode refuses, it never truncates
    with pytest.raises(StoreError) as refused:
        mysql_store.apply_batch([Incoming(Deduction("t-bad", sku, too_long, 1), "m-bad")])
    assert refused.value.retriable is False

    log = FakeLog()
    log.deducted(sku, "t-ok", "u1", 1, "m-ok")
    log.deducted(sku, "t-bad", too_long, 1, "m-bad")
    receiver = _Receiver()
    consumer = DeductionConsumer(receiver, mysql_store, log, batch_size=10, max_backoff_s=1)
    batch = [
        Delivery(gid, "t", token, DeductionMessage(sku, (Purchase(token, "u1", 1),), gid).encode(), 1, 1)
        for token, gid in (("t-ok", "m-ok"), ("t-bad", "m-bad"))
    ]
    report = consumer.process(batch)
    assert [d.token for d in report.applied] == ["t-ok"]
    assert [d.message_id for d in report.dead_letters] == ["m-bad"]
    assert receiver.acked == ["m-ok", "m-bad"]
    view = mysql_store.view(sku)
    assert (view.stock, view.deductions, view.orders) == (9, 1, 1)


def test_the_producer_s_redis_connections_pack_with_hiredis_and_round_trip_any_value(settings: Settings) -> None:
    import redis.asyncio as aredis

    from flashsale.adapters.redis.packing import packed
    from flashsale.adapters.redis.topology import AsyncRouter

    key, values = f"packed-{time.time_ns()}", {f"f{i}": f"é ✓ {i}" for i in range(700)}

    async def roundtrip() -> tuple[type, list[str | None]]:
        router = AsyncRouter(settings.redis_url, timeout_s=2, max_connections=4)
        try:
            client = await router.client(key)
            await client.hset(key, mapping=values)
            got = await client.hmget(key, list(values))
            await client.delete(key)
            return (await router.pool(key)).connection_class, got
        finally:
            await router.close()

    kind, got = asyncio.run(roundtrip())
    assert kind is packed(aredis.Connection)
    assert got == list(values.values())


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (TryAgainError, "TRYAGAIN"),
        (ClusterDownError, "CLUSTERDOWN"),
        (MasterDownError, "MASTERDOWN"),
        (AskError, "1 127.0.0.1:7000"),
        (SlotNotCoveredError, 'Slot "5798" not covered by the cluster'),  # redis-py's, its retries spent
        (ClusterError, "TTL exhausted."),  # redirections that never settled
    ],
)
def test_a_redis_cluster_failing_over_under_the_consumers_look_up_dead_letters_nothing(
    settings: Settings,
    redis_stock: RedisStock,
    mysql_store: MySQLStore,
    sku: str,
    error: type[Exception],
    said: str,
) -> None:
    """A cluster failing over answers reads with TRYAGAIN, CLUSTERDOWN, MASTERDOWN or ASK for a while. Taken for
    an error of the batch, they made the consumer apply it one message at a time, each failing alike, and
    dead-letter and ack every good purchase; they are Redis not serving now: nothing is acked, the batch
    goes back to the broker, and the consumer waits for the stores."""
    redis_stock.load(sku, 10)
    mysql_store.load_stock(sku, 10)
    assert redis_stock.prededuct(sku, "m-ok", [Purchase("t-ok", "u1", 1)])[0].code is Prededuct.ACCEPTED
    failing = redis_stock.client.pipeline

    def pipeline(transaction: bool = False) -> object:
        pipe = failing(transaction=transaction)
        pipe.execute = lambda *args, **kwargs: (_ for _ in ()).throw(error(said))  # type: ignore[method-assign]
        return pipe

    redis_stock.client.pipeline = pipeline  # type: ignore[method-assign]
    with pytest.raises(ServiceUnavailable) as raised:
        redis_stock.lookup({sku: (["t-ok"], ["m-ok"])})
    assert raised.value.retriable
    consumer = DeductionConsumer(_Receiver(), mysql_store, redis_stock, batch_size=10, max_backoff_s=1)
    delivery = Delivery("m-ok", "t", "t-ok", DeductionMessage(sku, (Purchase("t-ok", "u1", 1),), "m-ok").encode(), 1, 1)
    with pytest.raises(ServiceUnavailable):  # the run loop hands the batch back and waits for the stores
        consumer.process([delivery])
    assert mysql_store.view(sku).deductions == 0
    with mysql_connection(settings.mysql_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM dead_letters WHERE sku = %s", (sku,))
        assert cur.fetchone() == (0,)


def test_a_cluster_map_that_cannot_be_read_mid_failover_does_not_hide_that_redis_is_not_serving(
    redis_stock: RedisStock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a misrouted call the adapter reads the cluster's map again; mid-failover redis-py refuses with
    RedisClusterException ("All slots are not covered"), which is no RedisError. Raised from there, it hid the
    ServiceUnavailable the call was about to raise, and the consumer took it for an error of its batch."""

    class Pipe:
        def __getattr__(self, name: str) -> object:
            return lambda *args, **kwargs: None

        def execute(self, *args: object, **kwargs: object) -> object:
            raise TryAgainError("TRYAGAIN")

    cluster = mock.create_autospec(redis.RedisCluster, instance=True)
    cluster.pipeline.side_effect = lambda *args, **kwargs: Pipe()
    cluster.nodes_manager = mock.Mock()
    cluster.nodes_manager.initialize.side_effect = RedisClusterException("All slots are not covered")
    monkeypatch.setattr(redis_stock, "_client", cluster)
    with pytest.raises(ServiceUnavailable):
        redis_stock.lookup({"sku-x": (["t1"], ["m1"])})
    assert cluster.nodes_manager.initialize.called


@pytest.mark.parametrize("call", ["entries", "prededuct", "layout"])
def test_the_producers_cluster_map_that_cannot_be_read_mid_failover_is_redis_not_serving(
    settings: Settings, call: str
) -> None:
    """The producer's adapter reads the cluster's map again when it is stale; mid-failover redis-py refuses
    with RedisClusterException. Raised raw, the producer took it for a bug: the group heard `pending` and a
    partitioned group's holds were not given back."""

    async def go() -> None:
        stock = AsyncRedisStock(settings.redis_url)
        router = stock._router
        cluster = mock.Mock()
        cluster.nodes_manager.initialize = mock.AsyncMock(
            side_effect=RedisClusterException("All slots are not covered")
        )
        router._cluster, router._resolved, router._stale = cluster, True, True
        try:
            if call == "entries":
                await stock.entries({"sku-x#0": ["t1"]})
            elif call == "prededuct":
                await stock.prededuct("sku-x", "m1", [Purchase("t1", "u1", 1)])
            else:
                await stock.layout("sku-x")
        finally:
            router._cluster = None
            await stock.close()

    with pytest.raises(ServiceUnavailable):
        asyncio.run(go())
