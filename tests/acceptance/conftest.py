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
