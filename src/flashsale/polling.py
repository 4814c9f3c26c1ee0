"""Waiting for a condition with a deadline: the one loop every "until it answers or time is up" uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(check: Callable[[], T], timeout_s: float, *, interval_s: float = 0.25) -> T:
    """Call `check` until it returns something truthy, or `timeout_s` has passed; returns its last answer.

    `check` is always called at least once, and once more at the deadline; an exception it raises ends
    the wait (a dead process, say), so a check decides which failures are worth waiting through.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if answer or time.monotonic() >= deadline:
            return answer
        time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
