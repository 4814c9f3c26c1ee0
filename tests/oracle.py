"""The books, read back with plain SQL and plain Redis commands: an oracle that shares no code with flashsale.

Every acceptance test judges the pipeline with this module, never with flashsale's own reconcile, so
that a blind spot in reconcile cannot hide the same defect from the tests. The Redis key layout and the
SQL tables are written out here a second time on purpose.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pymysql
import redis
from sqlalchemy.engine.url import make_url


class _HasUrls(Protocol):
    redis_url: str
    mysql_url: str


#: Answers after which a buyer holds a purchase: each such token must have exactly one order.
HOLDS = frozenset({"accepted", "duplicate"})


@dataclass
class Books:
    sku: str
    redis_initial: int
    redis_stock: int
    redis_deducted: dict[str, int]  # token -> qty, log entries whose deduction stands
    redis_counter_qty: int
    mysql_initial: int
    mysql_stock: int
    mysql_deducted: dict[str, int]  # token -> qty, rows of stock_deductions
    orders: Counter[str]  # token -> orders
    ordered_qty: int
    open_conflicts: int
    redis_fenced: int = 0  # messages the checker fenced (the meta counter)
    order_rows: dict[str, tuple[str, int]] = field(default_factory=dict)  # token -> (user, qty) of its order
    redis_returned: dict[str, int] = field(default_factory=dict)  # token -> qty, cancelled or expired in the log
    mysql_returned: dict[str, int] = field(default_factory=dict)  # token -> qty, rows of stock_returns
    order_status: dict[str, str] = field(default_factory=dict)  # token -> orders.status
    redis_added: dict[str, int] = field(default_factory=dict)  # request id -> qty, restocks in Redis
    mysql_added: dict[str, int] = field(default_factory=dict)  # request id -> qty, rows of stock_additions
    problems: list[str] = field(default_factory=list)  # what balance() found when the books were read

    @property
    def sold(self) -> int:
        return sum(self.redis_deducted.values())

    @property
    def applied(self) -> list[str]:
        """Tokens MySQL applied, sorted."""
        return sorted(self.mysql_deducted)

    @property
    def order_count(self) -> int:
        return sum(self.orders.values())

    def oversold(self) -> int:
        """Units sold beyond the initial stock and the restocks, on the worst of the three books."""
        redis_supply = self.redis_initial + sum(self.redis_added.values())
        mysql_supply = self.mysql_initial + sum(self.mysql_added.values())
        return max(
            0,
            self.sold - redis_supply,
            sum(self.mysql_deducted.values()) - sum(self.mysql_returned.values()) - mysql_supply,
            self.ordered_qty - sum(self.mysql_returned.values()) - mysql_supply,
            -self.redis_stock,
            -self.mysql_stock,
        )

    def against(
        self,
        answers: Mapping[str, Iterable[str]],
        asked: Mapping[str, Iterable[int]],
        users: Mapping[str, str],
        limit: int = 0,
    ) -> list[str]:
        """Where the orders disagree with what the buyers heard, in both directions: every token told
        `accepted` or `duplicate` has exactly one order and no other token has any; each order is for
        the token's buyer and a quantity it was sent with; no buyer holds more than `limit` units."""
        told = {t for t, said in answers.items() if HOLDS & set(said)}
        problems = [f"told {sorted(answers[t])}, {self.orders.get(t, 0)} order(s): {t}" for t in self.lost(answers)]
        theirs = set(self.orders) & set(answers)  # orders of these buyers (others may buy the same SKU)
        problems += [f"an order for {t}, whose buyer was never told so" for t in sorted(theirs - told)]
        for token, (user, qty) in sorted(self.order_rows.items()):
            if token in users and user != users[token]:
                problems.append(f"{token} ordered for {user}, bought by {users[token]}")
            if token in asked and qty not in set(asked[token]):
                problems.append(f"{token} ordered {qty} unit(s), asked {sorted(asked[token])}")
        if limit:
            held: Counter[str] = Counter()
            for token, (user, qty) in self.order_rows.items():
                if token in answers:
                    held[user] += qty
            problems += [f"{user} holds {n} units, past the limit of {limit}" for user, n in held.items() if n > limit]
        return problems

    def lost(self, answers: Mapping[str, Iterable[str]]) -> list[str]:
        """Tokens a buyer was told they hold (accepted or duplicate) that do not have exactly one order."""
        return sorted(t for t, said in answers.items() if HOLDS & set(said) and self.orders.get(t, 0) != 1)

    def balance(self) -> list[str]:
        """What keeps the three books from agreeing, or [] when Redis, MySQL and the orders say the same."""
        problems = []
        if self.redis_initial != self.mysql_initial:
            problems.append(f"initial stock: Redis {self.redis_initial}, MySQL {self.mysql_initial}")
        added = sum(self.redis_added.values())
        if self.redis_stock + self.sold != self.redis_initial + added:
            problems.append(
                f"Redis stock {self.redis_stock} + sold {self.sold} != initial {self.redis_initial} + added {added}"
            )
        if self.redis_added != self.mysql_added:
            problems.append(f"restocks in Redis {self.redis_added}, in MySQL {self.mysql_added}")
        if self.redis_counter_qty != self.sold + sum(self.redis_returned.values()):
            problems.append(f"Redis counter {self.redis_counter_qty} != log {self.sold} + returned")
        applied = sum(self.mysql_deducted.values())
        given_back = sum(self.mysql_returned.values())
        if self.mysql_stock + applied - given_back != self.mysql_initial + sum(self.mysql_added.values()):
            problems.append(
                f"MySQL stock {self.mysql_stock} + applied {applied} - returned {given_back} "
                f"!= initial {self.mysql_initial} + added {sum(self.mysql_added.values())}"
            )
        if self.redis_returned != self.mysql_returned:
            problems.append(f"returned in Redis {sorted(self.redis_returned)}, in MySQL {sorted(self.mysql_returned)}")
        ever = {**self.redis_deducted, **self.redis_returned}
        if ever != self.mysql_deducted:
            missing = sorted(set(ever) - set(self.mysql_deducted))
            extra = sorted(set(self.mysql_deducted) - set(ever))
            other = sorted(t for t in set(ever) & set(self.mysql_deducted) if ever[t] != self.mysql_deducted[t])
            problems.append(
                f"{len(missing)} deduction(s) not in MySQL {missing[:5]}, {len(extra)} not in Redis {extra[:5]}, "
                f"{len(other)} of other quantities there {other[:5]}"
            )
        doubled = sorted(t for t, n in self.orders.items() if n != 1)
        if set(self.orders) != set(self.mysql_deducted) or doubled:
            problems.append(f"orders do not match deductions ({len(self.orders)} vs {len(self.mysql_deducted)})")
        if self.ordered_qty != applied:
            problems.append(f"ordered {self.ordered_qty} units, applied {applied}")
        if self.open_conflicts:
            problems.append(f"{self.open_conflicts} open conflict(s)")
        return problems


