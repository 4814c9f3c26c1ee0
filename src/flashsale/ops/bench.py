"""`flashsale bench`: one flash sale per strategy, same load, results side by side.

- pipeline: buyers post to the producer over HTTP; deductions reach MySQL through RocketMQ and the
  batched consumer. Drain time is how long MySQL needs after the last answer to hold every deduction.
- mysql-lock / mysql-optimistic: buyers run the purchase as one MySQL transaction, straight from this
  process (no HTTP hop, which flatters them): what a team would otherwise build.

Every strategy gets fresh SKUs with the same stock, and its books are checked at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flashsale.adapters.mysql_baselines import MySQLBaselines
from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.config import Settings
from flashsale.errors import FlashSaleError, InvalidInput
from flashsale.models import PurchaseRequest
from flashsale.ops import reconcile, setup
from flashsale.ops.fleet import Fleet, environment, ready
from flashsale.ops.load import LoadReport, run_load

logger = logging.getLogger(__name__)

STRATEGIES = ("mysql-lock", "mysql-optimistic", "pipeline")
BASELINE = "mysql-lock"
#: Longest wait for the pipeline's consumer to apply every accepted deduction.
DRAIN_TIMEOUT_S = 300.0

Tick = Callable[[], None]


@dataclass(frozen=True)
class BenchConfig:
    skus: int = 1
    stock: int = 1000
    buyers: int = 200
    attempts: int = 5000
    per_user_limit: int = 0
    #: Pipeline only: sell with no consumer running, then start one and time how fast it applies the backlog.
    backlog: bool = False
    #: Pipeline only: FLASHSALE_BATCH_SIZE of the bench's own consumer (None: the configured one).
    batch_size: int | None = None

    def check(self) -> None:
        for name in ("skus", "stock", "buyers", "attempts"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.per_user_limit < 0:
            raise InvalidInput(f"--per-user-limit must be >= 0, got {self.per_user_limit}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidInput(f"--batch-size must be at least 1, got {self.batch_size}")


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
    transport_errors: list[str] = field(default_factory=list)  # the first attempts that got no HTTP answer
    ratio: float | None = None  # throughput relative to mysql-lock in the same run

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_strategies(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise InvalidInput(f"unknown strategy {', '.join(unknown) or '(none)'}; choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(chosen))


def _result(
    strategy: str,
    skus: list[str],
    load: LoadReport,
    drain_s: float,
    problems: list[str],
    applied_per_s: float | None = None,
) -> StrategyResult:
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
        applied_per_s=round(applied_per_s, 1) if applied_per_s is not None else None,
        consistent=not problems,
        problems=problems,
        transport_errors=load.errors,
    )


def _baseline(
    settings: Settings, strategy: str, config: BenchConfig, skus: list[str], run: str, tick: Tick
) -> StrategyResult:
    store = MySQLStore(settings.mysql_url, pool_size=config.buyers)
    try:
        for sku in skus:
            store.load_stock(sku, config.stock, per_user_limit=config.per_user_limit)
        purchase = MySQLBaselines(store, config.per_user_limit).strategy(strategy)
        load = LoadReport(started=time.perf_counter())

        def buyer(b: int) -> None:
            for i in range(b, config.attempts, config.buyers):
                request = PurchaseRequest(skus[i % len(skus)], f"{run}-u{b}", 1, f"{run}-{i}")
                started = time.perf_counter()
                try:
                    status = purchase(request).status.value
                except FlashSaleError as exc:
                    status = "error"
                    logger.debug("%s purchase failed: %s", strategy, exc)
                load.latencies_s.append(time.perf_counter() - started)
                load.statuses[status] += 1
                load.attempts += 1
                if status == "accepted":
                    load.last_accepted = time.perf_counter()
                tick()

        with ThreadPoolExecutor(config.buyers) as pool:
            list(pool.map(buyer, range(config.buyers)))
        load.elapsed_s = time.perf_counter() - load.started
        problems = []
        for sku in skus:
            view = store.view(sku)
            if view.stock + view.deducted_qty != view.initial or view.orders != view.deductions or view.stock < 0:
                problems.append(
                    f"{sku}: stock {view.stock} + applied {view.deducted_qty} vs initial {view.initial}, "
                    f"{view.orders} orders"
                )
        applied, _ = store.applied(skus)
        if applied != load.statuses.get("accepted", 0):
            problems.append(f"{load.statuses.get('accepted', 0)} accepted but {applied} applied")
        return _result(strategy, skus, load, 0.0, problems)
    finally:
        store.close()


def _pipeline(
    settings: Settings,
    config: BenchConfig,
    skus: list[str],
    run: str,
    url: str,
    tick: Tick,
    start_consumer: Callable[[], object] | None,
) -> StrategyResult:
    """`start_consumer` is given in backlog mode: the sale ran with no consumer, it starts one."""
    for sku in skus:
        setup.set_stock(settings, sku, config.stock, per_user_limit=config.per_user_limit)
    load = asyncio.run(run_load(url, skus, attempts=config.attempts, concurrency=config.buyers, run_id=run, tick=tick))
    accepted = load.statuses.get("accepted", 0)
    store, stock = MySQLStore(settings.mysql_url), RedisStock(settings.redis_url)
    try:
        started = time.perf_counter()
        if start_consumer:  # its start-up counts: the backlog waits for it too
            start_consumer()
        reconcile.wait_applied(store, skus, accepted, timeout_s=DRAIN_TIMEOUT_S)
        drain_s = time.perf_counter() - started
        problems = []
        for sku in skus:
            report = reconcile.reconcile_sku(stock, store, sku, settle_s=0)
            problems += [f"{sku}: {p}" for p in report.problems]
        rate = accepted / drain_s if start_consumer and drain_s else None
        return _result("pipeline", skus, load, drain_s, problems, rate)
    finally:
        store.close()
        stock.close()


def run_bench(
    settings: Settings,
    config: BenchConfig,
    strategies: list[str],
    *,
    producer_url: str | None = None,
    logs: Path | None = None,
    on_start: Callable[[str, int], Tick] | None = None,
) -> list[StrategyResult]:
    """Run each strategy in turn; `on_start(strategy, attempts)` returns the tick called per attempt."""
    config.check()
    if producer_url is not None and (config.backlog or config.batch_size):
        raise InvalidInput("--backlog and --batch-size need the bench's own processes; leave --producer-url out")
    run = uuid.uuid4().hex[:6]
    results: list[StrategyResult] = []
    fleet: Fleet | None = None
    try:
        for strategy in strategies:
            skus = [f"bench-{run}-{strategy}-{i}" for i in range(config.skus)]
            tick = on_start(strategy, config.attempts) if on_start else (lambda: None)
            if strategy != "pipeline":
                results.append(_baseline(settings, strategy, config, skus, f"{run}-{strategy}", tick))
                continue
            url = producer_url
            start_consumer: Callable[[], object] | None = None
            if url is not None:
                if not ready(url):
                    raise InvalidInput(
                        f"no producer answers at {producer_url}",
                        hint="start one (`flashsale producer run`) or leave --producer-url out",
                    )
            else:
                env = {"FLASHSALE_BATCH_SIZE": str(config.batch_size)} if config.batch_size else {}
                fleet = Fleet(environment(**env), logs or settings.home.resolve() / "logs" / f"bench-{run}")
                if config.backlog:
                    fleet.checker()
                    _, url = fleet.producer()
                    start_consumer = fleet.consumer
                else:
                    url = fleet.start_all()
            results.append(_pipeline(settings, config, skus, f"{run}-p", url, tick, start_consumer))
    finally:
        if fleet:
            fleet.stop()
    baseline = next((r for r in results if r.strategy == BASELINE), None)
    if baseline and baseline.throughput:
        for r in results:
            r.ratio = round(r.throughput / baseline.throughput, 2)
    return results
