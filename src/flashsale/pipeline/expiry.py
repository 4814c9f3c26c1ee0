"""Expire the orders still unpaid when their deadline fires (a timer message on the deadline topic).

Each timer names the orders of one SKU due at one moment. Each order is expired through the same
decision as a cancel (pipeline/orders.py): an order paid or cancelled meanwhile hears `already_paid` or
`already_cancelled` and nothing changes; one expired already (a timer delivered twice, or a payment that
came late) hears `already_expired`. A timer is acked once every order it names is decided; a timer that
fires before its deadline on Redis's clock (the broker's timer ticks by the second, on its own clock)
comes back when the deadline is due, and one that could not be decided (Redis or the broker down)
comes back a second later: the first order that meets the outage stops the timer, so that its other
orders do not each wait out a timeout against a server that is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from flashsale.errors import BusError, FlashSaleError, MalformedMessage
from flashsale.logs import ids
from flashsale.models import Deadline, Delivery
from flashsale.pipeline.orders import OrderAnswer
from flashsale.ports import ReceiverPort
from flashsale.records import Decision

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Runs a coroutine on the engine's loop and waits for its result.
Runner = Callable[[Coroutine[Any, Any, T]], T]
Decide = Callable[[str, str], Coroutine[Any, Any, OrderAnswer]]
#: Timers received per call.
BATCH = 32


class Expirer:
    def __init__(
        self,
        receiver: ReceiverPort,
        expire: Decide,
        run: Runner[OrderAnswer],
        *,
        observe_lateness: Callable[[float], None] | None = None,
    ) -> None:
        self._receiver = receiver
        self._expire = expire
        self._run = run
        self._observe = observe_lateness
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._receiver.receive(BATCH)
            except BusError as exc:
                logger.warning("receive failed: %s", exc)
                self._stop.wait(1.0)
                continue
            for delivery in batch:
                later_s = self.fire(delivery)
                try:
                    if later_s is None:
                        self._receiver.ack([delivery])
                    else:
                        self._receiver.nack([delivery], later_s)
                except BusError as exc:  # the timer comes back when its invisible time ends: no harm
                    logger.warning("timer %s not acked: %s", delivery.message_id, exc)

    def fire(self, delivery: Delivery) -> int | None:
        """Expire the orders a timer names; None when every one is decided, else the seconds until it
        should come back."""
        try:
            deadline = Deadline.decode(delivery.body)
        except MalformedMessage as exc:
            logger.error("timer %s is malformed (%s); dropped", delivery.message_id, exc)
            return None
        later_s: int | None = None
        for token in deadline.tokens:
            try:
                wait_s = self._expire_one(deadline, token)
            except FlashSaleError as exc:
                logger.warning("cannot expire %s of %s yet: %s", token, deadline.sku, exc, extra=ids(token=token))
                if exc.retriable:
                    # Redis or the broker is out: every other order of the timer would meet the same outage,
                    # each after its own timeout. The whole timer comes back instead.
                    return 1
                wait_s = 1
            if wait_s is not None:
                later_s = max(later_s or 0, wait_s)
        return later_s

    def _expire_one(self, deadline: Deadline, token: str) -> int | None:
        answer = self._run(self._expire(deadline.sku, token))
        if answer.decision is Decision.NOT_DUE:
            return max(1, -(-(deadline.due_ms - int(time.time() * 1000)) // 1000))
        if answer.decision in (Decision.FROZEN, Decision.FENCED):
            return 1  # nothing was decided: ask again
        # Once per order: a timer delivered again hears `expired` again (the same decision id), with no
        # message of its own. Late from the order's own deadline: the timer's is its group's latest.
        entry = answer.entry
        if answer.decision is Decision.EXPIRED and answer.message_id and entry is not None and entry.decided_ms:
            late_ms = entry.decided_ms - (entry.due_ms or deadline.due_ms)
            logger.info(
                "expired %s of %s, %d ms after its deadline",
                token,
                deadline.sku,
                late_ms,
                extra=ids(token=token, sku=deadline.sku, message_id=answer.message_id),
            )
            if self._observe:
                self._observe(late_ms / 1000)
        return None
