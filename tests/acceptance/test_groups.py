"""Group commit on the real stack: what one transaction of many purchases does, and what each crash leaves."""

from __future__ import annotations

import json
import threading
import time

import pytest

from flashsale import failpoints
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Pipeline, post
from tests.acceptance.servers import kill, up_again
from tests.oracle import balanced, redis_client

pytestmark = pytest.mark.slow

#: One group holds the whole crowd: it closes when the last of them arrives (or after a second).
GROUP = {"FLASHSALE_GROUP_SIZE": "10", "FLASHSALE_GROUP_WAIT_MS": "1000"}


def _crowd(url: str, sku: str, tokens: list[str], users: list[str] | None = None) -> dict[str, object]:
    """Each token bought at the same moment from its own thread; its answer, or None if none came."""
    answers: dict[str, object] = {}

    def buy(i: int, token: str) -> None:
        user = users[i] if users else f"u-{token}"
        try:
            answers[token] = post(url, {"sku": sku, "user_id": user, "qty": 1, "token": token}, timeout_s=20)[1]
        except OSError:
            answers[token] = None

    threads = [threading.Thread(target=buy, args=(i, t)) for i, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def _log(settings: Settings, sku: str) -> dict[str, dict[str, object]]:
    client = redis_client(settings.redis_url)
    try:
        return {t: json.loads(raw) for t, raw in client.hgetall(f"fs:{{{sku}}}:log").items()}
    finally:
        client.close()


def test_one_transaction_carries_the_crowd_and_mysql_gets_exactly_what_its_pre_deduct_accepted(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 3, per_user_limit=1)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    _, grouped = pipeline.producer(**GROUP)
    tokens = [f"t{i}" for i in range(10)]
    users = ["alice", "alice", *[f"u{i}" for i in range(8)]]  # alice's second purchase passes her limit
    answers = _crowd(grouped, sku, tokens, users)
    statuses = sorted(str(a["status"]) for a in answers.values())  # type: ignore[index]
    assert statuses.count("accepted") == 3
    accepted = {t for t, a in answers.items() if a["status"] == "accepted"}  # type: ignore[index]
    # One message id for all: one half message carried the group.
    assert len({a["message_id"] for a in answers.values() if a["status"] == "accepted"}) == 1  # type: ignore[index]
    books = balanced(settings, sku)
    assert books.problems == []
    log = _log(settings, sku)
    named = {t for t, e in log.items() if e["state"] == "deducted"}
    assert set(books.orders) == named == accepted
    # Alice's two purchases met her limit of one inside the same pre-deduct.
    assert len({"t0", "t1"} & accepted) <= 1


def test_a_producer_killed_mid_group_leaves_every_purchase_of_the_group_to_its_retry(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 100)
    pipeline.consumer()
    checker = pipeline.checker()
    _, doomed = pipeline.producer(failpoints=failpoints.AFTER_HALF_MESSAGE, **GROUP)
    tokens = [f"g{i}" for i in range(5)]
    assert set(_crowd(doomed, sku, tokens).values()) == {None}  # the process died holding all five
    checker.wait_log("-> rollback", timeout_s=60)
    # Every buyer asks again with the same token: nothing was deducted, so each is a purchase now.
    _, healthy = pipeline.producer()
    again = _crowd(healthy, sku, tokens)
    assert {a["status"] for a in again.values()} == {"accepted"}  # type: ignore[index]
    books = balanced(settings, sku)
    assert books.problems == [] and dict(books.orders) == dict.fromkeys(tokens, 1)
    assert books.redis_fenced == 1  # one fence for the whole group


def test_a_group_pre_deducted_when_its_producer_and_the_broker_both_die_is_committed_after_the_restart(
    pipeline: Pipeline, settings: Settings, stack_settings: StackSettings, sku: str
) -> None:
    set_stock(settings, sku, 100)
    pipeline.launch("consumer")
    pipeline.launch("checker")
    _, doomed = pipeline.producer(failpoints=failpoints.AFTER_PREDEDUCT, **GROUP)
    tokens = [f"h{i}" for i in range(5)]
    assert set(_crowd(doomed, sku, tokens).values()) == {None}  # pre-deducted, never committed
    stack = Stack(stack_settings)
    kill(stack, "broker")
    time.sleep(3)
    up_again(stack, "broker", settings)
    # The same checker and consumer, never restarted: the check reaches the checker, which commits.
    books = balanced(settings, sku, 120)
    assert books.problems == [] and dict(books.orders) == dict.fromkeys(tokens, 1)
    _, healthy = pipeline.producer()
    assert {a["status"] for a in _crowd(healthy, sku, tokens).values()} == {"duplicate"}  # type: ignore[index]
