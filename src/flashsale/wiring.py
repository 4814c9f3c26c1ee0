"""The one place that builds clients: each opened as a context manager, with the settings of its process.

Every command and process gets its Redis, MySQL and RocketMQ clients here, so timeouts, pool sizes and
replica waits are decided once, and every client is closed on the way out, whatever went wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.adapters.rocketmq.consumer import RocketMQConsumer
from flashsale.adapters.rocketmq.producer import DeadlineSender, RocketMQProducer
from flashsale.config import Settings
from flashsale.models import Delivery, Resolution


@contextmanager
def redis_stock(settings: Settings, *, replicated: bool = False, pinged: bool = False) -> Iterator[RedisStock]:
    """Redis for commands and the checker. `replicated`: each write waits for a replica (REDIS_WAIT_MS)."""
    stock = RedisStock(
        settings.redis_url,
        timeout_s=settings.clients.redis_timeout_s,
        wait_ms=settings.clients.redis_wait_ms if replicated else 0,
    )
    try:
        if pinged:
            stock.ping()
        yield stock
    finally:
        stock.close()


def async_redis_stock(settings: Settings) -> AsyncRedisStock:
    """The producer's Redis, on its event loop (closed there: `await stock.close()`)."""
    return AsyncRedisStock(
        settings.redis_url,
        timeout_s=settings.clients.redis_timeout_s,
        max_connections=settings.producer.redis_connections,
        wait_ms=settings.clients.redis_wait_ms,
    )


@contextmanager
def mysql_store(settings: Settings, *, pool_size: int | None = None, pinged: bool = False) -> Iterator[MySQLStore]:
    store = MySQLStore(settings.mysql_url) if pool_size is None else MySQLStore(settings.mysql_url, pool_size=pool_size)
    try:
        if pinged:
            store.ping()
        yield store
    finally:
        store.close()


@contextmanager
def books(settings: Settings, *, replicated: bool = False) -> Iterator[tuple[RedisStock, MySQLStore]]:
    """Both stores a command reads the books from: Redis (the gate) and MySQL (the books). `replicated`: as
    `redis_stock`'s (a command that carries what it read in Redis over to MySQL)."""
    with ExitStack() as opened:
        stock = opened.enter_context(redis_stock(settings, replicated=replicated))
        yield stock, opened.enter_context(mysql_store(settings))


def _never_checked(_: Delivery) -> Resolution:
    return Resolution.UNKNOWN


@contextmanager
def producer(
    settings: Settings,
    topics: Sequence[str],
    check: Callable[[Delivery], Resolution] = _never_checked,
    *,
    on_resync: Callable[[], None] | None = None,
) -> Iterator[RocketMQProducer]:
    """A started RocketMQ producer of `topics`; `check` answers the broker's transaction checks."""
    bus = RocketMQProducer(settings.rocketmq_endpoint, topics, check)
    if on_resync:
        bus.watchdog.on_resync = on_resync
    bus.start()
    try:
        yield bus
    finally:
        bus.shutdown()


@contextmanager
def deadline_sender(settings: Settings) -> Iterator[DeadlineSender]:
    """Timer messages of payment deadlines (the consumer schedules them; its producer starts at the first)."""
    topic = settings.deadline_topic
    sender = DeadlineSender(
        lambda: RocketMQProducer(settings.rocketmq_endpoint, [topic], _never_checked).start(), topic
    )
    try:
        yield sender
    finally:
        sender.close()


@contextmanager
def deadline_receiver(settings: Settings, *, on_resync: Callable[[], None] | None = None) -> Iterator[RocketMQConsumer]:
    """The expiry group's receiver of deadlines, started."""
    with _receiver(settings, settings.expiry_group, [settings.deadline_topic], on_resync=on_resync) as receiver:
        yield receiver


@contextmanager
def deduction_receiver(
    settings: Settings, *, on_resync: Callable[[], None] | None = None
) -> Iterator[RocketMQConsumer]:
    """The consumer group's receiver of deductions and replays, started."""
    topics = [settings.deduction_topic, settings.replay_topic]
    with _receiver(settings, settings.consumer_group, topics, on_resync=on_resync) as receiver:
        yield receiver


@contextmanager
def _receiver(
    settings: Settings, group: str, topics: Sequence[str], *, on_resync: Callable[[], None] | None
) -> Iterator[RocketMQConsumer]:
    cfg = settings.consumer
    receiver = RocketMQConsumer(
        settings.rocketmq_endpoint,
        group,
        topics,
        poll_wait_s=cfg.poll_wait_s,
        invisible_s=cfg.invisible_s,
        prefetch=cfg.batch_size,
    )
    if on_resync:
        receiver.watchdog.on_resync = on_resync
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
