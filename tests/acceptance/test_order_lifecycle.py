"""Orders awaiting payment, on the real stack: paid, cancelled, expired, carried to MySQL, units sold again.

The books are read back with plain SQL and plain Redis commands.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pymysql
import redis
from sqlalchemy.engine.url import make_url

from flashsale import FlashSale
from flashsale.adapters.redis.stock import RedisStock
from flashsale.config import Settings
from flashsale.models import PurchaseStatus
from flashsale.ops import reconcile
from flashsale.ops.setup import set_stock
from flashsale.records import Decision, Layout
from tests.acceptance.harness import Pipeline
from tests.oracle import balanced, redis_client

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
    pipeline.launch("consumer")
    pipeline.launch("checker")
    pipeline.ready_all()
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
    pipeline.launch("consumer")
    pipeline.launch("checker")
    pipeline.launch("expirer")
    pipeline.ready_all()
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
    nobodys = cli("order", "pay", sku, "nobody", "--payment-id", "p9")
    assert nobodys.returncode == 2 and json.loads(nobodys.stdout)["decision"] == "no_order"
    assert json.loads(cli("order", "show", sku, "t0").stdout)["state"] == "paid"
    statuses, returns, mysql_stock = _wait_for(settings, sku, {"t0": "paid", "t1": "cancelled"})
    assert (statuses, returns, mysql_stock) == ({"t0": "paid", "t1": "cancelled"}, {"t1": 1}, 1)


# --- partitioned SKUs --------------------------------------------------------------------------------
PARTS_DEADLINE_MS = 6_000


def _layout(settings: Settings, sku: str) -> Layout:
    stock = RedisStock(settings.redis_url)
    try:
        layout = stock.layout(sku)
    finally:
        stock.close()
    assert layout is not None
    return layout


def _tokens_for(layout: Layout, part: str, n: int, tag: str) -> list[str]:
    """`n` tokens whose order starts at `part` and goes on to the anchor (for the anchor: any)."""
    ours = (f"{tag}{i}-{uuid.uuid4().hex[:8]}" for i in range(10**9))
    wanted = [part] if part == layout.anchor else [part, layout.anchor]
    return list(itertools.islice((t for t in ours if list(layout.order(t))[: len(wanted)] == wanted), n))


def _partition_logs(settings: Settings, layout: Layout) -> dict[str, dict[str, dict[str, object]]]:
    """Each partition's log (token -> entry), read with plain Redis commands."""
    raw = redis_client(settings.redis_url)
    try:
        return {p: {t: json.loads(v) for t, v in raw.hgetall(f"fs:{{{p}}}:log").items()} for p in layout.parts}
    finally:
        raw.close()


class Buyers:
    """Every answer each token heard, with its buyer and quantity, for the oracle's `against`."""

    def __init__(self, sale: FlashSale, sku: str) -> None:
        self.sale, self.sku = sale, sku
        self.answers: dict[str, list[str]] = {}
        self.users: dict[str, str] = {}

    def buy(self, tokens: list[str]) -> Counter[PurchaseStatus]:
        said: Counter[PurchaseStatus] = Counter()
        for token in tokens:
            status = self.sale.purchase(self.sku, f"u-{token}", 1, token).status
            self.answers.setdefault(token, []).append(status.value)
            self.users[token] = f"u-{token}"
            said[status] += 1
        return said

    def accepted(self, tokens: list[str]) -> list[str]:
        return [t for t in tokens if self.answers.get(t, [""])[0] == "accepted"]


