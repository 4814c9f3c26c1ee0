"""Preparing a sale: schema and topics (`init`), and loading stock into Redis and MySQL (`stock set`)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale import constants as c
from flashsale import wiring
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.config import Settings
from flashsale.errors import InvalidInput, ServiceUnavailable, StackError, StockError, UnknownSku
from flashsale.models import parse_count, require_id
from flashsale.polling import poll_until

logger = logging.getLogger(__name__)

#: Deliveries before the broker moves a message to %DLQ%<group>. The consumer stops receiving while the
#: database is down, so a long outage costs one attempt, not one per back-off.
RETRY_MAX_TIMES = 100


@dataclass
class InitReport:
    database_created: bool = False
    migrations_applied: list[str] = field(default_factory=list)
    schema_version: int = 0
    topics: dict[str, str] = field(default_factory=dict)
    consumer_group: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def init(settings: Settings, *, wait_s: float = 0.0) -> InitReport:
    """Create the database schema, the topics with their message types, and the consumer group. Idempotent.

    With `wait_s`, servers that do not answer yet are asked again until that many seconds have passed.
    """
    last: list[ServiceUnavailable] = []

    def attempt() -> InitReport | None:
        try:
            return _init(settings)
        except ServiceUnavailable as exc:
            logger.info("waiting for %s", exc)
            last[:] = [exc]
            return None

    report = poll_until(attempt, wait_s, interval_s=2.0)
    if report is None:
        raise last[0]
    return report


def _redis_answers(settings: Settings) -> None:
    """The processes need Redis from their first purchase: init waits for it too."""
    with wiring.redis_stock(settings, pinged=True):
        pass


def _init(settings: Settings) -> InitReport:
    _redis_answers(settings)
    report = InitReport()
    with wiring.mysql_store(settings) as store:
        report.database_created = store.ensure_database()
        report.migrations_applied = store.migrate()
        report.schema_version = store.schema_version()
    brokers = rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME)
    if not brokers:
        raise ServiceUnavailable("RocketMQ", settings.namesrv_addr, f"no broker of {c.CLUSTER_NAME} is registered")
    topics = {
        settings.deduction_topic: "TRANSACTION",
        settings.replay_topic: "NORMAL",
        settings.deadline_topic: "DELAY",
    }
    for broker in brokers:
        for topic, message_type in topics.items():
            existing = rocketmq_admin.topic_info(broker, topic)
            if existing is None or existing.message_type != message_type:
                rocketmq_admin.create_topic(broker, topic, queues=c.TOPIC_QUEUES, message_type=message_type)
            info = rocketmq_admin.topic_info(broker, topic)
            if info is None or info.message_type != message_type:
                raise StackError(f"topic {topic} on {broker} is not of type {message_type} after creation")
        for group in (settings.consumer_group, settings.expiry_group):
            rocketmq_admin.create_group(broker, group, retry_max_times=RETRY_MAX_TIMES)
    report.topics = topics
    report.consumer_group = settings.consumer_group
    return report


def set_stock(
    settings: Settings,
    sku: str,
    qty: object,
    *,
    per_user_limit: object = 0,
    reset: bool = False,
    force: bool = False,
    partitions: object = 1,
    pay_within_ms: object = 0,
) -> None:
    """Load a SKU: MySQL first (the books), then Redis (the gate).

    Every argument is checked against the bounds of both stores, and both sides are read, before either
    is written: a refusal changes nothing anywhere. A SKU with a sale on record is refused unless
    `reset`; a reset is refused while Redis holds deductions MySQL has not applied yet (they are in
    flight, or lost: `reconcile --repair` brings them over), unless `force`.

    A live sale may be loaded again: for the moment of the load the SKU is frozen (its purchases hear
    `error` and are asked again), and every producer then sells by the new layout, since a step placed
    by the old one (a pre-deduct or a transfer of stock) is refused and the layout read again.
    """
    load = _Load.checked(sku, qty, per_user_limit, partitions, pay_within_ms)
    # With replicas, each write of the load waits for one to hold it: a failover must not bring back
    # the stock it replaced (MySQL already holds the new quantity).
    with wiring.mysql_store(settings) as store, wiring.redis_stock(settings, replicated=True) as stock:
        # Frozen, the SKU takes no purchase while its history is read and it is loaded: none can land in
        # between, to be discarded by a reset or to slip past the in-flight check.
        with stock.frozen(sku) as freeze:
            _refuse_history(stock, store, sku, reset=reset, force=force)
            freeze.confirm()  # the history read may have taken long: still frozen, or MySQL is not touched
            # Should this load stall past its freeze from here on, MySQL refuses it once a later load wrote.
            ticket = stock.ticket(sku, above=store.load_ticket(sku))
            store.load_stock(sku, load.quantity, per_user_limit=load.per_user_limit, reset=reset, ticket=ticket)
            _load_redis(settings, stock, load, reset=reset)
    logger.info(
        "loaded %s: %d units in %d partition(s), per-user limit %s, payment within %s ms",
        sku,
        load.quantity,
        load.parts,
        load.per_user_limit or "none",
        load.pay_within_ms or "none",
    )


@dataclass(frozen=True)
class _Load:
    sku: str
    quantity: int
    per_user_limit: int
    parts: int
    pay_within_ms: int = 0

    @classmethod
    def checked(cls, sku: str, qty: object, per_user_limit: object, parts: object, pay_within_ms: object) -> _Load:
        """The load asked for, each argument checked against the bounds of both stores."""
        load = cls(
            require_id(sku, "sku"),
            quantity=parse_count(qty, "quantity", c.MAX_STOCK),
            per_user_limit=parse_count(per_user_limit, "per-user limit", c.MAX_PER_USER_LIMIT),
            parts=parse_count(parts, "partitions", c.MAX_PARTITIONS),
            pay_within_ms=parse_count(pay_within_ms, "payment deadline (ms)", c.MAX_PAY_WITHIN_MS),
        )
        if load.parts < 1:
            raise InvalidInput("partitions must be at least 1 (1: the SKU is not partitioned)")
        return load


def _refuse_history(stock: RedisStock, store: MySQLStore, sku: str, *, reset: bool, force: bool) -> None:
    """Refuse a load over a sale on record without `reset`, and a reset over deductions still in flight."""
    applied, logged = store.history(sku), stock.history(sku)
    if (applied or logged) and not reset:
        raise StockError(
            f"{sku} already has a sale on record ({logged} Redis log entries, {applied} MySQL deductions)",
            hint="use another SKU, or pass --reset to discard its history on both sides",
        )
    if reset and not force:
        in_flight = _in_flight(stock, sku, applied)
        if in_flight > 0:
            raise StockError(
                f"{sku} has {in_flight} deduction(s) in Redis that MySQL has not applied yet",
                hint="let the consumer catch up (or run `flashsale reconcile --repair`) and try again; "
                "--force discards them",
            )
    # A load forgets the restocks of the one before, on both sides: one MySQL has not applied yet would be
    # applied after the load, to the new one.
    restocks = sorted(stock.additions(sku).keys() - store.additions(sku).keys())
    if restocks and not force:
        raise StockError(
            f"{sku} has {len(restocks)} restock(s) in Redis that MySQL has not applied yet ({', '.join(restocks[:5])})",
            hint="let the consumer catch up (or run `flashsale reconcile --repair`) and try again; "
            "--force discards them",
        )


def _load_redis(settings: Settings, stock: RedisStock, load: _Load, *, reset: bool) -> None:
    if load.parts == 1:
        stock.load(
            load.sku, load.quantity, per_user_limit=load.per_user_limit, reset=reset, pay_within_ms=load.pay_within_ms
        )
        return
    stock.load_partitioned(
        load.sku,
        load.quantity,
        partitions=load.parts,
        refill=settings.partition_refill,
        threshold=settings.partition_threshold,
        per_user_limit=load.per_user_limit,
        reset=reset,
        pay_within_ms=load.pay_within_ms,
    )


def _in_flight(stock: RedisStock, sku: str, applied: int) -> int:
    try:
        return stock.view(sku).deducted_count - applied
    except UnknownSku:
        return 0


def stock_report(settings: Settings, sku: str) -> dict[str, Any]:
    """What Redis and MySQL each hold of `sku` (None for a side that never loaded it)."""
    redis_side: dict[str, Any] | None = None
    mysql_side: dict[str, Any] | None = None
    with wiring.books(settings) as (stock, store):
        with contextlib.suppress(UnknownSku):
            redis_side = asdict(stock.view(sku))
        with contextlib.suppress(UnknownSku):
            mysql_side = asdict(store.view(sku))
    if redis_side is None and mysql_side is None:
        raise UnknownSku(
            f"unknown SKU {sku!r}: not loaded in Redis nor MySQL", hint=f"load it with `flashsale stock set {sku} QTY`"
        )
    return {"sku": sku, "redis": redis_side, "mysql": mysql_side}
