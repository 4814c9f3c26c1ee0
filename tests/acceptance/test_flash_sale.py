"""A whole flash sale over HTTP through the three real processes."""

from __future__ import annotations

import asyncio

from flashsale.bench.load import run_load
from flashsale.config import Settings
from flashsale.ops.setup import set_stock
from tests.acceptance.harness import Pipeline, free_port, post
from tests.oracle import balanced, mysql_connection


def test_a_flash_sale_sells_exactly_the_stock_and_the_books_balance(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 1000)
    url = pipeline.start_all()

    load = asyncio.run(run_load(url, [sku], attempts=5000, concurrency=200))

    assert load.attempts == 5000
    assert load.statuses["accepted"] == 1000, load.statuses
    assert load.statuses["sold_out"] == 4000, load.statuses
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.redis_stock, books.mysql_stock) == (0, 0)
    assert (len(books.mysql_deducted), books.order_count, len(books.redis_deducted)) == (1000, 1000, 1000)
    # The buyers' own record agrees with the books: every accepted token has one order, and no other has.
    assert set(books.orders) == {token for _, token, _ in load.accepted}
    assert books.lost({token: ["accepted"] for _, token, _ in load.accepted}) == []


def test_the_python_api_purchases_through_the_same_pipeline(pipeline: Pipeline, settings: Settings, sku: str) -> None:
    from flashsale import FlashSale, PurchaseStatus

    set_stock(settings, sku, 2, per_user_limit=1)
    pipeline.consumer()
    with FlashSale(settings) as sale:
        first = sale.purchase(sku, "alice", 1, "tok-1")
        again = sale.purchase(sku, "alice", 1, "tok-1")
        greedy = sale.purchase(sku, "alice", 1, "tok-2")
        bob = sale.purchase(sku, "bob", 1, "tok-3")
        late = sale.purchase(sku, "carol", 1, "tok-4")
        bad = sale.purchase(sku, "carol", 0, "tok-5")
    assert (first.status, first.remaining) == (PurchaseStatus.ACCEPTED, 1)
    assert (again.status, again.message_id) == (PurchaseStatus.DUPLICATE, first.message_id)
    assert greedy.status is PurchaseStatus.LIMIT_EXCEEDED
    assert (bob.status, bob.remaining) == (PurchaseStatus.ACCEPTED, 0)
    assert late.status is PurchaseStatus.SOLD_OUT and bad.status is PurchaseStatus.INVALID
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.applied == ["tok-1", "tok-3"] and dict(books.orders) == {"tok-1": 1, "tok-3": 1}


def test_tokens_that_differ_only_in_case_are_two_purchases_in_every_store(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    import json
    import subprocess
    import sys

    set_stock(settings, sku, 10)
    url = pipeline.start_all()
    answers = {t: post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": t})[1]["status"] for t in ("Ab1", "aB1")}
    assert answers == {"Ab1": "accepted", "aB1": "accepted"}
    books = balanced(settings, sku, 60)
    assert books.problems == []
    assert dict(books.orders) == {"Ab1": 1, "aB1": 1} and books.mysql_stock == 8

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**pipeline.base_env, "FLASHSALE_SETTLE_S": "0"}
        return subprocess.run([sys.executable, "-m", "flashsale", *args], capture_output=True, text=True, env=env)

    reconciled = cli("reconcile", sku, "--json")
    row = json.loads(reconciled.stdout)["skus"][0]
    assert reconciled.returncode == 0 and (row["redis_deducted"], row["mysql_applied"], row["orders"]) == (2, 2, 2)
    replayed = cli("replay", "--token", "Ab1", "--sku", sku, "--dry-run", "--json")
    report = json.loads(replayed.stdout)
    assert replayed.returncode == 0 and (report["published"], report["already_applied"], report["not_deducted"]) == (
        1,
        1,
        [],
    )
    # A token Redis does not hold as deducted is not replayed, and says so by its exit code too: a script
    # must not take the run for a repair.
    other_case = cli("replay", "--token", "AB1", "--sku", sku, "--dry-run", "--json")
    assert other_case.returncode == 1 and json.loads(other_case.stdout)["not_deducted"] == ["AB1"]


def test_a_retry_after_the_sell_out_gets_duplicate_with_the_original_message_id(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 1)
    url = pipeline.start_all()
    first = post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "tok-1"})[1]
    late = post(url, {"sku": sku, "user_id": "u2", "qty": 1, "token": "tok-2"})[1]
    retry = post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "tok-1"})[1]
    assert (first["status"], late["status"], retry["status"]) == ("accepted", "sold_out", "duplicate")
    assert retry["message_id"] == first["message_id"]
    books = balanced(settings, sku, 60)
    assert books.problems == [] and dict(books.orders) == {"tok-1": 1}


