"""Reconcile a sale: Redis stock and log vs MySQL stock, deductions and orders, per SKU.

Both sides are read in pages (Redis HSCAN, MySQL keyset paging), each page checked against the other
side in one round trip, so a sale with millions of entries never sits in memory at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale import constants as c
from flashsale import wiring
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.stock import RedisStock
from flashsale.config import Settings
from flashsale.errors import UnknownSku
from flashsale.ops.paging import pages
from flashsale.polling import poll_until
from flashsale.records import Adopt, DeductionRow, LogEntry

#: Log entries / rows read per round trip.
PAGE = 1000
#: Most tokens listed per kind of drift (the counts are always complete).
SAMPLE = 100
#: An order still awaiting payment this long after its deadline lost its timer (a timer is retried for
#: far less): `flashsale order expire-due` expires it.
OVERDUE_S = 300


@dataclass(frozen=True)
class Missing:
    """A deduction in the Redis log that MySQL does not have."""

    token: str
    user: str
    qty: int
    ts_ms: int


@dataclass
class SkuReport:
    sku: str
    initial: int | None = None
    redis_stock: int | None = None
    mysql_stock: int | None = None
    mysql_initial: int | None = None
    redis_deducted: int = 0  # deductions in the Redis log (count)
    redis_deducted_qty: int = 0
    redis_counter_qty: int = 0  # what the Redis counters say was deducted
    redis_returned_qty: int = 0
    #: The two counters read again once the log was (None: not read again, or the SKU was loaded again
    #: meanwhile): higher when the sale went on as the log was read, whose entries may then count more.
    redis_counter_qty_after: int | None = None
    redis_returned_qty_after: int | None = None
    redis_returned_logged_qty: int = 0  # units of the entries the Redis log holds as returned
    redis_fenced: int = 0
    redis_load: int | None = None  # the number of the load Redis held as its counters were read
    mysql_applied: int = 0
    mysql_applied_qty: int = 0
    orders: int = 0
    ordered_qty: int = 0
    in_flight: int = 0
    in_flight_qty: int = 0
    missing_in_mysql: int = 0
    missing_qty: int = 0
    missing_tokens: list[str] = field(default_factory=list)
    mysql_without_log: int = 0
    mysql_without_log_qty: int = 0
    without_log_tokens: list[str] = field(default_factory=list)
    orders_without_deduction: int = 0
    deductions_without_order: int = 0
    dead_letters: int = 0
    conflicts: int = 0
    conflict_qty: int = 0
    mysql_returned_qty: int = 0  # units of cancelled or expired orders MySQL gave back
    redis_added_qty: int = 0  # units restocks added during the sale (Redis's counter)
    mysql_added_qty: int = 0
    restocks_in_flight: int = 0  # restocks in Redis, younger than the settle time, not in MySQL yet
    restock_drift: list[str] = field(default_factory=list)  # request ids whose restock the two sides disagree on
    orders_by_state: dict[str, int] = field(default_factory=dict)  # MySQL: created, awaiting_payment, paid, ...
    order_drift: int = 0  # orders whose state (or return) in MySQL is not the log's, settled
    order_drift_tokens: list[str] = field(default_factory=list)
    orders_in_flight: int = 0  # the same, younger than the settle time: on their way
    orders_overdue: int = 0  # awaiting payment in Redis more than OVERDUE_S after their deadline
    overdue_tokens: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["consistent"] = self.consistent
        return data


#: Called with each page of Redis deductions MySQL lacks, or holds with its order in another state (older
#: than the settle time).
OnMissing = Callable[[list[LogEntry]], None]
#: Called with each MySQL deduction row whose token has no deduction in the Redis log, and its entry.
OnOrphan = Callable[[Any, LogEntry | None, SkuReport], None]


def wait_applied(store: MySQLStore, skus: list[str], count: int, *, timeout_s: float) -> float:
    """Wait until MySQL holds `count` deductions of `skus` (or the time is up); returns the seconds waited."""
    started = time.perf_counter()
    poll_until(lambda: store.applied(skus)[0] >= count, timeout_s, interval_s=0.05)
    return time.perf_counter() - started


def reconcile_sku(
    stock: RedisStock,
    store: MySQLStore,
    sku: str,
    *,
    settle_s: float,
    now_ms: int | None = None,
    on_missing: OnMissing | None = None,
    on_orphan: OnOrphan | None = None,
) -> SkuReport:
    report = SkuReport(sku)
    _read_redis(stock, report)
    _read_mysql(store, report)
    if report.problems:
        return report
    # A deduction logged after this is young: still on its way to MySQL, not missing.
    settled_ms = (now_ms if now_ms is not None else int(time.time() * 1000)) - settle_s * 1000
    # Redis -> MySQL: every deduction in the log must be applied (or still be young: in flight).
    for page in pages(stock.scan_log(sku, page=PAGE), PAGE):
        missing = _check_applied(store, report, page, settled_ms)
        if missing and on_missing:
            on_missing(missing)
    _read_counters_again(stock, report)
    # MySQL -> Redis: every applied deduction must have a deduction in the log.
    for rows in _deduction_pages(store, sku):
        _check_logged(stock, report, rows, on_orphan)
    _check_restocks(stock.additions(sku), store.additions(sku), report, settled_ms)
    _judge(report)
    return report


def _read_redis(stock: RedisStock, report: SkuReport) -> None:
    try:
        view = stock.view(report.sku)
    except UnknownSku:
        report.problems.append("not loaded in Redis")
        return
    report.initial, report.redis_stock = view.initial, view.stock
    report.redis_counter_qty, report.redis_returned_qty = view.deducted_qty, view.returned_qty
    report.redis_fenced = view.fenced_count
    report.redis_load = view.ticket
    report.redis_added_qty = view.added_qty


def _read_counters_again(stock: RedisStock, report: SkuReport) -> None:
    """The counters once the log is read. The log is read a page at a time after the counters: a purchase
    (or a give-back) meanwhile adds to the entries read, or not, and not to the counters read first. So the
    entries the log explains lie between what the counters said before and after: where the two differ, the
    units a lost entry still counts are not known, and the judge and the repair say so rather than guess."""
    try:
        view = stock.view(report.sku)
    except UnknownSku:
        return
    if view.ticket == report.redis_load:
        report.redis_counter_qty_after, report.redis_returned_qty_after = view.deducted_qty, view.returned_qty


def _read_mysql(store: MySQLStore, report: SkuReport) -> None:
    try:
        view = store.view(report.sku)
        books = store.bookkeeping(report.sku)
    except UnknownSku:
        report.problems.append("not loaded in MySQL")
        return
    report.mysql_initial, report.mysql_stock = view.initial, view.stock
    report.mysql_applied, report.mysql_applied_qty = view.deductions, view.deducted_qty
    report.orders, report.ordered_qty = view.orders, view.ordered_qty
    report.mysql_returned_qty = view.returned_qty
    report.mysql_added_qty = view.added_qty
    report.orders_by_state = {status: count for status, (count, _) in sorted(view.order_states.items())}
    report.orders_without_deduction = books.orders_without_deduction
    report.deductions_without_order = books.deductions_without_order
    report.dead_letters = books.dead_letters
    report.conflicts, report.conflict_qty = books.conflicts, books.conflict_qty


def _check_applied(store: MySQLStore, report: SkuReport, page: list[LogEntry], settled_ms: float) -> list[LogEntry]:
    """Count one page of the Redis log against MySQL; returns its settled deductions MySQL lacks, and those
    whose order MySQL holds in another state (a replay of either brings MySQL to the log)."""
    deducted = [e for e in page if e.state in c.DEDUCTED_STATES]
    _count_overdue(report, deducted, settled_ms)
    report.redis_deducted += len(deducted)
    report.redis_deducted_qty += sum(e.qty for e in deducted)
    report.redis_returned_logged_qty += sum(e.qty for e in deducted if e.state == c.STATE_RETURNED)
    applied = store.order_facts(report.sku, [e.token for e in deducted])
    missing = []
    for entry in deducted:
        if entry.token in applied:
            if _order_drifts(report, entry, applied[entry.token], settled_ms):
                missing.append(entry)
            continue
        if entry.ts_ms > settled_ms:
            report.in_flight += 1
            report.in_flight_qty += entry.qty
            continue
        missing.append(entry)
        report.missing_in_mysql += 1
        report.missing_qty += entry.qty
        if len(report.missing_tokens) < SAMPLE:
            report.missing_tokens.append(entry.token)
    return missing


def _count_overdue(report: SkuReport, entries: list[LogEntry], settled_ms: float) -> None:
    """Orders still awaiting payment long after their deadline: their timer was lost."""
    for entry in entries:
        if entry.order == "awaiting" and entry.due_ms is not None and entry.due_ms < settled_ms - OVERDUE_S * 1000:
            report.orders_overdue += 1
            if len(report.overdue_tokens) < SAMPLE:
                report.overdue_tokens.append(entry.token)


def _order_drifts(report: SkuReport, entry: LogEntry, facts: tuple[str | None, bool], settled_ms: float) -> bool:
    """An applied deduction's order must stand in MySQL as the log has it, its units back when it ended
    cancelled or expired; a decision younger than the settle time may still be on its way. (A deduction
    without any order is counted apart: see Bookkeeping.)"""
    status, returned = facts
    want = c.ORDER_STATUS[entry.order] if entry.order else c.ORDER_FINAL
    if status is None or (status == want and returned == (entry.state == c.STATE_RETURNED)):
        return False
    if (entry.decided_ms or entry.ts_ms) > settled_ms:
        report.orders_in_flight += 1
        return False
    report.order_drift += 1
    if len(report.order_drift_tokens) < SAMPLE:
        report.order_drift_tokens.append(entry.token)
    return True


def _deduction_pages(store: MySQLStore, sku: str) -> Iterator[list[Any]]:
    after = 0
    while rows := store.deductions_page(sku, after, PAGE):
        after = rows[-1].id
        yield rows


def _check_logged(stock: RedisStock, report: SkuReport, rows: list[Any], on_orphan: OnOrphan | None) -> None:
    """Count one page of MySQL deductions against the Redis log: each must be a deduction there."""
    entries = stock.log_entries(report.sku, [r.token for r in rows])
    for row in rows:
        logged = entries[row.token]
        if logged is not None and logged.state in c.DEDUCTED_STATES:
            continue
        report.mysql_without_log += 1
        report.mysql_without_log_qty += int(row.qty)
        if len(report.without_log_tokens) < SAMPLE:
            report.without_log_tokens.append(row.token)
        if on_orphan:
            on_orphan(row, logged, report)


def _check_restocks(
    redis_side: dict[str, tuple[int, int, str]],
    mysql_side: dict[str, tuple[int, int]],
    report: SkuReport,
    settled_ms: float,
) -> None:
    """Every restock Redis made must be in MySQL with the same units (or still be young: in flight), and
    MySQL must hold none that Redis did not make."""
    for request in sorted(redis_side.keys() | mysql_side.keys()):
        ours, theirs = redis_side.get(request), mysql_side.get(request)
        if ours is not None and theirs is None and ours[1] > settled_ms:
            report.restocks_in_flight += 1
        elif ours is None or theirs is None or ours[0] != theirs[0]:
            report.restock_drift.append(request)


def _judge(r: SkuReport) -> None:
    assert r.initial is not None and r.redis_stock is not None and r.mysql_stock is not None
    if r.mysql_initial != r.initial:
        r.problems.append(f"initial stock differs: Redis {r.initial}, MySQL {r.mysql_initial}")
    _judge_redis(r, r.initial, r.redis_stock)
    if r.mysql_stock + r.mysql_applied_qty - r.mysql_returned_qty != r.initial + r.mysql_added_qty:
        r.problems.append(
            f"MySQL stock {r.mysql_stock} + applied {r.mysql_applied_qty} - returned {r.mysql_returned_qty} "
            f"!= initial {r.initial} + added {r.mysql_added_qty}"
        )
    if r.restock_drift:
        r.problems.append(
            f"{len(r.restock_drift)} restock(s) stand otherwise in MySQL than in Redis: "
            + ", ".join(r.restock_drift[:SAMPLE])
        )
    if r.missing_in_mysql:
        r.problems.append(f"{r.missing_in_mysql} deduction(s) ({r.missing_qty} units) in Redis are missing in MySQL")
    if r.mysql_without_log:
        r.problems.append(
            f"{r.mysql_without_log} MySQL deduction(s) ({r.mysql_without_log_qty} units) have no "
            f"deduction in the Redis log"
        )
    if r.orders_without_deduction or r.deductions_without_order or r.orders != r.mysql_applied:
        r.problems.append(f"{r.mysql_applied} deductions but {r.orders} orders")
    if r.conflicts:
        r.problems.append(
            f"{r.conflicts} deduction(s) ({r.conflict_qty} units) are open conflicts: MySQL could not apply them "
            f"as they stand (see the conflicts table)"
        )
    if r.orders_overdue:
        r.problems.append(
            f"{r.orders_overdue} order(s) await payment more than {OVERDUE_S} s past their deadline (their timer was "
            f"lost): `flashsale order expire-due {r.sku}` expires them"
        )
    if r.order_drift:
        r.problems.append(
            f"{r.order_drift} order(s) stand otherwise in MySQL than in the Redis log (state or units given back)"
        )


def _judge_redis(r: SkuReport, initial: int, stock: int) -> None:
    """Redis's own books: its stock against its counters, and its counters against its log."""
    if stock + r.redis_counter_qty - r.redis_returned_qty != initial + r.redis_added_qty:
        r.problems.append(
            f"Redis stock {stock} + deducted {r.redis_counter_qty} - returned "
            f"{r.redis_returned_qty} != initial {initial} + added {r.redis_added_qty}"
        )
    deducted = _counted(r.redis_counter_qty, r.redis_counter_qty_after)
    if not deducted[0] <= r.redis_deducted_qty <= deducted[1]:
        r.problems.append(
            f"Redis log holds {r.redis_deducted_qty} units of deductions, its counter says {_says(deducted)}"
        )
    # A give-back counted twice raises the stock and the returned counter together: the equation above
    # balances, and only the entries, each returned once, tell.
    returned = _counted(r.redis_returned_qty, r.redis_returned_qty_after)
    if not returned[0] <= r.redis_returned_logged_qty <= returned[1]:
        r.problems.append(
            f"Redis log holds {r.redis_returned_logged_qty} units given back, its counter says {_says(returned)}"
        )


