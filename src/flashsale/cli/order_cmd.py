"""`flashsale order show|pay|cancel|expire-due`: one order looked at or decided, or lost timers made good."""

from __future__ import annotations

import json
import sys

import click

from flashsale.cli.context import Context
from flashsale.records import Decision
from flashsale.service import order_ops as orders


@click.group()
def order() -> None:
    """Look at an order, pay or cancel it (as the payment service or its buyer would), or expire the
    orders whose timer was lost."""


@order.command("show")
@click.argument("sku")
@click.argument("token")
@click.pass_obj
def order_show(ctx: Context, sku: str, token: str) -> None:
    """Where the order of TOKEN stands: awaiting (with its deadline), paid, cancelled, expired or final."""
    click.echo(json.dumps(orders.show(ctx.settings, sku, token)))


@order.command("pay")
@click.argument("sku")
@click.argument("token")
@click.option(
    "--payment-id", required=True, help="The payment's own id: the same id asked again hears the first answer."
)
@click.pass_obj
def order_pay(ctx: Context, sku: str, token: str, payment_id: str) -> None:
    """Record the payment of an order awaiting payment (refused once its deadline has passed)."""
    _decide(ctx, sku, token, "pay", payment_id, "")


@order.command("cancel")
@click.argument("sku")
@click.argument("token")
@click.option("--user", "user_id", required=True, help="The buyer: only they may cancel their order.")
@click.option("--request-id", required=True, help="This cancel's own id: asked again, it hears the first answer.")
@click.pass_obj
def order_cancel(ctx: Context, sku: str, token: str, user_id: str, request_id: str) -> None:
    """Cancel an order awaiting payment: its units go back on sale."""
    _decide(ctx, sku, token, "cancel", request_id, user_id)


@order.command("expire-due")
@click.argument("sku")
@click.pass_obj
def order_expire_due(ctx: Context, sku: str) -> None:
    """Expire every order of SKU still awaiting payment past its deadline, as its timer would have (for a
    timer that was lost: `reconcile` lists such orders). Prints the count of each answer; exits 1 when some
    were answered `frozen` or `fenced` (nothing decided: run it again)."""
    answers = orders.expire_due(ctx.settings, sku)
    click.echo(json.dumps(answers))
    sys.exit(1 if any(answers.get(a) for a in orders.ASK_AGAIN) else 0)


def _decide(ctx: Context, sku: str, token: str, action: str, decision_id: str, user: str) -> None:
    """Print the answer; exit 0 when the order now stands as asked, 1 when it stands otherwise, 2 when no
    purchase of that token stands (as for an unknown SKU)."""
    answer = orders.decide(ctx.settings, sku, token, action, decision_id=decision_id, user=user)
    decision = answer.decision.name.lower()
    click.echo(json.dumps({"decision": decision, "token": token, "message_id": answer.message_id}))
    sys.exit(0 if decision in orders.DONE else 2 if answer.decision is Decision.NO_ORDER else 1)
