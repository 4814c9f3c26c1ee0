"""Restocks during a sale, on the real stack: units added once per request id, in Redis and MySQL, and sold.

The books are read back with plain SQL and plain Redis commands (tests/oracle.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pymysql
from sqlalchemy.engine.url import make_url

from flashsale.config import Settings
from flashsale.models import PurchaseStatus
from flashsale.ops import reconcile
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.records import Decision, Restock
from tests.acceptance.crowd import Crowd
from tests.acceptance.harness import Pipeline
from tests.oracle import balanced, redis_client, redis_stock


def _mysql(settings: Settings) -> pymysql.connections.Connection:  # type: ignore[type-arg]
    url = make_url(settings.mysql_url)
    return pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password, database=url.database
    )


def _cli(pipeline: Pipeline, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashsale", *args],
        capture_output=True,
        text=True,
        env={**pipeline.base_env, **env},
        timeout=120,
    )


def test_a_restock_during_a_sale_is_added_once_however_often_it_is_asked_and_every_unit_sells_once(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    from flashsale import FlashSale

    set_stock(settings, sku, 20)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    _, url = pipeline.producer()
    crowd = Crowd(url, sku, buyers=12, run_id=f"r{os.getpid()}").start()
    try:
        assert poll_until(lambda: redis_stock(settings.redis_url, sku) <= 10, 60), "the sale did not start"
        with FlashSale(settings) as sale:
            first = sale.add_stock(sku, 15, "r1")
            again = sale.add_stock(sku, 15, "r1")  # a retry of the same restock: nothing more
        retried = _cli(pipeline, "stock", "add", sku, "15", "--request-id", "r1")
        assert poll_until(lambda: redis_stock(settings.redis_url, sku) == 0, 60), crowd.counts()
        # Sold out: a second restock brings the SKU back on sale, and its units sell too.
        second = _cli(pipeline, "stock", "add", sku, "5", "--request-id", "r2")
        assert poll_until(lambda: redis_stock(settings.redis_url, sku) == 0, 60), "the restock did not sell"
        time.sleep(1)
    finally:
        crowd.stop()
    assert (first.outcome, first.qty, again.outcome, again.qty) == (Restock.ADDED, 15, Restock.ALREADY_ADDED, 15)
    assert again.message_id is None and first.message_id
    assert retried.returncode == 0 and json.loads(retried.stdout)["outcome"] == "already_added", retried.stderr
    assert second.returncode == 0 and json.loads(second.stdout)["outcome"] == "added", second.stderr

    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.redis_added == books.mysql_added == {"r1": 15, "r2": 5}
    assert books.sold == 40 and books.redis_stock == books.mysql_stock == 0 and books.oversold() == 0
    assert books.against(crowd.answers, crowd.asked, crowd.users) == []
    assert crowd.counts()["accepted"] == 40
    report = reconcile.run(settings.with_overrides(settle_s=0), [sku])[0][0]
    assert report.problems == [] and (report.redis_added_qty, report.mysql_added_qty) == (20, 20)


def test_a_restock_whose_process_dies_before_its_commit_is_settled_by_the_checker_and_added_once(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 3)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    pipeline.ready_all()
    died = _cli(pipeline, "stock", "add", sku, "7", "--request-id", "r-crash", FLASHSALE_FAILPOINTS="restock-after-add")
    assert died.returncode == -9, (died.returncode, died.stderr[-2000:])
    # The units were added in Redis; the checker commits the half message from its record, and the
    # consumer applies it: MySQL holds the same 10 units.
    books = balanced(settings, sku)
    assert books.problems == [] and books.mysql_added == {"r-crash": 7} and books.mysql_stock == 10, books.problems
    retried = _cli(pipeline, "stock", "add", sku, "7", "--request-id", "r-crash")
    assert retried.returncode == 0 and json.loads(retried.stdout) | {"message_id": None} == {
        "outcome": "already_added",
        "request_id": "r-crash",
        "qty": 7,
        "stock": 10,
        "message_id": None,
    }
    assert balanced(settings, sku).mysql_stock == 10


def test_a_restock_of_a_sku_with_a_deadline_and_units_given_back_keeps_every_book_exact(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    from flashsale import FlashSale

    set_stock(settings, sku, 2, pay_within_ms=600_000)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    pipeline.ready_all()
    with FlashSale(settings) as sale:
        bought = [sale.purchase(sku, f"u{i}", 1, f"t{i}").status for i in range(3)]
        assert bought == [PurchaseStatus.ACCEPTED, PurchaseStatus.ACCEPTED, PurchaseStatus.SOLD_OUT]
        assert sale.add_stock(sku, 2, "r1").outcome is Restock.ADDED
        assert sale.cancel(sku, "t0", "u0", "c0").decision is Decision.CANCELLED
        # The sold-out answer sealed the SKU (docs/operations.md): units back go on sale when the seal ends.
        _until_unsealed(settings, sku)
        more = [sale.purchase(sku, f"v{i}", 1, f"n{i}").status for i in range(4)]
    assert more == [PurchaseStatus.ACCEPTED] * 3 + [PurchaseStatus.SOLD_OUT]
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.sold, books.mysql_returned, books.mysql_added, books.mysql_stock) == (4, {"t0": 1}, {"r1": 2}, 0)


def _until_unsealed(settings: Settings, sku: str) -> None:
    """Wait, on Redis's clock, for the end of the SKU's seal (seal.lua), if it has one."""
    r = redis_client(settings.redis_url)
    try:
        until = int(r.hget(f"fs:{{{sku}}}:meta", "sealed_until") or 0)
        seconds, micros = r.time()
        left_ms = until - (int(seconds) * 1000 + int(micros) // 1000)
    finally:
        r.close()
    time.sleep(max(left_ms, 0) / 1000 + 0.02)


def test_stock_add_refuses_an_unknown_sku_a_bad_quantity_and_a_request_id_reused_saying_why(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    unknown = _cli(pipeline, "stock", "add", sku, "5", "--request-id", "r1")
    assert unknown.returncode == 2 and f"unknown SKU {sku!r}" in unknown.stderr, unknown.stderr
    set_stock(settings, sku, 10)
    for bad in ("0", "-3", "many", "1000001"):
        refused = _cli(pipeline, "stock", "add", sku, bad, "--request-id", "r1")
        assert refused.returncode == 2 and "QTY" in refused.stderr, refused.stderr
    # Without a request id a retry could not be told from a new restock: the id is required.
    anonymous = _cli(pipeline, "stock", "add", sku, "5")
    assert anonymous.returncode == 2 and "--request-id" in anonymous.stderr, anonymous.stderr
    assert balanced(settings, sku).redis_added == {}
    pipeline.checker()
    assert _cli(pipeline, "stock", "add", sku, "5", "--request-id", "r1").returncode == 0
    other = _cli(pipeline, "stock", "add", sku, "7", "--request-id", "r1")
    assert other.returncode == 2 and "added 5 unit(s)" in other.stderr and "not 7" in other.stderr, other.stderr
    assert balanced(settings, sku, 0).redis_added == {"r1": 5}


def test_stock_set_waits_for_a_restock_mysql_has_not_applied_yet(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    from flashsale import FlashSale

    set_stock(settings, sku, 10)
    pipeline.checker()  # no consumer yet: the restock's message waits in the broker
    with FlashSale(settings) as sale:
        assert sale.add_stock(sku, 4, "r-waiting").outcome is Restock.ADDED
    refused = _cli(pipeline, "stock", "set", sku, "20")
    assert refused.returncode != 0 and "restock(s) in Redis that MySQL has not applied yet" in refused.stderr
    assert balanced(settings, sku, 0).redis_added == {"r-waiting": 4}  # nothing was loaded
    pipeline.consumer()
    assert balanced(settings, sku).mysql_added == {"r-waiting": 4}
    loaded = _cli(pipeline, "stock", "set", sku, "20")
    assert loaded.returncode == 0, loaded.stderr
    books = balanced(settings, sku)
    assert books.problems == [] and books.redis_added == books.mysql_added == {} and books.mysql_stock == 20


def test_a_restock_of_a_sold_out_partitioned_sku_goes_to_its_pool_and_sells_once(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 12, partitions=3)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    _, url = pipeline.producer()
    crowd = Crowd(url, sku, buyers=8, run_id=f"p{os.getpid()}").start()
    try:
        assert poll_until(lambda: crowd.counts()["sold_out"] >= 20, 60), crowd.counts()
        added = _cli(pipeline, "stock", "add", sku, "9", "--request-id", "r-pool")
        assert added.returncode == 0 and json.loads(added.stdout)["outcome"] == "added", added.stderr
        assert poll_until(lambda: crowd.counts()["accepted"] == 21, 60), crowd.counts()
        time.sleep(1)
    finally:
        crowd.stop()
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert (books.sold, books.redis_stock, books.mysql_stock, books.oversold()) == (21, 0, 0, 0)
    assert books.redis_added == books.mysql_added == {"r-pool": 9}
    assert books.against(crowd.answers, crowd.asked, crowd.users) == []
    report = reconcile.run(settings.with_overrides(settle_s=0), [sku])[0][0]
    assert report.problems == [], report.problems


def test_reconcile_finds_a_restock_mysql_lost_and_repair_carries_it_again_once(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    from flashsale import FlashSale

    set_stock(settings, sku, 4)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    pipeline.ready_all()
    with FlashSale(settings) as sale:
        assert sale.add_stock(sku, 6, "r-lost").outcome is Restock.ADDED
    assert balanced(settings, sku).mysql_added == {"r-lost": 6}
    # MySQL loses the restock (a restore from an older backup, say): its row and its units.
    conn = _mysql(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM stock_additions WHERE sku = %s", (sku,))
            cur.execute("UPDATE inventory SET stock = stock - 6 WHERE sku = %s", (sku,))
        conn.commit()
    finally:
        conn.close()
    found = _cli(pipeline, "reconcile", sku, "--json", FLASHSALE_SETTLE_S="0")
    assert found.returncode == 1 and json.loads(found.stdout)["skus"][0]["restock_drift"] == ["r-lost"], found.stdout
    repaired = _cli(pipeline, "reconcile", sku, "--repair", "--wait", "60", "--json", FLASHSALE_SETTLE_S="0")
    assert repaired.returncode == 0, (repaired.stdout, repaired.stderr[-2000:])
    assert json.loads(repaired.stdout)["repairs"][0]["restocks_replayed"] == 1
    books = balanced(settings, sku)
    assert books.problems == [] and books.mysql_added == {"r-lost": 6} and books.mysql_stock == 10, books.problems