def _counted(before: int, after: int | None) -> tuple[int, int]:
    """What a counter said as the log was read: from its value before to its value after."""
    return before, max(before, after if after is not None else before)


def _says(counted: tuple[int, int]) -> str:
    return str(counted[0]) if counted[0] == counted[1] else f"{counted[0]} to {counted[1]} as the log was read"


@dataclass
class RepairReport:
    sku: str
    orders_created: int = 0
    replayed: int = 0
    adopted_entries: int = 0  # log entries written back (Redis still counted the deduction)
    adopted_deductions: int = 0  # deductions Redis had lost entirely, taken from its stock again
    restocks_replayed: int = 0  # restocks Redis made and MySQL lacks, carried to it again
    needs_operator: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Repairer:
    """The fixes that need no guessing, applied while reconcile streams through the SKU:

    - deductions the Redis log has and MySQL lacks are replayed (the consumer applies each once), and so
      are those whose order MySQL holds in another state than the log (the replay applies the log's);
    - deductions MySQL applied and the Redis log lacks are written back to Redis: the entry alone while
      the Redis counters still include units no entry explains, otherwise the whole deduction (Redis lost
      it, e.g. in a failover); when Redis has no stock left to take, or fenced the token, an operator
      has to decide; once Redis holds another load than the rows' (the SKU was loaded again during the
      repair), nothing more is written back;
    - deductions MySQL applied without an order get their order.
    """

    def __init__(
        self,
        stock: RedisStock,
        sku: str,
        replay: Callable[[list[LogEntry]], int],
        replay_restocks: Callable[[str, dict[str, tuple[int, int, str]]], int] = lambda sku, made: 0,
    ) -> None:
        self.stock = stock
        self.replay = replay
        self.replay_restocks = replay_restocks
        self.report = RepairReport(sku)
        self._entries_qty = 0  # units explained by the entries written back so far
        self._reloaded = False  # Redis refused a write-back: it holds another load of the SKU

    def restocks(self, drift: list[str], applied: dict[str, tuple[int, int]]) -> None:
        """Restocks Redis made and MySQL lacks go to the consumer again, as their own message: it applies
        the units that message's record says it added, once. Any other difference needs an operator."""
        made = self.stock.additions(self.report.sku)
        missing = {r: made[r] for r in drift if r in made and r not in applied}
        self.report.restocks_replayed += self.replay_restocks(self.report.sku, missing)
        self.report.needs_operator += [
            f"restock {r}: {made.get(r, ('none',))[0]} unit(s) in Redis, {applied.get(r, ('none',))[0]} in MySQL"
            for r in drift
            if r not in missing
        ]

    def on_missing(self, entries: list[LogEntry]) -> None:
        self.report.replayed += self.replay(entries)

    def on_orphan(self, row: Any, entry: LogEntry | None, seen: SkuReport) -> None:
        if entry is not None:
            self.report.needs_operator.append(f"{row.token}: applied in MySQL but {entry.state} in Redis")
            return
        if self._reloaded:
            return
        if seen.redis_load is not None and row.load != seen.redis_load:
            # The counters that choose below between the entry alone and the whole deduction are another load's.
            self._stop(row, seen.sku)
            return
        # Units the counters count and no entry explains, lowest and highest (see _read_counters_again).
        counted = _counted(seen.redis_counter_qty, seen.redis_counter_qty_after)
        low, high = (n - seen.redis_deducted_qty - self._entries_qty for n in counted)
        if low < int(row.qty) <= high:
            self.report.needs_operator.append(
                f"{row.token}: {seen.sku} sold as its log was read, and whether Redis still counts this deduction "
                "is not known; run the repair again once the sale is quiet"
            )
            return
        entry_only = low >= int(row.qty)
        code, detail = self.stock.adopt(seen.sku, row, deduct=not entry_only)
        if code is Adopt.ADOPTED and entry_only:
            self.report.adopted_entries += 1
            self._entries_qty += int(row.qty)
        elif code is Adopt.ADOPTED:
            self.report.adopted_deductions += 1
        elif code is Adopt.NO_STOCK:
            self.report.needs_operator.append(f"{row.token}: Redis has {detail} left, cannot take {row.qty} again")
        elif code is Adopt.SEALED:
            self.report.needs_operator.append(f"{row.token}: {seen.sku} stayed sealed; run the repair again")
        elif code is Adopt.RELOADED:
            self._stop(row, seen.sku)

    def _stop(self, row: DeductionRow, sku: str) -> None:
        """The SKU was loaded again during the repair: nothing more is written back to it."""
        self._reloaded = True
        self.report.needs_operator.append(f"{row.token}: {sku} was loaded again during the repair; run it again")


