"""Wall-clock and memory numbers of the operators' side, reported rather than asserted (`make bench`).

- how long each process takes to stop on SIGTERM, idle and in the middle of a sale;
- the peak memory reconcile takes over a sale of 100,000 deductions (it reads a page at a time).

Run on the local stack: `python -m tests.benchmarks.ops_bounds`.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.stock import RedisStock
from flashsale.bench.load import run_load
from flashsale.config import Settings
from flashsale.models import Deduction, Purchase
from flashsale.ops.reconcile import reconcile_sku
from flashsale.ops.setup import init, set_stock
from flashsale.records import Incoming
from tests.acceptance.harness import Pipeline
from tests.conftest import isolated_settings


def _settings() -> Settings:
    return isolated_settings("b")


def stop_times(settings: Settings) -> dict[str, float]:
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as logs:
        pipeline = Pipeline(settings, Path(logs))
        try:
            for role, start in (("checker", pipeline.checker), ("consumer", pipeline.consumer)):
                child = start()
                started = time.monotonic()
                child.terminate(timeout_s=120)
                times[f"{role}, idle"] = time.monotonic() - started
            sku = f"bench-stop-{uuid.uuid4().hex[:6]}"
            set_stock(settings, sku, 100_000)
            producer, url = pipeline.producer()
            load = threading.Thread(target=lambda: asyncio.run(run_load(url, [sku], attempts=3000, concurrency=50)))
            load.start()
            time.sleep(1.0)
            started = time.monotonic()
            producer.terminate(timeout_s=120)
            times["producer, mid-sale (50 buyers)"] = time.monotonic() - started
            load.join()
        finally:
            pipeline.stop()
    return times


def reconcile_peak(settings: Settings, n: int = 100_000) -> tuple[float, float]:
    """(peak MB, seconds) of reconciling a SKU with `n` deductions on both sides."""
    stock, store = RedisStock(settings.redis_url), MySQLStore(settings.mysql_url)
    sku = f"bench-reconcile-{uuid.uuid4().hex[:6]}"
    try:
        set_stock(settings, sku, n)
        for start in range(0, n, 1000):
            stock.prededuct(sku, f"m{start}", [Purchase(f"t{i}", "u", 1) for i in range(start, min(n, start + 1000))])
        ts = int(time.time() * 1000)
        for start in range(0, n, 5000):
            store.apply_batch(
                [Incoming(Deduction(f"t{i}", sku, "u", 1, ts), f"m{start}") for i in range(start, min(n, start + 5000))]
            )
        tracemalloc.start()
        started = time.monotonic()
        report = reconcile_sku(stock, store, sku, settle_s=0)
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.consistent, report.problems
        return peak / 1e6, seconds
    finally:
        stock.close()
        store.close()


def main() -> None:
    settings = _settings()
    init(settings)
    print("| what | measured |")
    print("|---|---|")
    for what, seconds in stop_times(settings).items():
        print(f"| stop on SIGTERM: {what} | {seconds:.2f} s |")
    peak_mb, seconds = reconcile_peak(settings)
    print(f"| reconcile of 100,000 deductions | {seconds:.1f} s, peak {peak_mb:.1f} MB traced |")


if __name__ == "__main__":
    main()
