"""Fixtures of the acceptance tests: the real processes of one test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flashsale.config import Settings
from tests.acceptance.harness import Pipeline


@pytest.fixture
def pipeline(settings: Settings, tmp_path: Path) -> Iterator[Pipeline]:
    """Producer, consumer and checker processes in the session's namespace, stopped after the test."""
    p = Pipeline(settings, tmp_path)
    yield p
    p.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's table (victim, accepted, lost, oversold, seconds to converge), as in docs/operations.md."""
    from tests.acceptance.test_faults import RESULTS

    if RESULTS:
        terminalreporter.section("faults")
        terminalreporter.write_line("| victim | accepted | lost | oversold | seconds to converge |")
        terminalreporter.write_line("|---|---|---|---|---|")
        for o in RESULTS:
            terminalreporter.write_line(f"| {o.victim} | {o.accepted} | {o.lost} | {o.oversold} | {o.converge_s} |")