def repair_sku(
    stock: RedisStock,
    store: MySQLStore,
    sku: str,
    *,
    settle_s: float,
    replay: Callable[[list[LogEntry]], int],
    replay_restocks: Callable[[str, dict[str, tuple[int, int, str]]], int] = lambda sku, made: 0,
) -> tuple[SkuReport, RepairReport]:
    """Reconcile `sku` and repair what can be repaired (see _Repairer); returns both reports."""
    try:
        redis_initial, mysql_initial = stock.view(sku).initial, store.view(sku).initial
    except UnknownSku:  # loaded on one side only: reconcile reports it, and nothing can be replayed
        redis_initial = mysql_initial = 0
    if redis_initial != mysql_initial:
        # Replaying into books that were loaded differently would make them balance by accident.
        refused = RepairReport(sku)
        refused.needs_operator.append(
            f"initial stock differs (Redis {redis_initial}, MySQL {mysql_initial}): nothing repaired; "
            f"reload the SKU with `flashsale stock set {sku} QTY --reset` once its sale is over"
        )
        return reconcile_sku(stock, store, sku, settle_s=settle_s), refused
    repairer = _Repairer(stock, sku, replay, replay_restocks)
    report = reconcile_sku(
        stock, store, sku, settle_s=settle_s, on_missing=repairer.on_missing, on_orphan=repairer.on_orphan
    )
    if report.deductions_without_order:
        repairer.report.orders_created = store.create_missing_orders(sku)
    repairer.restocks(report.restock_drift, store.additions(sku))
    return report, repairer.report