def redis_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A plain redis-py client for the URL: a cluster client if the server says it is a cluster node."""
    probe = redis.Redis.from_url(url)
    try:
        cluster = bool(probe.info("cluster").get("cluster_enabled"))
    finally:
        probe.close()
    if cluster:
        return redis.RedisCluster.from_url(url, decode_responses=True)
    return redis.Redis.from_url(url, decode_responses=True)


def mysql_connection(mysql_url: str) -> pymysql.connections.Connection:
    """A plain PyMySQL connection to the database the URL names."""
    url = make_url(mysql_url)
    return pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password, database=url.database
    )


def drop_database(mysql_url: str) -> None:
    """Drop the database the URL names, if it exists (on a connection to none)."""
    server, database = mysql_url.rsplit("/", 1)
    conn = mysql_connection(server + "/")
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
    finally:
        conn.close()


def read_books(redis_url: str, mysql_url: str, sku: str) -> Books:
    """The SKU's books as they are now, from both stores (Redis first; MySQL only ever lags behind it)."""
    r = redis_client(redis_url)
    try:
        meta = r.hgetall(f"fs:{{{sku}}}:meta")
        stock, counter, fenced, deducted = _redis_side(r, sku, meta)
        returned = _returned(r, sku, meta)
        redis_added = {
            request: int(json.loads(raw)["qty"]) for request, raw in r.hgetall(f"fs:{{{sku}}}:added").items()
        }
    finally:
        r.close()
    books = Books(
        sku=sku,
        redis_initial=int(meta.get("initial", -1)),
        redis_stock=stock,
        redis_deducted=deducted,
        redis_counter_qty=counter,
        redis_returned=returned,
        redis_fenced=fenced,
        redis_added=redis_added,
        **_mysql_side(mysql_url, sku),
    )
    books.problems = books.balance()  # filled on every read, so that no check of it can pass unread
    return books


