"""The RocketMQ producer: transactional half messages sent from an asyncio loop, and the broker's checks answered.

What the client does on its own and what this adapter adds:
- A TransactionChecker that raises or returns None is silently dropped by the client, so the check
  callback is wrapped: it never raises, and every failure answers UNKNOWN (the broker asks again).
- Half messages are sent with raw RPCs on the client's own loop (the client's send is blocking), with the
  message id chosen by the caller, so the message body can name its own id.
- A watchdog keeps the telemetry stream, on which checks arrive, open across proxy restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from rocketmq import Message, TransactionChecker, TransactionResolution

from flashsale import constants as c
from flashsale.adapters.rocketmq import internals
from flashsale.adapters.rocketmq.base import shutdown_quietly, start_client, to_delivery
from flashsale.adapters.rocketmq.recovery import StreamWatchdog
from flashsale.errors import BusError
from flashsale.models import Deadline, Delivery, Resolution

logger = logging.getLogger(__name__)
T = TypeVar("T")

_RESOLUTIONS = {
    Resolution.COMMIT: TransactionResolution.COMMIT,
    Resolution.ROLLBACK: TransactionResolution.ROLLBACK,
    Resolution.UNKNOWN: TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED,
}
#: Attempts at sending one half message (the client's own default for sends).
SEND_ATTEMPTS = 3
#: How long a topic's route (which proxy endpoints to send to) is reused before it is asked again.
ROUTE_TTL_S = 30.0


class _Checker(TransactionChecker):  # type: ignore[misc]
    def __init__(self, check: Callable[[Delivery], Resolution]) -> None:
        self._check = check

    def check(self, message: Message) -> Any:
        try:
            resolution = self._check(to_delivery(message))
        except BaseException:
            logger.exception("transaction check of message %s failed; answering unknown", message.message_id)
            resolution = Resolution.UNKNOWN
        return _RESOLUTIONS[resolution]


class AsyncHalfMessage:
    """A sent, not yet visible, transactional message, settled from the client's event loop."""

    def __init__(
        self, producer: RocketMQProducer, topic: str, endpoints: Any, message_id: str, transaction_id: str
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._endpoints = endpoints
        self.message_id = message_id
        self._transaction_id = transaction_id

    async def commit(self) -> None:
        await self._end(commit=True)

    async def rollback(self) -> None:
        await self._end(commit=False)

    async def _end(self, *, commit: bool) -> None:
        what = "commit" if commit else "rollback"
        request = internals.end_transaction_request(self._topic, self.message_id, self._transaction_id, commit=commit)
        try:
            response = await self._producer.call("end_transaction_async", self._endpoints, request)
        except Exception as exc:
            raise BusError(f"{what} of half message {self.message_id} failed: {exc}") from exc
        if not internals.ok(response):
            raise BusError(f"{what} of half message {self.message_id} refused: {response.status.message}")


class HalfMessage:
    """A blocking handle on an AsyncHalfMessage (see RocketMQProducer.send_half)."""

    def __init__(self, half: AsyncHalfMessage, run: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._half = half
        self._run = run
        self.message_id = half.message_id

    def commit(self) -> None:
        self._run(self._half.commit())

    def rollback(self) -> None:
        self._run(self._half.rollback())


class RocketMQProducer:
    """A producer that can send transactional half messages and answer the broker's checks.

    The broker sends a check to any live producer that declared the topic, round robin; every
    producer therefore needs `check`, and `check` must read shared state, never process memory.

    `send_half_async` runs on the client's own event loop (`loop`): the producer's hot path lives
    there, so a purchase never hops between threads. The sync methods may be called from any other
    thread.
    """

    def __init__(
        self,
        endpoint: str,
        topics: Sequence[str],
        check: Callable[[Delivery], Resolution],
        *,
        request_timeout_s: float = 3.0,
    ) -> None:
        self.endpoint = endpoint
        self._timeout_s = request_timeout_s
        self._topics = list(topics)
        self._client = internals.new_producer(endpoint, request_timeout_s, self._topics, _Checker(check))
        self._selectors: dict[str, tuple[Any, float]] = {}
        self.watchdog = StreamWatchdog()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The client's I/O loop (one per process, run by the client on its own thread)."""
        return internals.io_loop(self._client)

    def start(self) -> RocketMQProducer:
        start_client(self._client, self.endpoint, "producer", self._topics)
        self.watchdog.watch(self._client, "producer", resend_settings=True)
        return self

    def shutdown(self) -> None:
        self.watchdog.stop()
        shutdown_quietly(self._client)

    def problem(self) -> str | None:
        """Why this producer cannot reach the broker right now (sends or checks), or None."""
        return "; ".join(self.watchdog.problems()) or None

    async def call(self, method: str, endpoints: Any, request: Any) -> Any:
        return await internals.call(self._client, method, endpoints, request, self._timeout_s)

    async def _endpoints(self, topic: str) -> Any:
        cached = self._selectors.get(topic)
        if cached is None or time.monotonic() - cached[1] > ROUTE_TTL_S:
            # An uncached route is fetched with a blocking call that needs this very loop: not on it.
            selector = await asyncio.get_running_loop().run_in_executor(
                None, internals.queue_selector, self._client, topic
            )
            cached = (selector, time.monotonic())
            self._selectors[topic] = cached
        return internals.next_endpoints(cached[0])

    @staticmethod
    def new_message_id() -> str:
        return internals.new_message_id()

    async def send_half_async(
        self, topic: str, key: str, body: bytes, tag: str, message_id: str | None = None
    ) -> AsyncHalfMessage:
        message_id = message_id or internals.new_message_id()
        request = internals.half_message_request(topic, key, body, tag, message_id, int(time.time() * 1000))
        last: Exception | None = None
        for _ in range(SEND_ATTEMPTS):
            try:
                endpoints = await self._endpoints(topic)
                response = await self.call("send_message_async", endpoints, request)
                sent_id, transaction_id = internals.sent(response)
                return AsyncHalfMessage(self, topic, endpoints, sent_id, transaction_id)
            except internals.Throttled as exc:  # the broker sheds load: trying again makes it worse
                last = exc
                break
            except Exception as exc:  # noqa: BLE001 - every other failure is tried again, then reported
                last = exc
        raise BusError(f"sending the half message for {key} to {topic} failed: {last}") from last

    def send_half(self, topic: str, key: str, body: bytes, tag: str, message_id: str | None = None) -> HalfMessage:
        """`send_half_async`, for callers on any thread but the client's loop."""
        return HalfMessage(self._on_loop(self.send_half_async(topic, key, body, tag, message_id)), self._on_loop)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def send(self, topic: str, key: str, body: bytes, tag: str, *, deliver_at_ms: int | None = None) -> str:
        """A normal (not transactional) message, sent with the client's own blocking send; with
        `deliver_at_ms`, a timer message (on a DELAY topic) that no consumer sees before then."""
        message = Message()
        message.topic = topic
        message.body = body
        message.tag = tag
        message.keys = key
        if deliver_at_ms is not None:
            # The client sends this field as whole seconds (the broker's timer ticks by the second):
            # rounded up, a timer never fires before its time.
            message.delivery_timestamp = -(-deliver_at_ms // 1000)
        try:
            receipt = self._client.send(message)
        except Exception as exc:
            raise BusError(f"sending {key} to {topic} failed: {exc}") from exc
        message_id: str = receipt.message_id
        return message_id


class DeadlineSender:
    """Payment deadlines as timer messages on the deadline topic (a DeadlinePort).

    Its producer starts at the first deadline, not before: a consumer of SKUs sold without deadlines never
    needs it, and one that starts while the name server has no route for the topic yet (it learns them
    again after a restart) still starts.
    """

    def __init__(self, start: Callable[[], RocketMQProducer], topic: str) -> None:
        self._start = start
        self._topic = topic
        self._producer: RocketMQProducer | None = None

    def schedule(self, deadlines: Sequence[Deadline]) -> None:
        if self._producer is None:
            self._producer = self._start()
        for deadline in deadlines:
            self._producer.send(
                self._topic, deadline.tokens[0], deadline.encode(), c.DEADLINE_TAG, deliver_at_ms=deadline.due_ms
            )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.shutdown()
