"""What a client really sees, measured from outside with Debian's wrk (`make wrk`).

For each group size (1: a transaction per purchase; and the configured default), on fresh processes:

- live: a SKU that never sells out, wrk for DURATION s with CONNECTIONS connections and a token of its
  own per request; accepted purchases per second end to end (from the first request until MySQL holds
  every accepted one), wrk's latency percentiles, broker transactions per accepted purchase, the CPU
  each process spent per accepted purchase, and how long a deduction took from its pre-deduct in Redis
  to its row in MySQL (percentiles, read with raw SQL);
- sold out: a SKU with no stock left; rejections per second of the one producer process;
- bare: the ceiling, measured before and after the others (bare_server.py: the producer's HTTP server
  answering a fixed JSON, nothing else); each rate is printed as a ratio of the mean of the two;
- crowd: the same live and sold-out runs of the default group size with `flashsale bench`'s buyers
  (bench/crowd.py) instead of wrk, each right after wrk's, as many attempts as wrk made, on the same
  connections: the two load generators' rates side by side, each pair's ratio, and with `--rounds N`
  (every run N times over, in turn) the median of the N pairs' ratios.

Run on the local stack: `python -m tests.benchmarks.wrk_bench [--duration 10] [--connections 200] [--rounds 1]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

from flashsale import constants as c
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.keys import SkuKeys
from flashsale.bench.cpu import CpuMeter
from flashsale.bench.crowd import DEFAULT_PROCESSES, Crowd, run_crowd
from flashsale.bench.fleet import Child, Fleet, free_port
from flashsale.bench.load import percentile
from flashsale.config import Settings
from flashsale.net import port_open
from flashsale.ops.setup import init, set_stock
from flashsale.polling import poll_until
from flashsale.stack import procs
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.conftest import ROOT, TEST_DATABASE, clean_environment, isolated_settings, session_env
from tests.oracle import drop_database, mysql_connection, redis_client

SCRIPT = ROOT / "infra" / "wrk" / "purchase.lua"
#: Servers of the stack whose CPU is counted too.
SERVERS = ("redis", "mariadb", "broker")


@dataclass
class Run:
    group_size: int
    mode: str  # live | sold_out
    group_wait_ms: float | None
    requests_per_s: float
    latency_ms: dict[str, float]
    accepted: int = 0
    end_to_end_s: float = 0.0
    accepted_per_s: float = 0.0
    transactions_per_accepted: float | None = None
    cpu_ms_per_accepted: dict[str, float] = field(default_factory=dict)
    cpu_percent: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0  # of the load
    generator: str = "wrk"  # or "crowd": the bench's buyers
    load_us_per_request: float | None = None  # CPU the load generator (wrk, or the buyers) spent per request
    to_mysql_ms: dict[str, float] = field(default_factory=dict)  # from a pre-deduct to its row in MySQL


@contextmanager
def own_database(prefix: str) -> Iterator[Settings]:
    """Settings of one benchmark run, initialised, on a MySQL database of its own that is dropped after it.
    MariaDB's cost per purchase grows with the rows already in its tables (the tests' database holds the
    books of every run before): a run measures the product, not the history of the box it runs on."""
    settings = isolated_settings(prefix, database=f"{TEST_DATABASE}_{prefix}{uuid.uuid4().hex[:8]}")
    init(settings)
    try:
        yield settings
    finally:
        drop_database(settings.mysql_url)


@contextmanager
def on_sale(settings: Settings, sku: str, stock: int) -> Iterator[str]:
    """`sku` loaded with `stock` for one run, and out of Redis after it. Runs in a row would otherwise grow
    Redis by a log entry per purchase each (a gigabyte in an afternoon), and its AOF rewrites, each a fork
    of all of it, would land in a later run's CPU."""
    set_stock(settings, sku, stock)
    try:
        yield sku
    finally:
        client = redis_client(settings.redis_url)
        try:
            client.unlink(*astuple(SkuKeys.of(sku)))
        finally:
            client.close()


def metric(url: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + labels + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def wrk_command(url: str, sku: str, duration_s: int, connections: int) -> list[str]:
    """wrk buying `sku` at `url` with a token of its own per request (infra/wrk/purchase.lua)."""
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "-s",
        str(SCRIPT),
        url,
        "--",
        sku,
        uuid.uuid4().hex[:8],
    ]


