"""Claims of docs/operations.md about the protocol, each produced for real on the stack.

- reconcile tells a deduction on its way to MySQL (younger than FLASHSALE_SETTLE_S) from a missing one;
- a buyer told `pending` asks again with the same token and hears `duplicate` with the original message id;
- the checker commits a half message whose body disagrees with the log (the log decides), rolls back
  one whose body names another message, and two checkers share the broker's checks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from flashsale import constants as c
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.config import Settings
from flashsale.models import DeductionMessage, Purchase, Resolution
from flashsale.ops.setup import init, set_stock
from flashsale.polling import poll_until
from flashsale.records import Prededuct
from tests.acceptance.harness import Child, Pipeline, post
from tests.conftest import drop_namespace, isolated_settings
from tests.integration.test_adapter_contracts import _BUSY
from tests.oracle import balanced, now

# --- reconcile: in flight or missing ------------------------------------------------------------------

#: The settle time reconcile runs with here: long enough for a CLI run to start and read both stores.
SETTLE_S = 10


def _reconcile(pipeline: Pipeline, sku: str) -> tuple[int, dict[str, Any]]:
    """`flashsale reconcile SKU --json` as an operator runs it, with a real settle time."""
    result = subprocess.run(
        [sys.executable, "-m", "flashsale", "reconcile", sku, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**pipeline.base_env, "FLASHSALE_SETTLE_S": str(SETTLE_S)},
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)["skus"][0]


def _logged_at_ms(settings: Settings, sku: str, token: str) -> int:
    """When the pre-deduct of `token` ran, as its log entry says (Redis's clock, in ms), read with plain redis."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        raw = client.hget(f"fs:{{{sku}}}:log", token)
    finally:
        client.close()
    assert raw is not None, f"no log entry for {token}"
    return int(json.loads(str(raw))["ts"])


def _buy(url: str, sku: str, token: str, qty: int = 1, user: str = "u1") -> dict[str, Any]:
    status, body = post(url, {"sku": sku, "user_id": user, "qty": qty, "token": token})
    body["http"] = status
    return body


def test_reconcile_counts_a_deduction_younger_than_the_settle_time_in_flight_and_an_older_one_missing(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 10)
    _, url = pipeline.producer()  # and no consumer yet: every deduction stays in Redis, none reaches MySQL
    assert _buy(url, sku, "t-old")["status"] == "accepted"

    code, row = _reconcile(pipeline, sku)
    age_s = time.time() - _logged_at_ms(settings, sku, "t-old") / 1000
    assert age_s < SETTLE_S, f"reconcile took too long to judge a young deduction: it is {age_s:.1f} s old"
    assert (code, row["consistent"], row["in_flight"], row["missing_in_mysql"]) == (0, True, 1, 0), row

    # Once t-old is older than the settle time, it is missing; t-young, bought just now, is in flight.
    old_ms = _logged_at_ms(settings, sku, "t-old")
    time.sleep(max(0.0, old_ms / 1000 + SETTLE_S + 0.5 - time.time()))
    assert _buy(url, sku, "t-young")["status"] == "accepted"
    code, row = _reconcile(pipeline, sku)
    assert (code, row["consistent"]) == (1, False), row
    assert (row["in_flight"], row["missing_in_mysql"], row["missing_tokens"]) == (1, 1, ["t-old"]), row
    assert now(settings, sku).mysql_deducted == {}  # neither is in MySQL: only their age tells them apart

    pipeline.consumer()
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.mysql_deducted == {"t-old": 1, "t-young": 1}
    code, row = _reconcile(pipeline, sku)
    assert (code, row["consistent"], row["in_flight"], row["missing_in_mysql"]) == (0, True, 0, 0), row


# --- pending, then duplicate --------------------------------------------------------------------------

#: How long _BUSY keeps the single-threaded server busy here (it only reads: EVAL_RO runs while writes are paused).
BUSY_S = 3.0
#: The producer's Redis timeout here: the pre-deduct and its one retry give up well within BUSY_S.
TIMEOUT_S = 0.6


def _waiting_scripts(admin: redis.Redis, pid: int) -> int:
    """Connections of process `pid` that CLIENT PAUSE WRITE holds with a script to run (flag `b`: blocked)."""
    own = {f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr}
    held = [c for c in admin.client_list() if c["cmd"] == "evalsha" and "b" in c["flags"]]
    return sum(1 for client in held if client["addr"] in own)


def _answer_while_held(settings: Settings, producer: Child, sku: str, token: str) -> tuple[dict[str, Any], bool]:
    """Buy `token` while its pre-deduct cannot be answered, and let it run once the producer gave up.

    Writes are paused (the producer's read ahead still answers, its pre-deduct waits). Then the server
    runs a busy script for BUSY_S, and the pause ends in the same breath, right behind it: the producer
    times out twice and drops its connections meanwhile, but a busy server reads no socket, so it never
    sees them go, and runs the waiting pre-deduct as soon as the script ends. Returns the buyer's answer,
    and whether it came while the server was still busy (before the pre-deduct ran)."""
    admin = redis.Redis.from_url(settings.redis_url, socket_timeout=30, decode_responses=True)
    answer: dict[str, Any] = {}

    def buy() -> None:
        answer.update(_buy(producer.url, sku, token, qty=2))
        answer["at"] = time.monotonic()

    buyer = threading.Thread(target=buy)
    admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    try:
        buyer.start()
        waits = poll_until(lambda: _waiting_scripts(admin, producer.popen.pid), 10, interval_s=0.005)
        assert waits == 1, "the producer's pre-deduct never reached Redis"
        held = admin.pipeline(transaction=False)
        held.execute_command("EVAL_RO", _BUSY, 0, str(BUSY_S))
        held.execute_command("CLIENT", "UNPAUSE")
        held.execute()
        free_at = time.monotonic()
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    buyer.join(30)
    assert "at" in answer, "the buyer got no answer"
    return answer, answer["at"] < free_at


def test_a_buyer_told_pending_retries_the_same_token_and_hears_duplicate_with_the_original_message_id(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 10)
    producer, url = pipeline.producer(FLASHSALE_REDIS_TIMEOUT_S=str(TIMEOUT_S), FLASHSALE_REDIS_WAIT_MS="100")
    checker = pipeline.checker()
    assert _buy(url, sku, "t-warm")["status"] == "accepted"  # a pooled connection, and the script cached

    first, unanswered = _answer_while_held(settings, producer, sku, "t-lost")
    assert unanswered, "the producer answered only after Redis ran the pre-deduct"
    assert (first["http"], first["status"]) == (202, "pending"), first
    message_id = first["message_id"]
    assert message_id and _logged_by(settings, sku, "t-lost") == message_id  # it ran, after the answer

    again = _buy(url, sku, "t-lost", qty=2)
    assert (again["http"], again["status"], again["message_id"]) == (200, "duplicate", message_id), again

    # The producer left the half message open; a check finds the purchase in the log and commits it.
    pipeline.consumer()
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    told = {"t-warm": ["accepted"], "t-lost": ["pending", "duplicate"]}
    assert books.against(told, {"t-warm": [1], "t-lost": [2]}, {"t-warm": "u1", "t-lost": "u1"}) == []
    assert (books.order_rows["t-lost"], books.redis_stock, books.mysql_stock) == (("u1", 2), 7, 7)
    committed = f"check message {message_id} key t-lost -> commit"
    assert poll_until(lambda: committed in producer.text() + checker.text(), 30), "no check committed it"


def _logged_by(settings: Settings, sku: str, token: str) -> str | None:
    """The message the log entry of `token` names, read with plain redis."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        raw = client.hget(f"fs:{{{sku}}}:log", token)
    finally:
        client.close()
    return None if raw is None else str(json.loads(str(raw))["msg"])


# --- the checker, on the real broker ------------------------------------------------------------------


@pytest.fixture
def own(settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    """Processes on topics made for this test alone: what the broker counts on them is this test's."""
    mine = isolated_settings("p", settings)
    init(mine)
    pipeline = Pipeline(mine, tmp_path)
    try:
        yield pipeline
    finally:
        try:
            pipeline.stop()
        finally:
            drop_namespace(mine)


def _carried(settings: Settings) -> int:
    """Messages the deduction topic has ever held, read from the brokers: one per half message committed."""
    brokers = rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME)
    return sum(
        rocketmq_admin.max_offset(b, settings.deduction_topic, q) for b in brokers for q in range(c.TOPIC_QUEUES)
    )


