"""Named crash points for fault-injection tests.

A process started with FLASHSALE_FAILPOINTS=name1,name2 kills itself with SIGKILL the first time it
reaches one of those points: no clean-up, no flush, no ack, exactly like a machine losing power there.
`name@N` kills it the N-th time instead, so that a crash lands mid-sale, at that exact step. Production
runs leave the variable empty and every check is one test of an empty set.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

#: Producer: the half message is on the broker, the Redis pre-deduct has not run.
AFTER_HALF_MESSAGE = "producer-after-half-message"
#: Producer: the Redis pre-deduct ran, commit/rollback was not sent.
AFTER_PREDEDUCT = "producer-after-prededuct"
#: Consumer: the database transaction committed, the messages were not acked.
AFTER_DB_COMMIT = "consumer-after-db-commit"
#: A restock: Redis added the units, the commit was not sent.
AFTER_RESTOCK = "restock-after-add"

KNOWN = frozenset({AFTER_HALF_MESSAGE, AFTER_PREDEDUCT, AFTER_DB_COMMIT, AFTER_RESTOCK})


#: Times each point was reached in this process (counted only where a `name@N` asks for it).
_reached: dict[str, int] = {}


def parse(entry: str) -> tuple[str, int]:
    """A FAILPOINTS entry: the point's name, and the time it kills (1: the first). ValueError if malformed."""
    name, _, nth = entry.partition("@")
    if name not in KNOWN or (nth and (not nth.isdigit() or int(nth) < 1)):
        raise ValueError(entry)
    return name, int(nth or 1)


def hit(active: frozenset[str], name: str) -> None:
    if not active:
        return
    due = name in active
    if not due and any(entry.startswith(name + "@") for entry in active):
        _reached[name] = _reached.get(name, 0) + 1
        due = any(parse(entry) == (name, _reached[name]) for entry in active)
    if due:
        logger.critical("failpoint %s reached: killing process %d with SIGKILL", name, os.getpid())
        for handler in logging.getLogger("flashsale").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
