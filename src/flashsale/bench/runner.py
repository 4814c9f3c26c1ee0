"""`flashsale bench`: one flash sale per strategy, same load, results side by side.

Every strategy is served over the same HTTP stack (granian, the producer's RSGI app), so every one pays
the same hop, and buyers are the same (closed loop, or open loop with `rate`):

- mysql-lock / mysql-optimistic: `flashsale baseline run`, the purchase as one MySQL transaction;
- pipeline-b1: flashsale with a transaction per purchase (FLASHSALE_GROUP_SIZE=1);
- pipeline: flashsale as configured (group commit);
- bucketed: the pipeline with each SKU spread over `partitions` partitions (on the masters of the Redis
  Cluster the settings name, or on one node), refilled from a pool.

With `unpaid` (--unpaid), the run is a pair instead: pipeline-orders, a sale whose orders await payment
(`pay_within_ms`), where that fraction of the accepted buyers never pays and the others pay at once
over HTTP (bench/payers.py), with an expirer running; then pipeline, the same sale without orders.
Both come at the same steady rate (open loop), long enough for the units given back at the deadlines
to be sold again; pipeline-orders waits for its last deadlines, and the plain sale's CPU is read over
as long a time, so that idle processes weigh the same in both. The lifecycle's numbers are read from
the Redis logs (bench/lifecycle.py).

Every strategy gets fresh SKUs with the same stock and fresh processes; its books are checked at the
end, and the CPU each process spent is read for it. A strategy that fails (connections exhausted,
timeouts) is reported with its errors; the run goes on.
"""

from __future__ import annotations

import logging
import secrets
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flashsale import constants as c
from flashsale import wiring
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.stock import RedisStock
from flashsale.bench.cpu import CpuMeter
from flashsale.bench.crowd import DEFAULT_PROCESSES, Crowd, run_crowd
from flashsale.bench.fleet import Child, Fleet, environment, ready
from flashsale.bench.lifecycle import Lifecycle, measure
from flashsale.bench.load import LoadReport
from flashsale.bench.mysql_baselines import BASELINES
from flashsale.bench.payers import Payers
from flashsale.config import Settings
from flashsale.errors import FlashSaleError, InvalidInput
from flashsale.ops import reconcile, setup
from flashsale.ops.paging import pages
from flashsale.polling import poll_until

logger = logging.getLogger(__name__)

PIPELINES = ("pipeline-b1", "pipeline", "bucketed")
STRATEGIES = (*BASELINES, *PIPELINES)
BASELINE = "mysql-lock"
#: The sale with orders awaiting payment (--unpaid), run before the plain pipeline it is compared with.
ORDERS = "pipeline-orders"
ORDERS_PAIR = (ORDERS, "pipeline")
DEFAULT_PAY_WITHIN_MS = 5_000
#: With --unpaid and no --rate, the attempts are spread over this many payment deadlines: units given
#: back at the first deadline, and at the second, still find buyers.
SALE_DEADLINES = 3
#: Longest wait for the pipeline's consumer to apply every accepted deduction.
DRAIN_TIMEOUT_S = 300.0
#: Most MySQL transactions a baseline runs at once (its threads and connections): the local MariaDB
#: allows 500 connections, and a team would not open more per service.
BASELINE_WORKERS = 64
#: Servers of the local stack whose CPU counts too, when they run (`server_pids` finds them).
SERVERS = ("redis", "mariadb", "broker")

Tick = Callable[[], None]
#: The PIDs of the servers the bench measures too, by name: asked when a strategy's processes have started.
ServerPids = Callable[[], dict[str, int]]