def _resolved(settings: Settings) -> int:
    """The brokers' op markers: every commit or rollback is written there (in batches), after a commit's message."""
    brokers = rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME)
    return sum(rocketmq_admin.max_offset(b, "RMQ_SYS_TRANS_OP_HALF_TOPIC", 0) for b in brokers)


def _injector(settings: Settings) -> RocketMQProducer:
    """A producer of the test's own: it sends half messages and leaves them open, like one that died."""
    return RocketMQProducer(
        settings.rocketmq_endpoint, [settings.deduction_topic], lambda _: Resolution.UNKNOWN
    ).start()


def _open_half(injector: RocketMQProducer, settings: Settings, body: DeductionMessage, message_id: str) -> Any:
    half = injector.send_half(settings.deduction_topic, body.tokens[0], body.encode(), c.DEDUCTION_TAG, message_id)
    assert half.message_id == message_id
    return half


def _prededuct(stock: RedisStock, sku: str, gid: str, purchases: list[Purchase]) -> None:
    """The local transaction of message `gid`, as the producer runs it."""
    assert [r.code for r in stock.prededuct(sku, gid, purchases)] == [Prededuct.ACCEPTED] * len(purchases)


def test_the_checker_commits_a_half_message_whose_body_disagrees_with_the_log_and_mysql_takes_the_log(
    own: Pipeline, redis_stock: RedisStock, sku: str
) -> None:
    settings = own.settings
    set_stock(settings, sku, 10)
    own.consumer()
    checker = own.checker()
    carried = _carried(settings)
    injector = _injector(settings)
    try:
        gid = injector.new_message_id()
        # The body says another buyer and five more units than the pre-deduct logged for the message.
        _open_half(injector, settings, DeductionMessage(sku, (Purchase("t-body", "someone-else", 5),), gid), gid)
        _prededuct(redis_stock, sku, gid, [Purchase("t-body", "u1", 2)])
    finally:
        injector.shutdown()  # gone before it settled: the checker answers the broker's check

    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    # Committed, not rolled back: the units are deducted, and the order is the log's.
    assert (books.order_rows, books.redis_stock, books.mysql_stock) == ({"t-body": ("u1", 2)}, 8, 8)
    assert _carried(settings) == carried + 1
    assert f"check message {gid} key t-body -> commit" in checker.text()
    assert "carries token t-body as user someone-else qty 5; the log says user u1 qty 2" in checker.text()


