"""The root command: settings from FLASHSALE_* variables, one error policy, sub-commands registered."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from flashsale import __version__, logs
from flashsale.cli import context
from flashsale.config import Settings, variable, variables
from flashsale.errors import ConfigError, FlashSaleError, InvalidInput, ServiceUnavailable
from flashsale.stack.settings import StackSettings

#: Exit codes, documented in docs/operations.md.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # the command ran and found a problem (drift, an unhealthy service)
EXIT_BAD_INPUT = 2  # usage, arguments, configuration
EXIT_UNAVAILABLE = 3  # a server could not be reached
EXIT_FAILED = 4  # anything else that went wrong

#: Every FLASHSALE_* variable, the local stack's and the product's (what `--help` lists).
VARIABLES = variables(StackSettings, Settings)
#: Commands that run until SIGTERM; they log at INFO by default.
LONG_RUNNING = {"producer", "consumer", "checker", "expirer", "baseline"}


def exit_code(exc: FlashSaleError) -> int:
    if isinstance(exc, InvalidInput | ConfigError):
        return EXIT_BAD_INPUT
    if isinstance(exc, ServiceUnavailable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def _environment_help() -> str:
    width = max(len(v.env) for v in VARIABLES)
    lines = ["\b", "Environment (all optional):"]
    for var in VARIABLES:
        default = f" [default: {var.default}]" if var.default else ""
        lines.append(f"  {var.env:<{width}}  {var.meaning}{default}")
    return "\n".join(lines)


class FlashSaleGroup(click.Group):
    """Every failure becomes one `error:` line on stderr and a documented exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except FlashSaleError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exit_code(exc))
        except Exception as exc:
            logging.getLogger("flashsale").debug("unexpected failure", exc_info=True)
            click.echo(
                f"error: unexpected {type(exc).__name__}: {exc} (run with --log-level DEBUG for details)", err=True
            )
            sys.exit(EXIT_FAILED)


@click.group(cls=FlashSaleGroup, epilog=_environment_help(), context_settings={"max_content_width": 120})
@click.version_option(__version__, prog_name="flashsale")
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Verbosity of the log lines written to stderr [default: INFO for the processes that run until "
    "SIGTERM, WARNING for other commands].",
)
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """flashsale: sell a hot item's stock to a flood of buyers, never oversell, never lose a deduction."""
    command = ctx.invoked_subcommand or "flashsale"
    level = log_level or ("INFO" if command in LONG_RUNNING else "WARNING")
    # Read before the settings: a malformed setting must still be reported in the chosen format.
    fmt = os.environ.get(variable(Settings, "log_format"), "text").strip() or "text"
    logs.configure(level.upper(), process=command, fmt=fmt)
    ctx.obj = context.Context()


def _register() -> None:
    from flashsale.cli import ops_cmd, order_cmd, process_cmd, sale_cmd, setup_cmd, stack_cmd

    for command in (
        stack_cmd.stack,
        setup_cmd.init,
        setup_cmd.stock,
        process_cmd.producer,
        process_cmd.consumer,
        process_cmd.checker,
        process_cmd.expirer,
        process_cmd.baseline,
        order_cmd.order,
        ops_cmd.reconcile,
        ops_cmd.replay,
        sale_cmd.bench,
        sale_cmd.demo,
    ):
        main.add_command(command)


_register()
