"""Orders awaiting payment, on the real stack: paid, cancelled, expired, carried to MySQL, units sold again.

The books are read back with plain SQL and plain Redis commands.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pymysql
import redis
from sqlalchemy.engine.url import make_url

from flashsale.config import Settings
from flashsale.models import PurchaseStatus
from flashsale.ops import reconcile
from flashsale.ops.setup import set_stock
from flashsale.records import Decision
from tests.acceptance.harness import Pipeline
from tests.oracle import balanced

DEADLINE_MS = 4_000


def _mysql(settings: Settings) -> pymysql.connections.Connection:  # type: ignore[type-arg]
    url = make_url(settings.mysql_url)
    return pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password, database=url.database
    )


def _mysql_books(settings: Settings, sku: str) -> tuple[dict[str, str], dict[str, int], int]:
    """Each order's status, each return's units, and the inventory's stock, by plain SQL."""
    conn = _mysql(settings)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT token, status FROM orders WHERE sku = %s", (sku,))
            statuses = dict(cur.fetchall())
            cur.execute("SELECT token, qty FROM stock_returns WHERE sku = %s", (sku,))
            returns = dict(cur.fetchall())
            cur.execute("SELECT stock FROM inventory WHERE sku = %s", (sku,))
            (stock,) = cur.fetchone()
        return statuses, returns, int(stock)
    finally:
        conn.close()


