"""The RocketMQ gRPC client (rocketmq-python-client 5.1.2) behind a small surface. Only this module imports it.

What the client does on its own and what this adapter adds:
- `startup()` returns even when nothing listens; we wait for the server's settings on the telemetry
  stream, which only arrive when the proxy really answered for our topics.
- A TransactionChecker that raises or returns None is silently dropped by the client, so the check
  callback is wrapped: it never raises, and every failure answers UNKNOWN (the broker asks again).
- `ack_async` returns None in 5.1.2; acking a batch is one AckMessageRequest with many entries.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

# The client configures a rotating log file under ~/logs at import; logs.configure() reroutes it.
from rocketmq import (
    ClientConfiguration,
    Credentials,
    FilterExpression,
    Message,
    Producer,
    SimpleConsumer,
    TransactionChecker,
    TransactionResolution,
)
from rocketmq.grpc_protocol import (
    AckMessageEntry,
    AckMessageRequest,
    Code,
    Encoding,
    EndTransactionRequest,
    MessageType,
    SendMessageRequest,
    TransactionSource,
)
from rocketmq.v5.client.balancer import QueueSelector
from rocketmq.v5.exception import TooManyRequestsException
from rocketmq.v5.util import MessageIdCodec, MessagingResultChecker

from flashsale.errors import BusError, ServiceUnavailable
from flashsale.models import Delivery, Resolution

logger = logging.getLogger(__name__)
T = TypeVar("T")

_RESOLUTIONS = {
    Resolution.COMMIT: TransactionResolution.COMMIT,
    Resolution.ROLLBACK: TransactionResolution.ROLLBACK,
    Resolution.UNKNOWN: TransactionResolution.TRANSACTION_RESOLUTION_UNSPECIFIED,
}
#: Seconds to wait for the proxy's settings after startup.
SETTINGS_TIMEOUT_S = 10.0
#: Attempts at sending one half message (the client's own default for sends).
SEND_ATTEMPTS = 3
_HOSTNAME = socket.gethostname()
#: How long a topic's route (which proxy endpoints to send to) is reused before it is asked again.
ROUTE_TTL_S = 30.0


def _config(endpoint: str, request_timeout_s: float) -> ClientConfiguration:
    return ClientConfiguration(endpoint, Credentials(), request_timeout=max(1, round(request_timeout_s)))


def _delivery(message: Message) -> Delivery:
    keys = message.keys or set()
    return Delivery(
        message_id=message.message_id,
        topic=message.topic,
        key=next(iter(sorted(keys)), None),
        body=bytes(message.body or b""),
        born_ms=message.born_timestamp,
        attempt=int(message.delivery_attempt or 1),
        handle=message,
    )


def _start(client: Any, endpoint: str, what: str) -> None:
    try:
        client.startup()
    except Exception as exc:
        raise ServiceUnavailable("RocketMQ", endpoint, f"{what} did not start: {exc}") from exc
    if not client._init_settings_event.wait(SETTINGS_TIMEOUT_S):
        _quiet_shutdown(client)
        raise ServiceUnavailable(
            "RocketMQ",
            endpoint,
            f"{what} got no answer from the gRPC proxy",
            hint="is the stack up (`flashsale stack status`) and were the topics created (`flashsale init`)?",
        )


def _quiet_shutdown(client: Any) -> None:
    try:
        client.shutdown()
    except Exception:
        logger.debug("shutdown after a failed start raised", exc_info=True)


class _Checker(TransactionChecker):  # type: ignore[misc]
    def __init__(self, check: Callable[[Delivery], Resolution]) -> None:
        self._check = check

    def check(self, message: Message) -> Any:
        try:
            resolution = self._check(_delivery(message))
        except BaseException:
            logger.exception("transaction check of message %s failed; answering unknown", message.message_id)
            resolution = Resolution.UNKNOWN
        return _RESOLUTIONS[resolution]


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
        await self._end(TransactionResolution.COMMIT, "commit")

    async def rollback(self) -> None:
        await self._end(TransactionResolution.ROLLBACK, "rollback")

    async def _end(self, resolution: Any, what: str) -> None:
        request = EndTransactionRequest()
        request.topic.name = self._topic
        request.message_id = self.message_id
        request.transaction_id = self._transaction_id
        request.resolution = resolution
        request.source = TransactionSource.SOURCE_CLIENT
        try:
            response = await self._producer.call("end_transaction_async", self._endpoints, request)
        except Exception as exc:
            raise BusError(f"{what} of half message {self.message_id} failed: {exc}") from exc
        if response.status.code != Code.OK:
            raise BusError(f"{what} of half message {self.message_id} refused: {response.status.message}")


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
        self._producer = Producer(_config(endpoint, request_timeout_s), topics=tuple(topics), checker=_Checker(check))
        self._routes: dict[str, tuple[Any, float]] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The client's I/O loop (one per process, run by the client on its own thread)."""
        loop: asyncio.AbstractEventLoop = self._producer.rpc_client.get_channel_io_loop()
        return loop

    async def call(self, method: str, endpoints: Any, request: Any) -> Any:
        """One RPC of the client (`send_message_async`, `end_transaction_async`), awaited on this loop."""
        rpc = self._producer.rpc_client
        future = getattr(rpc, method)(endpoints, request, self._producer.sign(), self._timeout_s)
        return await asyncio.wrap_future(future)

    async def _endpoints(self, topic: str) -> Any:
        cached = self._routes.get(topic)
        if cached is None or time.monotonic() - cached[1] > ROUTE_TTL_S:
            # An uncached route is fetched with a blocking call that needs this very loop: not on it.
            route = await asyncio.get_running_loop().run_in_executor(
                None, self._producer._retrieve_topic_route_data, topic
            )
            cached = (QueueSelector.producer_queue_selector(route), time.monotonic())
            self._routes[topic] = cached
        return cached[0].select_next_queue().endpoints

    async def send_half_async(self, topic: str, key: str, body: bytes, tag: str) -> AsyncHalfMessage:
        request = SendMessageRequest()
        message = request.messages.add()
        message.topic.name = topic
        message.body = body
        message.system_properties.tag = tag
        message.system_properties.keys.append(key)
        message.system_properties.message_id = MessageIdCodec().next_message_id()
        message.system_properties.message_type = MessageType.TRANSACTION
        message.system_properties.born_timestamp.seconds = int(time.time())
        message.system_properties.born_host = _HOSTNAME
        message.system_properties.body_encoding = Encoding.IDENTITY
        last: Exception | None = None
        for _ in range(SEND_ATTEMPTS):
            try:
                endpoints = await self._endpoints(topic)
                response = await self.call("send_message_async", endpoints, request)
                MessagingResultChecker.check(response.status)
                entry = response.entries[0]
                return AsyncHalfMessage(self, topic, endpoints, entry.message_id, entry.transaction_id)
            except TooManyRequestsException as exc:  # the broker sheds load: trying again makes it worse
                last = exc
                break
            except Exception as exc:  # noqa: BLE001 - every other failure is tried again, then reported
                last = exc
        raise BusError(f"sending the half message for {key} to {topic} failed: {last}") from last

    def start(self) -> RocketMQProducer:
        _start(self._producer, self.endpoint, "producer")
        return self

    def send_half(self, topic: str, key: str, body: bytes, tag: str) -> HalfMessage:
        """`send_half_async`, for callers on any thread but the client's loop."""
        return HalfMessage(self._on_loop(self.send_half_async(topic, key, body, tag)), self._on_loop)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def send(self, topic: str, key: str, body: bytes, tag: str) -> str:
        try:
            receipt = self._producer.send(_message(topic, key, body, tag))
        except Exception as exc:
            raise BusError(f"sending {key} to {topic} failed: {exc}") from exc
        message_id: str = receipt.message_id
        return message_id

    def shutdown(self) -> None:
        _quiet_shutdown(self._producer)


