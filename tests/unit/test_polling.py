from __future__ import annotations

import time

import pytest

from flashsale.polling import poll_until


def test_poll_until_returns_the_first_truthy_answer() -> None:
    answers = iter([0, "", None, "ready", "later"])
    assert poll_until(lambda: next(answers), 5, interval_s=0) == "ready"


def test_poll_until_gives_the_last_answer_once_the_time_is_up() -> None:
    calls: list[float] = []

    def never() -> bool:
        calls.append(time.monotonic())
        return False

    assert poll_until(never, 0.05, interval_s=0.01) is False
    assert len(calls) >= 2 and calls[-1] - calls[0] >= 0.05


def test_poll_until_lets_an_exception_of_the_check_end_the_wait() -> None:
    def dead() -> bool:
        raise ChildProcessError("it exited")

    with pytest.raises(ChildProcessError):
        poll_until(dead, 5)