def _wait_for(settings: Settings, sku: str, want: dict[str, str], timeout_s: float = 60) -> tuple[dict, dict, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        books = _mysql_books(settings, sku)
        if books[0] == want or time.monotonic() > deadline:
            return books
        time.sleep(0.2)


def test_orders_end_paid_cancelled_or_expired_once_and_every_unit_given_back_sells_again(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    from flashsale import FlashSale

    set_stock(settings, sku, 10, pay_within_ms=DEADLINE_MS)
    pipeline.consumer()
    pipeline.checker()
    with FlashSale(settings) as sale:
        bought = [sale.purchase(sku, f"u{i}", 1, f"t{i}").status for i in range(11)]
        assert bought == [PurchaseStatus.ACCEPTED] * 10 + [PurchaseStatus.SOLD_OUT]
        answers = {
            "pay t0": sale.pay(sku, "t0", "p0").decision,
            "pay t0 again": sale.pay(sku, "t0", "p0").decision,
            "pay t1": sale.pay(sku, "t1", "p1").decision,
            "pay t2": sale.pay(sku, "t2", "p2").decision,
            "pay t3": sale.pay(sku, "t3", "p3").decision,
            "pay t7": sale.pay(sku, "t7", "p7").decision,
            "pay t7 twice": sale.pay(sku, "t7", "p7-other").decision,
            "cancel t4": sale.cancel(sku, "t4", "u4", "c4").decision,
            "cancel t5": sale.cancel(sku, "t5", "u5", "c5").decision,
            "cancel t6 by another": sale.cancel(sku, "t6", "u0", "c6").decision,
            "cancel t0 once paid": sale.cancel(sku, "t0", "u0", "c0").decision,
            "expire t9 early": sale.expire(sku, "t9").decision,
        }
        started = sale.order(sku, "t0")
        assert started is not None and started.due_ms is not None
        # Past the deadline, on Redis's clock: a late payment is refused and expires its order.
        time.sleep(DEADLINE_MS / 1000 + 0.5)
        answers |= {
            "pay t8 late": sale.pay(sku, "t8", "p8").decision,
            "pay t8 late again": sale.pay(sku, "t8", "p8").decision,
            "expire t9": sale.expire(sku, "t9").decision,
            "expire t6": sale.expire(sku, "t6").decision,
            "expire t1 once paid": sale.expire(sku, "t1").decision,
        }
        resold = Counter(sale.purchase(sku, f"v{i}", 1, f"r{i}").status for i in range(7))
    assert answers == {
        "pay t0": Decision.PAID,
        "pay t0 again": Decision.PAID,
        "pay t1": Decision.PAID,
        "pay t2": Decision.PAID,
        "pay t3": Decision.PAID,
        "pay t7": Decision.PAID,
        "pay t7 twice": Decision.ALREADY_PAID,
        "cancel t4": Decision.CANCELLED,
        "cancel t5": Decision.CANCELLED,
        "cancel t6 by another": Decision.NOT_YOURS,
        "cancel t0 once paid": Decision.ALREADY_PAID,
        "expire t9 early": Decision.NOT_DUE,
        "pay t8 late": Decision.ALREADY_EXPIRED,
        "pay t8 late again": Decision.ALREADY_EXPIRED,
        "expire t9": Decision.EXPIRED,
        "expire t6": Decision.EXPIRED,
        "expire t1 once paid": Decision.ALREADY_PAID,
    }
    # Five units came back (t4, t5 cancelled; t6, t8, t9 expired) and went to exactly five new buyers.
    assert resold == {PurchaseStatus.ACCEPTED: 5, PurchaseStatus.SOLD_OUT: 2}

    want = {f"t{i}": "paid" for i in (0, 1, 2, 3, 7)}
    want |= {"t4": "cancelled", "t5": "cancelled", "t6": "expired", "t8": "expired", "t9": "expired"}
    raw = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    log = {t: json.loads(v) for t, v in raw.hgetall(f"fs:{{{sku}}}:log").items()}
    want |= {t: "awaiting_payment" for t, e in log.items() if t.startswith("r") and e["state"] == "deducted"}
    statuses, returns, mysql_stock = _wait_for(settings, sku, want)
    assert statuses == want
    assert returns == {t: 1 for t in ("t4", "t5", "t6", "t8", "t9")}
    assert mysql_stock == 0 and int(raw.get(f"fs:{{{sku}}}:stock") or -1) == 0
    assert {t: e.get("order") for t, e in log.items() if not t.startswith("r")} == {
        t: {"awaiting_payment": "awaiting"}.get(s, s) for t, s in want.items() if not t.startswith("r")
    }
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.redis_returned == books.mysql_returned == returns
    report = reconcile.run(settings.with_overrides(settle_s=0), [sku])[0][0]
    assert report.problems == [] and report.order_drift == 0
    assert report.orders_by_state == {"paid": 5, "cancelled": 2, "expired": 3, "awaiting_payment": 5}


def test_unpaid_orders_expire_when_their_deadline_fires_and_their_units_sell_again(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    from flashsale import FlashSale

    set_stock(settings, sku, 20, pay_within_ms=2_000)
    pipeline.consumer()
    pipeline.checker()
    pipeline.expirer()
    raw = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    with FlashSale(settings) as sale:
        assert all(sale.purchase(sku, f"u{i}", 1, f"t{i}").status is PurchaseStatus.ACCEPTED for i in range(20))
        assert all(sale.pay(sku, f"t{i}", f"p{i}").decision is Decision.PAID for i in range(8))

        def log() -> dict[str, dict[str, object]]:
            return {t: json.loads(v) for t, v in raw.hgetall(f"fs:{{{sku}}}:log").items()}

        deadline = time.monotonic() + 60
        while sum(e.get("order") == "expired" for e in log().values()) < 12 and time.monotonic() < deadline:
            time.sleep(0.2)
        entries = log()
        assert Counter(str(e.get("order")) for e in entries.values()) == {"paid": 8, "expired": 12}
        late_ms = sorted(
            int(str(e["decided_ts"])) - int(str(e["due"])) for e in entries.values() if e["order"] == "expired"
        )
        # Never before the deadline (Redis's clock decides); how late is what the broker's timer costs.
        assert late_ms[0] >= 0
        print(f"expiry lateness, {len(late_ms)} orders: p50 {late_ms[len(late_ms) // 2]} ms, max {late_ms[-1]} ms")
        want = {f"t{i}": "paid" for i in range(8)} | {f"t{i}": "expired" for i in range(8, 20)}
        statuses, returns, mysql_stock = _wait_for(settings, sku, want)
        assert statuses == want
        assert returns == {f"t{i}": 1 for i in range(8, 20)} and mysql_stock == 12
        books = balanced(settings, sku)
        assert books.problems == [] and books.redis_stock == 12, books.problems
        resold = Counter(sale.purchase(sku, f"v{i}", 1, f"r{i}").status for i in range(13))
    assert resold == {PurchaseStatus.ACCEPTED: 12, PurchaseStatus.SOLD_OUT: 1}


def test_an_operator_sells_with_a_deadline_and_shows_pays_and_cancels_orders_from_the_cli(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    import subprocess
    import sys

    from flashsale import FlashSale

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flashsale", *args],
            capture_output=True,
            text=True,
            env=pipeline.base_env,
            timeout=120,
        )

    loaded = cli("stock", "set", sku, "2", "--pay-within", "10m")
    assert loaded.returncode == 0 and "orders to be paid within 10m" in loaded.stdout, loaded.stderr
    pipeline.consumer()
    with FlashSale(settings) as sale:
        assert [sale.purchase(sku, f"u{i}", 1, f"t{i}").status for i in range(2)] == [PurchaseStatus.ACCEPTED] * 2
    shown = json.loads(cli("order", "show", sku, "t0").stdout)
    assert (shown["state"], shown["user_id"], shown["decided_ms"]) == ("awaiting", "u0", None) and shown["due_ms"]
    paid = cli("order", "pay", sku, "t0", "--payment-id", "p0")
    assert paid.returncode == 0 and json.loads(paid.stdout)["decision"] == "paid"
    theirs = cli("order", "cancel", sku, "t1", "--user", "u0", "--request-id", "c1")
    assert theirs.returncode == 1 and json.loads(theirs.stdout)["decision"] == "not_yours"
    cancelled = cli("order", "cancel", sku, "t1", "--user", "u1", "--request-id", "c1")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["decision"] == "cancelled"
    late = cli("order", "pay", sku, "t1", "--payment-id", "p1")
    assert late.returncode == 1 and json.loads(late.stdout)["decision"] == "already_cancelled"
    missing = cli("order", "show", sku, "nobody")
    assert missing.returncode == 2 and "no purchase of token 'nobody'" in missing.stderr
    assert json.loads(cli("order", "show", sku, "t0").stdout)["state"] == "paid"
    statuses, returns, mysql_stock = _wait_for(settings, sku, {"t0": "paid", "t1": "cancelled"})
    assert (statuses, returns, mysql_stock) == ({"t0": "paid", "t1": "cancelled"}, {"t1": 1}, 1)
