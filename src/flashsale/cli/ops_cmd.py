"""`flashsale reconcile` and `flashsale replay`: after (or during) a sale."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.cli.context import Context
from flashsale.cli.options import json_output, wait_seconds
from flashsale.errors import InvalidInput
from flashsale.ops import reconcile as reconcile_ops
from flashsale.ops.replay import Replayer
from flashsale.ops.times import parse_time, to_ms

_COLUMNS = (
    ("initial", "initial"),
    ("redis_stock", "Redis stock"),
    ("mysql_stock", "MySQL stock"),
    ("redis_deducted", "Redis deducted"),
    ("mysql_applied", "MySQL applied"),
    ("orders", "orders"),
    ("in_flight", "in flight"),
    ("missing_in_mysql", "missing in MySQL"),
    ("mysql_without_log", "MySQL w/o log"),
    ("dead_letters", "dead letters"),
    ("conflicts", "conflicts"),
)


def print_reconcile(reports: list[reconcile_ops.SkuReport], console: Console | None = None) -> None:
    console = console or Console(soft_wrap=True)
    table = Table(title="reconcile")
    table.add_column("")
    for r in reports:
        table.add_column(r.sku, justify="right")
    for key, title in _COLUMNS:
        table.add_row(title, *(str(getattr(r, key)) if getattr(r, key) is not None else "-" for r in reports))
    table.add_row("consistent", *("[green]yes[/]" if r.consistent else "[red]NO[/]" for r in reports))
    console.print(table)
    for r in reports:
        for problem in r.problems:
            console.print(f"[red]{r.sku}[/]: {problem}")
        if r.missing_tokens:
            console.print(f"  missing in MySQL, e.g. {', '.join(r.missing_tokens[:5])}")
        if r.without_log_tokens:
            console.print(f"  without Redis log, e.g. {', '.join(r.without_log_tokens[:5])}")


@click.command()
@click.argument("skus", nargs=-1, metavar="[SKU]...")
@json_output("the report")
@click.option("--repair", is_flag=True, help="Replay what MySQL lacks, write back what Redis lacks, add lost orders.")
@wait_seconds("After --repair, keep checking until the books balance (the consumer applies replays).")
@click.pass_obj
def reconcile(ctx: Context, skus: tuple[str, ...], as_json: bool, repair: bool, wait_s: float) -> None:
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
                f"written back {fix.adopted_entries}, deductions written back {fix.adopted_deductions}"
            )
            for note in fix.needs_operator:
                click.echo(f"{fix.sku}: needs an operator: {note}")
        if not reports:
            click.echo("no SKU is loaded")
        else:
            print_reconcile(reports)
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
    """Re-publish deductions as ordinary messages; the consumer applies each token at most once."""
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
    if since is not None and not sku:
        raise InvalidInput("--since needs --sku")
    since_ms = to_ms(parse_time(since, what="--since")) if since is not None else 0
    settings = ctx.settings
    stock, store = RedisStock(settings.redis_url), MySQLStore(settings.mysql_url)
    try:
        with Replayer(settings, stock, store, dry_run=dry_run) as replayer:
            if tokens:
                replayer.tokens(tokens, sku)
            elif since is not None and sku:
                replayer.since(sku, since_ms)
            else:
                replayer.dead_letters(sku)
        report = replayer.report
    finally:
        stock.close()
        store.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    verb = "would publish" if dry_run else "published"
    click.echo(
        f"{verb} {report.published} deduction(s) to {settings.replay_topic} "
        f"({report.already_applied} already applied in MySQL: their replay changes nothing)"
    )
    if report.not_deducted:
        click.echo(f"not deducted in Redis, not replayed: {', '.join(report.not_deducted[:20])}")
    for note in report.unreplayable[:20]:
        click.echo(f"cannot replay: {note}")
