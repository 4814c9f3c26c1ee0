"""`flashsale producer|consumer|checker run`: the three long-running processes."""

from __future__ import annotations

from dataclasses import replace

import click

from flashsale.bench.baseline import run_baseline
from flashsale.bench.mysql_baselines import BASELINES
from flashsale.cli.context import Context
from flashsale.config import ConsumerSettings, ProducerSettings, field_default, variable
from flashsale.service import processes

METRICS_PORT = click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve /metrics (Prometheus), /healthz (alive) and /readyz (its servers answer) on PORT.",
)


HTTP_PORT = click.option(
    "--port",
    type=click.IntRange(1, 65535),
    envvar=variable(ProducerSettings, "http_port"),
    show_envvar=True,
    default=field_default(ProducerSettings, "http_port"),
    show_default=True,
    help="Listen port.",
)


@click.group()
def producer() -> None:
    """The purchase ingress: HTTP API, half message, Redis pre-deduct, commit or roll back."""


@producer.command("run")
@click.option(
    "--host",
    envvar=variable(ProducerSettings, "http_host"),
    show_envvar=True,
    default=field_default(ProducerSettings, "http_host"),
    show_default=True,
    help="Listen address.",
)
@HTTP_PORT
@click.pass_obj
def producer_run(ctx: Context, host: str, port: int) -> None:
    """Serve POST /purchase, GET /stock/{sku}, /healthz, /readyz and /metrics until SIGTERM."""
    settings = ctx.settings
    chosen = replace(settings.producer, http_host=host, http_port=port)
    processes.run_producer(settings.with_overrides(producer=chosen))


@click.group()
def consumer() -> None:
    """Applies committed deductions to MySQL in batches and acks after the commit."""


@consumer.command("run")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10000),
    envvar=variable(ConsumerSettings, "batch_size"),
    show_envvar=True,
    default=field_default(ConsumerSettings, "batch_size"),
    show_default=True,
    help="Most deductions per database transaction.",
)
@METRICS_PORT
@click.pass_obj
def consumer_run(ctx: Context, batch_size: int, metrics_port: int | None) -> None:
    """Consume the deduction and replay topics until SIGTERM (the batch in hand is finished first)."""
    settings = ctx.settings
    settings = settings.with_overrides(consumer=replace(settings.consumer, batch_size=batch_size))
    processes.run_consumer(settings, metrics_port=metrics_port)


@click.group()
def checker() -> None:
    """Answers the broker's transaction checks from the Redis log."""


@checker.command("run")
@METRICS_PORT
@click.pass_obj
def checker_run(ctx: Context, metrics_port: int | None) -> None:
    """Answer transaction checks until SIGTERM."""
    processes.run_checker(ctx.settings, metrics_port=metrics_port)


@click.group()
def expirer() -> None:
    """Expires the orders still unpaid when their payment deadline fires."""


@expirer.command("run")
@METRICS_PORT
@click.pass_obj
def expirer_run(ctx: Context, metrics_port: int | None) -> None:
    """Fire payment deadlines until SIGTERM (the timer in hand is finished first)."""
    processes.run_expirer(ctx.settings, metrics_port=metrics_port)


@click.group()
def baseline() -> None:
    """A plain-MySQL purchase service, served like the producer: what `flashsale bench` compares against."""


@baseline.command("run")
@click.option(
    "--strategy",
    type=click.Choice(BASELINES),
    required=True,
    help="mysql-lock: SELECT ... FOR UPDATE; mysql-optimistic: a version check and retries.",
)
@HTTP_PORT
@click.option(
    "--workers", type=click.IntRange(1, 1000), default=64, show_default=True, help="Purchases run at once (threads)."
)
@click.pass_obj
def baseline_run(ctx: Context, strategy: str, port: int, workers: int) -> None:
    """Serve POST /purchase as one MySQL transaction per purchase, until SIGTERM."""
    settings = ctx.settings
    chosen = replace(settings.producer, http_port=port)
    run_baseline(settings.with_overrides(producer=chosen), strategy, workers=workers)
