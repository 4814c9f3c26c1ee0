"""The RocketMQ consumer: batches received from several topics, acked in one request per topic, or handed back.

- One SimpleConsumer per topic, each long-polling on threads of its own into a shared, bounded inbox:
  the client's receive() serves one subscribed topic per call, so a long poll on an idle topic would
  delay a busy one.
- A watchdog keeps each client's telemetry stream, and so its subscription on the proxy, alive across
  proxy restarts; a receive refused for lost settings asks it to resync at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from rocketmq import FilterExpression, Message

from flashsale.adapters.rocketmq import internals
from flashsale.adapters.rocketmq.base import shutdown_quietly, start_client, to_delivery
from flashsale.adapters.rocketmq.recovery import StreamWatchdog
from flashsale.errors import BusError, ServiceUnavailable
from flashsale.models import Delivery

logger = logging.getLogger(__name__)

#: The proxy hands out at most this many messages per receive call.
RECEIVE_MAX = 32
#: Most receive calls in flight per topic.
MAX_RECEIVERS = 4
#: Seconds a receiver waits after a page that was not full, before it asks again, where its topic has
#: other receivers. A receive call costs about 1 ms of this process's CPU and 0.7 to 1 ms of the broker's
#: (a pop and its checkpoint), however few messages it brings (tests/benchmarks/receive_calls.py), and
#: under steady load each came back with one or two. Messages that arrive meanwhile wait in the broker and
#: come in fuller pages (five or six a call at 0.25 s, about three at 0.1 s: performance.md, run L). A
#: message that arrives while every receiver of its topic waits waits too, at most this long: under light
#: load the others are long-polling and take it at once. A topic's only receiver (a consumer of small
#: batches) never waits: nothing would be polling meanwhile.
LINGER_S = 0.25


def linger_s(receivers: int) -> float:
    """How long each of a topic's `receivers` waits after a page that was not full (see LINGER_S)."""
    return LINGER_S if receivers > 1 else 0.0


class _Pump:
    """Long-polls one topic's client on its own thread into the shared inbox."""

    def __init__(
        self,
        client: Any,
        topic: str,
        inbox: queue.Queue[list[Message]],
        stop: threading.Event,
        running: threading.Event,
        invisible_s: int,
        watchdog: StreamWatchdog,
        hand_back: Callable[[list[Message]], None],
        linger: float,
    ) -> None:
        self.client = client
        self.topic = topic
        self._linger = linger  # seconds: see linger_s
        self._inbox = inbox
        self._stop = stop
        self._running = running
        self._hand_back = hand_back
        self._invisible_s = invisible_s
        self._watchdog = watchdog
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name=f"receive-{topic}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._running.wait(0.5):
                continue
            try:
                messages = self.client.receive(RECEIVE_MAX, self._invisible_s)
                self.error = None
            except Exception as exc:  # noqa: BLE001 - reported through receive(); retried after a pause
                self.error = exc
                if internals.settings_lost(exc):
                    self._watchdog.poke(self.client)
                self._stop.wait(1.0)
                continue
            if messages:
                self._deliver(messages)
            if self._linger and 0 < len(messages) < RECEIVE_MAX:
                self._stop.wait(self._linger)

    def _deliver(self, messages: list[Message]) -> None:
        """Into the inbox, or back to the broker when receipt is paused or stopped before there is room: a
        page held here when the consumer stops would otherwise stay hidden for its whole invisible time."""
        while not self._stop.is_set() and self._running.is_set():
            try:
                self._inbox.put(messages, timeout=0.5)
                return
            except queue.Full:
                continue
        self._hand_back(messages)


