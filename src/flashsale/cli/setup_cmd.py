"""`flashsale init` and `flashsale stock ...`: prepare a sale and look at it."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from flashsale import constants as c
from flashsale.cli.context import Context
from flashsale.cli.options import json_output, partitions_option, wait_seconds
from flashsale.ops import setup
from flashsale.ops.times import parse_duration_ms
from flashsale.service import order_ops


@click.command()
@json_output("what was done")
@wait_seconds("Keep asking servers that do not answer yet, for up to this long.")
@click.pass_obj
def init(ctx: Context, as_json: bool, wait_s: float) -> None:
    """Apply the SQL migrations and create the topics (deductions as TRANSACTION) and the consumer group."""
    report = setup.init(ctx.settings, wait_s=wait_s)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    s = ctx.settings
    click.echo(
        f"database {s.mysql_database}: schema version {report.schema_version}"
        + (f" (applied {', '.join(report.migrations_applied)})" if report.migrations_applied else "")
    )
    for topic, kind in report.topics.items():
        click.echo(f"topic {topic}: {kind}")
    click.echo(f"consumer group {report.consumer_group}")


@click.group()
def stock() -> None:
    """Load a SKU's stock before a sale and look at it during and after."""


_per_user_limit = click.option(
    "--per-user-limit",
    type=click.IntRange(0, c.MAX_PER_USER_LIMIT),
    default=0,
    show_default=True,
    metavar="N",
    help="Most units one user may buy (0 = no limit).",
)
_pay_within = click.option(
    "--pay-within",
    default=None,
    metavar="DURATION",
    help="Orders await payment this long (90s, 15m, 2h), then expire and their units sell again "
    "(`flashsale expirer run`); without it orders are final on acceptance.",
)


@stock.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("sku")
@click.argument("qty", type=click.IntRange(0, c.MAX_STOCK))
@_per_user_limit
@click.option(
    "--reset", is_flag=True, help="Discard the SKU's previous sale (Redis log, MySQL deductions, orders, conflicts)."
)
@click.option(
    "--force", is_flag=True, help="With --reset: go ahead even while deductions are still on their way to MySQL."
)
@_pay_within
@partitions_option(
    1,
    "Spread the stock over P partitions on different Redis masters, refilled from a pool "
    "(FLASHSALE_PARTITION_REFILL units at a time; 1 = one key, not partitioned).",
)
@click.pass_obj
def stock_set(ctx: Context, /, sku: str, qty: int, pay_within: str | None, **load: Any) -> None:
    """Load SKU with QTY units into MySQL and Redis, consistently."""
    pay_within_ms = parse_duration_ms(pay_within, what="--pay-within") if pay_within else 0
    setup.set_stock(ctx.settings, sku, qty, pay_within_ms=pay_within_ms, **load)
    click.echo(
        f"{sku}: {qty} units loaded"
        + (f" in {load['partitions']} partitions" if load["partitions"] > 1 else "")
        + (f", at most {load['per_user_limit']} per user" if load["per_user_limit"] else "")
        + (f", orders to be paid within {pay_within}" if pay_within else "")
    )


@stock.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("sku")
@click.argument("qty", type=click.IntRange(1, c.MAX_QTY))
@click.option(
    "--request-id",
    required=True,
    help="This restock's own id (make one up, and keep it): asked again with it, the units are added once.",
)
@click.pass_obj
def stock_add(ctx: Context, sku: str, qty: int, request_id: str) -> None:
    """Add QTY units to SKU while it is on sale (Redis and, through the consumer, MySQL), once per request id.

    Exit 0 when the units stand added (by this call or an earlier one with the same id), 1 when nothing was
    added and asking again with the same id may add them. Whatever the answer, or none, ask again with the
    same id: never with a new one until this one answered."""
    answer = order_ops.add_stock(ctx.settings, sku, qty, request_id=request_id)
    outcome = answer.outcome.name.lower()
    shown = {"outcome": outcome, "request_id": request_id, "qty": answer.qty, "stock": answer.stock}
    click.echo(json.dumps(shown | {"message_id": answer.message_id}))
    if outcome not in order_ops.ADDED:
        click.echo(f"nothing added ({outcome}): ask again with --request-id {request_id}", err=True)
        sys.exit(1)


def _partitions_table(sku: str, redis_side: dict[str, Any]) -> Table:
    table = Table(title=f"partitions of {sku}: pool {redis_side['pool']}, moving {redis_side['moving']}")
    for name in ("partition", "node", "active", "standby", "deducted", "refilled", "drained", "switches", "state"):
        table.add_column(name, justify="left" if name in ("partition", "node", "state") else "right")
    for p in redis_side["partitions"]:
        table.add_row(
            p["part"],
            p["node"] or "-",
            *(str(p[k]) for k in ("active", "standby", "deducted_qty", "refilled_qty", "drained_qty", "switches")),
            "closed" if p["closed"] else "open",
        )
    return table


@stock.command("show")
@click.argument("sku")
@json_output()
@click.pass_obj
def stock_show(ctx: Context, sku: str, as_json: bool) -> None:
    """Stock of SKU in Redis and MySQL, side by side."""
    report = setup.stock_report(ctx.settings, sku)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    r, m = report["redis"] or {}, report["mysql"] or {}
    table = Table(title=f"stock of {sku}")
    table.add_column("")
    table.add_column("Redis", justify="right")
    table.add_column("MySQL", justify="right")

    def cell(side: dict[str, Any], key: str) -> str:
        return "-" if not side or side.get(key) is None else str(side[key])

    table.add_row("initial", cell(r, "initial"), cell(m, "initial"))
    table.add_row("stock", cell(r, "stock"), cell(m, "stock"))
    table.add_row("deducted units", cell(r, "deducted_qty"), cell(m, "deducted_qty"))
    table.add_row("deductions", cell(r, "deducted_count"), cell(m, "deductions"))
    table.add_row("returned units", cell(r, "returned_qty"), "-")
    table.add_row("fenced tokens", cell(r, "fenced_count"), "-")
    table.add_row("orders", "-", cell(m, "orders"))
    table.add_row("per-user limit", cell(r, "per_user_limit"), cell(m, "per_user_limit"))
    table.add_row("sold out", cell(r, "sold_out"), "-")
    console = Console()
    console.print(table)
    if r.get("partitions"):
        console.print(_partitions_table(sku, r))
    if not r or not m:
        click.echo(f"warning: {sku} is loaded in {'MySQL' if m else 'Redis'} only", err=True)
