"""Named crash points for fault-injection tests.

A process started with FLASHSALE_FAILPOINTS=name1,name2 kills itself with SIGKILL the first time it
reaches one of those points: no clean-up, no flush, no ack, exactly like a machine losing power there.
Production runs leave the variable empty and every check is one set lookup.
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

KNOWN = frozenset({AFTER_HALF_MESSAGE, AFTER_PREDEDUCT, AFTER_DB_COMMIT})


def hit(active: frozenset[str], name: str) -> None:
    if name in active:
        logger.critical("failpoint %s reached: killing process %d with SIGKILL", name, os.getpid())
        for handler in logging.getLogger("flashsale").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
