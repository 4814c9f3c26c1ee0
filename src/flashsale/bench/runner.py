"""`flashsale bench`: one flash sale per strategy, same load, results side by side.

Every strategy is served over the same HTTP stack (granian, the producer's RSGI app), so every one pays
the same hop, and buyers are the same (closed loop, or open loop with `rate`):

- mysql-lock / mysql-optimistic: `flashsale baseline run`, the purchase as one MySQL transaction;
- pipeline-b1: flashsale with a transaction per purchase (FLASHSALE_GROUP_SIZE=1);
- pipeline: flashsale as configured (group commit);
- bucketed: the pipeline with each SKU spread over `partitions` partitions (on the masters of the Redis
  Cluster the settings name, or on one node), refilled from a pool.

Every strategy gets fresh SKUs with the same stock and fresh processes; its books are checked at the
end, and the CPU each process spent is read for it. A strategy that fails (connections exhausted,
timeouts) is reported with its errors; the run goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flashsale import constants as c
from flashsale import wiring
from flashsale.bench.cpu import CpuMeter
from flashsale.bench.fleet import Child, Fleet, environment, ready
from flashsale.bench.load import LoadReport, run_load
from flashsale.bench.mysql_baselines import BASELINES
from flashsale.config import Settings
from flashsale.errors import FlashSaleError, InvalidInput
from flashsale.ops import reconcile, setup

logger = logging.getLogger(__name__)

PIPELINES = ("pipeline-b1", "pipeline", "bucketed")
STRATEGIES = (*BASELINES, *PIPELINES)
BASELINE = "mysql-lock"
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

    def check(self) -> None:
        for name in ("skus", "stock", "buyers", "attempts"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.per_user_limit < 0:
            raise InvalidInput(f"--per-user-limit must be >= 0, got {self.per_user_limit}")
        if self.rate is not None and self.rate <= 0:
            raise InvalidInput(f"--rate must be above 0, got {self.rate}")
        if not 1 <= self.partitions <= c.MAX_PARTITIONS:
            raise InvalidInput(f"--partitions must be 1 to {c.MAX_PARTITIONS}, got {self.partitions}")


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
    cpu_ms_per_accepted: dict[str, float] = field(default_factory=dict)  # by process
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
        self.fleet = Fleet(environment(**env), logs / strategy)

    def load_stock(self) -> None:
        if self.strategy in BASELINES:
            with wiring.mysql_store(self.settings) as store:
                for sku in self.skus:
                    store.load_stock(sku, self.config.stock, per_user_limit=self.config.per_user_limit)
            return
        partitions = self.config.partitions if self.strategy == "bucketed" else 1
        for sku in self.skus:
            setup.set_stock(
                self.settings, sku, self.config.stock, per_user_limit=self.config.per_user_limit, partitions=partitions
            )

    def start(self, *, consumer: bool = True) -> tuple[str, dict[str, Child]]:
        """The strategy's processes; returns the URL buyers post to and the children by role."""
        if self.strategy in BASELINES:
            child = self.fleet.baseline(self.strategy, workers=min(self.config.buyers, BASELINE_WORKERS))
            return child.url, {"baseline": child}
        children = {"checker": self.fleet.checker()}
        if consumer:
            children["consumer"] = self.fleet.consumer()
        producer, url = self.fleet.producer()
        children["producer"] = producer
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


def _sell(
    settings: Settings, config: BenchConfig, strategy: str, run: str, logs: Path, tick: Tick, server_pids: ServerPids
) -> StrategyResult:
    sale = _Sale(settings, config, strategy, run, logs)
    sale.load_stock()
    backlog = config.backlog and strategy in PIPELINES
    try:
        url, children = sale.start(consumer=not backlog)
        meter = CpuMeter({**{r: ch.popen.pid for r, ch in children.items()}, **server_pids()})
        producer = children.get("producer")
        transactions = _metric(producer.url, "flashsale_transaction_purchases_count") if producer else 0.0
        load = asyncio.run(
            run_load(
                url,
                sale.skus,
                attempts=config.attempts,
                concurrency=config.buyers,
                rate=config.rate,
                run_id=f"{run}-{strategy}",
                tick=tick,
            )
        )
        accepted = load.statuses.get("accepted", 0)
        if producer:
            transactions = _metric(producer.url, "flashsale_transaction_purchases_count") - transactions
        drain_s = 0.0
        if strategy in PIPELINES:
            with wiring.mysql_store(settings) as store:
                started = time.perf_counter()
                if backlog:  # its start-up counts: the backlog waits for it too
                    sale.fleet.consumer()
                reconcile.wait_applied(store, sale.skus, accepted, timeout_s=DRAIN_TIMEOUT_S)
                drain_s = time.perf_counter() - started
        used = meter.used()
    finally:
        sale.fleet.stop()
    result = _result(strategy, sale.skus, load, drain_s, sale.books())
    if backlog and drain_s:
        result.applied_per_s = round(accepted / drain_s, 1)
    if accepted:
        result.cpu_ms_per_accepted = {name: round(1000 * s / accepted, 3) for name, s in used.items()}
        if producer:
            result.transactions_per_accepted = round(transactions / accepted, 4)
    return result


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
    """Run each strategy in turn, its processes logging under `logs_root`/bench-<run>; `on_start(strategy,
    attempts)` returns the tick called per attempt."""
    config.check()
    if producer_url is not None and (config.backlog or config.batch_size or strategies != ["pipeline"]):
        raise InvalidInput(
            "--producer-url measures one running producer: use it with --strategy pipeline, without "
            "--backlog or --batch-size"
        )
    run = uuid.uuid4().hex[:6]
    folder = logs_root / f"bench-{run}"
    results: list[StrategyResult] = []
    for strategy in strategies:
        tick = on_start(strategy, config.attempts) if on_start else (lambda: None)
        try:
            if producer_url is not None:
                results.append(_sell_to(settings, config, producer_url, run, tick))
            else:
                results.append(_sell(settings, config, strategy, run, folder, tick, server_pids))
        except FlashSaleError as exc:  # it could not even start: said as its result, and the run goes on
            logger.error("strategy %s failed: %s", strategy, exc)
            results.append(_result(strategy, [], LoadReport(), 0.0, [f"did not run: {exc}"]))
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
    load = asyncio.run(
        run_load(
            url, skus, attempts=config.attempts, concurrency=config.buyers, rate=config.rate, run_id=run, tick=tick
        )
    )
    with wiring.mysql_store(settings) as store:
        drain_s = reconcile.wait_applied(store, skus, load.statuses.get("accepted", 0), timeout_s=DRAIN_TIMEOUT_S)
    return _result("pipeline", skus, load, drain_s, _drift(settings, skus))


def _drift(settings: Settings, skus: list[str]) -> list[str]:
    """What reconcile finds wrong with the books of `skus`, each problem named by its SKU."""
    with wiring.books(settings) as (stock, store):
        return [f"{sku}: {p}" for sku in skus for p in reconcile.reconcile_sku(stock, store, sku, settle_s=0).problems]
