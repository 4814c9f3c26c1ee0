"""Crashes and faults on the real stack: every one must leave the books exact."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.engine.url import make_url

from flashsale import constants as c
from flashsale import failpoints
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.keys import SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.bench.load import run_load
from flashsale.config import Settings
from flashsale.models import DeductionMessage, Purchase, Resolution
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.records import Prededuct
from flashsale.stack.manager import Stack
from flashsale.stack.mariadb import MariaDBService
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Child, Pipeline, free_port, post
from tests.oracle import balanced, now

pytestmark = pytest.mark.slow


def buy(url: str, sku: str, token: str, user: str = "u1", qty: int = 1) -> None:
    """A purchase whose answer never comes: the producer dies while handling it."""
    try:
        answer = post(url, {"sku": sku, "user_id": user, "qty": qty, "token": token}, timeout_s=15)
    except OSError:
        return
    raise AssertionError(f"the producer answered {answer} although it should have been killed")


def test_producer_killed_after_the_half_message_is_rolled_back_and_its_message_fenced(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 10)
    pipeline.consumer()
    checker = pipeline.checker()
    doomed, url = pipeline.producer(failpoints=failpoints.AFTER_HALF_MESSAGE)
    buy(url, sku, "t-crash")
    assert doomed.wait_exit(10) != 0

    checker.wait_log("key t-crash -> rollback", timeout_s=60)
    gid = re.search(r"check message (\S+) key t-crash -> rollback", checker.text())
    assert gid is not None
    record = redis_stock.client.hget(SkuKeys.of(sku).tx, gid[1])
    assert record is not None and json.loads(record)["state"] == c.TX_FENCED
    # The dead producer's pre-deduct, arriving late, deducts nothing.
    late = redis_stock.prededuct(sku, gid[1], [Purchase("t-crash", "u1", 1)])
    assert [r.code for r in late] == [Prededuct.FENCED]
    # The buyer retries the same token on a healthy producer: nothing was deducted, so it is a new purchase.
    _, healthy = pipeline.producer()
    status, body = post(healthy, {"sku": sku, "user_id": "u1", "qty": 1, "token": "t-crash"})
    assert (status, body["status"]) == (200, "accepted")
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.redis_stock, books.mysql_stock, books.order_count, books.redis_fenced) == (9, 9, 1, 1)


def test_producer_killed_after_the_prededuct_is_committed_by_the_checker(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 10)
    pipeline.consumer()
    checker = pipeline.checker()
    doomed, url = pipeline.producer(failpoints=failpoints.AFTER_PREDEDUCT)
    buy(url, sku, "t-crash", qty=3)
    assert doomed.wait_exit(10) != 0

    checker.wait_log("key t-crash -> commit", timeout_s=60)
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.redis_stock, books.mysql_stock, books.order_count) == (7, 7, 1)
    assert now(settings, sku).applied == ["t-crash"]


def test_consumer_killed_between_commit_and_ack_gets_a_redelivery_that_changes_nothing(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 50)
    _, url = pipeline.producer()
    pipeline.checker()
    doomed = pipeline.consumer(failpoints=failpoints.AFTER_DB_COMMIT, FLASHSALE_INVISIBLE_S="5")
    load = asyncio.run(run_load(url, [sku], attempts=20, concurrency=4))
    assert load.statuses["accepted"] == 20
    assert doomed.wait_exit(30) != 0
    committed = len(now(settings, sku).applied)
    assert committed > 0  # the killed consumer had committed its batch but acked nothing

    survivor = pipeline.consumer(FLASHSALE_INVISIBLE_S="5")
    books = balanced(settings, sku, 90)
    assert books.problems == [], books.problems
    assert (len(books.mysql_deducted), books.order_count, books.mysql_stock) == (20, 20, 30)
    # the redelivered messages reached the new consumer and were recognised as already applied
    survivor.wait_for(lambda: _duplicates(survivor.text()) >= committed, "seeing the redelivered batch", 60)


def _duplicates(log: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) duplicate", log))


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def test_mariadb_down_for_20_seconds_mid_sale_acks_nothing_and_loses_nothing(
    pipeline: Pipeline,
    settings: Settings,
    stack_settings: StackSettings,
    redis_stock: RedisStock,
    mysql_store: MySQLStore,
    sku: str,
) -> None:
    set_stock(settings, sku, 400)
    _, url = pipeline.producer()
    pipeline.checker()
    metrics_port = free_port()
    consumer = pipeline.consumer(metrics_port=metrics_port, FLASHSALE_INVISIBLE_S="10")
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    first = asyncio.run(run_load(url, [sku], attempts=100, concurrency=10, run_id="before"))
    assert first.statuses["accepted"] == 100
    assert balanced(settings, sku, 30).problems == []

    db = Stack(stack_settings)
    db.down(["mariadb"])
    try:
        acked_before = _metric(metrics_url, "flashsale_consumer_batches_total")
        seen = len(consumer.text())
        during = asyncio.run(run_load(url, [sku], attempts=200, concurrency=10, run_id="during"))
        assert during.statuses["accepted"] == 200  # buyers do not notice: Redis and the broker carry the sale
        time.sleep(max(0.0, 20 - during.elapsed_s))
        outage = consumer.text()[seen:]
    finally:
        db.up(["mariadb"])
    # Once the first batch met the outage, the consumer handed every batch back and paused receipt: not one
    # batch line (each is written after its commit, with the messages it acked) until MariaDB was back. (A
    # batch that committed just before the kill may still log its line before that.)
    paused = outage.find("pausing receipt until the stores answer")
    assert paused >= 0 and "receipt paused" in outage[paused:], outage[-3000:]
    assert re.findall(r"batch: \d+ applied.*acked", outage[paused:]) == [], outage[-3000:]

    books = balanced(settings, sku, 120)
    assert books.problems == [], books.problems
    assert (len(books.mysql_deducted), books.order_count, books.mysql_stock, books.redis_stock) == (300, 300, 100, 100)
    assert _metric(metrics_url, "flashsale_consumer_batches_total") > acked_before


def test_a_duplicate_and_a_malformed_message_injected_into_the_topic_change_nothing(
    pipeline: Pipeline, settings: Settings, redis_stock: RedisStock, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 10)
    _, url = pipeline.producer()
    pipeline.checker()
    consumer = pipeline.consumer()
    _, body = post(url, {"sku": sku, "user_id": "u1", "qty": 2, "token": "t-real"})
    assert body["status"] == "accepted"
    assert balanced(settings, sku).problems == []

    injector = RocketMQProducer(
        settings.rocketmq_endpoint, [settings.deduction_topic], lambda _: Resolution.ROLLBACK
    ).start()
    try:
        # The real message again, under a new id: the log names the first one, so it deducts nothing.
        again = injector.new_message_id()
        duplicate = DeductionMessage(sku, (Purchase("t-real", "u1", 2),), again).encode()
        injector.send_half(settings.deduction_topic, "t-real", duplicate, c.DEDUCTION_TAG, again).commit()
        malformed_key = f"bad-{uuid.uuid4().hex[:8]}"
        malformed = injector.send_half(settings.deduction_topic, malformed_key, b'{"v": 1, "sku": ', c.DEDUCTION_TAG)
        malformed.commit()
        replayed_twice = DeductionMessage(sku, (Purchase("t-real", "u1", 2),), source="replay").encode()
        injector.send(settings.replay_topic, "t-real", replayed_twice, c.DEDUCTION_TAG)
    finally:
        injector.shutdown()

    consumer.wait_for(lambda: _duplicates(consumer.text()) >= 2, "seeing both duplicates", 60)
    with mysql_store.transaction("read dead letters") as conn:
        deadline = time.monotonic() + 30
        while True:
            rows = conn.execute(
                sa.text("SELECT reason FROM dead_letters WHERE message_id = :m"), {"m": malformed.message_id}
            ).all()
            if rows or time.monotonic() > deadline:
                break
            conn.commit()
            time.sleep(0.5)
    assert len(rows) == 1 and "not JSON" in rows[0].reason
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (len(books.mysql_deducted), books.order_count, books.mysql_stock) == (1, 1, 8)


@contextmanager
def row_locked(settings: Settings, sku: str) -> Iterator[None]:
    """The SKU's inventory row locked by a transaction of our own for the block: a batch that applies the SKU
    waits for it."""
    url = make_url(settings.mysql_url)
    conn = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password, database=url.database
    )
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT stock FROM inventory WHERE sku = %s FOR UPDATE", (sku,))
        yield
    finally:
        conn.rollback()
        conn.close()


def _lock_waits(mariadb: MariaDBService) -> int:
    return int(mariadb._root_sql("SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"))


def stopped_mid_batch(consumer: Child, settings: Settings, stack_settings: StackSettings, sku: str) -> int:
    """SIGTERM a consumer while a batch of `sku` it took waits on the row we lock, then let the batch go:
    the stop comes amid a backlog however fast the consumer is. Returns its exit code."""
    mariadb = MariaDBService(Stack(stack_settings).layout, stack_settings)
    with row_locked(settings, sku):
        assert poll_until(lambda: _lock_waits(mariadb) > 0, 30), "no batch waited on the locked row"
        consumer.ask_to_stop()
    return consumer.wait_exit(30)


def test_redis_down_under_a_backlog_pauses_receipt_hands_the_batch_back_and_loses_nothing(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 300)
    _, url = pipeline.producer()
    pipeline.checker()
    # A message neither applied nor handed back would stay hidden for two minutes, far past the wait below.
    consumer = pipeline.consumer(FLASHSALE_INVISIBLE_S="120")
    stack = Stack(stack_settings)
    with row_locked(settings, sku):
        # The consumer's first batch waits on the row; what is sold meanwhile queues up behind it.
        first = asyncio.run(run_load(url, [sku], attempts=10, concurrency=2, run_id="first"))
        assert poll_until(lambda: _lock_waits(MariaDBService(stack.layout, stack_settings)) > 0, 30)
        rest = asyncio.run(run_load(url, [sku], attempts=90, concurrency=10, run_id="rest"))
        assert first.statuses["accepted"] + rest.statuses["accepted"] == 100
        stack.down(["redis"])
        seen = len(consumer.text())
    # The row is free: the first batch commits, and the next one meets Redis down.
    try:
        consumer.wait_for(lambda: "receipt paused" in consumer.text()[seen:], "pausing receipt", 30)
        time.sleep(4)
        outage = consumer.text()[seen:]
    finally:
        stack.up(["redis"])
    consumer.wait_for(lambda: "resuming receipt" in consumer.text()[seen:], "resuming receipt", 30)
    books = balanced(settings, sku, 30)
    assert books.problems == [], books.problems
    assert (len(books.mysql_deducted), books.order_count, books.mysql_stock, books.redis_stock) == (100, 100, 200, 200)
    # One batch met the outage; then receipt stopped, and the consumer only asked the stores until Redis
    # answered: no second batch was tried meanwhile. That batch was handed back, not left to its invisible
    # time: the books balanced well within it.
    assert outage.count("not applied") == 1, outage[-3000:]
    paused = [line for line in outage.splitlines() if "receipt paused" in line]
    assert paused and all("Redis at" in line for line in paused), paused
