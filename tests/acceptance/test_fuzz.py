"""Thousands of random bodies through the real topics: the consumer dead-letters what it cannot apply and goes on."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from flashsale import constants as c
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.config import Settings
from flashsale.errors import MalformedMessage
from flashsale.models import DeductionMessage, Resolution
from flashsale.ops.setup import set_stock
from tests.acceptance.harness import Pipeline, post
from tests.oracle import wait_balanced

pytestmark = pytest.mark.slow

BODIES = 3000
SEED = 20261123


def _valid(rng: random.Random, sku: str) -> dict[str, object]:
    return {
        "v": 2,
        "sku": sku,
        "gid": "",
        "ts_ms": rng.randrange(10**13),
        "source": "replay",
        "purchases": [{"token": f"fz-{rng.randrange(10**9)}", "user_id": "u1", "qty": rng.randrange(1, 5)}],
    }


#: Stands for an integer of thousands of digits, which Python itself refuses to print: see _dumps.
HUGE = "\u0000huge"


def _dumps(value: object, rng: random.Random) -> bytes:
    text = json.dumps(value)
    while '"\\u0000huge"' in text:
        text = text.replace('"\\u0000huge"', "9" * rng.randrange(1, 6000), 1)
    return text.encode()


def _junk(rng: random.Random) -> object:
    """A random JSON value of a random shape, sometimes huge or deep."""
    kind = rng.randrange(9)
    if kind == 0:
        return HUGE
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(0, 300)
    if kind == 2:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(0, 80)))
    if kind == 3:
        return [_junk(rng) for _ in range(rng.randrange(0, 3))]
    if kind == 4:
        return {str(rng.randrange(100)): _junk(rng) for _ in range(rng.randrange(0, 3))}
    return rng.choice([None, True, False, 0, -1, "", "sku", 2, 1.5, [], {}])


def _mutated(rng: random.Random, sku: str) -> bytes:
    body: dict[str, object] = _valid(rng, sku)
    purchase = body["purchases"][0]  # type: ignore[index]
    for _ in range(rng.randrange(1, 4)):
        target = rng.choice([body, purchase])
        key = rng.choice([*target.keys(), "extra"])
        if rng.random() < 0.3:
            target.pop(key, None)
        else:
            target[key] = _junk(rng)
    return _dumps(body, rng)


MAKERS: list[Callable[[random.Random, str], bytes]] = [
    lambda rng, sku: _mutated(rng, sku),
    lambda rng, sku: _mutated(rng, sku),
    lambda rng, sku: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
    lambda rng, sku: b"[" * rng.randrange(1000, 200_000) + b"]" * rng.randrange(0, 10),
    lambda rng, sku: _dumps(_junk(rng), rng),
    lambda rng, sku: b'{"v": 2, "sku": "' + bytes([rng.randrange(128, 256)]) * 3 + b'"}',
    lambda rng, sku: json.dumps(_valid(rng, sku)).encode(),  # well formed: a replay of tokens never deducted
]


def test_thousands_of_random_bodies_never_stop_the_consumer(
    pipeline: Pipeline, settings: Settings, mysql_store: MySQLStore, sku: str
) -> None:
    set_stock(settings, sku, 10)
    consumer = pipeline.consumer()
    _, url = pipeline.producer()
    pipeline.checker()
    rng = random.Random(SEED)
    bodies = [MAKERS[rng.randrange(len(MAKERS))](rng, sku) for _ in range(BODIES)]
    malformed = 0
    for body in bodies:
        try:
            DeductionMessage.decode(body)
        except MalformedMessage:
            malformed += 1
    assert 0.5 * BODIES < malformed < BODIES  # most are broken, some are well formed

    sender = RocketMQProducer(settings.rocketmq_endpoint, [settings.replay_topic], lambda _: Resolution.UNKNOWN)
    sender.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(lambda b: sender.send(settings.replay_topic, "fuzz", b, c.DEDUCTION_TAG), bodies))
    finally:
        sender.shutdown()

    def dead_lettered() -> int:
        with mysql_store.transaction("count dead letters") as conn:
            return int(
                conn.execute(
                    sa.text("SELECT COUNT(*) FROM dead_letters WHERE message_id IN :ids").bindparams(
                        sa.bindparam("ids", expanding=True)
                    ),
                    {"ids": ids},
                ).scalar_one()
            )

    deadline = time.monotonic() + 120
    while dead_lettered() < malformed and time.monotonic() < deadline:
        assert consumer.popen.poll() is None, consumer.text()[-3000:]
        time.sleep(1)
    assert dead_lettered() == malformed
    assert consumer.popen.poll() is None and "Traceback" not in consumer.text()

    # The same consumer still applies a real purchase, and the books hold only that one.
    status, answer = post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "after-the-fuzz"})
    assert (status, answer["status"]) == (200, "accepted")
    books, _ = wait_balanced(settings.redis_url, settings.mysql_url, sku, 60)
    assert books.problems == []
    assert list(books.orders) == ["after-the-fuzz"]
