"""`flashsale demo`: a whole flash sale on the real stack, from nothing, with the books checked at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from flashsale import wiring
from flashsale.bench.crowd import Crowd, run_crowd
from flashsale.bench.fleet import Fleet, environment
from flashsale.bench.load import LoadReport
from flashsale.config import Settings
from flashsale.ops import reconcile, setup

Say = Callable[[str], None]
#: Brings the local stack up, saying each step with the function given.
StackUp = Callable[[Say], object]


@dataclass(frozen=True)
class DemoConfig:
    sku: str = ""
    stock: int = 1000
    attempts: int = 5000
    buyers: int = 200
    per_user_limit: int = 0


@dataclass
class DemoResult:
    sku: str
    load: LoadReport
    drain_s: float
    report: reconcile.SkuReport
    logs: str


def run_demo(
    settings: Settings,
    config: DemoConfig,
    *,
    stack_up: StackUp,
    logs_root: Path,
    say: Say,
    on_sale_start: Callable[[int], Callable[[], None]],
) -> DemoResult:
    """The demo's six steps; its processes log under `logs_root`/<sku>."""
    say("1/6 local stack: Redis, MariaDB, RocketMQ (installed and started if needed)")
    stack_up(lambda line: say(f"    {line}"))

    say("2/6 schema and topics")
    setup.init(settings, wait_s=30)
    sku = config.sku or datetime.now().astimezone().strftime("demo-%Y%m%d-%H%M%S")
    say(f"3/6 {sku}: {config.stock} units" + (f", {config.per_user_limit} per user" if config.per_user_limit else ""))
    setup.set_stock(settings, sku, config.stock, per_user_limit=config.per_user_limit)

    logs = logs_root / sku
    say(f"4/6 producer, consumer and checker processes (logs in {logs})")
    fleet = Fleet(environment(), logs)
    try:
        url = fleet.start_all()
        say(f"5/6 the sale: {config.attempts} purchase attempts from {config.buyers} buyers at once on {url}")
        tick = on_sale_start(config.attempts)
        load = run_crowd(Crowd(url, (sku,), attempts=config.attempts, concurrency=config.buyers), tick=tick)
        say("6/6 waiting for MySQL to hold every deduction, then reconciling Redis, MySQL and orders")
        with wiring.books(settings) as (stock, store):
            drain_s = reconcile.wait_applied(store, [sku], load.statuses.get("accepted", 0), timeout_s=120)
            report = reconcile.reconcile_sku(stock, store, sku, settle_s=0)
    finally:
        fleet.stop()
    return DemoResult(sku=sku, load=load, drain_s=drain_s, report=report, logs=str(logs))
