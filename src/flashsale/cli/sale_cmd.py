"""`flashsale bench` and `flashsale demo`: flash sales with a progress bar and a verdict."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flashsale.bench import runner as bench_ops
from flashsale.bench.crowd import DEFAULT_PROCESSES
from flashsale.bench.demo import DemoConfig, run_demo
from flashsale.bench.lifecycle import Lifecycle
from flashsale.bench.plot import plot
from flashsale.cli.context import Context
from flashsale.cli.ops_cmd import print_reconcile
from flashsale.cli.options import Decorator, json_output, partitions_option
from flashsale.errors import InvalidInput
from flashsale.ops.times import parse_duration_ms
from flashsale.stack.manager import Stack


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """Yields start(label, total) -> tick; a no-op when disabled (JSON output, no terminal)."""
    if not enabled:
        yield lambda _label, _total: lambda: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bars:

        def start(label: str, total: int) -> Callable[[], None]:
            task = bars.add_task(label, total=total)
            return lambda: bars.advance(task)

        yield start


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


Row = tuple[str, Callable[[bench_ops.StrategyResult], str]]


def _bench_table(results: list[bench_ops.StrategyResult]) -> Table:
    table = Table(title="flash sale bench")
    table.add_column("")
    for r in results:
        table.add_column(r.strategy, justify="right")
    rows = _sale_rows(results)
    if any(r.lifecycle for r in results):
        rows += _lifecycle_rows()
    for title, cell in rows:
        table.add_row(title, *(cell(r) for r in results))
    return table


def _sale_rows(results: list[bench_ops.StrategyResult]) -> list[Row]:
    return [
        ("attempts", lambda r: str(r.attempts)),
        ("accepted", lambda r: str(r.accepted)),
        *(
            (f"rejected: {status}", lambda r, s=status: str(r.rejected.get(s, 0)))
            for status in sorted({k for r in results for k in r.rejected})
        ),
        ("attempts/s", lambda r: f"{r.throughput:.0f}"),
        ("sold out after s", lambda r: f"{r.sellout_s:.2f}"),
        ("accepted/s until sold out", lambda r: f"{r.accepted_per_s:.0f}"),
        ("latency p50 ms", lambda r: f"{r.p50_ms:.1f}"),
        ("latency p95 ms", lambda r: f"{r.p95_ms:.1f}"),
        ("latency p99 ms", lambda r: f"{r.p99_ms:.1f}"),
        ("drain s", lambda r: f"{r.drain_s:.2f}"),
        ("consumer rows/s (backlog)", lambda r: f"{r.applied_per_s:.0f}" if r.applied_per_s else "-"),
        ("broker transactions / accepted", lambda r: _maybe(r.transactions_per_accepted, ".3f")),
        *(
            (f"CPU ms / accepted: {name}", lambda r, n=name: _maybe(r.cpu_ms_per_accepted.get(n), ".3f"))
            for name in dict.fromkeys(n for r in results for n in r.cpu_ms_per_accepted)
        ),
        ("CPU s, all, read over s", lambda r: f"{r.cpu_s:.2f} over {r.cpu_window_s:.1f}" if r.cpu_s else "-"),
        ("books", lambda r: "[green]balanced[/]" if r.consistent else "[red]DRIFT[/]"),
        (f"x {bench_ops.BASELINE} (attempts/s)", lambda r: _maybe(r.ratio, ".2f")),
        (f"x {bench_ops.BASELINE} (p99)", lambda r: _maybe(r.p99_ratio, ".3f")),
    ]


def _life(cell: Callable[[Lifecycle], str]) -> Callable[[bench_ops.StrategyResult], str]:
    return lambda r: "-" if r.lifecycle is None else cell(r.lifecycle)


def _lifecycle_rows() -> list[Row]:
    """The orders' numbers (bench/lifecycle.py says how each is read)."""
    return [
        ("orders paid / expired", _life(lambda x: f"{x.paid} / {x.expired}")),
        ("buyers who never paid", _life(lambda x: str(x.unpaid_buyers))),
        ("payments p50 / p99 ms", _life(lambda x: f"{x.pay_p50_ms:.1f} / {x.pay_p99_ms:.1f}" if x.payments else "-")),
        ("units resold", _life(lambda x: str(x.resold))),
        ("units resold/s", _life(lambda x: f"{x.resold_per_s:.1f}")),
        ("units given back, unsold at the end", _life(lambda x: str(x.back_unsold))),
        (
            "expiry lateness p50 / p99 ms",
            _life(lambda x: f"{x.lateness_p50_ms:.0f} / {x.lateness_p99_ms:.0f}" if x.expired_under_load else "-"),
        ),
        (
            "deadline to resold p50 / p99 ms",
            _life(lambda x: f"{x.resold_after_due_p50_ms:.0f} / {x.resold_after_due_p99_ms:.0f}" if x.resold else "-"),
        ),
        ("settled after the last answer s", _life(lambda x: f"{x.settle_s:.2f}")),
        ("oversold / lost", _life(lambda x: f"{x.oversold} / {x.lost}")),
        ("CPU / accepted, x plain (all)", _life(lambda x: _maybe(x.cpu_x_plain, ".2f"))),
        ("CPU ms added / accepted (all)", _life(lambda x: _maybe(x.cpu_extra_ms_per_accepted, "+.3f"))),
    ]


