"""Apply committed deductions to MySQL: batch, learn from Redis what was accepted, one transaction, commit, ack.

- What is applied comes from the Redis log, never from a message body (see accepted.py).
- A message is acked only after the transaction that applied it committed. A crash in between means
  redelivery, and the (sku, token) key makes the second apply a no-op.
- A malformed message goes to dead_letters (in the same transaction) and is acked. Nothing a body
  holds can stop the consumer: any failure while decoding or applying one message dead-letters it.
- MySQL or Redis unavailable, or MySQL refusing writes (read-only): nothing is acked, receiving is
  paused and what was received is handed back, so an outage costs each message one delivery attempt;
  receiving resumes once both answer and MySQL takes a write again.
- A statement the database rejects for good (not an outage): the batch is applied one message at a time,
  and the message that still fails alone is dead-lettered instead of blocking everything behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from flashsale import constants as c
from flashsale import failpoints
from flashsale.errors import BusError, FlashSaleError, LoadUnderWay, MalformedMessage, StockShort
from flashsale.logs import ids
from flashsale.models import Deadline, DeductionMessage, Delivery
from flashsale.pipeline import accepted
from flashsale.pipeline.accepted import Decoded
from flashsale.ports import DeadlinePort, LogPort, ReceiverPort, StorePort
from flashsale.records import ApplyReport, DeadLetter, Incoming

logger = logging.getLogger(__name__)

Observer = Callable[[ApplyReport, int, float], None]
#: Longest reason kept with a dead letter.
REASON_MAX = 512
#: Seconds the messages of a SKU being loaded wait before they come again: each return counts against the
#: broker's delivery attempts, and a load takes seconds (one that stopped midway, until it is run again).
LOAD_WAIT_S = 5
#: Seconds the messages of a SKU MySQL is short of wait for the units on their way (given back, restocked),
#: at their first two deliveries; the wait doubles at each delivery after, up to SHORT_WAIT_MAX_S (short_wait_s).
SHORT_WAIT_S = 1
SHORT_WAIT_MAX_S = 30


def short_wait_s(attempt: int) -> int:
    """The wait of a message MySQL is short of, by its delivery. The store turns a shortfall into a conflict at
    the message's SHORTFALL_ATTEMPTS-th delivery: waits of 1, 1, 2, 4 ... 30 s make its 10 deliveries span
    about 2 minutes, longer than the slowest path of the units on their way (a return whose producer died is
    committed by the checker after ~10 s; one on a broker group that restarts, a minute later), where 10
    deliveries 1 s apart recorded a conflict while the return was still coming. The first two stay 1 s: a
    return that travels as it should is applied within them, and the order it resold is not held later."""
    return min(SHORT_WAIT_S << min(max(attempt - 2, 0), 8), SHORT_WAIT_MAX_S)


def decode(batch: Sequence[Delivery]) -> tuple[list[Decoded], list[DeadLetter]]:
    decoded, dead = [], []
    for delivery in batch:
        try:
            message = DeductionMessage.decode(delivery.body, delivery.message_id)
        except MalformedMessage as exc:
            logger.error(
                "message %s on %s is malformed: %s",
                delivery.message_id,
                delivery.topic,
                exc,
                extra=ids(message_id=delivery.message_id),
            )
            dead.append(_dead(delivery, str(exc)))
            continue
        decoded.append(Decoded(delivery, message))
    return decoded, dead


def _dead(delivery: Delivery, reason: str, sku: str | None = None) -> DeadLetter:
    return DeadLetter(delivery.message_id, delivery.topic, delivery.key, reason[:REASON_MAX], delivery.body, sku)


class DeductionConsumer:
    def __init__(
        self,
        receiver: ReceiverPort,
        store: StorePort,
        log: LogPort,
        *,
        batch_size: int,
        max_backoff_s: float,
        failpoint_names: frozenset[str] = frozenset(),
        observe: Observer | None = None,
        deadlines: DeadlinePort | None = None,
    ) -> None:
        self._receiver = receiver
        self._deadlines = deadlines
        self._store = store
        self._log = log
        self._batch_size = batch_size
        self._max_backoff_s = max_backoff_s
        self._failpoints = failpoint_names
        self._observe = observe
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stop.set()
        self._receiver.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._receiver.receive(self._batch_size)
            except BusError as exc:
                logger.warning("receive failed: %s", exc)
                self._stop.wait(1.0)
                continue
            if not batch:
                continue
            try:
                self.process(batch)
            except FlashSaleError as exc:
                logger.warning(
                    "batch of %d not applied (%s); handing it back and pausing receipt until the stores answer",
                    len(batch),
                    exc,
                )
                self._receiver.nack(batch, 1)
                self._receiver.pause()
                self._wait_for_stores()
                self._receiver.resume()

    def process(self, batch: Sequence[Delivery]) -> ApplyReport:
        started = time.perf_counter()
        decoded, dead = decode(batch)
        report, waiting = self._apply_or_wait(decoded, dead)
        failpoints.hit(self._failpoints, failpoints.AFTER_DB_COMMIT)
        for wait_s in sorted({s for _, s in waiting}):
            self._receiver.nack([d for d, s in waiting if s == wait_s], wait_s)
        handed_back = {d.message_id for d, _ in waiting}
        batch = [d for d in batch if d.message_id not in handed_back]
        try:
            acked = self._receiver.ack(batch) if batch else 0
        except BusError as exc:
            acked = 0
            logger.warning(
                "ack of %d committed messages failed (%s); their redelivery will be a no-op", len(batch), exc
            )
        logger.info(
            "batch: %d applied, %d duplicate, %d skipped, %d conflict, %d dead-lettered, %d/%d acked",
            len(report.applied),
            report.duplicates,
            report.skipped,
            len(report.conflicts),
            len(report.dead_letters),
            acked,
            len(batch),
        )
        if self._observe:
            self._observe(report, len(batch), time.perf_counter() - started)
        return report

    def _apply_or_wait(
        self, decoded: Sequence[Decoded], dead: Sequence[DeadLetter]
    ) -> tuple[ApplyReport, list[tuple[Delivery, int]]]:
        """Apply the batch, but for the messages of SKUs that must wait: those a `stock set` is loading
        (LoadUnderWay), to come again once the load is done, and those MySQL is short of while units are on
        their way (StockShort). Those are returned with their wait, to be handed back. The others go on: a
        message handed back with a batch counts a delivery more, and the wait for units on their way is
        counted in a message's own deliveries (SHORTFALL_ATTEMPTS), which must not run out riding along."""
        try:
            return self._apply_or_split(decoded, dead), []
        except (LoadUnderWay, StockShort) as exc:
            logger.warning("%s: their messages wait, the others are applied", exc)
            rest = [d for d in decoded if d.message.sku not in exc.skus]
            report, waiting = self._apply_or_wait(rest, dead) if rest or dead else (ApplyReport(), [])
            loading = isinstance(exc, LoadUnderWay)
            return report, [
                (d.delivery, LOAD_WAIT_S if loading else short_wait_s(d.delivery.attempt))
                for d in decoded
                if d.message.sku in exc.skus
            ] + waiting

    def _apply_or_split(self, decoded: Sequence[Decoded], dead: Sequence[DeadLetter]) -> ApplyReport:
        """Apply the batch; one a message of which the database rejects, or that fails, one by one."""
        try:
            return self._apply(decoded, dead)
        except FlashSaleError as exc:
            if exc.retriable:
                raise
            logger.warning("batch of %d rejected (%s); applying its messages one by one", len(decoded), exc)
        except Exception:  # a message nobody foresaw: find it by applying the batch one message at a time
            logger.exception("batch of %d failed; applying its messages one by one", len(decoded))
        return self._apply_one_by_one([d.delivery for d in decoded], dead)

    def _schedule(self, awaiting: Sequence[Incoming]) -> None:
        """A timer message per SKU and deadline for the orders awaiting payment, before the batch is applied:
        a batch MySQL holds back (a short stock, an outage) does not hold its deadlines back with it, and a
        consumer that dies before its ack gets the batch again and schedules them again (an expiry is
        idempotent, and one that finds the order before MySQL does is carried there like any decision)."""
        if not awaiting or self._deadlines is None:
            return
        # One timer per SKU and second (the broker's timer ticks by the second), at most MAX_GROUP orders each.
        by_due: dict[tuple[str, int], list[tuple[str, int]]] = {}
        for item in awaiting:
            if item.order is not None:
                key = (item.deduction.sku, -(-item.order.due_ms // 1000))
                by_due.setdefault(key, []).append((item.deduction.token, item.order.due_ms))
        deadlines = [
            Deadline(sku, tuple(t for t, _ in chunk), max(due for _, due in chunk))
            for (sku, _), orders in sorted(by_due.items())
            for chunk in (orders[i : i + c.MAX_GROUP] for i in range(0, len(orders), c.MAX_GROUP))
        ]
        self._deadlines.schedule(deadlines)

    def _apply(self, decoded: Sequence[Decoded], dead: Sequence[DeadLetter]) -> ApplyReport:
        """One Redis look-up for the batch, then one transaction per `batch_size` deductions.

        A message may carry hundreds of purchases: a transaction is bounded by deductions, not messages.
        Units coming back (orders cancelled or expired, restocks) are committed first, on their own: they
        always fit, and a batch that MySQL finds short (a resale whose return travels in another batch)
        must not take them back with it, or two such batches would each hold what the other needs.
        Nothing is acked before every transaction of the batch committed; a redelivery after a failure
        halfway is a no-op for what was committed.
        """
        found = self._log.lookup(accepted.wanted(decoded)) if decoded else {}
        todo = accepted.plan(decoded, found)
        self._schedule([i for i in todo.apply if i.order is not None and i.order.state == "awaiting"])
        back = [i for i in todo.apply if i.order is not None and i.order.returned]
        report, rest = ApplyReport(), todo.apply
        loads = todo.loads
        if (back or todo.additions) and len(back) < len(todo.apply):
            report = self._store.apply_batch(back, additions=todo.additions, loads=loads)
            rest = [i for i in todo.apply if i.order is None or not i.order.returned]
            todo.additions = []
        report.add(self._store.apply_batch(rest[: self._batch_size], dead, todo.conflicts, todo.additions, loads))
        for start in range(self._batch_size, len(rest), self._batch_size):
            report.add(self._store.apply_batch(rest[start : start + self._batch_size], loads=loads))
        report.skipped += todo.skipped
        report.duplicates += todo.duplicates
        return report

    def _apply_one_by_one(self, batch: Sequence[Delivery], dead: Sequence[DeadLetter]) -> ApplyReport:
        total = self._apply([], dead) if dead else ApplyReport()
        for delivery in batch:
            try:
                report = self._apply(*decode([delivery]))
            except FlashSaleError as exc:
                if exc.retriable:
                    raise
                report = self._dead_letter(delivery, f"database rejected it: {exc}")
            except Exception as exc:
                logger.exception("message %s cannot be applied; dead-lettering it", delivery.message_id)
                report = self._dead_letter(delivery, f"applying it failed: {type(exc).__name__}: {exc}")
            total.add(report)
        return total

    def _dead_letter(self, delivery: Delivery, reason: str) -> ApplyReport:
        logger.error(
            "message %s cannot be applied (%s); dead-lettering it",
            delivery.message_id,
            reason,
            extra=ids(message_id=delivery.message_id),
        )
        try:
            sku: str | None = DeductionMessage.decode(delivery.body, delivery.message_id).sku
        except MalformedMessage:
            sku = None
        return self._store.apply_batch([], [_dead(delivery, reason, sku)])

    def _wait_for_stores(self) -> None:
        """Back off, then ask MySQL (for a write) and Redis until both answer, or until asked to stop."""
        pause_s = 0.5
        while not self._stop.wait(pause_s):
            try:
                self._store.ping()
                self._log.ping()
            except FlashSaleError as exc:
                logger.warning("receipt paused: %s", exc)
                pause_s = min(self._max_backoff_s, pause_s * 2)
                continue
            logger.info("MySQL takes writes and Redis answers again; resuming receipt")
            return
