"""The order lifecycle's books, read back with plain SQL and plain Redis commands (no flashsale code).

Like tests/oracle.py, this module writes out the Redis key layout and the SQL tables a second time on
purpose, so that a blind spot shared by flashsale's own readers cannot hide a defect from the tests. It
reads what the oracle does not: each order's state and deadline in the Redis log, the decision counters
of the SKU's meta hash, and each order's and each return's row in MySQL (returns counted per token, so a
token given back twice would show).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pymysql
import redis
from sqlalchemy.engine.url import make_url

from tests.oracle import redis_stock as oracle_stock

#: The MySQL status of each order state of the Redis log.
STATUS = {"awaiting": "awaiting_payment", "paid": "paid", "cancelled": "cancelled", "expired": "expired"}
#: Order states whose units went back on sale.
RETURNED = ("cancelled", "expired")
#: The decision id decide.lua records when the deadline expired the order (constants.EXPIRY_DECISION).
BY_DEADLINE = "deadline"


@dataclass(frozen=True)
class OrderRow:
    user: str
    qty: int
    status: str
    due_ms: int | None
    decided_ms: int | None
    #: when the consumer wrote it (this host's clock): its deadline's timer is sent right after
    created_ms: int


@dataclass
class LifecycleBooks:
    sku: str
    initial: int
    redis_stock: int
    meta: dict[str, str]
    #: token -> its log entry (every state: deducted, returned, fenced)
    entries: dict[str, dict[str, Any]]
    mysql_initial: int
    mysql_stock: int
    orders: dict[str, OrderRow]
    #: token -> (rows, units, reason) of stock_returns
    returns: dict[str, tuple[int, int, str]]
    #: tokens of deductions MySQL refused as conflicts, not resolved since
    open_conflicts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def orders_in(self, *states: str) -> dict[str, dict[str, Any]]:
        """Log entries of orders in one of `states` (awaiting, paid, cancelled, expired)."""
        return {t: e for t, e in self.entries.items() if e.get("order") in states and e["state"] != "fenced"}

    def units(self, *states: str) -> int:
        return sum(int(e["qty"]) for e in self.orders_in(*states).values())

    def awaiting(self) -> dict[str, dict[str, Any]]:
        """Orders still awaiting payment whose units are still held."""
        return {t: e for t, e in self.orders_in("awaiting").items() if e["state"] == "deducted"}

    def final(self) -> bool:
        """Sold out for good: nothing on sale, and no order left that could give units back."""
        return self.redis_stock == 0 and not self.awaiting()

    def oversold(self) -> int:
        """Units held (paid or awaiting payment) beyond the loaded stock, on the worse of the two sides."""
        held = self.units("paid") + sum(int(e["qty"]) for e in self.awaiting().values())
        mysql_held = sum(r.qty for r in self.orders.values() if r.status in ("paid", "awaiting_payment"))
        return max(0, held - self.initial, mysql_held - self.mysql_initial, -self.redis_stock, -self.mysql_stock)

    def expiry_lateness_ms(self) -> list[int]:
        """decided_ts - due of each order its deadline expired (not a late payment), sorted."""
        return sorted(
            int(e["decided_ts"]) - int(e["due"])
            for e in self.orders_in("expired").values()
            if e.get("decision") == BY_DEADLINE
        )

    def late_applies(self, since_ms: int, bound_ms: int) -> list[str]:
        """Orders MySQL received more than `bound_ms` after their purchase (or after `since_ms`, if later)."""
        return [
            f"{t}: accepted {e['ts']}, in MySQL {self.orders[t].created_ms}"
            for t, e in self.orders_in(*STATUS).items()
            if t in self.orders and self.orders[t].created_ms > max(int(e["ts"]), since_ms) + bound_ms
        ]

    def late_deadlines(self, since_ms: int, bound_ms: int) -> list[str]:
        """Orders expired before their deadline, or left awaiting payment more than `bound_ms` past the
        latest of their deadline, `since_ms` and the moment MySQL received them (its timer is sent then)."""
        wrong = []
        for token, entry in self.orders_in(*RETURNED).items():
            due, decided = int(entry["due"]), int(entry["decided_ts"])
            row = self.orders.get(token)
            start = max(due, since_ms, row.created_ms if row else 0)
            if (entry["order"] == "expired" and decided < due) or decided > start + bound_ms:
                wrong.append(f"{token}: {entry['order']}, due {due}, decided {decided}, counted from {start}")
        return wrong

    def check(self) -> list[str]:
        """Where MySQL, the log and the counters disagree on the orders and what they gave back."""
        problems = self._conserved()
        for token, entry in self.orders_in(*STATUS).items():
            row = self.orders.get(token)
            want = STATUS[entry["order"]]
            if row is None or row.status != want:
                problems.append(f"{token}: log says {want}, MySQL {row.status if row else 'no order'}")
            elif entry["order"] != "awaiting" and row.decided_ms != int(entry["decided_ts"]):
                problems.append(f"{token}: decided at {entry['decided_ts']} in the log, {row.decided_ms} in MySQL")
            if (entry["state"] == "returned") != (entry["order"] in RETURNED):
                problems.append(f"{token}: {entry['order']} but its entry is {entry['state']}")
        given_back = {t: (1, int(e["qty"]), e["order"]) for t, e in self.orders_in(*RETURNED).items()}
        if self.returns != given_back:
            wrong = sorted(set(self.returns.items()) ^ set(given_back.items()))[:5]
            problems.append(f"stock_returns {len(self.returns)} rows, log {len(given_back)} returns: {wrong}")
        problems += self._counters()
        return problems

    def _conserved(self) -> list[str]:
        """Units: loaded = on sale + paid + awaiting payment, on each side; both sides' stock the same."""
        held = self.units("paid") + sum(int(e["qty"]) for e in self.awaiting().values())
        problems = []
        if self.redis_stock + held != self.initial:
            problems.append(f"Redis: stock {self.redis_stock} + paid or awaiting {held} != loaded {self.initial}")
        mysql_held = sum(r.qty for r in self.orders.values() if r.status in ("paid", "awaiting_payment"))
        if self.mysql_stock + mysql_held != self.mysql_initial:
            problems.append(f"MySQL: stock {self.mysql_stock} + paid or awaiting {mysql_held} != {self.mysql_initial}")
        if self.redis_stock != self.mysql_stock:
            problems.append(f"stock: Redis {self.redis_stock}, MySQL {self.mysql_stock}")
        return problems

    def _counters(self) -> list[str]:
        """The meta hash's decision counters against the log entries they count."""
        count = Counter(e["order"] for e in self.orders_in("paid", *RETURNED).values())
        returned = self.orders_in(*RETURNED)
        want = {
            "paid_count": count["paid"],
            "cancelled_count": count["cancelled"],
            "expired_count": count["expired"],
            "returned_count": len(returned),
            "returned_qty": sum(int(e["qty"]) for e in returned.values()),
        }
        have = {name: int(self.meta.get(name, 0)) for name in want}
        return [] if have == want else [f"Redis counters {have}, log {want}"]