def run(
    settings: Settings, skus: list[str], *, repair: bool = False, wait_s: float = 0.0
) -> tuple[list[SkuReport], list[RepairReport]]:
    """Reconcile the given SKUs (all known ones when empty); with `repair`, fix and reconcile again.

    After a repair the replayed deductions still have to pass through the consumer: `wait_s` keeps
    reconciling until the books balance or the time is up.
    """
    from flashsale.ops.replay import Replayer

    with wiring.books(settings, replicated=repair) as (stock, store):
        names = skus or sorted(set(stock.skus()) | set(store.skus()))
        mysql_skus = set(store.skus())
        for sku in skus:
            if not stock.exists(sku) and sku not in mysql_skus:
                raise UnknownSku(
                    f"unknown SKU {sku!r}: not loaded in Redis nor MySQL",
                    hint="`flashsale reconcile` without a SKU checks every loaded SKU",
                )
        if not repair:
            return [reconcile_sku(stock, store, sku, settle_s=settings.settle_s) for sku in names], []
        repairs: list[RepairReport] = []
        with Replayer(settings, stock, store, dry_run=False) as replayer:

            def replay(entries: list[LogEntry]) -> int:
                before = replayer.report.published
                replayer.entries(entries)
                return replayer.report.published - before

            for sku in names:
                repairs.append(
                    repair_sku(
                        stock, store, sku, settle_s=settings.settle_s, replay=replay, replay_restocks=replayer.restocks
                    )[1]
                )
        latest: list[SkuReport] = []

        def balanced() -> bool:
            latest[:] = [reconcile_sku(stock, store, sku, settle_s=settings.settle_s) for sku in names]
            return all(r.consistent for r in latest)

        poll_until(balanced, wait_s, interval_s=1.0)
        return latest, repairs