def _sale_shape(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that shape each strategy's sale (the fields of BenchConfig)."""
    for option in reversed(_SHAPE):
        command = option(command)
    return command


_SHAPE: list[Decorator] = [
    click.option(
        "--skus", type=click.IntRange(1), default=1, show_default=True, help="SKUs on sale (attempts spread over them)."
    ),
    click.option("--stock", type=click.IntRange(1), default=1000, show_default=True, help="Units per SKU."),
    click.option(
        "--buyers",
        type=click.IntRange(1),
        default=200,
        show_default=True,
        help="Buyers in flight at once (concurrency).",
    ),
    click.option(
        "--attempts", type=click.IntRange(1), default=5000, show_default=True, help="Purchase attempts in all."
    ),
    click.option(
        "--per-user-limit",
        type=click.IntRange(0),
        default=0,
        show_default=True,
        help="Units one buyer may get (0 = none).",
    ),
    click.option(
        "--rate",
        type=click.FloatRange(0, min_open=True),
        default=None,
        metavar="R",
        help="Open loop: R attempts per second, due whatever the answers; latency counts from when each was due.",
    ),
    click.option(
        "--backlog", is_flag=True, help="Pipeline: sell with no consumer running, then time how fast one applies it."
    ),
    click.option(
        "--batch-size", type=click.IntRange(1), default=None, help="Pipeline: batch size of the bench's own consumer."
    ),
    partitions_option(
        3, "Bucketed: partitions of each SKU (on the masters of the Redis Cluster FLASHSALE_REDIS_URL names)."
    ),
    click.option(
        "--unpaid",
        type=click.FloatRange(0, 1, max_open=True),
        default=None,
        metavar="FRACTION",
        help="Orders await payment and this share of the accepted buyers never pays (the rest pay over HTTP): "
        "runs pipeline-orders, then pipeline, the same sale without orders, and compares them. The buyers "
        f"come at --rate, by default the attempts spread over {bench_ops.SALE_DEADLINES} deadlines.",
    ),
    click.option(
        "--pay-within",
        "pay_within_ms",
        default=None,
        metavar="DURATION",
        callback=lambda _ctx, _param, value: None if value is None else parse_duration_ms(value, what="--pay-within"),
        help=f"With --unpaid: how long an order awaits payment (500ms, 5s, 2m; at most 1d) [default: "
        f"{bench_ops.DEFAULT_PAY_WITHIN_MS // 1000}s].",
    ),
    click.option(
        "--load-processes",
        type=click.IntRange(1),
        default=DEFAULT_PROCESSES,
        show_default=True,
        help="Processes the buyers are spread over; each takes a core when the server answers fast.",
    ),
]


@click.command()
@click.option(
    "--strategy",
    "strategies",
    default="pipeline",
    show_default=True,
    help=f"Comma-separated, run in turn with the same load: {', '.join(bench_ops.STRATEGIES)}.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    metavar="FILE.png",
    help="Draw accepted/s and p50/p99 latency over time, one line per strategy, sold-out marked.",
)
@click.option(
    "--producer-url",
    default=None,
    metavar="URL",
    help="A running producer to load; by default the bench starts its own three processes.",
)
@_sale_shape
@json_output("the results (no progress bars)")
@click.pass_obj
def bench(
    ctx: Context, /, strategies: str, plot_path: Path | None, producer_url: str | None, as_json: bool, **shape: Any
) -> None:
    """A flash sale per strategy against the running stack; a table of throughput, latency, drain and books."""
    chosen = bench_ops.parse_strategies(strategies)
    if producer_url is not None:
        _check_url(producer_url)
    config = bench_ops.BenchConfig(**shape).resolved()
    stack = Stack(ctx.stack_settings)
    with progress_bars(not as_json and sys.stderr.isatty()) as start:
        results = bench_ops.run_bench(
            ctx.settings,
            config,
            chosen,
            logs_root=stack.layout.logs,
            server_pids=lambda: stack.pids(bench_ops.SERVERS),
            producer_url=producer_url,
            on_start=start,
        )
    if plot_path is not None:
        plot([(r.strategy, r.load) for r in results if r.load is not None], plot_path)
    _print_bench(config, results, plot_path, as_json)
    sys.exit(0 if all(r.consistent for r in results) else 1)


def _print_bench(
    config: bench_ops.BenchConfig, results: list[bench_ops.StrategyResult], plot_path: Path | None, as_json: bool
) -> None:
    if as_json:
        click.echo(json.dumps({"config": config.__dict__, "results": [r.to_json() for r in results]}, indent=2))
        return
    Console().print(_bench_table(results))
    for r in results:
        for problem in r.problems:
            click.echo(f"{r.strategy}: {problem}")
        for error in r.errors:
            click.echo(f"{r.strategy}: {error}")
    if plot_path is not None:
        click.echo(f"plot: {plot_path}")


def _check_url(producer_url: str) -> None:
    parts = urlsplit(producer_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"--producer-url {producer_url!r} is not an http:// URL")


@click.command()
@click.option("--sku", default="", help="SKU of the sale [default: demo-<date>-<time>, a fresh one each run].")
@click.option("--stock", type=click.IntRange(1), default=1000, show_default=True, help="Units on sale.")
@click.option("--attempts", type=click.IntRange(1), default=5000, show_default=True, help="Purchase attempts.")
@click.option(
    "--buyers", type=click.IntRange(1, 2000), default=200, show_default=True, help="Buyers in flight at once."
)
@click.option(
    "--per-user-limit", type=click.IntRange(0), default=0, show_default=True, help="Units one buyer may get (0 = none)."
)
@click.pass_obj
def demo(ctx: Context, sku: str, stock: int, attempts: int, buyers: int, per_user_limit: int) -> None:
    """The whole story on the real stack: stack up, schema, stock, three processes, a sale, the books."""
    config = DemoConfig(sku=sku, stock=stock, attempts=attempts, buyers=buyers, per_user_limit=per_user_limit)
    console = Console(soft_wrap=True)
    stack = Stack(ctx.stack_settings)
    with progress_bars(sys.stderr.isatty()) as start:
        result = run_demo(
            ctx.settings,
            config,
            stack_up=lambda say: stack.up(progress=say),
            logs_root=stack.layout.logs,
            say=lambda line: console.print(line, highlight=False),
            on_sale_start=lambda total: start("purchases", total),
        )
    load = result.load
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(load.statuses.items()))
    console.print(f"\n{load.attempts} attempts in {load.elapsed_s:.2f} s ({load.throughput:.0f}/s): {statuses}")
    console.print(
        f"latency p50 {load.percentile(0.5) * 1000:.1f} ms, p99 {load.percentile(0.99) * 1000:.1f} ms; "
        f"MySQL caught up {result.drain_s:.2f} s after the last answer\n"
    )
    for error in load.errors:
        console.print(error)
    print_reconcile([result.report], console)
    console.print(
        f"\nProcess logs: {result.logs}\nThe stack keeps running (`flashsale stack status`); "
        f"stop it with `flashsale stack down`."
    )
    sys.exit(0 if result.report.consistent else 1)
