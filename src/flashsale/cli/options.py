"""Options several commands share, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from flashsale import constants as c

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def json_output(what: str = "the result") -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def wait_seconds(meaning: str) -> Decorator:
    return click.option(
        "--wait", "wait_s", type=click.FloatRange(0), default=0, show_default=True, metavar="SECONDS", help=meaning
    )


def partitions_option(default: int, meaning: str) -> Decorator:
    return click.option(
        "--partitions",
        type=click.IntRange(1, c.MAX_PARTITIONS),
        default=default,
        show_default=True,
        metavar="P",
        help=meaning,
    )
