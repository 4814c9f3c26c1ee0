"""`flashsale reconcile` and `flashsale replay`: after (or during) a sale."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from flashsale import constants as c
from flashsale.cli.context import Context
from flashsale.cli.options import json_output, wait_seconds
from flashsale.errors import InvalidInput
from flashsale.ops import reconcile as reconcile_ops
from flashsale.ops import replay as replay_ops
from flashsale.ops.times import parse_time, to_ms

#: (field, heading) of the numbers shown per SKU (initial = Redis + sold); the rest is in --json.
_COLUMNS = (
    ("redis_stock", "Redis"),
    ("mysql_stock", "MySQL"),
    ("redis_deducted", "sold"),
    ("mysql_applied", "applied"),
    ("orders", "orders"),
    ("in_flight", "flight"),
)
#: Drifting SKUs whose problems are spelled out below the table; the others are counted.
PROBLEMS_SHOWN = 20


def print_reconcile(
    reports: list[reconcile_ops.SkuReport], console: Console | None = None, *, only_drift: bool = False
) -> None:
    """One row per SKU, a summary line, then what is wrong with each drifting SKU. Fits 80 columns."""
    console = console or Console(soft_wrap=False)
    drifting = [r for r in reports if not r.consistent]
    shown = drifting if only_drift else reports
    cells = [[f"{v:,}" if isinstance(v := getattr(r, key), int) else "-" for key, _ in _COLUMNS] for r in shown]
    widths = [max([len(heading), *(len(row[i]) for row in cells)]) for i, (_, heading) in enumerate(_COLUMNS)]
    # Numbers are never cut: the SKU column alone gives way when the terminal is narrow.
    room = console.width - sum(widths) - len("DRIFT") - 2 * (len(widths) + 1)
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1))
    table.add_column("SKU", overflow="ellipsis", no_wrap=True, max_width=max(8, room))
    for width, (_, heading) in zip(widths, _COLUMNS, strict=True):
        table.add_column(heading, justify="right", no_wrap=True, min_width=width)
    table.add_column("books", no_wrap=True, min_width=len("DRIFT"))
    for r, numbers in zip(shown, cells, strict=True):
        table.add_row(r.sku, *numbers, "[green]ok[/]" if r.consistent else "[red]DRIFT[/]")
    if shown:
        console.print(table)
    _print_orders(shown, console)
    sold = sum(r.redis_deducted for r in reports)
    in_flight = sum(r.in_flight for r in reports)
    console.print(
        f"{len(reports):,} SKU(s): {len(reports) - len(drifting):,} consistent, "
        + (f"[red]{len(drifting):,} with drift[/]" if drifting else "0 with drift")
        + f"; {sold:,} sold, {in_flight:,} in flight"
    )
    for r in drifting[:PROBLEMS_SHOWN]:
        for problem in r.problems:
            console.print(f"[red]{r.sku}[/]: {problem}")
        if r.missing_tokens:
            console.print(f"  missing in MySQL, e.g. {', '.join(r.missing_tokens[:5])}")
        if r.without_log_tokens:
            console.print(f"  without Redis log, e.g. {', '.join(r.without_log_tokens[:5])}")
        if r.order_drift_tokens:
            console.print(f"  orders otherwise in MySQL, e.g. {', '.join(r.order_drift_tokens[:5])}")
    if len(drifting) > PROBLEMS_SHOWN:
        console.print(f"... and {len(drifting) - PROBLEMS_SHOWN:,} more SKU(s) with drift: `--json` lists them all")


def _print_orders(reports: list[reconcile_ops.SkuReport], console: Console) -> None:
    """For SKUs sold with a payment deadline: their orders by state in MySQL, and the units given back."""
    for r in reports[:PROBLEMS_SHOWN]:
        states = {k: v for k, v in r.orders_by_state.items() if k != c.ORDER_FINAL}
        if states:
            counts = ", ".join(f"{n:,} {state.replace('_', ' ')}" for state, n in states.items())
            console.print(f"{r.sku}: orders {counts}; {r.mysql_returned_qty:,} unit(s) given back")


@click.command()
@click.argument("skus", nargs=-1, metavar="[SKU]...")
@json_output("the report")
@click.option("--repair", is_flag=True, help="Replay what MySQL lacks, write back what Redis lacks, add lost orders.")
@wait_seconds("After --repair, keep checking until the books balance (the consumer applies replays).")
@click.option("--only-drift", is_flag=True, help="List only the SKUs with drift (the summary counts all).")
@click.pass_obj
def reconcile(
    ctx: Context, skus: tuple[str, ...], as_json: bool, repair: bool, wait_s: float, only_drift: bool
) -> None:
    """Compare Redis and MySQL per SKU (every loaded SKU by default). Exit 0 when consistent, 1 on drift.

    Deductions younger than FLASHSALE_SETTLE_S count as in flight, not as drift.
    """
    if wait_s and not repair:
        raise InvalidInput("--wait only applies with --repair")
    reports, repairs = reconcile_ops.run(ctx.settings, list(skus), repair=repair, wait_s=wait_s)
    consistent = all(r.consistent for r in reports)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "consistent": consistent,
                    "skus": [r.to_json() for r in reports],
                    "repairs": [r.to_json() for r in repairs],
                },
                indent=2,
            )
        )
    else:
        for fix in repairs:
            click.echo(
                f"{fix.sku}: replayed {fix.replayed}, orders created {fix.orders_created}, log entries "
                f"written back {fix.adopted_entries}, deductions written back {fix.adopted_deductions}, "
                f"restocks replayed {fix.restocks_replayed}"
            )
            for note in fix.needs_operator:
                click.echo(f"{fix.sku}: needs an operator: {note}")
        if not reports:
            click.echo("no SKU is loaded")
        else:
            print_reconcile(reports, only_drift=only_drift)
    sys.exit(0 if consistent else 1)


@click.command()
@click.option("--token", "tokens", multiple=True, metavar="TOKEN", help="Replay this token (repeatable).")
@click.option(
    "--sku",
    default=None,
    help="With --since: the SKU to replay; with --token: where to look; with --dead-letters: only its letters.",
)
@click.option(
    "--since",
    default=None,
    metavar="TIME",
    help="Replay the SKU's deductions logged since TIME (ISO 8601, or 15m / 2h ago).",
)
@click.option("--dead-letters", is_flag=True, help="Replay dead-lettered deductions whose SKU MySQL now knows.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; publish nothing.")
@json_output("the counts")
@click.pass_obj
def replay(
    ctx: Context,
    tokens: tuple[str, ...],
    sku: str | None,
    since: str | None,
    dead_letters: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Re-publish deductions as ordinary messages; the consumer applies each token at most once.

    Exit 1 when some of what was asked for was not replayed (a token named with --token that Redis does
    not hold as deducted, a dead letter that cannot be replayed and stays open): a script must not take
    that for a repair. A dead letter whose tokens the log does not hold as deducted is settled (nothing
    was sold to apply): listed, and closed."""
    since_ms = _replay_since(tokens, sku, since, dead_letters)
    report = replay_ops.run(ctx.settings, tokens, sku=sku, since_ms=since_ms, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_replay(report, ctx.settings.replay_topic)
    sys.exit(1 if report.unreplayable or (tokens and report.not_deducted) else 0)


def _replay_since(tokens: tuple[str, ...], sku: str | None, since: str | None, dead_letters: bool) -> int | None:
    """Check that exactly one source was chosen; returns --since in ms (None without it)."""
    chosen = [
        name
        for name, on in (("--token", bool(tokens)), ("--since", since is not None), ("--dead-letters", dead_letters))
        if on
    ]
    if len(chosen) != 1:
        raise InvalidInput(
            "choose exactly one of --token, --sku with --since, --dead-letters",
            hint="e.g. `flashsale replay --sku SKU --since 15m --dry-run`",
        )
    if since is None:
        return None
    if not sku:
        raise InvalidInput("--since needs --sku")
    return to_ms(parse_time(since, what="--since"))


def _print_replay(report: replay_ops.ReplayReport, topic: str) -> None:
    verb = "would publish" if report.dry_run else "published"
    click.echo(
        f"{verb} {report.published} deduction(s) to {topic} "
        f"({report.already_applied} already applied in MySQL: their replay changes nothing)"
    )
    if report.restocks:
        click.echo(f"{verb} {report.restocks} restock(s) to {topic}")
    if report.not_deducted:
        click.echo(f"not deducted in Redis, not replayed: {', '.join(report.not_deducted[:20])}")
    for note in report.unreplayable[:20]:
        click.echo(f"cannot replay: {note}")
