"""Apply committed deductions to MySQL: batch, one transaction, commit, then ack.

- A message is acked only after the transaction that applied it committed. A crash in between means
  redelivery, and the (sku, token) key makes the second apply a no-op.
- A malformed message goes to dead_letters (in the same transaction) and is acked.
- The database unreachable: nothing is acked, the batch is handed back (nack) and the consumer stops
  receiving until the database answers again, so an outage does not burn the messages' delivery attempts.
- A statement the database rejects for good (not an outage): the batch is applied one message at a time,
  and the message that still fails alone is dead-lettered instead of blocking everything behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from flashsale import failpoints
from flashsale.errors import BusError, FlashSaleError, MalformedMessage
from flashsale.models import Deduction, Delivery
from flashsale.ports import ReceiverPort, StorePort
from flashsale.records import ApplyReport, DeadLetter, Incoming

logger = logging.getLogger(__name__)

Observer = Callable[[ApplyReport, int, float], None]


def decode(batch: Sequence[Delivery]) -> tuple[list[Incoming], list[DeadLetter]]:
    incoming, dead = [], []
    for delivery in batch:
        try:
            deduction = Deduction.decode(delivery.body)
        except MalformedMessage as exc:
            logger.error("message %s on %s is malformed: %s", delivery.message_id, delivery.topic, exc)
            dead.append(DeadLetter(delivery.message_id, delivery.topic, delivery.key, str(exc), delivery.body))
            continue
        incoming.append(Incoming(deduction, delivery.message_id, delivery.topic))
    return incoming, dead


class DeductionConsumer:
    def __init__(
        self,
        receiver: ReceiverPort,
        store: StorePort,
        *,
        batch_size: int,
        max_backoff_s: float,
        failpoint_names: frozenset[str] = frozenset(),
        observe: Observer | None = None,
    ) -> None:
        self._receiver = receiver
        self._store = store
        self._batch_size = batch_size
        self._max_backoff_s = max_backoff_s
        self._failpoints = failpoint_names
        self._observe = observe
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        backoff_s = 0.0
        while not self._stop.is_set():
            if backoff_s:
                self._wait_for_store(backoff_s)
                if self._stop.is_set():
                    break
            try:
                batch = self._collect()
            except BusError as exc:
                logger.warning("receive failed: %s", exc)
                self._stop.wait(1.0)
                continue
            if not batch:
                continue
            try:
                self.process(batch)
                backoff_s = 0.0
            except FlashSaleError as exc:
                backoff_s = min(self._max_backoff_s, max(0.5, backoff_s * 2))
                logger.warning(
                    "batch of %d not applied (%s); handing it back, retrying in %.1f s", len(batch), exc, backoff_s
                )
                self._receiver.nack(batch, max(1, round(backoff_s)))
        logger.info("consumer stopped")

    def _collect(self) -> list[Delivery]:
        """What arrived: waits up to the poll wait for the first messages, then takes what is ready."""
        return self._receiver.receive(self._batch_size)

    def process(self, batch: Sequence[Delivery]) -> ApplyReport:
        started = time.perf_counter()
        incoming, dead = decode(batch)
        try:
            report = self._store.apply_batch(incoming, dead)
        except FlashSaleError as exc:
            if exc.retriable:
                raise
            logger.warning("batch of %d rejected (%s); applying its messages one by one", len(batch), exc)
            report = self._apply_one_by_one(batch)
        failpoints.hit(self._failpoints, failpoints.AFTER_DB_COMMIT)
        try:
            acked = self._receiver.ack(batch)
        except BusError as exc:
            acked = 0
            logger.warning(
                "ack of %d committed messages failed (%s); their redelivery will be a no-op", len(batch), exc
            )
        logger.info(
            "batch: %d applied, %d duplicate, %d conflict, %d dead-lettered, %d/%d acked",
            len(report.applied),
            report.duplicates,
            len(report.conflicts),
            len(report.dead_letters),
            acked,
            len(batch),
        )
        if self._observe:
            self._observe(report, len(batch), time.perf_counter() - started)
        return report

    def _apply_one_by_one(self, batch: Sequence[Delivery]) -> ApplyReport:
        total = ApplyReport()
        for delivery in batch:
            incoming, dead = decode([delivery])
            try:
                report = self._store.apply_batch(incoming, dead)
            except FlashSaleError as exc:
                if exc.retriable:
                    raise
                logger.error("message %s cannot be applied (%s); dead-lettering it", delivery.message_id, exc)
                letter = DeadLetter(
                    delivery.message_id,
                    delivery.topic,
                    delivery.key,
                    f"database rejected it: {exc}"[:512],
                    delivery.body,
                )
                report = self._store.apply_batch([], [letter])
            total.applied += report.applied
            total.duplicates += report.duplicates
            total.conflicts += report.conflicts
            total.dead_letters += report.dead_letters
        return total

    def _wait_for_store(self, pause_s: float) -> None:
        """Sleep, then ping the database until it answers (or we are asked to stop)."""
        while not self._stop.wait(pause_s):
            try:
                self._store.ping()
                logger.info("database answers again; resuming")
                return
            except FlashSaleError as exc:
                logger.warning("database still unavailable: %s", exc)
                pause_s = min(self._max_backoff_s, pause_s * 2)