def test_stock_and_readiness_answer_503_while_redis_is_unreachable_and_liveness_200(
    pipeline: Pipeline, sku: str
) -> None:
    import json
    import time
    import urllib.error
    import urllib.request

    port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    pipeline.start("producer", FLASHSALE_HTTP_PORT=str(port), FLASHSALE_REDIS_URL=dead_redis)

    def get(path: str) -> tuple[int, dict[str, object]]:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    status, body = get(f"/stock/{sku}")
    assert status == 503 and dead_redis in str(body["error"])
    status, body = get("/readyz")
    assert status == 503 and body["status"] == "unavailable" and dead_redis in str(body["redis"])
    assert body["broker"] == "ok"
    assert get("/healthz") == (200, {"status": "ok"})


def test_every_metric_the_dashboard_queries_is_in_the_processes_real_metrics(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    import urllib.request

    from flashsale import failpoints
    from tests.integration.test_docker_compose import dashboard_metric_names

    set_stock(settings, sku, 10)
    checker = pipeline.launch("checker")
    consumer = pipeline.launch("consumer")
    producer, url = pipeline.producer()
    assert post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "t-metrics"})[1]["status"] == "accepted"
    # A producer that dies after its half message: the checker's answer fills the check series.
    _, doomed_url = pipeline.producer(failpoints=failpoints.AFTER_HALF_MESSAGE)
    try:
        post(doomed_url, {"sku": sku, "user_id": "u2", "qty": 1, "token": "t-doomed"}, timeout_s=15)
    except OSError:
        pass
    # The broker asks any producer of the topic, or the checker: one of them answers.
    checker.wait_for(lambda: "key t-doomed -> rollback" in checker.text() + producer.text(), "answering the check", 60)
    assert balanced(settings, sku, 60).problems == []

    exported: set[str] = set()
    for child in (producer, consumer, checker):
        with urllib.request.urlopen(child.url + "/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line and not line.startswith("#"):
                    exported.add(line.split("{", 1)[0].split(" ", 1)[0])
    missing = sorted(dashboard_metric_names() - exported)
    assert missing == [], f"the dashboard queries series no process exports: {missing}"


def _rows_of(mysql_url: str, sku: str) -> dict[str, int]:
    """Every table of the database `mysql_url` names, with its rows of `sku` (-1 for a table with no sku)."""
    conn = mysql_connection(mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT t.table_name, MAX(c.column_name = 'sku') FROM information_schema.tables t "
                "LEFT JOIN information_schema.columns c USING (table_schema, table_name) "
                "WHERE t.table_schema = DATABASE() GROUP BY t.table_name"
            )
            tables = {str(name): bool(has_sku) for name, has_sku in cur.fetchall()}
            rows = dict.fromkeys(tables, -1)
            for name in (n for n, has_sku in tables.items() if has_sku):
                cur.execute(f"SELECT COUNT(*) FROM `{name}` WHERE sku = %s", (sku,))
                rows[name] = int(cur.fetchone()[0])
            return rows
    finally:
        conn.close()


def test_a_test_sale_leaves_the_users_own_databases_alone(
    pipeline: Pipeline, settings: Settings, stack: Settings, sku: str
) -> None:
    """The processes keep to the Redis database and the MySQL database their URLs name: the session's
    (Redis 15, flashsale_test), never the user's own on the same servers (Redis 0, flashsale)."""
    import redis

    users = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    ours = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        before, tables = users.smembers("fs:skus"), _rows_of(stack.mysql_url, sku)
        set_stock(settings, sku, 5)
        url = pipeline.start_all()
        said = post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "t1"})[1]["status"]
        books = balanced(settings, sku)
        # Nothing of the sale in the user's databases: no key names the SKU, no row of it, no new table.
        assert sorted(users.scan_iter(match=f"*{sku}*", count=1000)) == [] and users.smembers("fs:skus") == before
        assert _rows_of(stack.mysql_url, sku) == tables and set(tables.values()) <= {0, -1}
        # All of it in the session's: the sale's keys in its Redis database, its order in its MySQL database.
        assert said == "accepted" and books.problems == [] and books.order_rows == {"t1": ("u1", 1)}
        assert sku in ours.smembers("fs:skus") and ours.hget(f"fs:{{{sku}}}:log", "t1") is not None
    finally:
        users.close()
        ours.close()