def test_units_given_back_on_open_and_closed_partitions_sell_again_once_the_sku_was_sold_out(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    sell_out_give_back_and_sell_again(pipeline, settings, sku)


def sell_out_give_back_and_sell_again(pipeline: Pipeline, settings: Settings, sku: str) -> None:
    """A partitioned SKU with a deadline sold out; orders paid, cancelled and expired on open and closed
    partitions; every unit given back sold again to exactly one new buyer; the books read back.

    12 units, 4 in each of 3 partitions, the pool empty. The partitions other than the anchor close as
    they run dry, so orders are given back to open and to closed partitions alike."""
    set_stock(settings.with_overrides(partition_refill=4), sku, 12, partitions=3, pay_within_ms=PARTS_DEADLINE_MS)
    layout = _layout(settings, sku)
    p0, p1, p2 = layout.parts
    first = {p: _tokens_for(layout, p, 5, f"a{n}") for n, p in enumerate(layout.parts)}
    pipeline.launch("consumer")
    pipeline.launch("checker")
    pipeline.launch("expirer")
    pipeline.ready_all()
    with FlashSale(settings) as sale:
        buyers = Buyers(sale, sku)
        # The fifth token of p1 (and of p2) finds it empty: it closes, and the token is sold on the anchor.
        sold = [*first[p1], *first[p2], *first[p0][:2]]
        assert buyers.buy(sold) == {PurchaseStatus.ACCEPTED: 12}
        assert buyers.buy(first[p0][2:3]) == {PurchaseStatus.SOLD_OUT: 1}
        assert _closed(settings, layout) == {p1, p2}
        answers = _decide_before_the_deadline(sale, sku, first)
        assert answers == {
            "pay p0": Decision.PAID,
            "pay p1": Decision.PAID,
            "pay p2": Decision.PAID,
            "pay p2 again": Decision.PAID,
            "pay p2 with another payment": Decision.ALREADY_PAID,
            "cancel on p1 (closed)": Decision.CANCELLED,
            "cancel on p0, past p1 (closed)": Decision.CANCELLED,
            "cancel on p2 by another": Decision.NOT_YOURS,
            "expire on p2 early": Decision.NOT_DUE,
        }
        shown = [sale.order(sku, first[p1][1]), sale.order(sku, first[p1][4])]
        assert [(e.part, e.order) for e in shown if e] == [(p1, "cancelled"), (p0, "cancelled")]
        # Two units came back (one to the closed p1): exactly two of six new buyers get them, then sold out.
        time.sleep(0.2)  # past the producer's last read of the registry (50 ms), which said sold out
        wave = [t for n, p in enumerate(layout.parts) for t in _tokens_for(layout, p, 2, f"b{n}")]
        assert buyers.buy(wave) == {PurchaseStatus.ACCEPTED: 2, PurchaseStatus.SOLD_OUT: 4}
        assert all(sale.pay(sku, t, f"pay-{t}").decision is Decision.PAID for t in buyers.accepted(wave))
        # The seven orders left unpaid expire on their timers, on the closed partitions too; a payment
        # past the deadline never lands.
        unpaid = [first[p0][1], first[p1][2], first[p1][3], *first[p2][1:]]
        _wait_expired(settings, layout, unpaid)
        assert sale.pay(sku, first[p2][3], "late").decision is Decision.ALREADY_EXPIRED
        again = [t for n, p in enumerate(layout.parts) for t in _tokens_for(layout, p, 4, f"c{n}")]
        assert buyers.buy(again) == {PurchaseStatus.ACCEPTED: 7, PurchaseStatus.SOLD_OUT: 5}
        resold = [*buyers.accepted(wave), *buyers.accepted(again)]
        assert all(sale.pay(sku, t, f"pay-{t}").decision is Decision.PAID for t in buyers.accepted(again))
    # The closed partitions stayed closed: what came back to them was drained to the pool, and sold on.
    assert _closed(settings, layout) == {p1, p2}
    logs = _partition_logs(settings, layout)
    assert {t for p in (p1, p2) for t, e in logs[p].items() if e["order"] == "paid"} == {first[p1][0], first[p2][0]}
    assert set(resold) <= set(logs[p0])  # resold on the anchor, the one partition open
    given_back = [first[p1][1], first[p1][4], *unpaid]
    want = {first[p][0]: "paid" for p in layout.parts} | dict.fromkeys(resold, "paid")
    want |= {first[p1][1]: "cancelled", first[p1][4]: "cancelled"} | dict.fromkeys(unpaid, "expired")
    statuses, returns, mysql_stock = _wait_for(settings, sku, want)
    assert (statuses, returns, mysql_stock) == (want, dict.fromkeys(given_back, 1), 0)
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.against(buyers.answers, {t: [1] for t in buyers.answers}, buyers.users) == []
    assert books.oversold() == 0 and books.redis_stock == 0 and books.redis_returned == dict.fromkeys(given_back, 1)
    report = reconcile.run(settings.with_overrides(settle_s=0), [sku])[0][0]
    assert report.problems == [] and report.order_drift == 0
    assert report.orders_by_state == {"paid": 12, "cancelled": 2, "expired": 7}


def _closed(settings: Settings, layout: Layout) -> set[str]:
    raw = redis_client(settings.redis_url)
    try:
        return {p for p in layout.parts if raw.hget(f"fs:{{{p}}}:meta", "closed") == "1"}
    finally:
        raw.close()


def _decide_before_the_deadline(sale: FlashSale, sku: str, first: dict[str, list[str]]) -> dict[str, Decision]:
    p0, p1, p2 = first
    return {
        "pay p0": sale.pay(sku, first[p0][0], "pay-0").decision,
        "pay p1": sale.pay(sku, first[p1][0], "pay-1").decision,
        "pay p2": sale.pay(sku, first[p2][0], "pay-2").decision,
        "pay p2 again": sale.pay(sku, first[p2][0], "pay-2").decision,
        "pay p2 with another payment": sale.pay(sku, first[p2][0], "pay-2-other").decision,
        "cancel on p1 (closed)": sale.cancel(sku, first[p1][1], f"u-{first[p1][1]}", "c-1").decision,
        "cancel on p0, past p1 (closed)": sale.cancel(sku, first[p1][4], f"u-{first[p1][4]}", "c-4").decision,
        "cancel on p2 by another": sale.cancel(sku, first[p2][1], "someone-else", "c-2").decision,
        "expire on p2 early": sale.expire(sku, first[p2][2]).decision,
    }


def _wait_expired(settings: Settings, layout: Layout, tokens: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        orders = {t: e.get("order") for log in _partition_logs(settings, layout).values() for t, e in log.items()}
        if all(orders.get(t) == "expired" for t in tokens):
            return
        assert time.monotonic() < deadline, {t: orders.get(t) for t in tokens}
        time.sleep(0.2)


def test_a_payment_racing_the_expiry_of_an_order_on_a_partition_is_decided_once_and_mysql_follows(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    # Each order is paid by one producer and expired by another at the same instant: well before its
    # deadline (the payment lands), at it (either may win), or well after it (the order expires).
    pay_within_ms, spread_ms = 3_000, (-300, 0, 300)
    set_stock(settings.with_overrides(partition_refill=5), sku, 9, partitions=3, pay_within_ms=pay_within_ms)
    pipeline.launch("consumer")
    pipeline.launch("checker")
    pipeline.ready_all()
    tokens = [f"race-{i}" for i in range(9)]
    with FlashSale(settings) as payer, FlashSale(settings) as expirer:
        assert [payer.purchase(sku, f"u-{t}", 1, t).status for t in tokens] == [PurchaseStatus.ACCEPTED] * 9
        orders = {t: payer.order(sku, t) for t in tokens}
        assert len({e.part for e in orders.values() if e}) > 1  # the orders are spread over the partitions
        answers: dict[str, tuple[Decision, Decision]] = {}

        def race(i: int, token: str) -> None:
            due_ms = orders[token].due_ms  # type: ignore[union-attr]
            time.sleep(max(0.0, (due_ms + spread_ms[i % 3]) / 1000 - time.time()))
            start = threading.Barrier(2)

            def pay() -> Decision:
                start.wait()
                return payer.pay(sku, token, f"pay-{token}").decision

            def expire() -> Decision:
                start.wait()
                return expirer.expire(sku, token).decision

            with ThreadPoolExecutor(2) as both:
                paid, expired = both.submit(pay), both.submit(expire)
                answers[token] = (paid.result(), expired.result())

        with ThreadPoolExecutor(len(tokens)) as pool:
            list(pool.map(race, range(len(tokens)), tokens))
    logs = _partition_logs(settings, _layout(settings, sku))
    ended = {t: e.get("order") for log in logs.values() for t, e in log.items()}
    for token, (pay, expire) in answers.items():
        assert ended[token] in ("paid", "expired"), (token, pay, expire)
        assert (pay is Decision.PAID) == (ended[token] == "paid") and not (pay is expire is Decision.PAID)
        assert expire in ((Decision.NOT_DUE, Decision.ALREADY_PAID) if pay is Decision.PAID else _EXPIRY_ANSWERS)
    assert {"paid", "expired"} <= set(ended.values()), answers
    expired = sorted(t for t in tokens if ended[t] == "expired")
    statuses, returns, mysql_stock = _wait_for(settings, sku, {t: str(ended[t]) for t in tokens})
    assert (statuses, sorted(returns), mysql_stock) == ({t: ended[t] for t in tokens}, expired, len(expired))
    books = balanced(settings, sku)
    assert books.problems == [] and books.redis_stock == len(expired), books.problems
    report = reconcile.run(settings.with_overrides(settle_s=0), [sku])[0][0]
    assert report.problems == [] and report.order_drift == 0


#: What an expiry hears when the order did not end paid: it expired it, or the payment came past the
#: deadline and expired it first, or it came early (and the payment, past the deadline, expired it).
_EXPIRY_ANSWERS = (Decision.EXPIRED, Decision.ALREADY_EXPIRED, Decision.NOT_DUE)
