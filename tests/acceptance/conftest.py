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
    _lifecycle_faults_summary(terminalreporter)


def _lifecycle_faults_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The lifecycle fault suite's table: seconds to converge and expiry lateness per victim."""
    from tests.acceptance.test_lifecycle_faults import RESULTS

    if RESULTS:
        terminalreporter.section("lifecycle faults")
        terminalreporter.write_line(
            "| victim | s down | s to receive again | orders | expired | s from back to sold out for good "
            "| s MySQL then took | expiry lateness p50 / p99 / max ms | decisions the checker committed |"
        )
        terminalreporter.write_line("|---|---|---|---|---|---|---|---|---|")
        for o in RESULTS:
            terminalreporter.write_line(
                f"| {o.victim} | {o.down_s} | {o.reconnect_s} | {o.orders} | {o.expired} | {o.final_s} | {o.settle_s} "
                f"| {o.late_p50_ms} / {o.late_p99_ms} / {o.late_max_ms} | {o.checked_decisions} |"
            )
