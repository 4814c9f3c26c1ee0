"""`flashsale producer|consumer|checker run`: the three long-running processes."""

from __future__ import annotations

from dataclasses import replace

import click

from flashsale.cli.context import Context
from flashsale.service import processes

METRICS_PORT = click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve /metrics (Prometheus), /healthz (alive) and /readyz (its servers answer) on PORT.",
)


@click.group()
def producer() -> None:
    """The purchase ingress: HTTP API, half message, Redis pre-deduct, commit or roll back."""


@producer.command("run")
@click.option("--host", default=None, help="Listen address [env FLASHSALE_HTTP_HOST].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Listen port [env FLASHSALE_HTTP_PORT].")
@click.pass_obj
def producer_run(ctx: Context, host: str | None, port: int | None) -> None:
    """Serve POST /purchase, GET /stock/{sku}, GET /healthz and GET /metrics until SIGTERM."""
    settings = ctx.settings
    cfg = settings.producer
    chosen = replace(cfg, http_host=host or cfg.http_host, http_port=port or cfg.http_port)
    processes.run_producer(settings.with_overrides(producer=chosen))


@click.group()
def consumer() -> None:
    """Applies committed deductions to MySQL in batches and acks after the commit."""


@consumer.command("run")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10000),
    default=None,
    help="Most deductions per database transaction [env FLASHSALE_BATCH_SIZE].",
)
@METRICS_PORT
@click.pass_obj
def consumer_run(ctx: Context, batch_size: int | None, metrics_port: int | None) -> None:
    """Consume the deduction and replay topics until SIGTERM (the batch in hand is finished first)."""
    settings = ctx.settings
    if batch_size is not None:
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