def test_the_checker_rolls_back_a_half_message_whose_body_names_another_message(
    own: Pipeline, redis_stock: RedisStock, sku: str
) -> None:
    settings = own.settings
    set_stock(settings, sku, 10)
    own.consumer()
    checker = own.checker()
    carried, resolved = _carried(settings), _resolved(settings)
    injector = _injector(settings)
    try:
        real = injector.new_message_id()  # a purchase carried by its own message, committed by its producer
        body = DeductionMessage(sku, (Purchase("t-real", "u1", 2),), real)
        half = _open_half(injector, settings, body, real)
        _prededuct(redis_stock, sku, real, list(body.purchases))
        half.commit()
        # Its op marker is written: from now on, only the next message resolved moves the op topic.
        assert poll_until(lambda: _carried(settings) == carried + 1 and _resolved(settings) > resolved, 30)
        resolved = _resolved(settings)
        rogue = injector.new_message_id()  # its body names the real message: committed, it would carry t-real again
        _open_half(injector, settings, DeductionMessage(sku, body.purchases, real), rogue)
    finally:
        injector.shutdown()

    # The broker resolved it (a commit puts the message on the topic before its op marker): the topic never took it.
    assert poll_until(lambda: _resolved(settings) > resolved, 60), "the broker never recorded an answer"
    assert _carried(settings) == carried + 1
    assert f"check message {rogue} key t-real -> rollback" in checker.text()
    assert f"half message {rogue} names message {real} in its body; rolling back" in checker.text()
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.order_rows, books.mysql_stock) == ({"t-real": ("u1", 2)}, 8)


def _final_answers(checkers: list[Child]) -> dict[str, list[tuple[str, int]]]:
    """Per message, every commit or rollback the checkers answered: (answer, which checker)."""
    found: dict[str, list[tuple[str, int]]] = {}
    for i, checker in enumerate(checkers):
        for gid, said in re.findall(r"check message (\S+) key \S+ -> (commit|rollback)", checker.text()):
            found.setdefault(gid, []).append((said, i))
    return found


def test_two_checkers_share_the_checks_and_settle_every_message_once(
    own: Pipeline, redis_stock: RedisStock, sku: str
) -> None:
    settings = own.settings
    set_stock(settings, sku, 20)
    own.consumer()
    checkers = [own.checker(), own.checker()]
    carried = _carried(settings)
    ran: dict[str, str] = {}  # message -> token: pre-deducted, then its producer died
    never: dict[str, str] = {}  # message -> token: its producer died before the pre-deduct
    injector = _injector(settings)
    try:
        for i in range(12):
            gid, token = injector.new_message_id(), f"t{i}"
            body = DeductionMessage(sku, (Purchase(token, f"u{i}", 1),), gid)
            _open_half(injector, settings, body, gid)
            if i < 8:
                _prededuct(redis_stock, sku, gid, list(body.purchases))
                ran[gid] = token
            else:
                never[gid] = token
    finally:
        injector.shutdown()

    assert poll_until(lambda: set(_final_answers(checkers)) >= set(ran) | set(never), 90), _final_answers(checkers)
    answers = _final_answers(checkers)
    said = {gid: tuple(answer for answer, _ in answers[gid]) for gid in answers}
    assert said == {**dict.fromkeys(ran, ("commit",)), **dict.fromkeys(never, ("rollback",))}, answers
    assert {i for found in answers.values() for _, i in found} == {0, 1}, "one checker answered every check"
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.order_rows == {token: (f"u{token[1:]}", 1) for token in ran.values()}
    assert (books.redis_stock, books.mysql_stock, books.redis_fenced) == (12, 12, 4)
    assert _carried(settings) == carried + 8  # each committed message on the topic once, no rolled back one
