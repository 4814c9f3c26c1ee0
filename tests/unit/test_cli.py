from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from flashsale.cli.main import EXIT_BAD_INPUT, VARIABLES, main

_LOGGERS = ("", "flashsale", "rocketmq-python-client", "aiohttp.access")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`flashsale` configures logging for the process; put back what pytest had."""
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger, _LOGGERS)]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def _invoke(tmp_path: Path, *args: str, **env: str) -> Result:
    """Run the CLI with no FLASHSALE_* variable of the developer's shell, plus `env`."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FLASHSALE_")}
    clean["FLASHSALE_HOME"] = str(tmp_path / "home")
    clean.update(env)
    return CliRunner().invoke(main, list(args), env=clean)


def _one_error_line(result: Result) -> str:
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_every_flashsale_variable(tmp_path: Path) -> None:
    result = _invoke(tmp_path, "--help")
    assert result.exit_code == 0
    missing = [v.env for v in VARIABLES if v.env not in result.output]
    assert missing == []
    listed = [line.split()[0] for line in result.output.splitlines() if line.strip().startswith("FLASHSALE_")]
    assert listed == [v.env for v in VARIABLES]  # each once, the stack's first


def test_stock_set_refuses_a_bad_sku_in_one_line_before_any_connection(tmp_path: Path) -> None:
    # Ports nothing listens on: were a connection tried, the exit code would be 3, not 2.
    result = _invoke(tmp_path, "stock", "set", "bad sku", "5", FLASHSALE_REDIS_PORT="1", FLASHSALE_MYSQL_PORT="1")
    assert "sku must be" in _one_error_line(result)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (("--pay-within", "5"), "'5' is not a duration"),
        (("--pay-within", "8d"), "payment deadline (ms) must be"),
    ],
)
def test_stock_set_refuses_a_payment_deadline_it_cannot_keep_before_any_connection(
    tmp_path: Path, options: tuple[str, ...], said: str
) -> None:
    ports = {"FLASHSALE_REDIS_PORT": "1", "FLASHSALE_MYSQL_PORT": "1"}
    result = _invoke(tmp_path, "stock", "set", "sku-1", "5", *options, **ports)
    assert said in _one_error_line(result) and result.exit_code == 2


def test_stack_up_of_an_unknown_service_names_it(tmp_path: Path) -> None:
    line = _one_error_line(_invoke(tmp_path, "stack", "up", "nosuch"))
    assert "unknown service nosuch" in line
    assert not (tmp_path / "home").exists()


def test_bad_port_variable_is_named_in_the_error(tmp_path: Path) -> None:
    line = _one_error_line(_invoke(tmp_path, "stack", "up", "nosuch", FLASHSALE_REDIS_PORT="abc"))
    assert "FLASHSALE_REDIS_PORT='abc' is not an integer" in line


@pytest.mark.parametrize(
    ("answers", "code"),
    [({"expired": 2, "already_paid": 1}, 0), ({"expired": 2, "frozen": 1}, 1), ({"fenced": 1}, 1), ({}, 0)],
)
def test_order_expire_due_exits_1_when_an_order_was_left_undecided(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: dict[str, int], code: int
) -> None:
    """`frozen` and `fenced` decided nothing: the operator must run it again (the sweep itself is
    test_order_repairs.py's, on the real stack)."""
    from flashsale.service import order_ops

    monkeypatch.setattr(order_ops, "expire_due", lambda settings, sku: answers)
    result = _invoke(tmp_path, "order", "expire-due", "sku-1")
    assert (result.exit_code, result.stdout.strip()) == (code, json.dumps(answers))