@dataclass(frozen=True)
class BenchConfig:
    skus: int = 1
    stock: int = 1000
    buyers: int = 200
    attempts: int = 5000
    per_user_limit: int = 0
    #: Open loop: attempts per second, due whatever the answers (None: closed loop, `buyers` at once).
    rate: float | None = None
    #: Pipeline only: sell with no consumer running, then start one and time how fast it applies the backlog.
    backlog: bool = False
    #: Pipeline only: FLASHSALE_BATCH_SIZE of the bench's own consumer (None: the configured one).
    batch_size: int | None = None
    #: Bucketed only: partitions of each SKU.
    partitions: int = 3
    #: The share of accepted buyers who never pay: runs the pair ORDERS_PAIR (None: no orders).
    unpaid: float | None = None
    #: With `unpaid`: how long an order awaits payment (None: DEFAULT_PAY_WITHIN_MS).
    pay_within_ms: int | None = None
    #: Processes the buyers are spread over (bench/crowd.py).
    load_processes: int = DEFAULT_PROCESSES

    @property
    def deadline_ms(self) -> int:
        return self.pay_within_ms or DEFAULT_PAY_WITHIN_MS

    def resolved(self) -> BenchConfig:
        """Checked, and with `unpaid` given the rate that spreads the attempts over SALE_DEADLINES deadlines
        when no rate is."""
        self.check()
        if self.unpaid is None:
            return self
        rate = self.rate or self.attempts / (SALE_DEADLINES * self.deadline_ms / 1000)
        return replace(self, pay_within_ms=self.deadline_ms, rate=rate)

    def check(self) -> None:
        for name in ("skus", "stock", "buyers", "attempts", "load_processes"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.per_user_limit < 0:
            raise InvalidInput(f"--per-user-limit must be >= 0, got {self.per_user_limit}")
        if self.rate is not None and self.rate <= 0:
            raise InvalidInput(f"--rate must be above 0, got {self.rate}")
        if not 1 <= self.partitions <= c.MAX_PARTITIONS:
            raise InvalidInput(f"--partitions must be 1 to {c.MAX_PARTITIONS}, got {self.partitions}")
        self._check_orders()

    def _check_orders(self) -> None:
        if self.unpaid is None:
            if self.pay_within_ms is not None:
                raise InvalidInput("--pay-within goes with --unpaid (the share of accepted buyers who never pay)")
            return
        if not 0 <= self.unpaid < 1:
            raise InvalidInput(f"--unpaid must be a fraction from 0 up to, not including, 1; got {self.unpaid}")
        if not 0 < self.deadline_ms <= c.MAX_PAY_WITHIN_MS:
            raise InvalidInput(
                f"--pay-within must be above 0 and at most {c.MAX_PAY_WITHIN_MS / 86_400_000:g}d (as `stock set` "
                f"allows), got {self.deadline_ms} ms"
            )
        if self.backlog:
            raise InvalidInput("--unpaid sells with a consumer running (it schedules the deadlines): drop --backlog")
        twice_s = 2 * self.deadline_ms / 1000
        if self.rate is not None and self.attempts / self.rate < twice_s:
            raise InvalidInput(
                f"--unpaid: the buyers would stop after {self.attempts / self.rate:.1f} s (--attempts / --rate), "
                f"too soon for units given back at the deadline to sell again",
                hint=f"make the sale last at least twice --pay-within ({twice_s:g} s), or leave --rate out",
            )


@dataclass
class StrategyResult:
    strategy: str
    skus: list[str]  # sold in this run: what to reconcile or look at afterwards
    attempts: int
    accepted: int
    rejected: dict[str, int]
    elapsed_s: float
    throughput: float  # attempts answered per second
    accepted_per_s: float  # accepted purchases per second until the stock ran out
    sellout_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    drain_s: float
    applied_per_s: float | None  # with --backlog: rows the consumer applied per second from a cold start
    consistent: bool
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first unclear answers, and attempts with no answer
    transactions_per_accepted: float | None = None  # broker transactions (half messages) per accepted purchase
    cpu_ms_per_accepted: dict[str, float] = field(default_factory=dict)  # by process, and "all"
    cpu_window_s: float | None = None  # seconds over which that CPU was read
    cpu_s: float | None = None  # CPU seconds all the processes spent over that time
    lifecycle: Lifecycle | None = None  # with --unpaid: what the orders did, read from the Redis logs
    ratio: float | None = None  # throughput relative to mysql-lock in the same run
    p99_ratio: float | None = None  # p99 relative to mysql-lock's
    load: LoadReport | None = field(default=None, repr=False)  # every answer, for --plot

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("load")
        return data


def parse_strategies(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise InvalidInput(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(chosen))


def _result(strategy: str, skus: list[str], load: LoadReport, drain_s: float, problems: list[str]) -> StrategyResult:
    accepted = load.statuses.get("accepted", 0)
    return StrategyResult(
        strategy=strategy,
        skus=skus,
        attempts=load.attempts,
        accepted=accepted,
        rejected={k: v for k, v in sorted(load.statuses.items()) if k != "accepted"},
        elapsed_s=round(load.elapsed_s, 3),
        throughput=round(load.throughput, 1),
        accepted_per_s=round(load.accepted_per_s, 1),
        sellout_s=round(load.sellout_s, 3),
        p50_ms=round(load.percentile(0.50) * 1000, 2),
        p95_ms=round(load.percentile(0.95) * 1000, 2),
        p99_ms=round(load.percentile(0.99) * 1000, 2),
        drain_s=round(drain_s, 3),
        applied_per_s=None,
        consistent=not problems,
        problems=problems,
        errors=load.errors,
        load=load,
    )


def _metric(url: str, name: str) -> float:
    """The value of one unlabelled series on `url`/metrics (0 when absent)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


class _Sale:
    """One strategy's run: its stock, its processes, its load, its books."""

    def __init__(self, settings: Settings, config: BenchConfig, strategy: str, run: str, logs: Path) -> None:
        self.settings = settings
        self.config = config
        self.strategy = strategy
        self.run = run
        self.skus = [f"bench-{run}-{strategy}-{i}" for i in range(config.skus)]
        env = {"FLASHSALE_GROUP_SIZE": "1"} if strategy == "pipeline-b1" else {}
        if config.batch_size:
            env["FLASHSALE_BATCH_SIZE"] = str(config.batch_size)
        # The bench is the payment service of its own sale: it signs with a secret of this run.
        self.secret = secrets.token_hex(16) if strategy == ORDERS else ""
        if self.secret:
            env["FLASHSALE_PAYMENT_SECRET"] = self.secret
        self.fleet = Fleet(environment(**env), logs / strategy)
        self.payers: Payers | None = None

    def load_stock(self) -> None:
        if self.strategy in BASELINES:
            with wiring.mysql_store(self.settings) as store:
                for sku in self.skus:
                    store.load_stock(sku, self.config.stock, per_user_limit=self.config.per_user_limit)
            return
        partitions = self.config.partitions if self.strategy == "bucketed" else 1
        pay_within_ms = self.config.deadline_ms if self.strategy == ORDERS else 0
        for sku in self.skus:
            setup.set_stock(
                self.settings,
                sku,
                self.config.stock,
                per_user_limit=self.config.per_user_limit,
                partitions=partitions,
                pay_within_ms=pay_within_ms,
            )

    def start(self, *, consumer: bool = True) -> tuple[str, dict[str, Child]]:
        """The strategy's processes; returns the URL buyers post to and the children by role."""
        if self.strategy in BASELINES:
            child = self.fleet.baseline(self.strategy, workers=min(self.config.buyers, BASELINE_WORKERS))
            return child.url, {"baseline": child}
        children = {"checker": self.fleet.checker()}
        if consumer:
            children["consumer"] = self.fleet.consumer()
        if self.strategy == ORDERS:
            children["expirer"] = self.fleet.expirer()
        producer, url = self.fleet.producer()
        children["producer"] = producer
        if self.strategy == ORDERS:
            self.payers = Payers(self.secret, self.config.unpaid or 0.0)
        return url, children

    def books(self) -> list[str]:
        problems: list[str] = []
        if self.strategy in BASELINES:
            with wiring.mysql_store(self.settings) as store:
                for sku in self.skus:
                    view = store.view(sku)
                    if view.stock + view.deducted_qty != view.initial or view.orders != view.deductions:
                        problems.append(
                            f"{sku}: stock {view.stock} + applied {view.deducted_qty} vs initial {view.initial}, "
                            f"{view.orders} orders"
                        )
            return problems
        return _drift(self.settings, self.skus)

    def buy(self, url: str, tick: Tick) -> LoadReport:
        crowd = Crowd(
            url,
            tuple(self.skus),
            attempts=self.config.attempts,
            concurrency=self.config.buyers,
            rate=self.config.rate,
            run_id=f"{self.run}-{self.strategy}",
            payers=self.payers,
        )
        return run_crowd(crowd, processes=self.config.load_processes, tick=tick)


@dataclass
class _Drained:
    """What happened between the last answer and the books' settling."""

    drain_s: float = 0.0  # until MySQL held every accepted deduction
    settle_s: float = 0.0  # with orders: until every order was decided, and MySQL held the decisions too
    sale_end_ms: int = 0  # the last answer, on the wall clock (Redis's, on this machine)


def _sell(
    settings: Settings,
    config: BenchConfig,
    strategy: str,
    run: str,
    logs: Path,
    tick: Tick,
    server_pids: ServerPids,
    *,
    window_s: float = 0.0,
) -> StrategyResult:
    """One strategy's sale; its processes' CPU is read once the books settled, and not before `window_s`."""
    sale = _Sale(settings, config, strategy, run, logs)
    sale.load_stock()
    backlog = config.backlog and strategy in PIPELINES
    try:
        url, children = sale.start(consumer=not backlog)
        meter = CpuMeter({**{r: ch.popen.pid for r, ch in children.items()}, **server_pids()})
        metered = time.perf_counter()
        producer = children.get("producer")
        transactions = _metric(producer.url, "flashsale_transaction_purchases_count") if producer else 0.0
        load = sale.buy(url, tick)
        if producer:
            transactions = _metric(producer.url, "flashsale_transaction_purchases_count") - transactions
        drained = _drain(sale, load.statuses.get("accepted", 0), backlog)
        time.sleep(max(0.0, window_s - (time.perf_counter() - metered)))
        used, window = meter.used(), time.perf_counter() - metered
    finally:
        sale.fleet.stop()
    result = _result(strategy, sale.skus, load, drained.drain_s, sale.books())
    if backlog and drained.drain_s:
        result.applied_per_s = round(result.accepted / drained.drain_s, 1)
    if result.accepted:
        result.cpu_ms_per_accepted = {name: round(1000 * s / result.accepted, 3) for name, s in used.items()}
        result.cpu_ms_per_accepted["all"] = round(1000 * sum(used.values()) / result.accepted, 3)
        result.cpu_window_s, result.cpu_s = round(window, 1), round(sum(used.values()), 3)
        if producer:
            result.transactions_per_accepted = round(transactions / result.accepted, 4)
    if config.unpaid is not None:
        _add_lifecycle(result, sale, load, drained)
    return result


def _drain(sale: _Sale, accepted: int, backlog: bool) -> _Drained:
    """Wait for MySQL to hold the sale (with orders: its last deadlines to fire, and their decisions)."""
    drained = _Drained(sale_end_ms=int(time.time() * 1000))
    if sale.strategy not in (*PIPELINES, ORDERS):
        return drained
    with wiring.mysql_store(sale.settings) as store:
        started = time.perf_counter()
        if backlog:  # its start-up counts: the backlog waits for it too
            sale.fleet.consumer()
        reconcile.wait_applied(store, sale.skus, accepted, timeout_s=DRAIN_TIMEOUT_S)
        drained.drain_s = time.perf_counter() - started
        if sale.strategy == ORDERS:
            _wait_decided(sale, store)
        drained.settle_s = time.perf_counter() - started
    return drained


def _wait_decided(sale: _Sale, store: MySQLStore) -> None:
    """Until no order awaits payment in Redis and MySQL holds every purchase and decision the logs hold.

    The last orders are due a deadline after the last answer: nothing to read before then (each read
    scans the logs, and Redis's CPU is being measured)."""
    time.sleep(sale.config.deadline_ms / 1000)
    with wiring.redis_stock(sale.settings) as stock:
        poll_until(lambda: _caught_up(stock, store, sale.skus), DRAIN_TIMEOUT_S, interval_s=0.5)


def _caught_up(stock: RedisStock, store: MySQLStore, skus: list[str]) -> bool:
    for sku in skus:
        if not stock.exists(sku):
            return True  # dropped under the sale: nothing more will come, and the books will say so
        sold = [e for e in stock.scan_log(sku) if e.state in c.DEDUCTED_STATES]
        if any(e.order == "awaiting" for e in sold):
            return False
        view = store.view(sku)
        paid = sum(e.order == "paid" for e in sold)
        returned = sum(e.state == c.STATE_RETURNED for e in sold)
        states = {status: count for status, (count, _) in view.order_states.items()}
        if (view.deductions, view.returns, states.get("paid", 0)) != (len(sold), returned, paid):
            return False
        if states.get(c.ORDER_STATUS["awaiting"], 0):
            return False
    return True


def _add_lifecycle(result: StrategyResult, sale: _Sale, load: LoadReport, drained: _Drained) -> None:
    """The lifecycle's numbers from the Redis logs, the buyers' payments, and whether a purchase was lost
    (told accepted, not in MySQL) or a unit sold twice over (more sold than loaded and given back)."""
    with wiring.books(sale.settings) as (stock, store):
        loaded = sale.config.stock
        lifecycle = measure(((stock.scan_log(sku), loaded) for sku in sale.skus), sale_end_ms=drained.sale_end_ms)
        told: dict[str, list[str]] = {}
        for sku, token, _ in load.accepted:
            told.setdefault(sku, []).append(token)
        for sku, tokens in told.items():
            for page in pages(tokens, reconcile.PAGE):
                lifecycle.lost += len(page) - len(store.existing_tokens(sku, page))
    lifecycle.settle_s = round(drained.settle_s, 3)
    if sale.payers is not None:
        paid = sale.payers.report
        lifecycle.unpaid_buyers, lifecycle.payments = paid.unpaid, dict(sorted(paid.decisions.items()))
        lifecycle.pay_p50_ms, lifecycle.pay_p99_ms = paid.percentile_ms(0.5), paid.percentile_ms(0.99)
        result.errors += paid.errors
    if lifecycle.lost:
        result.problems.append(f"{lifecycle.lost} purchase(s) told accepted are not in MySQL")
    if lifecycle.oversold:
        result.problems.append(f"{lifecycle.oversold} unit(s) sold beyond the stock loaded and given back")
    result.lifecycle, result.consistent = lifecycle, not result.problems


def _compare_orders(results: list[StrategyResult]) -> None:
    """What the orders cost in CPU, all processes: per accepted purchase over the plain sale's, and the CPU
    the sale with orders spent beyond the plain one's, per purchase it accepted (both sales answered as
    many attempts, so the sold-out answers weigh the same in both totals)."""
    by_name = {r.strategy: r for r in results}
    orders, plain = by_name.get(ORDERS), by_name.get("pipeline")
    if orders is None or plain is None or orders.lifecycle is None:
        return
    with_orders, without = orders.cpu_ms_per_accepted.get("all"), plain.cpu_ms_per_accepted.get("all")
    if with_orders is not None and without:
        orders.lifecycle.cpu_x_plain = round(with_orders / without, 2)
    if orders.cpu_s is not None and plain.cpu_s is not None and orders.accepted:
        orders.lifecycle.cpu_extra_ms_per_accepted = round(1000 * (orders.cpu_s - plain.cpu_s) / orders.accepted, 3)


def run_bench(
    settings: Settings,
    config: BenchConfig,
    strategies: list[str],
    *,
    logs_root: Path,
    server_pids: ServerPids = dict,
    producer_url: str | None = None,
    on_start: Callable[[str, int], Tick] | None = None,
) -> list[StrategyResult]:
    """Run each strategy in turn (with `config.unpaid`: the pair ORDERS_PAIR), its processes logging under
    `logs_root`/bench-<run>; `on_start(strategy, attempts)` returns the tick called per attempt."""
    config = config.resolved()
    if producer_url is not None and (config.backlog or config.batch_size or strategies != ["pipeline"]):
        raise InvalidInput(
            "--producer-url measures one running producer: use it with --strategy pipeline, without "
            "--backlog or --batch-size"
        )
    if config.unpaid is not None:
        if strategies != ["pipeline"] or producer_url is not None:
            raise InvalidInput(
                f"--unpaid runs a pair of its own, {' then '.join(ORDERS_PAIR)}: leave --strategy and "
                "--producer-url out"
            )
        strategies = list(ORDERS_PAIR)
    run = uuid.uuid4().hex[:6]
    folder = logs_root / f"bench-{run}"
    results: list[StrategyResult] = []
    for strategy in strategies:
        tick = on_start(strategy, config.attempts) if on_start else (lambda: None)
        # The plain sale's CPU is read over as long as the sale with orders took to settle.
        window_s = next((r.cpu_window_s or 0.0 for r in results if r.strategy == ORDERS), 0.0)
        try:
            if producer_url is not None:
                results.append(_sell_to(settings, config, producer_url, run, tick))
            else:
                results.append(_sell(settings, config, strategy, run, folder, tick, server_pids, window_s=window_s))
        except FlashSaleError as exc:  # it could not even start: said as its result, and the run goes on
            logger.error("strategy %s failed: %s", strategy, exc)
            results.append(_result(strategy, [], LoadReport(), 0.0, [f"did not run: {exc}"]))
    _compare_orders(results)
    baseline = next((r for r in results if r.strategy == BASELINE), None)
    if baseline and baseline.throughput:
        for r in results:
            r.ratio = round(r.throughput / baseline.throughput, 2)
            r.p99_ratio = round(r.p99_ms / baseline.p99_ms, 3) if baseline.p99_ms else None
    return results


def _sell_to(settings: Settings, config: BenchConfig, url: str, run: str, tick: Tick) -> StrategyResult:
    """The pipeline strategy against a producer someone else runs (--producer-url)."""
    if not ready(url):
        raise InvalidInput(
            f"no producer answers at {url}", hint="start one (`flashsale producer run`) or leave --producer-url out"
        )
    skus = [f"bench-{run}-pipeline-{i}" for i in range(config.skus)]
    for sku in skus:
        setup.set_stock(settings, sku, config.stock, per_user_limit=config.per_user_limit)
    crowd = Crowd(url, tuple(skus), attempts=config.attempts, concurrency=config.buyers, rate=config.rate, run_id=run)
    load = run_crowd(crowd, processes=config.load_processes, tick=tick)
    with wiring.mysql_store(settings) as store:
        drain_s = reconcile.wait_applied(store, skus, load.statuses.get("accepted", 0), timeout_s=DRAIN_TIMEOUT_S)
    return _result("pipeline", skus, load, drain_s, _drift(settings, skus))


def _drift(settings: Settings, skus: list[str]) -> list[str]:
    """What reconcile finds wrong with the books of `skus`, each problem named by its SKU."""
    with wiring.books(settings) as (stock, store):
        return [f"{sku}: {p}" for sku in skus for p in reconcile.reconcile_sku(stock, store, sku, settle_s=0).problems]
