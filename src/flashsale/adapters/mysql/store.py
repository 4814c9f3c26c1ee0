"""The books in MySQL, through SQLAlchemy Core + PyMySQL (imported only here and by the bench baselines)."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.url import make_url

from flashsale import constants as c
from flashsale.adapters.mysql import lifecycle, sql
from flashsale.adapters.mysql.statements import query
from flashsale.errors import LoadUnderWay, ServiceUnavailable, StockError, StockShort, StoreError, UnknownSku
from flashsale.logs import ids
from flashsale.models import SOURCE_REPLAY, Deduction, DeductionMessage, Purchase
from flashsale.records import (
    Addition,
    ApplyReport,
    Bookkeeping,
    Conflict,
    DeadLetter,
    DeadLetterRow,
    DeductionRow,
    Incoming,
    InventoryView,
)

logger = logging.getLogger(__name__)

#: MySQL error numbers that mean "this server is not reachable right now".
_UNREACHABLE = {2002, 2003, 2006, 2013, 2055, 1053}
#: The row this process writes to prove the database takes writes.
_HEARTBEAT_NAME = f"{socket.gethostname()}:{os.getpid()}"[:128]
#: Errors that go away when the same transaction is simply run again (deadlock, lock wait timeout,
#: too many connections). 1467 is how MariaDB reports a deadlock on a table's AUTO-INC lock, which an
#: INSERT ... SELECT takes under innodb_autoinc_lock_mode=1 (MariaDB's default; the stack runs mode 2).
_TRANSIENT = {1213, 1205, 1040, 1614, 1467}
#: Times a load of stock runs when it meets a deadlock or a lock wait that timed out.
_LOAD_ATTEMPTS = 3
#: The server is read-only (--read-only, or innodb_read_only): a replica, or a failover in progress.
_READ_ONLY = {1290, 1836}
#: Deliveries of a message during which a shortfall of a SKU sold with a payment deadline is waited out
#: (a return on its way), before it is recorded as a conflict; the consumer spaces them out
#: (pipeline.consumer.short_wait_s) to span the slowest path of the units on their way.
SHORTFALL_ATTEMPTS = 10


class MySQLStore:
    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        self.engine: Engine = sa.create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_recycle=3600,
            isolation_level="READ COMMITTED",
            connect_args={"connect_timeout": 3, "read_timeout": 30, "write_timeout": 30},
        )

    @property
    def address(self) -> str:
        url = make_url(self.url)
        return f"{url.host}:{url.port or 3306}/{url.database}"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as exc:
            code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
            if exc.connection_invalidated or code in _UNREACHABLE:
                raise ServiceUnavailable("MySQL", self.address, f"{what}: {exc.orig}") from exc
            if code in _READ_ONLY:
                raise ServiceUnavailable(
                    "MySQL", self.address, f"it refuses writes (read-only): {what}: {exc.orig}"
                ) from exc
            raise StoreError(f"{what} failed: {exc.orig}", retriable=code in _TRANSIENT) from exc
        except sa.exc.SQLAlchemyError as exc:  # pool exhausted, connection closed under us, ...
            raise StoreError(f"{what} failed: {exc}", retriable=True) from exc

    @contextmanager
    def transaction(self, what: str) -> Iterator[Connection]:
        with self._translate(what), self.engine.begin() as conn:
            yield conn

    def ping(self) -> None:
        """The database answers and takes a write: a read-only server (a replica, a failover) refuses it."""
        with self.transaction("write probe") as conn:
            conn.execute(query("heartbeat"), {"name": _HEARTBEAT_NAME})

    # --- schema -------------------------------------------------------------------------------------
    def ensure_database(self) -> bool:
        """Create the database of the URL if it is missing; returns True when it was created."""
        url = make_url(self.url)
        server = sa.create_engine(url.set(database=""), connect_args={"connect_timeout": 3})
        try:
            with self._translate("create database"), server.connect() as conn:
                exists = conn.execute(sa.text("SHOW DATABASES LIKE :db"), {"db": url.database}).first()
                if exists:
                    return False
                conn.execute(sa.text(f"CREATE DATABASE `{url.database}` CHARACTER SET utf8mb4"))
                return True
        finally:
            server.dispose()

    def schema_version(self) -> int:
        with self.transaction("read schema version") as conn:
            conn.execute(query("create_schema_version"))
            return int(conn.execute(query("schema_version")).scalar_one())

    def migrate(self) -> list[str]:
        """Apply pending migrations in order, each recorded in schema_version; returns their names."""
        applied: list[str] = []
        with self._translate("migrate"), self.engine.connect() as conn:
            # DDL commits implicitly in MySQL; a named lock keeps two `init`s from interleaving.
            conn.execute(query("lock_migrations"))
            try:
                conn.execute(query("create_schema_version"))
                current = int(conn.execute(query("schema_version")).scalar_one())
                for migration in sql.migrations():
                    if migration.version <= current:
                        continue
                    for statement in migration.statements:
                        conn.execute(sa.text(statement))
                    conn.execute(query("record_version"), {"version": migration.version, "name": migration.name})
                    conn.commit()
                    applied.append(f"{migration.version:04d}_{migration.name}")
            finally:
                conn.execute(query("unlock_migrations"))
                conn.commit()
        return applied

    # --- stock ----------------------------------------------------------------------------------------
    def load_stock(
        self, sku: str, qty: int, *, per_user_limit: int = 0, reset: bool = False, ticket: int | None = None
    ) -> None:
        """Load `sku` with `qty` units. A load numbered by Redis (`ticket`, see ticket.lua) writes only over a
        load with a lower number; None loads without one (a store no Redis fronts, the bench's baselines).
        A deadlock or a lock wait that timed out runs it again: a number stays good while its freeze holds."""
        for attempt in range(1, _LOAD_ATTEMPTS + 1):
            try:
                with self.transaction(f"load stock of {sku}") as conn:
                    self._load(conn, sku, qty, per_user_limit=per_user_limit, reset=reset, ticket=ticket)
                return
            except StoreError as exc:
                if not exc.retriable or attempt == _LOAD_ATTEMPTS:
                    raise
                logger.warning("the load of %s met a lock (%s); running it again", sku, exc)

    @staticmethod
    def _load(conn: Connection, sku: str, qty: int, *, per_user_limit: int, reset: bool, ticket: int | None) -> None:
        # The inventory row first (a SKU new to MySQL gets one), as the consumer takes it (apply_batch): a
        # batch either commits before the load, whose reset then deletes what it wrote, or waits for it
        # and finds its number. Locked, it also keeps a load that stalled in here from passing the
        # number's check against a row another load writes meanwhile.
        conn.execute(query("reserve_inventory"), {"sku": sku})
        held = conn.execute(query("lock_load_tickets", "skus"), {"skus": [sku]}).one().load_ticket
        if ticket is not None and held >= ticket:
            raise StockError(
                f"another load of {sku} wrote MySQL after this one's freeze ran out (it stalled longer than "
                "the freeze lasts): this one wrote nothing",
                hint="run `flashsale reconcile` to see what each side holds, then `flashsale stock set` again",
            )
        applied = int(conn.execute(query("deduction_count"), {"sku": sku}).scalar_one())
        if applied and not reset:
            raise StockError(
                f"{sku} already has {applied} applied deduction(s) in MySQL",
                hint="pass --reset to discard the SKU's deductions, orders and conflicts",
            )
        if reset:
            for name in ("delete_sku_history", "delete_sku_orders", "delete_sku_conflicts", "delete_sku_returns"):
                conn.execute(query(name), {"sku": sku})
        # Restocks belong to a load: a new one starts from its own quantity.
        conn.execute(query("delete_sku_additions"), {"sku": sku})
        params = {"sku": sku, "qty": qty, "per_user_limit": per_user_limit, "ticket": ticket}
        conn.execute(query("upsert_inventory"), params)

    def load_ticket(self, sku: str) -> int:
        """The number of the load MySQL holds of `sku` (0: none, or loaded without one)."""
        with self.transaction(f"read the load of {sku}") as conn:
            return int(conn.execute(query("load_ticket"), {"sku": sku}).scalar() or 0)

    def history(self, sku: str) -> int:
        """Deductions applied for the SKU."""
        with self.transaction(f"count deductions of {sku}") as conn:
            return int(conn.execute(query("deduction_count"), {"sku": sku}).scalar_one())

    def view(self, sku: str) -> InventoryView:
        with self.transaction(f"read {sku}") as conn:
            row = conn.execute(query("inventory"), {"sku": sku}).first()
            if row is None:
                raise UnknownSku(
                    f"unknown SKU {sku!r}: it is not in MySQL's inventory",
                    hint=f"load it with `flashsale stock set {sku} QTY`",
                )
            deductions, deducted = conn.execute(query("deduction_totals"), {"sku": sku}).one()
            orders, ordered = conn.execute(query("order_totals"), {"sku": sku}).one()
            returns, returned = conn.execute(query("return_totals"), {"sku": sku}).one()
            added = conn.execute(query("addition_totals"), {"sku": sku}).one()[1]
            states = {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(query("order_states"), {"sku": sku})}
        return InventoryView(
            sku=sku,
            initial=int(row.initial_stock),
            stock=int(row.stock),
            per_user_limit=int(row.per_user_limit),
            deductions=int(deductions),
            deducted_qty=int(deducted),
            orders=int(orders),
            ordered_qty=int(ordered),
            returns=int(returns),
            returned_qty=int(returned),
            added_qty=int(added),
            order_states=states,
        )

    # --- reconcile ----------------------------------------------------------------------------------
    def existing_tokens(self, sku: str, tokens: Sequence[str]) -> set[str]:
        if not tokens:
            return set()
        with self.transaction(f"look up tokens of {sku}") as conn:
            rows = conn.execute(query("existing_tokens", "tokens"), {"sku": sku, "tokens": list(tokens)})
            return {r[0] for r in rows}

    def additions(self, sku: str) -> dict[str, tuple[int, int]]:
        """The restocks MySQL applied for the SKU: request id -> (units, ms the restock was made)."""
        with self.transaction(f"read restocks of {sku}") as conn:
            return {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(query("sku_additions"), {"sku": sku})}

    def order_facts(self, sku: str, tokens: Sequence[str]) -> dict[str, tuple[str | None, bool]]:
        """For each token MySQL applied: its order's status (None: no order) and whether its units came back."""
        if not tokens:
            return {}
        with self.transaction(f"look up orders of {sku}") as conn:
            rows = conn.execute(query("order_facts", "tokens"), {"sku": sku, "tokens": list(tokens)})
            return {r[0]: (r[1], bool(r[2])) for r in rows}

    def deductions_page(self, sku: str, after: int, limit: int) -> list[DeductionRow]:
        """Applied deductions of the SKU with id > `after`, in id order (keyset paging)."""
        with self.transaction(f"page deductions of {sku}") as conn:
            rows = conn.execute(query("deductions_page"), {"sku": sku, "after": after, "limit": limit})
            return [_deduction_row(r) for r in rows]

    def dead_letters_page(self, after: int, limit: int, sku: str | None = None) -> list[DeadLetterRow]:
        """Dead letters not replayed yet with id > `after`, in id order (of one SKU, when given)."""
        with self.transaction("page dead letters") as conn:
            if sku is None:
                rows = conn.execute(query("dead_letters_page"), {"after": after, "limit": limit})
            else:
                params = {"after": after, "limit": limit, "sku": sku}
                rows = conn.execute(query("sku_dead_letters_page"), params)
            return [
                DeadLetterRow(int(r.id), r.message_id, r.topic, r.message_key, r.sku, r.reason, bytes(r.body))
                for r in rows
            ]

    def mark_replayed(self, ids: Sequence[int]) -> None:
        if ids:
            with self.transaction("mark dead letters replayed") as conn:
                conn.execute(query("mark_dead_letters_replayed", "ids"), {"ids": list(ids)})

    def applied(self, skus: Sequence[str]) -> tuple[int, int]:
        """(deductions, units) applied for these SKUs."""
        with self.transaction("count applied deductions") as conn:
            count, qty = conn.execute(query("applied_qty", "skus"), {"skus": list(skus)}).one()
            return int(count), int(qty)

    def create_missing_orders(self, sku: str) -> int:
        """An order for every applied deduction that lacks one; returns how many were created."""
        with self.transaction(f"create missing orders of {sku}") as conn:
            return int(conn.execute(query("create_missing_orders"), {"sku": sku}).rowcount)

    def bookkeeping(self, sku: str) -> Bookkeeping:
        """Counts reconcile needs besides the totals of `view`."""
        with self.transaction(f"read bookkeeping of {sku}") as conn:
            params = {"sku": sku}
            conflicts, conflict_qty = conn.execute(query("open_conflicts"), params).one()
            return Bookkeeping(
                orders_without_deduction=int(conn.execute(query("orders_without_deduction"), params).scalar_one()),
                deductions_without_order=int(conn.execute(query("deductions_without_order"), params).scalar_one()),
                dead_letters=int(conn.execute(query("open_dead_letters"), params).scalar_one()),
                conflicts=int(conflicts),
                conflict_qty=int(conflict_qty),
            )

    def skus(self) -> list[str]:
        with self.transaction("list skus") as conn:
            return [r[0] for r in conn.execute(query("inventory_skus"))]

    # --- the consumer's batch ---------------------------------------------------------------------------
    def apply_batch(
        self,
        items: Sequence[Incoming],
        dead: Sequence[DeadLetter] = (),
        conflicts: Sequence[Conflict] = (),
        additions: Sequence[Addition] = (),
        loads: Mapping[str, int] | None = None,
    ) -> ApplyReport:
        """Apply a batch in ONE transaction: restocks, token-unique rows, one guarded UPDATE per SKU, orders,
        conflicts.

        `loads`: the load Redis was read under for each SKU; refused (LoadUnderWay) where MySQL holds a later
        one. Those rows are locked first, in name order, as a load locks its row before it deletes anything:
        a load commits before this transaction and is seen, or after it and deletes what it wrote (a reset).

        Rows are inserted in token order and SKUs updated in name order, so two consumers sharing
        tokens or SKUs take their locks in the same order and cannot deadlock each other.
        """
        report = ApplyReport(dead_letters=list(dead))
        unique = _unique(items, report)
        batch_id = uuid.uuid4().hex
        with self.transaction("apply batch") as conn:
            _hold_loads(conn, loads or {})
            known = _known_skus(conn, {sku for sku, _ in unique} | {a.sku for a in additions})
            # A SKU sold with a payment deadline, or restocked, may have its stock updated twice (units given
            # back or added, then new deductions): its row is locked first, in one order, so two consumers
            # cannot take such rows in opposite orders.
            twice = set(lifecycle.lifecycle_skus(unique.values())) | {a.sku for a in additions if a.sku in known}
            if twice:
                conn.execute(query("lock_known_skus", "skus"), {"skus": sorted(twice)})
            rows = _deduction_rows(unique, known, batch_id, report)
            fresh = _insert_deductions(conn, rows, batch_id, report)
            to_order = _applied_before(unique, known, fresh)
            lifecycle.add_units(conn, [a for a in additions if a.sku in known], batch_id, report)
            report.dead_letters += [_unknown_addition(a) for a in additions if a.sku not in known]
            lifecycle.give_back(conn, unique.values(), batch_id, report)
            for sku in sorted(fresh):
                _deduct_sku(conn, batch_id, sku, fresh[sku], unique, report)
            # Every applied token has its order, made from its deduction row: this batch's rows (what stays
            # of them once conflicts are removed), then the tokens applied before: a no-op for a redelivery,
            # the missing order put back for a replay after an order was lost.
            for sku in sorted(fresh.keys() | to_order.keys()):
                if sku in fresh:
                    conn.execute(query("insert_batch_orders"), {"sku": sku, "batch_id": batch_id})
                if to_order.get(sku):
                    conn.execute(query("insert_orders", "tokens"), {"sku": sku, "tokens": to_order[sku]})
            lifecycle.set_states(conn, unique.values())
            _record_conflicts(conn, conflicts, report)
            _insert_dead_letters(conn, report.dead_letters)
        return report


Key = tuple[str, str]  # (sku, token)


def _unique(items: Sequence[Incoming], report: ApplyReport) -> dict[Key, Incoming]:
    unique: dict[Key, Incoming] = {}
    for item in items:
        key = (item.deduction.sku, item.deduction.token)
        if key in unique:
            report.duplicates += 1
        else:
            unique[key] = item
    return unique


def _hold_loads(conn: Connection, loads: Mapping[str, int]) -> None:
    """Lock the inventory rows of the batch's SKUs; raise LoadUnderWay where MySQL holds a later load than
    the one Redis was read under."""
    if not loads:
        return
    held = conn.execute(query("lock_load_tickets", "skus"), {"skus": sorted(loads)}).all()
    later = sorted(sku for sku, ticket in held if int(ticket) > loads[sku])
    if later:
        raise LoadUnderWay(later)


def _known_skus(conn: Connection, skus: set[str]) -> set[str]:
    if not skus:
        return set()
    return {r[0] for r in conn.execute(query("known_skus", "skus"), {"skus": sorted(skus)})}


class Row(NamedTuple):
    """A row of stock_deductions as inserted, its columns in the order of insert_deductions."""

    token: str
    sku: str
    user_id: str
    qty: int
    message_id: str
    source: str
    batch_id: str
    created_ms: int


#: A row as SQL: its strings as hexadecimal literals (their UTF-8 bytes), which no character can break out of
#: whatever the server's sql_mode (NO_BACKSLASH_ESCAPES or not), its numbers as digits.
_ROW_SQL = "(X'%s',X'%s',X'%s',%d,X'%s',X'%s',X'%s',%d)"
#: Rendered whole, the statement goes to the driver as it is: no placeholders, so nothing in it is read as one.
_AS_IS = {"no_parameters": True}
#: Rows per INSERT statement: a batch of given-back orders may carry 100,000 tokens, and one statement of
#: them all would pass the server's max_allowed_packet (16 MB on MariaDB by default); 1,000 rows take ~300 KB,
#: 2.5 MB if every field were at its longest, of 4-byte characters.
ROWS_PER_INSERT = 1000


def _deduction_rows(unique: dict[Key, Incoming], known: set[str], batch_id: str, report: ApplyReport) -> list[Row]:
    """Rows for stock_deductions in token order; a deduction of a SKU MySQL does not know is dead-lettered."""
    rows = []
    for key in sorted(unique):
        item = unique[key]
        d = item.deduction
        if d.sku not in known:
            body = DeductionMessage(d.sku, (Purchase(d.token, d.user_id, d.qty),), "", d.ts_ms, SOURCE_REPLAY)
            report.dead_letters.append(
                DeadLetter(
                    item.message_id, item.topic, d.token, f"unknown sku {d.sku!r}", body.encode(), d.sku, d.token
                )
            )
            continue
        rows.append(Row(d.token, d.sku, d.user_id, d.qty, item.message_id, d.source, batch_id, d.ts_ms))
    return rows


def _insert_deductions(conn: Connection, rows: list[Row], batch_id: str, report: ApplyReport) -> dict[str, list[Row]]:
    """Insert the rows (existing tokens are ignored); returns the ones new in this batch, by SKU, in token
    order.

    The rows go as one statement of literals (_values): bound by the driver, eight parameters a row and an
    escape call each, they were the largest share of a consumer's CPU per purchase. Which rows are new is
    counted, not read back: reading every row of the batch back cost about as much as binding it. Tokens
    are read only when some existed already (a redelivery, a replay)."""
    for start in range(0, len(rows), ROWS_PER_INSERT):  # in token order, statement after statement
        statement = sql.query("insert_deductions").format(rows=_values(rows[start : start + ROWS_PER_INSERT]))
        conn.exec_driver_sql(statement, execution_options=_AS_IS)
    new = rows
    if int(conn.execute(query("count_batch_deductions"), {"batch_id": batch_id}).scalar_one()) < len(rows):
        ours = {(r[0], r[1]) for r in conn.execute(query("batch_deduction_keys"), {"batch_id": batch_id})}
        new = [r for r in rows if (r.sku, r.token) in ours]
    report.duplicates += len(rows) - len(new)
    fresh: dict[str, list[Row]] = defaultdict(list)
    for row in new:
        fresh[row.sku].append(row)
    return fresh


def _values(rows: Sequence[Row]) -> str:
    """The rows as the VALUES of an INSERT, in their order: one format a row (PyMySQL took 6 µs a row to
    bind them, this takes 1)."""
    return ",".join(
        [
            _ROW_SQL
            % (
                token.encode().hex(),
                sku.encode().hex(),
                user_id.encode().hex(),
                qty,
                message_id.encode().hex(),
                source.encode().hex(),
                batch_id.encode().hex(),
                created_ms,
            )
            for token, sku, user_id, qty, message_id, source, batch_id, created_ms in rows
        ]
    )


def _applied_before(unique: dict[Key, Incoming], known: set[str], fresh: dict[str, list[Row]]) -> dict[str, list[str]]:
    """Tokens whose row existed before this batch: applied already; their orders are checked too."""
    new_keys = {(sku, r.token) for sku, rows in fresh.items() for r in rows}
    to_order: dict[str, list[str]] = defaultdict(list)
    for sku, token in unique:
        if sku in known and (sku, token) not in new_keys:
            to_order[sku].append(token)
    return to_order


def _deduct_sku(
    conn: Connection, batch_id: str, sku: str, fresh: list[Row], unique: dict[Key, Incoming], report: ApplyReport
) -> None:
    """Take the SKU's new deductions from its stock; the rows it cannot cover are removed (conflicts), so
    the batch's rows of the SKU that stay are the ones that need an order.

    An order is written in the same transaction as its stock deduction: a row that comes back for a token
    that has an order (the row was lost, the order was not) deducts nothing again.
    """
    batch = {"sku": sku, "batch_id": batch_id}
    ordered = {r[0] for r in conn.execute(query("ordered_in_batch"), batch)}
    report.restored += len(ordered)
    applied, conflicts = _guarded_update(conn, batch_id, sku, [r for r in fresh if r.token not in ordered], unique)
    report.applied += [unique[(sku, r.token)].deduction for r in applied]
    report.conflicts += [unique[(sku, r.token)].deduction for r in conflicts]
    if applied or ordered:
        conn.execute(query("resolve_batch_conflicts"), batch)


def _guarded_update(
    conn: Connection, batch_id: str, sku: str, rows: list[Row], items: dict[Key, Incoming]
) -> tuple[list[Row], list[Row]]:
    """One guarded UPDATE for the SKU's whole share of the batch (hot-row group commit).

    If MySQL does not hold enough (Redis and MySQL disagree), apply what fits in arrival order and
    record the rest as conflicts; their deduction rows are removed so they can be applied later. Rows
    whose units this batch gives back already (lifecycle.give_back) come first: they always fit.

    A SKU sold with a payment deadline may be short for a while: a unit given back in Redis and sold again
    there, whose return has not reached MySQL yet. Its batch is refused then (retriable), to come back
    once the return is applied; only a shortfall that outlasts SHORTFALL_ATTEMPTS deliveries is a conflict.
    """
    total = sum(r.qty for r in rows)
    if conn.execute(query("deduct_stock"), {"sku": sku, "total": total}).rowcount == 1:
        return rows, []
    stock = int(conn.execute(query("stock_for_update"), {"sku": sku}).scalar_one())
    fit, rest, room = [], [], stock
    for row in sorted(rows, key=lambda r: not _given_back(items[(sku, r.token)])):
        if row.qty <= room:
            fit.append(row)
            room -= row.qty
        else:
            rest.append(row)
    if rest and _units_on_their_way(conn, sku, [items[(sku, r.token)] for r in rest]):
        raise StockShort(sku, stock)
    if fit:
        conn.execute(query("deduct_stock"), {"sku": sku, "total": stock - room})
    _refuse(conn, batch_id, sku, rest, items, stock)
    return fit, rest


def _refuse(conn: Connection, batch_id: str, sku: str, rest: list[Row], items: dict[Key, Incoming], stock: int) -> None:
    """The deductions MySQL's stock cannot cover: their rows removed, each recorded as a conflict."""
    conn.execute(
        query("delete_deductions", "tokens"), {"batch_id": batch_id, "sku": sku, "tokens": [r.token for r in rest]}
    )
    for r in rest:
        logger.warning(
            "conflict: token %s sku %s qty %d does not fit MySQL stock %d",
            r.token,
            sku,
            r.qty,
            stock,
            extra=ids(token=r.token, sku=sku),
        )
    _insert_conflicts(
        conn,
        [
            (
                items[(sku, r.token)].deduction,
                items[(sku, r.token)].message_id,
                stock,
                f"MySQL stock {stock} cannot cover this deduction",
            )
            for r in rest
        ],
    )


def _given_back(item: Incoming) -> bool:
    return item.order is not None and item.order.returned


def _units_on_their_way(conn: Connection, sku: str, short: list[Incoming]) -> bool:
    """May deductions MySQL cannot cover wait (delivered fewer than SHORTFALL_ATTEMPTS times) for units on
    their way: given back (a SKU sold with a payment deadline), or added by a restock Redis made and MySQL
    has not applied yet?"""
    short = [i for i in short if i.attempt < SHORTFALL_ATTEMPTS]
    if any(i.order is not None for i in short):
        return True
    added = max((i.added_qty for i in short), default=0)
    return added > 0 and added > int(conn.execute(query("addition_totals"), {"sku": sku}).one()[1])


def _unknown_addition(a: Addition) -> DeadLetter:
    body = DeductionMessage.restock(a.sku, a.request_id, a.qty, a.message_id, a.ts_ms)
    return DeadLetter(a.message_id, "", a.request_id, f"unknown sku {a.sku!r}", body.encode(), a.sku, a.request_id)


def _record_conflicts(conn: Connection, conflicts: Sequence[Conflict], report: ApplyReport) -> None:
    """Deductions the consumer refused to apply (see pipeline/accepted.py), kept for reconcile."""
    if not conflicts:
        return
    for conflict in conflicts:
        d = conflict.deduction
        logger.warning(
            "conflict: token %s sku %s message %s: %s",
            d.token,
            d.sku,
            conflict.message_id,
            conflict.reason,
            extra=ids(token=d.token, sku=d.sku, message_id=conflict.message_id),
        )
    stocks = {
        sku: conn.execute(query("stock_of"), {"sku": sku}).scalar()
        for sku in sorted({c.deduction.sku for c in conflicts})
    }
    _insert_conflicts(
        conn, [(c.deduction, c.message_id, int(stocks[c.deduction.sku] or 0), c.reason) for c in conflicts]
    )
    report.conflicts += [c.deduction for c in conflicts]


def _insert_conflicts(conn: Connection, conflicts: list[tuple[Deduction, str, int, str]]) -> None:
    if conflicts:
        conn.execute(
            query("insert_conflict"),
            [
                {
                    "token": d.token,
                    "sku": d.sku,
                    "user_id": d.user_id,
                    "qty": d.qty,
                    "message_id": message_id,
                    "mysql_stock": stock,
                    "reason": reason[:255],
                }
                for d, message_id, stock, reason in conflicts
            ],
        )


def _insert_dead_letters(conn: Connection, letters: Sequence[DeadLetter]) -> None:
    if letters:
        conn.execute(
            query("insert_dead_letter"),
            [
                {
                    "message_id": d.message_id,
                    "purchase": d.purchase,
                    "topic": d.topic,
                    "message_key": (d.key or "")[:255] or None,
                    "sku": (d.sku or "")[:64] or None,
                    "reason": d.reason[:512],
                    "body": d.body,
                }
                for d in letters
            ],
        )


#: The log's name of each order status MySQL keeps (`created`: final on acceptance, no name).
_ORDER_OF_STATUS = {status: state for state, status in c.ORDER_STATUS.items()}


def _deduction_row(r: Any) -> DeductionRow:
    return DeductionRow(
        int(r.id),
        r.token,
        r.user_id,
        int(r.qty),
        r.message_id,
        int(r.created_ms),
        _ORDER_OF_STATUS.get(r.status),
        int(r.due_ms) if r.due_ms is not None else None,
        int(r.decided_ms) if r.decided_ms is not None else None,
        int(r.load_ticket),
    )