#: Log states of a token that bought (then maybe gave its units back).
SOLD = ("deducted", "returned")
#: The decision counters each key (or partition) keeps in its meta hash.
COUNTERS = ("paid_count", "cancelled_count", "expired_count", "returned_count", "returned_qty")


def _one_key_stock(redis_url: str, sku: str) -> int:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return int(r.get(f"fs:{{{sku}}}:stock") or -1)
    finally:
        r.close()


def _mysql(mysql_url: str) -> pymysql.connections.Connection:
    url = make_url(mysql_url)
    return pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password, database=url.database
    )


def read(redis_url: str, mysql_url: str, sku: str) -> LifecycleBooks:
    """The SKU's orders as they are now: Redis first (MySQL only ever lags behind it)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        meta = {str(k): str(v) for k, v in r.hgetall(f"fs:{{{sku}}}:meta").items()}
        shards = meta.get("parts", "").split()
        entries: dict[str, dict[str, Any]] = {}
        for shard in shards or [sku]:
            for token, raw in r.hscan_iter(f"fs:{{{shard}}}:log", count=1000):
                entry = json.loads(raw)
                # A token sold on one partition may be fenced on another it tried first: the sale counts.
                if entries.get(token, {}).get("state") not in SOLD:
                    entries[token] = entry
        if shards:  # each partition counts its own decisions
            counted = Counter[str]()
            for shard in shards:
                for name, value in r.hgetall(f"fs:{{{shard}}}:meta").items():
                    if name in COUNTERS:
                        counted[name] += int(value)
            meta.update((name, str(value)) for name, value in counted.items())
    finally:
        r.close()
    # On partitions: their stock, the pool's and the units moving between them (tests/oracle.py).
    stock = oracle_stock(redis_url, sku) if shards else _one_key_stock(redis_url, sku)
    conn = _mysql(mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT initial_stock, stock FROM inventory WHERE sku = %s", (sku,))
            initial, mysql_stock = cur.fetchone() or (-1, -1)
            cur.execute(
                "SELECT token, user_id, qty, status, due_ms, decided_ms, created_at FROM orders WHERE sku = %s", (sku,)
            )
            orders = {
                t: OrderRow(str(u), int(q), str(st), d, x, int(at.timestamp() * 1000))
                for t, u, q, st, d, x, at in cur.fetchall()
            }
            cur.execute(
                "SELECT token, COUNT(*), SUM(qty), MIN(reason) FROM stock_returns WHERE sku = %s GROUP BY token",
                (sku,),
            )
            returns = {t: (int(n), int(q), str(why)) for t, n, q, why in cur.fetchall()}
            cur.execute("SELECT token FROM conflicts WHERE sku = %s AND resolved_at IS NULL ORDER BY token", (sku,))
            conflicts = [str(t) for (t,) in cur.fetchall()]
    finally:
        conn.close()
    return LifecycleBooks(
        sku,
        int(meta.get("initial", -1)),
        stock,
        meta,
        entries,
        int(initial),
        int(mysql_stock),
        orders,
        returns,
        conflicts,
    )


def wait_settled(redis_url: str, mysql_url: str, sku: str, timeout_s: float) -> tuple[LifecycleBooks, float]:
    """Read until MySQL holds every order as the log does (or `timeout_s` passes: `problems` says why not);
    returns the books and the seconds it took. Conflicts left open 10 s end the wait: nothing resolves
    them but a message that carries their token again."""
    started = time.monotonic()
    conflicted_since: float | None = None
    while True:
        books = read(redis_url, mysql_url, sku)
        books.problems = books.check()
        elapsed = time.monotonic() - started
        if not books.open_conflicts:
            conflicted_since = None
        elif conflicted_since is None:
            conflicted_since = elapsed
        stuck = conflicted_since is not None and elapsed - conflicted_since > 10
        if not books.problems or elapsed > timeout_s or stuck:
            return books, elapsed
        time.sleep(0.25)


def percentile(values: list[int], q: float) -> int:
    """The q-quantile (0..1) of sorted `values`, nearest rank; -1 when there are none."""
    if not values:
        return -1
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]
