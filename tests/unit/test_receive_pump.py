from __future__ import annotations

import queue
import threading
from typing import Any

from flashsale.adapters.rocketmq.consumer import LINGER_S, RECEIVE_MAX, _Pump, linger_s
from flashsale.adapters.rocketmq.recovery import StreamWatchdog


class Steps(threading.Event):
    """The pump's stop event, keeping the pump's calls and waits in the order they came."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[str, Any]] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.steps.append(("wait", timeout))
        return self.is_set()


class Pages:
    """A client whose receive calls bring the given pages, then stop the pump."""

    def __init__(self, sizes: list[int], steps: Steps) -> None:
        self._sizes = sizes
        self._steps = steps

    def receive(self, max_messages: int, invisible_s: int) -> list[object]:
        if not self._sizes:
            self._steps.set()
            return []
        size = self._sizes.pop(0)
        self._steps.steps.append(("receive", size))
        return [object()] * size


def _run_pump(sizes: list[int], linger: float) -> list[tuple[str, Any]]:
    steps, running = Steps(), threading.Event()
    running.set()
    inbox: queue.Queue[list[Any]] = queue.Queue()
    pump = _Pump(Pages(sizes, steps), "t", inbox, steps, running, 30, StreamWatchdog(), lambda messages: None, linger)
    pump._run()
    return steps.steps


def test_a_receiver_waits_after_a_page_that_was_not_full_and_asks_again_at_once_after_a_full_or_empty_one() -> None:
    steps = _run_pump([1, RECEIVE_MAX, 0, RECEIVE_MAX - 1, 0], linger_s(4))
    assert steps == [
        ("receive", 1),
        ("wait", LINGER_S),  # a call brought one message: the next would bring about as few
        ("receive", RECEIVE_MAX),  # a backlog: no wait
        ("receive", 0),  # a long poll that ended empty: the next one starts at once
        ("receive", RECEIVE_MAX - 1),
        ("wait", LINGER_S),
        ("receive", 0),
    ]


def test_a_topics_only_receiver_never_waits_for_nothing_would_be_polling_meanwhile() -> None:
    assert linger_s(1) == 0.0
    assert _run_pump([1, 1, RECEIVE_MAX - 1, 0], linger_s(1)) == [
        ("receive", 1),
        ("receive", 1),
        ("receive", RECEIVE_MAX - 1),
        ("receive", 0),
    ]
