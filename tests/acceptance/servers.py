"""What a test does to a server of the stack behind the product's back: crash it, or freeze it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from flashsale.polling import poll_until
from flashsale.stack import procs
from flashsale.stack.manager import Stack


def _running(stack: Stack, service: str) -> procs.PidRecord:
    record = procs.PidRecord.load(stack.layout.pid_file(service))
    assert record is not None and procs.is_alive(record), f"{service} is not running"
    return record


def kill(stack: Stack, service: str) -> None:
    """SIGKILL a server, as a crash would."""
    record = _running(stack, service)
    os.kill(record.pid, signal.SIGKILL)
    assert poll_until(lambda: not procs.is_alive(record), 10), f"{service} survived SIGKILL"


@contextmanager
def frozen(stack: Stack, service: str) -> Iterator[None]:
    """The server stops answering (SIGSTOP) for the block, its connections open, and goes on afterwards."""
    record = _running(stack, service)
    os.kill(record.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(record.pid, signal.SIGCONT)