def parse_wrk(out: str) -> tuple[float, dict[str, float]]:
    """Requests/s and the latency percentiles (ms) of wrk's report."""
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    latency = {}
    for pct, value, unit in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        latency[f"p{pct}"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rate, latency


def _wrk(url: str, sku: str, duration_s: int, connections: int) -> tuple[float, dict[str, float]]:
    out = subprocess.run(
        wrk_command(url, sku, duration_s, connections), capture_output=True, text=True, check=True
    ).stdout
    return parse_wrk(out)


def measure_bare(duration_s: int, connections: int, *, validating: bool = False) -> Run:
    """The bare server's requests/s under the same wrk, and the CPU it spent per request; `validating`:
    the bare server that reads each purchase as the producer does (tests/benchmarks/bare_server.py)."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.benchmarks.bare_server", str(port)] + (["--validating"] if validating else [])
    server = subprocess.Popen(argv, cwd=ROOT)
    try:
        if not poll_until(lambda: port_open(c.DEFAULT_HOST, port), 30, interval_s=0.05):
            raise RuntimeError("the bare server did not listen within 30 s")
        meter = CpuMeter({"bare": server.pid})
        started = time.perf_counter()
        rate, latency = _wrk(f"http://{c.DEFAULT_HOST}:{port}", "bare", duration_s, connections)
        elapsed, used = time.perf_counter() - started, meter.used()
    finally:
        server.terminate()
        server.wait(30)
    run = Run(0, "validating" if validating else "bare", None, round(rate, 1), latency)
    run.cpu_percent = {"bare": round(100 * used["bare"] / elapsed, 1)}
    run.cpu_ms_per_accepted = {"bare": round(1000 * used["bare"] / (rate * elapsed), 4)}
    return run


def server_pids() -> dict[str, int]:
    """The PIDs of the local stack's servers (SERVERS) that are running, by name."""
    stack = Stack(StackSettings.from_env(clean_environment()))
    records = {name: procs.PidRecord.load(stack.layout.pid_file(name)) for name in SERVERS}
    return {name: record.pid for name, record in records.items() if record}


@contextmanager
def fleet_of(settings: Settings, group_size: int) -> Iterator[tuple[dict[str, int], str]]:
    """Fresh checker, consumer and producer on `settings`: the PIDs of them and of the stack's servers,
    and the producer's URL; stopped on exit."""
    env = {**session_env(settings), "FLASHSALE_GROUP_SIZE": str(group_size)}
    with tempfile.TemporaryDirectory() as logs:
        fleet = Fleet(env, Path(logs))
        try:
            children: dict[str, Child] = {"checker": fleet.checker(), "consumer": fleet.consumer()}
            producer, url = fleet.producer()
            children["producer"] = producer
            yield {**{name: c.popen.pid for name, c in children.items()}, **server_pids()}, url
        finally:
            fleet.stop()


def wait_applied(settings: Settings, sku: str, accepted: int) -> None:
    """Until MySQL holds `accepted` deductions of `sku` (at most 300 s)."""
    store = MySQLStore(settings.mysql_url)
    try:
        poll_until(lambda: store.applied([sku])[0] >= accepted, 300, interval_s=0.05)
    finally:
        store.close()


def to_mysql_ms(settings: Settings, sku: str) -> dict[str, float]:
    """Percentiles of the time from a deduction's pre-deduct (its log entry's time, Redis's clock, which
    the consumer writes as `created_ms`) to its row in MySQL (`applied_at`, MariaDB's): one box, one clock.
    The half message went a little before the pre-deduct, so this slightly understates message to row."""
    conn = mysql_connection(settings.mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT UNIX_TIMESTAMP(applied_at) * 1000 - created_ms FROM stock_deductions WHERE sku = %s", (sku,)
            )
            delays = [float(row[0]) for row in cur.fetchall()]
    finally:
        conn.close()
    return {f"p{q}": round(percentile(delays, q / 100), 1) for q in (50, 90, 99)} if delays else {}


def measure(
    settings: Settings,
    group_size: int,
    mode: str,
    duration_s: int,
    connections: int,
    group_wait_ms: float | None = None,
) -> Run:
    sku = f"wrk-{mode}-{group_size}-{uuid.uuid4().hex[:6]}"
    with on_sale(settings, sku, 10**9 if mode == "live" else 0), fleet_of(settings, group_size) as (pids, url):
        accepted_before = metric(url, "flashsale_purchases_total", '{status="accepted"}')
        tx_before = metric(url, "flashsale_transaction_purchases_count")
        meter = CpuMeter(pids)
        started = time.perf_counter()
        load_before = _children_cpu_s()
        rate, latency = _wrk(url, sku, duration_s, connections)
        load_s = _children_cpu_s() - load_before  # wrk's, ended and waited for
        accepted = int(metric(url, "flashsale_purchases_total", '{status="accepted"}') - accepted_before)
        transactions = metric(url, "flashsale_transaction_purchases_count") - tx_before
        wait_applied(settings, sku, accepted)
        end_to_end_s = time.perf_counter() - started
        used = meter.used()
    run = Run(group_size, mode, group_wait_ms, round(rate, 1), latency, duration_s=duration_s)
    run.cpu_percent = {name: round(100 * s / end_to_end_s, 1) for name, s in used.items()}
    run.load_us_per_request = round(1e6 * load_s / (rate * duration_s), 1)
    if mode == "live" and accepted:
        run.accepted = accepted
        run.end_to_end_s = round(end_to_end_s, 2)
        run.accepted_per_s = round(accepted / end_to_end_s, 1)
        run.transactions_per_accepted = round(transactions / accepted, 4)
        run.cpu_ms_per_accepted = {name: round(1000 * s / accepted, 3) for name, s in used.items()}
        run.to_mysql_ms = to_mysql_ms(settings, sku)
    return run


def measure_crowd(settings: Settings, like: Run, connections: int, processes: int) -> Run:
    """`like` again (its group size and mode, as many attempts as wrk made) with the bench's buyers."""
    sku = f"crowd-{like.mode}-{like.group_size}-{uuid.uuid4().hex[:6]}"
    attempts = max(connections, int(like.requests_per_s * like.duration_s))
    stock = 10**9 if like.mode == "live" else 0
    with on_sale(settings, sku, stock), fleet_of(settings, like.group_size) as (pids, url):
        tx_before = metric(url, "flashsale_transaction_purchases_count")
        meter = CpuMeter(pids)
        started = time.perf_counter()
        load = run_crowd(Crowd(url, (sku,), attempts=attempts, concurrency=connections), processes=processes)
        accepted = load.statuses.get("accepted", 0)
        transactions = metric(url, "flashsale_transaction_purchases_count") - tx_before
        wait_applied(settings, sku, accepted)
        end_to_end_s = time.perf_counter() - started - (load.started - started)
        used = meter.used()
    latency = {f"p{q}": round(load.percentile(q / 100) * 1000, 2) for q in (50, 90, 99)}
    run = Run(like.group_size, like.mode, like.group_wait_ms, round(load.throughput, 1), latency, generator="crowd")
    run.cpu_percent = {name: round(100 * s / end_to_end_s, 1) for name, s in used.items()}
    # During the sale: what the buyers took from the server (not their start, nor sending their reports).
    run.load_us_per_request = round(1e6 * load.cpu_s / load.attempts, 1)
    if like.mode == "live" and accepted:
        run.accepted, run.end_to_end_s = accepted, round(end_to_end_s, 2)
        run.accepted_per_s = round(accepted / end_to_end_s, 1)
        run.transactions_per_accepted = round(transactions / accepted, 4)
        run.cpu_ms_per_accepted = {name: round(1000 * s / accepted, 3) for name, s in used.items()}
    return run


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--group-sizes", default=f"1,{Settings().producer.group_size}")
    parser.add_argument("--group-waits", default="", help="comma-separated FLASHSALE_GROUP_WAIT_MS values")
    parser.add_argument("--modes", default="live,sold_out")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--warmup", type=int, default=30, help="seconds of live load first, not measured (0: none)")
    parser.add_argument(
        "--validating", action="store_true", help="also measure the bare server that reads purchases as the producer"
    )
    parser.add_argument(
        "--crowd-processes", type=int, default=DEFAULT_PROCESSES, help="0: no runs with the bench's buyers"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="every run this many times over, in turn (the box's drift shows)"
    )
    args = parser.parse_args()
    with own_database("w") as settings:
        _main(settings, args)


def _main(settings: Settings, args: argparse.Namespace) -> None:
    waits = [float(w) for w in args.group_waits.split(",")] if args.group_waits else [None]
    modes = args.modes.split(",")
    if args.warmup:
        # A broker just started spends most of its CPU compiling (its JIT): not a purchase's cost.
        measure(settings, Settings().producer.group_size, "live", args.warmup, args.connections)
    before = measure_bare(args.duration, args.connections)
    default = Settings().producer.group_size
    runs: list[Run] = []
    for _ in range(args.rounds):
        for size in args.group_sizes.split(","):
            for wait in waits:
                for mode in modes:
                    runs.append(measure(settings, int(size), mode, args.duration, args.connections, wait))
                    if args.crowd_processes and int(size) == default and wait is None:
                        # Right after wrk's run, so that both meet the broker at about the same age (its JIT).
                        runs.append(measure_crowd(settings, runs[-1], args.connections, args.crowd_processes))
    if args.validating:
        runs.append(measure_bare(args.duration, args.connections, validating=True))
    after = measure_bare(args.duration, args.connections)
    ceiling = (before.requests_per_s + after.requests_per_s) / 2
    if args.json:
        print(json.dumps({"bare": [asdict(before), asdict(after)], "runs": [asdict(r) for r in runs]}, indent=2))
        return
    report(runs, before, after, ceiling, args)


def report(runs: list[Run], before: Run, after: Run, ceiling: float, args: argparse.Namespace) -> None:
    print(f"wrk: 1 thread, {args.connections} connections, {args.duration} s per run, a token of its own per request")
    print(
        f"bare server (the ceiling): {before.requests_per_s:,.0f} requests/s before, {after.requests_per_s:,.0f}"
        f" after (mean {ceiling:,.0f}); {before.cpu_ms_per_accepted['bare']:.4f} ms of CPU per request"
    )
    print(
        "| group size | mode | load | requests/s | x bare | accepted/s end to end | x bare | p50 / p99 ms "
        "| transactions / accepted | CPU ms / accepted, all |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        live = r.mode == "live"
        accepted = f"{r.accepted_per_s:,.0f} | {r.accepted_per_s / ceiling:.2f}" if live else "- | -"
        tx = f"{r.transactions_per_accepted:.3f}" if r.transactions_per_accepted is not None else "-"
        latency = f"{r.latency_ms.get('p50', 0):.1f} / {r.latency_ms.get('p99', 0):.1f}"
        cpu = f"{sum(r.cpu_ms_per_accepted.values()):.3f}" if r.cpu_ms_per_accepted else "-"
        print(
            f"| {r.group_size} | {r.mode} | {r.generator} | {r.requests_per_s:,.0f} | {r.requests_per_s / ceiling:.2f} "
            f"| {accepted} "
            f"| {latency} | {tx} | {cpu} |"
        )
    print()
    print("CPU ms per accepted purchase (live), and % of a core (each run):")
    for r in runs:
        per = ", ".join(f"{k} {v}" for k, v in r.cpu_ms_per_accepted.items()) or "-"
        pct = ", ".join(f"{k} {v}%" for k, v in r.cpu_percent.items())
        to_mysql = " / ".join(f"{v:,.0f}" for v in r.to_mysql_ms.values())
        reached = f"; pre-deduct to MySQL p50 / p90 / p99 {to_mysql} ms" if to_mysql else ""
        print(f"  group {r.group_size} {r.mode} ({r.generator}): {per}; {pct}{reached}")
    compare_generators(runs)


def compare_generators(runs: list[Run]) -> None:
    """Each crowd run against the wrk run just before it (same group size and mode, the broker a few seconds
    older), and the median of those ratios over the rounds: one pair moves with the box's noise."""
    ratios: dict[tuple[int, str], list[float]] = {}
    for wrk, r in itertools.pairwise(runs):
        if r.generator != "crowd" or wrk.generator != "wrk" or not wrk.requests_per_s:
            continue
        live = f", accepted/s end to end {r.accepted_per_s / wrk.accepted_per_s:.2f}" if wrk.accepted_per_s else ""
        rate = r.requests_per_s / wrk.requests_per_s
        ratios.setdefault((r.group_size, r.mode), []).append(rate)
        print(
            f"bench's buyers / wrk, group {r.group_size} {r.mode}: requests/s {rate:.2f}{live}; "
            f"CPU per request: the buyers {r.load_us_per_request} µs, wrk {wrk.load_us_per_request} µs"
        )
    for (size, mode), each in ratios.items():
        if len(each) > 1:
            within = sum(0.8 <= x <= 1.2 for x in each)
            print(
                f"bench's buyers / wrk, group {size} {mode}, {len(each)} pairs: requests/s median "
                f"{statistics.median(each):.2f}, {within} of {len(each)} within 20%"
            )


if __name__ == "__main__":
    main()
