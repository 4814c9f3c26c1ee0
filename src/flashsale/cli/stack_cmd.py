"""`flashsale stack ...`: the local Redis + MariaDB + RocketMQ stack on 127.0.0.1."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from flashsale.cli.context import Context
from flashsale.cli.options import json_output
from flashsale.config import field_default, variable
from flashsale.stack.manager import ServiceState, Stack
from flashsale.stack.settings import StackSettings, StackTopology

SERVICES_ARG = click.argument("services", nargs=-1, metavar="[SERVICE]...")


def topology_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--redis-masters, --redis-replicas and --broker-groups, for every stack command (each must see the
    same topology)."""
    for name, meaning in (
        ("broker_groups", "RocketMQ broker groups: 1 is a broker with its own proxy, 2 or more share one proxy."),
        ("redis_replicas", "Replicas of each Redis Cluster master."),
        ("redis_masters", "Redis masters: 1 is a single node, 3 or more a Redis Cluster."),
    ):
        fn = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=click.IntRange(min=0 if name == "redis_replicas" else 1),
            envvar=variable(StackTopology, name),
            show_envvar=True,
            default=field_default(StackTopology, name),
            show_default=True,
            help=meaning,
        )(fn)
    return fn


def _settings(ctx: Context, topology: dict[str, int]) -> StackSettings:
    return ctx.stack_settings.with_overrides(topology=StackTopology(**topology))


def _print(states: list[ServiceState], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"services": [s.to_json() for s in states]}, indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("service", "address", "pid", "health", "listening", "note"):
        table.add_column(column)
    for s in states:
        health = "[green]healthy[/]" if s.healthy else ("[yellow]unhealthy[/]" if s.running else "[red]down[/]")
        table.add_row(s.name, s.address, str(s.pid or "-"), health, " ".join(s.listening) or "-", s.note)
    Console().print(table)


@click.group()
def stack() -> None:
    """Run Redis, MariaDB and RocketMQ natively on 127.0.0.1 (state in FLASHSALE_HOME).

    SERVICE is one of redis, mariadb, namesrv, broker; none means all. A Redis Cluster's nodes are
    redis-0, redis-1, ... on REDIS_PORT and up; `redis` names them all. Several broker groups are
    broker-a, broker-b, ... on BROKER_PORT, BROKER_PORT+10, ..., behind one gRPC proxy named proxy;
    `broker` names them all.
    """


@stack.command()
@SERVICES_ARG
@topology_options
@json_output("the status")
@click.pass_obj
def up(ctx: Context, /, services: tuple[str, ...], as_json: bool, **topology: int) -> None:
    """Install what is missing, start what is not running, wait until every service really serves."""
    stack_ = Stack(_settings(ctx, topology))
    states = stack_.up(services, progress=lambda line: click.echo(line, err=True))
    _print(states, as_json)


@stack.command()
@SERVICES_ARG
@topology_options
@json_output("the status")
@click.pass_obj
def down(ctx: Context, /, services: tuple[str, ...], as_json: bool, **topology: int) -> None:
    """Stop the services this stack started (by their recorded PIDs); data stays in FLASHSALE_HOME."""
    states = Stack(_settings(ctx, topology)).down(services, progress=lambda line: click.echo(line, err=True))
    _print(states, as_json)


@stack.command()
@SERVICES_ARG
@topology_options
@click.option("--probe", is_flag=True, help="Also send one message through the broker (status alone only reads).")
@json_output("the status")
@click.pass_obj
def status(ctx: Context, /, services: tuple[str, ...], probe: bool, as_json: bool, **topology: int) -> None:
    """Address, PID, health and listening sockets of each service. Exit 1 unless all are healthy."""
    states = Stack(_settings(ctx, topology)).status(services, probe=probe)
    _print(states, as_json)
    if not all(s.healthy for s in states):
        sys.exit(1)
