"""Expire the orders still unpaid when their deadline fires (a timer message on the deadline topic).

Each timer names the orders of one SKU due at one moment. Each order is expired through the same
decision as a cancel (pipeline/orders.py): an order paid or cancelled meanwhile hears `already_paid` or
`already_cancelled` and nothing changes; one expired already (a timer delivered twice, or a payment that
came late) hears `already_expired`. A timer is acked once every order it names is decided; a timer that
fires before its deadline on Redis's clock (the broker's timer ticks by the second, on its own clock)
comes back when the deadline is due, and one that could not be decided (Redis or the broker down)
comes back a second later.

A timer's orders are expired concurrently, up to CONCURRENCY at a time: each decision waits on a round trip
to the broker and one to Redis, so one at a time a single expirer expired only 20-40 orders a second
under load, and units came back on sale seconds late. The first order that meets an outage stops the
timer's orders not started yet, so that they do not each wait out a timeout against a server that is down.
"""

from __future__ import annotations

import asyncio
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
#: Orders of one timer decided at once.
CONCURRENCY = 64
#: What deciding one order gave: its answer, or why it could not be decided.
Outcome = OrderAnswer | BaseException


class _NotStarted(Exception):
    """An order left undecided because another of its timer met an outage first."""


class Expirer:
    def __init__(
        self,
        receiver: ReceiverPort,
        expire: Decide,
        run: Runner[list[Outcome]],
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
        self._receiver.wake()

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
        outage: BaseException | None = None
        for token, outcome in zip(deadline.tokens, self._run(self._expire_all(deadline)), strict=True):
            if isinstance(outcome, OrderAnswer):
                wait_s = self._settled(deadline, token, outcome)
            elif isinstance(outcome, _NotStarted) or (isinstance(outcome, FlashSaleError) and outcome.retriable):
                outage = outage or outcome
                wait_s = 1
            elif isinstance(outcome, FlashSaleError):
                logger.warning("cannot expire %s of %s: %s", token, deadline.sku, outcome, extra=ids(token=token))
                wait_s = 1
            else:
                raise outcome
            if wait_s is not None:
                later_s = max(later_s or 0, wait_s)
        if outage is not None:
            # Redis or the broker is out: the timer comes back for the orders it could not decide.
            logger.warning("cannot expire every order of %s's timer yet: %s", deadline.sku, outage)
        return later_s

    async def _expire_all(self, deadline: Deadline) -> list[Outcome]:
        """Every order of the timer decided, CONCURRENCY at a time; once one meets an outage, those not
        started yet are left undecided (_NotStarted)."""
        window = asyncio.Semaphore(CONCURRENCY)
        outage = asyncio.Event()

        async def expire(token: str) -> OrderAnswer:
            async with window:
                if outage.is_set():
                    raise _NotStarted
                try:
                    return await self._expire(deadline.sku, token)
                except FlashSaleError as exc:
                    if exc.retriable:
                        outage.set()
                    raise

        return await asyncio.gather(*(expire(token) for token in deadline.tokens), return_exceptions=True)

    def _settled(self, deadline: Deadline, token: str, answer: OrderAnswer) -> int | None:
        """None when the order is decided for good, else the seconds until its timer should come back."""
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