def _message(topic: str, key: str, body: bytes, tag: str) -> Message:
    message = Message()
    message.topic = topic
    message.body = body
    message.tag = tag
    message.keys = key
    return message


#: The proxy hands out at most this many messages per receive call.
RECEIVE_MAX = 32
#: Most receive calls in flight per topic.
MAX_RECEIVERS = 4


class _Pump:
    """One SimpleConsumer per topic, long-polling on its own thread into a shared, bounded inbox.

    The client's receive() serves one subscribed topic per call, so a long poll on an idle topic would
    delay a busy one; a pump per topic keeps each topic's latency independent.
    """

    def __init__(
        self, consumer: Any, topic: str, inbox: queue.Queue[list[Message]], stop: threading.Event, invisible_s: int
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self._inbox = inbox
        self._stop = stop
        self._invisible_s = invisible_s
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name=f"receive-{topic}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self.consumer.receive(RECEIVE_MAX, self._invisible_s)
                self.error = None
            except Exception as exc:  # noqa: BLE001 - reported through receive(); retried after a pause
                self.error = exc
                self._stop.wait(1.0)
                continue
            while messages and not self._stop.is_set():
                try:
                    self._inbox.put(messages, timeout=0.5)
                    break
                except queue.Full:
                    continue


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
        # About `prefetch` messages (a batch) wait in memory, in pages of at most RECEIVE_MAX; their
        # invisible time bounds how stale they can get.
        pages = max(2, len(topics), -(-prefetch // RECEIVE_MAX))
        self._inbox: queue.Queue[list[Message]] = queue.Queue(maxsize=pages)
        self._carry: list[Message] = []  # the part of a page a smaller receive() did not take
        # One client per topic; several receives in flight on it keep a large batch fed (one receive
        # call brings at most RECEIVE_MAX messages and takes a few milliseconds).
        self._by_topic = {
            topic: SimpleConsumer(
                _config(endpoint, request_timeout_s), group, {topic: FilterExpression()}, await_duration=poll_wait_s
            )
            for topic in topics
        }
        receivers = min(MAX_RECEIVERS, max(1, pages // 2))
        self._pumps = [
            _Pump(consumer, topic, self._inbox, self._stop, invisible_s)
            for topic, consumer in self._by_topic.items()
            for _ in range(receivers)
        ]

    def start(self) -> RocketMQConsumer:
        started = []
        try:
            for topic, consumer in self._by_topic.items():
                _start(consumer, self.endpoint, f"consumer of {topic} in group {self.group}")
                started.append(consumer)
        except ServiceUnavailable:
            for consumer in started:
                _quiet_shutdown(consumer)
            raise
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
        return [_delivery(m) for m in messages]

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        """Ack every delivery; returns how many the broker accepted (the others will come back)."""
        groups: dict[tuple[str, str], list[Message]] = defaultdict(list)
        for delivery in deliveries:
            message = delivery.handle
            groups[(message.topic, str(message.endpoints))].append(message)
        acked = 0
        for (topic, _), messages in groups.items():
            request = AckMessageRequest()
            request.group.name = self.group
            request.topic.name = topic
            for message in messages:
                entry = AckMessageEntry()
                entry.message_id = message.message_id
                entry.receipt_handle = message.receipt_handle
                request.entries.append(entry)
            consumer = self._by_topic[topic]
            try:
                future = consumer.rpc_client.ack_message_async(
                    messages[0].endpoints, request, metadata=consumer.sign(), timeout=self._request_timeout_s
                )
                response = future.result()
            except Exception as exc:
                raise BusError(f"ack of {len(messages)} messages on {topic} failed: {exc}") from exc
            for entry in response.entries:
                if entry.status.code == Code.OK:
                    acked += 1
                else:
                    logger.warning("ack of message %s refused: %s", entry.message_id, entry.status.message)
        return acked

    def nack(self, deliveries: Sequence[Delivery], delay_s: int) -> None:
        """Make deliveries visible again after `delay_s` (best effort: the invisible time expires anyway)."""
        for delivery in deliveries:
            consumer = self._by_topic[delivery.topic]
            try:
                consumer.change_invisible_duration(delivery.handle, max(1, delay_s))
            except Exception as exc:  # noqa: BLE001 - the message still comes back when its invisible time ends
                logger.warning("nack of message %s failed: %s", delivery.message_id, exc)

    def shutdown(self) -> None:
        """Stop receiving; hand back what was received but never processed, then close the clients."""
        self._stop.set()
        for pump in self._pumps:
            pump.thread.join(timeout=self._poll_wait_s + self._request_timeout_s + 1)
        leftover = [_delivery(m) for m in self._carry]
        self._carry = []
        while True:
            try:
                leftover += [_delivery(m) for m in self._inbox.get_nowait()]
            except queue.Empty:
                break
        if leftover:
            self.nack(leftover, 1)
        for consumer in self._by_topic.values():
            _quiet_shutdown(consumer)


def probe_send(endpoint: str, topic: str, timeout_s: float = 30.0) -> str:
    """Send one normal message through the proxy; returns its id. Proves the broker really accepts writes."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        producer = RocketMQProducer(endpoint, [topic], lambda _: Resolution.UNKNOWN)
        try:
            producer.start()
            return producer.send(topic, "probe", b"probe", "probe")
        except (ServiceUnavailable, BusError) as exc:
            last = exc
            time.sleep(1.0)
        finally:
            producer.shutdown()
    raise ServiceUnavailable("RocketMQ", endpoint, f"no probe message accepted on {topic}: {last}")