def _mysql_side(mysql_url: str, sku: str) -> dict[str, Any]:
    """The SKU's fields of Books read from MySQL, by plain SQL."""
    conn = mysql_connection(mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT initial_stock, stock FROM inventory WHERE sku = %s", (sku,))
            inventory = cur.fetchone()
            cur.execute("SELECT token, qty FROM stock_deductions WHERE sku = %s", (sku,))
            rows = {token: int(qty) for token, qty in cur.fetchall()}
            cur.execute("SELECT token, user_id, qty, status FROM orders WHERE sku = %s", (sku,))
            orders = cur.fetchall()
            cur.execute("SELECT token, qty FROM stock_returns WHERE sku = %s", (sku,))
            given_back = {token: int(qty) for token, qty in cur.fetchall()}
            cur.execute("SELECT request_id, qty FROM stock_additions WHERE sku = %s", (sku,))
            mysql_added = {request: int(qty) for request, qty in cur.fetchall()}
            cur.execute("SELECT COUNT(*) FROM conflicts WHERE sku = %s AND resolved_at IS NULL", (sku,))
            conflicts = cur.fetchone()
    finally:
        conn.close()
    return {
        "mysql_initial": int(inventory[0]) if inventory else -1,
        "mysql_stock": int(inventory[1]) if inventory else -1,
        "mysql_deducted": rows,
        "orders": Counter(token for token, *_ in orders),
        "ordered_qty": sum(int(qty) for _, _, qty, _ in orders),
        "order_rows": {token: (str(user), int(qty)) for token, user, qty, _ in orders},
        "order_status": {token: str(status) for token, _, _, status in orders},
        "mysql_returned": given_back,
        "mysql_added": mysql_added,
        "open_conflicts": int(conflicts[0]) if conflicts else 0,
    }


#: Reads of a partitioned SKU's keys made at most, until one saw no transfer begin or end (_redis_side).
READS = 50


def _redis_side(
    r: redis.Redis | redis.RedisCluster, sku: str, meta: dict[str, str], *, logs: bool = True
) -> tuple[int, int, int, dict[str, int]]:
    """Stock, deducted counter, fenced counter and standing deductions (token -> qty) of the SKU.

    A partitioned SKU (its meta lists `parts`) sums its partitions' two sub-domains, its pool, and the
    units of transfers under way: a refill whose partition has not recorded it yet, a drain whose
    partition has and whose pool has not (its record is still there). Its keys are read one after
    another: a transfer that began or ended between two reads would be counted twice or not at all, so
    the read is made again until no transfer began (`moves`) or ended (`done`) while it was made (at
    most READS times: a sale that moves stock without a pause is read as it stands). Without `logs`, the
    standing deductions are not read (an empty map), and the read is short.
    """
    if not meta.get("parts"):
        return _read_side(r, sku, meta, logs)
    for _ in range(READS):
        before = _transfers_seen(r, sku)
        side = _read_side(r, sku, meta, logs)
        if _transfers_seen(r, sku) == before:
            break
    return side


def _transfers_seen(r: redis.Redis | redis.RedisCluster, sku: str) -> tuple[str | None, int]:
    """The transfers a partitioned SKU ever began, and those it completed."""
    return r.hget(f"fs:{{{sku}}}:meta", "moves"), r.hlen(f"fs:{{{sku}}}:done")


def _read_side(
    r: redis.Redis | redis.RedisCluster, sku: str, meta: dict[str, str], logs: bool
) -> tuple[int, int, int, dict[str, int]]:
    shards = meta.get("parts", "").split() or [sku]
    stock = counter = fenced = 0
    deducted: dict[str, int] = {}
    received: dict[str, dict[str, str]] = {}
    for shard in shards:
        tag = "{" + shard + "}"
        raw_stock = r.get(f"fs:{tag}:stock")
        if raw_stock is None:
            return -1, 0, 0, deducted
        shard_meta = r.hgetall(f"fs:{tag}:meta")
        stock += int(raw_stock) + int(shard_meta.get("standby", 0))
        counter += int(shard_meta.get("deducted_qty", 0))
        fenced += int(shard_meta.get("fenced_count", 0))
        received[shard] = r.hgetall(f"fs:{tag}:refills")
        for token, raw in r.hscan_iter(f"fs:{tag}:log", count=1000) if logs else ():
            entry = json.loads(raw)
            if entry["state"] == "deducted":
                deducted[token] = int(entry["qty"])
    if shards != [sku]:
        stock += int(r.get(f"fs:{{{sku}}}:pool") or 0)
        for transfer_id, raw in r.hgetall(f"fs:{{{sku}}}:transfers").items():
            transfer = json.loads(raw)
            done = received.get(transfer["part"], {}).get(transfer_id)
            if transfer["dir"] == "out" and done is None:
                stock += int(transfer["qty"])
            elif transfer["dir"] == "in" and done is not None:
                stock -= int(done)
    return stock, counter, fenced, deducted


def _returned(r: redis.Redis | redis.RedisCluster, sku: str, meta: dict[str, str]) -> dict[str, int]:
    """Tokens whose order was cancelled or expired, their units back on sale (token -> qty)."""
    returned: dict[str, int] = {}
    for shard in meta.get("parts", "").split() or [sku]:
        for token, raw in r.hscan_iter(f"fs:{{{shard}}}:log", count=1000):
            entry = json.loads(raw)
            if entry["state"] == "returned":
                returned[token] = int(entry["qty"])
    return returned


def redis_stock(redis_url: str, sku: str) -> int:
    """The units the SKU still has on sale (or moving between its pool and partitions), from Redis alone."""
    r = redis_client(redis_url)
    try:
        return _redis_side(r, sku, r.hgetall(f"fs:{{{sku}}}:meta"), logs=False)[0]
    finally:
        r.close()


def partition_order(parts: Sequence[str], token: str) -> list[str]:
    """The order in which `token` tries a partitioned SKU's partitions, computed here from docs/scaling.md
    and not with flashsale's Layout: the token's crc32 divided by the number of partitions left, the
    remainder picks the next partition among them, the quotient goes on to pick from the rest."""
    left, code, order = list(parts), zlib.crc32(token.encode()), []
    while left:
        code, i = divmod(code, len(left))
        order.append(left.pop(i))
    return order


def misplaced(redis_url: str, sku: str, tokens: Iterable[str]) -> list[str]:
    """Tokens of a partitioned SKU not sold where their order sends them. Each must be in the log of one
    partition only: the first of its order not closed, or one before it, closed since it sold there (a
    partition closes for good, and a token passes only closed ones)."""
    r = redis_client(redis_url)
    try:
        parts = r.hget(f"fs:{{{sku}}}:meta", "parts").split()
        closed = {p for p in parts if r.hget(f"fs:{{{p}}}:meta", "closed") == "1"}
        logs = {p: set(r.hkeys(f"fs:{{{p}}}:log")) for p in parts}
    finally:
        r.close()
    problems = []
    for token in sorted(tokens):
        order = partition_order(parts, token)
        reach = next((i for i, p in enumerate(order) if p not in closed), len(order) - 1)
        where = [p for p in parts if token in logs[p]]
        if len(where) != 1 or where[0] not in order[: reach + 1]:
            problems.append(f"{token} sold on {where}: its order {order}, closed {sorted(closed)}")
    return problems


def now(settings: _HasUrls, sku: str) -> Books:
    """The books as they are right now."""
    return read_books(settings.redis_url, settings.mysql_url, sku)


def balanced(settings: _HasUrls, sku: str, timeout_s: float = 90) -> Books:
    """The books once they balance (or as they are after `timeout_s`: then `problems` says why not)."""
    return wait_balanced(settings.redis_url, settings.mysql_url, sku, timeout_s)[0]


def wait_balanced(redis_url: str, mysql_url: str, sku: str, timeout_s: float) -> tuple[Books, float]:
    """Read the books until they balance or `timeout_s` passes; returns them and the seconds it took."""
    started = time.monotonic()
    while True:
        books = read_books(redis_url, mysql_url, sku)
        elapsed = time.monotonic() - started
        if not books.problems or elapsed > timeout_s:
            return books, elapsed
        time.sleep(0.25)