class RocketMQConsumer:
    """A pull consumer of several topics: receive batches, ack them in one request per topic, or nack."""

    def __init__(
        self,
        endpoint: str,
        group: str,
        topics: Sequence[str],
        *,
        poll_wait_s: int,
        invisible_s: int,
        prefetch: int = RECEIVE_MAX,
        request_timeout_s: float = 3.0,
    ) -> None:
        self.endpoint = endpoint
        self.group = group
        self._poll_wait_s = poll_wait_s
        self._request_timeout_s = request_timeout_s
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        # About `prefetch` messages (a batch) wait in memory, in pages of at most RECEIVE_MAX; their
        # invisible time bounds how stale they can get.
        pages = max(2, len(topics), -(-prefetch // RECEIVE_MAX))
        self._inbox: queue.Queue[list[Message]] = queue.Queue(maxsize=pages)
        self._carry: list[Message] = []  # the part of a page a smaller receive() did not take
        self.watchdog = StreamWatchdog()
        # One client per topic; several receives in flight on it keep a large batch fed (one receive
        # call brings at most RECEIVE_MAX messages and takes a few milliseconds).
        self._by_topic = {
            topic: internals.new_simple_consumer(
                endpoint, request_timeout_s, group, {topic: FilterExpression()}, poll_wait_s
            )
            for topic in topics
        }
        receivers = min(MAX_RECEIVERS, max(1, pages // 2))
        self._pumps = [
            _Pump(
                client,
                topic,
                self._inbox,
                self._stop,
                self._running,
                invisible_s,
                self.watchdog,
                self._hand_back,
                linger_s(receivers),
            )
            for topic, client in self._by_topic.items()
            for _ in range(receivers)
        ]

    def start(self) -> RocketMQConsumer:
        started = []
        try:
            for topic, client in self._by_topic.items():
                start_client(client, self.endpoint, f"consumer of {topic} in group {self.group}", [topic])
                started.append(client)
        except ServiceUnavailable:
            for client in started:
                shutdown_quietly(client)
            raise
        for topic, client in self._by_topic.items():
            self.watchdog.watch(client, f"consumer of {topic}")
        for pump in self._pumps:
            pump.thread.start()
        return self

    def receive(self, max_messages: int) -> list[Delivery]:
        """Up to `max_messages` received messages, waiting at most the poll wait for the first ones."""
        messages, self._carry = self._carry, []
        if not messages:
            try:
                messages = list(self._inbox.get(timeout=self._poll_wait_s))
            except queue.Empty:
                failing = [f"{p.topic}: {p.error}" for p in self._pumps if p.error is not None]
                if failing:
                    raise BusError(f"receive for group {self.group} failed: {'; '.join(failing)}") from None
                return []
        while len(messages) < max_messages:
            try:
                messages += self._inbox.get_nowait()
            except queue.Empty:
                break
        messages, self._carry = messages[:max_messages], messages[max_messages:]
        return [to_delivery(m) for m in messages]

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        """Ack every delivery; returns how many the broker accepted (the others will come back)."""
        groups: dict[tuple[str, str], list[Message]] = defaultdict(list)
        for delivery in deliveries:
            message = delivery.handle
            groups[(message.topic, str(message.endpoints))].append(message)
        acked = 0
        for (topic, _), messages in groups.items():
            request = internals.ack_request(self.group, topic, [(m.message_id, m.receipt_handle) for m in messages])
            try:
                response = internals.blocking_call(
                    self._by_topic[topic], "ack_message_async", messages[0].endpoints, request, self._request_timeout_s
                )
            except Exception as exc:
                raise BusError(f"ack of {len(messages)} messages on {topic} failed: {exc}") from exc
            for message_id, accepted, status in internals.ack_results(response):
                if accepted:
                    acked += 1
                else:
                    logger.warning("ack of message %s refused: %s", message_id, status)
        return acked

    def nack(self, deliveries: Sequence[Delivery], delay_s: int) -> None:
        """Make deliveries visible again after `delay_s` (best effort: the invisible time expires anyway)."""
        for delivery in deliveries:
            client = self._by_topic[delivery.topic]
            try:
                client.change_invisible_duration(delivery.handle, max(1, delay_s))
            except Exception as exc:  # noqa: BLE001 - the message still comes back when its invisible time ends
                logger.warning("nack of message %s failed: %s", delivery.message_id, exc)

    def problem(self) -> str | None:
        """Why this consumer cannot receive right now, or None."""
        problems = self.watchdog.problems()
        problems += sorted({f"receive on {p.topic} failed: {p.error}" for p in self._pumps if p.error is not None})
        return "; ".join(problems) or None

    def pause(self) -> None:
        """Stop receiving; hand back what was received and not yet taken (see ReceiverPort)."""
        self._running.clear()
        self._hand_back_buffered()

    def resume(self) -> None:
        self._running.set()

    def wake(self) -> None:
        # An empty page: receive() takes it as a page with nothing in it. A full inbox needs no waking.
        try:
            self._inbox.put_nowait([])
        except queue.Full:
            pass

    def _hand_back(self, messages: list[Message]) -> None:
        self.nack([to_delivery(m) for m in messages], 1)
        logger.info("handed back %d message(s) received and not started", len(messages))

    def _hand_back_buffered(self) -> None:
        leftover, self._carry = self._carry, []
        while True:
            try:
                leftover += self._inbox.get_nowait()
            except queue.Empty:
                break
        if leftover:
            self._hand_back(leftover)

    def shutdown(self) -> None:
        """Stop receiving; hand back what was received but never processed, then close the clients."""
        self._stop.set()
        self.watchdog.stop()
        for pump in self._pumps:
            pump.thread.join(timeout=self._poll_wait_s + self._request_timeout_s + 1)
        self._hand_back_buffered()
        for client in self._by_topic.values():
            shutdown_quietly(client)
