"""Everything flashsale takes from rocketmq-python-client 5.1.2 beyond its public API, in one place.

The public API (Producer.send, SimpleConsumer.receive/ack) cannot send a half message from an asyncio
loop, ack a batch in one request, or recover from a proxy restart. This module reaches under it, and
nothing else in flashsale does. What it relies on, all checked by `shape_problems()`:

- `Client.rpc_client`: `send_message_async`, `end_transaction_async` and `ack_message_async`, each
  `(endpoints, request, metadata, timeout) -> concurrent.futures.Future`, and `get_channel_io_loop()`
  (the one asyncio loop the client runs per process); `Client.sign()` for the call metadata. On that
  loop, what those methods run there: `RpcClient.retrieve_or_create_channel(endpoints).async_stub`, a
  `MessagingServiceStub` whose `SendMessage`, `EndTransaction` and `AckMessage` are unary calls.
- `Client._retrieve_topic_route_data(topic)`, a blocking route fetch, and
  `QueueSelector.producer_queue_selector(route).select_next_queue().endpoints`.
- `Client._init_settings_event`, set by the first settings the proxy sends on the telemetry stream, and
  `Client.reset_setting(settings)`, the hook the stream calls with every settings reply.
- `Client.route_manager.get_all_endpoints()`, `Client.on_new_endpoints(endpoints)` (opens a telemetry
  stream and writes the client's settings on it), `Client._Client__telemetry_manager.setting_write(endpoints)`
  (writes them on the stream as it is), `RpcClient.channels.get(endpoints)`, the grpc call
  under `channel.telemetry_stream_stream_call` (`_RpcStreamStreamCall__stream_stream_call`), and
  `RpcChannel.channel_state(wait_for_ready)`, the grpc channel's connectivity.
- `rpc_channel.aio`, the grpc.aio the client makes its channels with (`aio.insecure_channel`): replaced
  by one that adds RECONNECT_OPTIONS to every channel.
- The protobuf requests SendMessageRequest, EndTransactionRequest and AckMessageRequest, the codes of
  `Code`, `MessagingResultChecker.check`, and `MessageIdCodec().next_message_id()`.

Why the stream matters: the proxy keeps a client's settings (its subscription, the topics it produces)
only while that client's telemetry stream is open, and sends transaction checks down the same stream.
When the proxy restarts, the client's read loop ends quietly and the client re-opens the stream only
when its next 300-second settings sync fails. Until then its consumers get "settings is null" and its
producers get no checks. `dead_streams` and `resync` let a watchdog (rocketmq_recovery.py) do in
seconds what the client does in minutes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from grpc import ChannelConnectivity, aio
from rocketmq import ClientConfiguration, Credentials, Producer, SimpleConsumer
from rocketmq.grpc_protocol import (
    AckMessageEntry,
    AckMessageRequest,
    Code,
    Encoding,
    EndTransactionRequest,
    MessageType,
    MessagingServiceStub,
    SendMessageRequest,
    TransactionResolution,
    TransactionSource,
)
from rocketmq.v5.client.balancer import QueueSelector
from rocketmq.v5.client.connection import rpc_channel
from rocketmq.v5.client.connection.rpc_channel import RpcChannel, RpcStreamStreamCall
from rocketmq.v5.client.connection.rpc_client import RpcClient
from rocketmq.v5.exception import TooManyRequestsException
from rocketmq.v5.util import MessageIdCodec, MessagingResultChecker

from flashsale.logs import ROCKETMQ_CLIENT_LOGGER

_HOSTNAME = socket.gethostname()
#: Codes in a reply that mean the proxy does not know this client's settings (it restarted).
SETTINGS_LOST_MARKERS = ("40015", "cannot find client settings", '"settings" is null')
#: Where RpcStreamStreamCall keeps the grpc call of a telemetry stream (a name-mangled private attribute).
_STREAM_CALL = "_RpcStreamStreamCall__stream_stream_call"
#: gRPC waits ever longer between attempts to reach a server that went away, up to 120 s: after a broker
#: restart of half a minute, a client would find it tens of seconds late. Every 2 s at most, whatever the
#: outage, so clients are back within seconds of the broker.
RECONNECT_OPTIONS = (("grpc.max_reconnect_backoff_ms", 2000),)


class Throttled(Exception):
    """The broker sheds load: trying again at once makes it worse."""


def config(endpoint: str, request_timeout_s: float) -> Any:
    if not isinstance(rpc_channel.aio, _ReconnectSooner):
        rpc_channel.aio = _ReconnectSooner()
    return ClientConfiguration(endpoint, Credentials(), request_timeout=max(1, round(request_timeout_s)))


class _ReconnectSooner:
    """grpc.aio as the client's channel module sees it, every channel it makes given RECONNECT_OPTIONS."""

    def __getattr__(self, name: str) -> Any:
        return getattr(aio, name)

    def insecure_channel(self, target: str, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        return aio.insecure_channel(target, [*(options or ()), *RECONNECT_OPTIONS], *args, **kwargs)

    def secure_channel(self, target: str, credentials: Any, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        return aio.secure_channel(target, credentials, [*(options or ()), *RECONNECT_OPTIONS], *args, **kwargs)


# --- clients that remember when the proxy last sent them settings ----------------------------------------
class _SettingsClock:
    """Mixed into the client classes: `reset_setting` is the hook every settings reply reaches."""

    settings_at: float = 0.0

    def reset_setting(self, settings: Any) -> None:
        super().reset_setting(settings)  # type: ignore[misc]
        self.settings_at = time.monotonic()


class _Producer(_SettingsClock, Producer):  # type: ignore[misc]
    pass


class _SimpleConsumer(_SettingsClock, SimpleConsumer):  # type: ignore[misc]
    pass


def new_producer(endpoint: str, request_timeout_s: float, topics: Iterable[str], checker: Any) -> Any:
    return _Producer(config(endpoint, request_timeout_s), topics=tuple(topics), checker=checker)


def new_simple_consumer(
    endpoint: str, request_timeout_s: float, group: str, subscription: dict[str, Any], await_s: int
) -> Any:
    return _SimpleConsumer(config(endpoint, request_timeout_s), group, subscription, await_duration=await_s)


def wait_for_settings(client: Any, timeout_s: float) -> bool:
    """`startup()` returns even when nothing answered; the first settings prove the proxy knows us."""
    event: threading.Event = client._init_settings_event
    return event.wait(timeout_s)


class _NoRouteYet(logging.Filter):
    """Drops the client's own error line for a "no route" answer (code 40402) while routes are asked
    again: on the client library's one logger, from the first fetch under way until the last is done
    (clients of one process may start at the same time)."""

    def __init__(self, log: logging.Logger) -> None:
        super().__init__()
        self._log = log
        self._lock = threading.Lock()
        self._fetches = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return "40402" not in record.getMessage()

    def __enter__(self) -> None:
        with self._lock:
            self._fetches += 1
            if self._fetches == 1:
                self._log.addFilter(self)

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._fetches -= 1
            if self._fetches == 0:
                self._log.removeFilter(self)


_NO_ROUTE_YET = _NoRouteYet(logging.getLogger(ROCKETMQ_CLIENT_LOGGER))


def fetch_routes(client: Any, topics: Iterable[str]) -> None:
    """Ask the proxy for each topic's route again (a blocking fetch); one it finds opens the client's
    telemetry stream, which brings its settings. A topic still without a route is left for the next try,
    without an error line from the client for each ask (its caller says it once)."""
    with _NO_ROUTE_YET:
        for topic in topics:
            try:
                client._retrieve_topic_route_data(topic)
            except Exception:  # noqa: BLE001 - "no route" while the proxy's cache is stale: asked again later
                continue


def settings_age_s(client: Any) -> float | None:
    """Seconds since the proxy last sent this client its settings (None: never)."""
    at = getattr(client, "settings_at", 0.0)
    return time.monotonic() - at if at else None


# --- the telemetry stream ---------------------------------------------------------------------------------
def all_endpoints(client: Any) -> list[Any]:
    return list(client.route_manager.get_all_endpoints().values())


def dead_streams(client: Any) -> list[Any]:
    """The endpoints whose telemetry stream has ended (or was never opened)."""
    dead = []
    for endpoints in all_endpoints(client):
        channel = client.rpc_client.channels.get(endpoints)
        stream = channel.telemetry_stream_stream_call if channel is not None else None
        call = getattr(stream, _STREAM_CALL, None)
        if call is None or call.done():
            dead.append(endpoints)
    return dead


def unconnected(client: Any) -> list[Any]:
    """The endpoints whose channel is not connected: no telemetry stream on it can be open.

    A stream the watchdog opens while the broker is away does not end: it waits, pending, for the channel
    to connect (and carries the settings once it does). So a stream that has not ended is not proof of an
    open one; a channel that is READY is.
    """
    found = []
    for endpoints in all_endpoints(client):
        channel = client.rpc_client.channels.get(endpoints)
        if channel is None or channel.channel_state(False) is not ChannelConnectivity.READY:
            found.append(endpoints)
    return found


def resync(client: Any, endpoints: Iterable[Any]) -> int:
    """Open a new telemetry stream to each endpoint and write the client's settings on it.

    A grpc.aio stream is created on the loop that will run it: the work is handed to the client's loop.
    """
    chosen = list(endpoints)

    def reopen() -> None:
        for each in chosen:
            client.on_new_endpoints(each)

    io_loop(client).call_soon_threadsafe(reopen)
    return len(chosen)


def resend_settings(client: Any, endpoints: Iterable[Any]) -> None:
    """Write the client's settings again on each endpoint's telemetry stream as it is (no new stream).

    The proxy writes a client's checks to the stream its latest settings came on, whichever stream that
    was, and to none once a write to it failed; each settings message it handles sets that stream again.
    """
    chosen = list(endpoints)
    manager = client._Client__telemetry_manager

    def write() -> None:
        for each in chosen:
            manager.setting_write(each)

    io_loop(client).call_soon_threadsafe(write)


def connect(client: Any, endpoints: Iterable[Any]) -> None:
    """Ask each endpoint's channel to connect now (its state, asked with try_to_connect), rather than at
    the client's next heartbeat."""
    channels = [client.rpc_client.channels.get(each) for each in endpoints]

    def connect_now() -> None:
        for channel in channels:
            if channel is not None:
                channel.channel_state(True)

    io_loop(client).call_soon_threadsafe(connect_now)


def settings_lost(error: BaseException) -> bool:
    text = str(error)
    return any(marker in text for marker in SETTINGS_LOST_MARKERS)


# --- raw RPCs on the client's loop ------------------------------------------------------------------------
def io_loop(client: Any) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = client.rpc_client.get_channel_io_loop()
    return loop


#: The channel's stub method behind each of the client's RPCs that `call` makes.
_STUB_METHODS = {
    "send_message_async": "SendMessage",
    "end_transaction_async": "EndTransaction",
    "ack_message_async": "AckMessage",
}


async def call(client: Any, method: str, endpoints: Any, request: Any, timeout_s: float) -> Any:
    """One RPC (`send_message_async`, `end_transaction_async`, `ack_message_async`), awaited on the client's loop.

    On that loop already (the producer's engine runs there), the channel's stub is awaited as the client's
    own coroutine would await it: the client's method would hand that coroutine to the same loop from
    outside (`run_coroutine_threadsafe`: a task, and a wake-up of the loop each way)."""
    if asyncio.get_running_loop() is io_loop(client):
        stub = client.rpc_client.retrieve_or_create_channel(endpoints).async_stub
        return await getattr(stub, _STUB_METHODS[method])(request, metadata=client.sign(), timeout=timeout_s)
    future = getattr(client.rpc_client, method)(endpoints, request, client.sign(), timeout_s)
    return await asyncio.wrap_future(future)


def blocking_call(client: Any, method: str, endpoints: Any, request: Any, timeout_s: float) -> Any:
    future = getattr(client.rpc_client, method)(endpoints, request, metadata=client.sign(), timeout=timeout_s)
    return future.result()


def queue_selector(client: Any, topic: str) -> Any:
    """A round-robin selector over the topic's writable queues (a blocking route fetch: not on the loop)."""
    return QueueSelector.producer_queue_selector(client._retrieve_topic_route_data(topic))


def next_endpoints(selector: Any) -> Any:
    return selector.select_next_queue().endpoints


def new_message_id() -> str:
    message_id: str = MessageIdCodec().next_message_id()
    return message_id


def half_message_request(topic: str, key: str, body: bytes, tag: str, message_id: str, born_ms: int) -> Any:
    request = SendMessageRequest()
    message = request.messages.add()
    message.topic.name = topic
    message.body = body
    message.system_properties.tag = tag
    message.system_properties.keys.append(key)
    message.system_properties.message_id = message_id
    message.system_properties.message_type = MessageType.TRANSACTION
    message.system_properties.born_timestamp.FromMilliseconds(born_ms)
    message.system_properties.born_host = _HOSTNAME
    message.system_properties.body_encoding = Encoding.IDENTITY
    return request


def sent(response: Any) -> tuple[str, str]:
    """(message id, transaction id) of an accepted send; raises Throttled or the client's own error."""
    try:
        MessagingResultChecker.check(response.status)
    except TooManyRequestsException as exc:
        raise Throttled(str(exc)) from exc
    entry = response.entries[0]
    return entry.message_id, entry.transaction_id


def end_transaction_request(topic: str, message_id: str, transaction_id: str, *, commit: bool) -> Any:
    request = EndTransactionRequest()
    request.topic.name = topic
    request.message_id = message_id
    request.transaction_id = transaction_id
    request.resolution = TransactionResolution.COMMIT if commit else TransactionResolution.ROLLBACK
    request.source = TransactionSource.SOURCE_CLIENT
    return request


def ok(response: Any) -> bool:
    return bool(response.status.code == Code.OK)


def ack_request(group: str, topic: str, handles: Iterable[tuple[str, str]]) -> Any:
    """One AckMessageRequest for many (message id, receipt handle) pairs of one topic."""
    request = AckMessageRequest()
    request.group.name = group
    request.topic.name = topic
    for message_id, receipt_handle in handles:
        entry = AckMessageEntry()
        entry.message_id = message_id
        entry.receipt_handle = receipt_handle
        request.entries.append(entry)
    return request


def ack_results(response: Any) -> list[tuple[str, bool, str]]:
    """(message id, accepted, status message) per entry of an ack reply."""
    return [(e.message_id, e.status.code == Code.OK, e.status.message) for e in response.entries]


# --- the shape the code above relies on ---------------------------------------------------------------------
def _stub_problems() -> list[str]:
    """The stub calls `call` awaits that the installed stub no longer makes as unary calls."""
    stub = inspect.getsource(MessagingServiceStub.__init__)
    return [
        f"MessagingServiceStub.{name} is no longer a unary call"
        for name in _STUB_METHODS.values()
        if f"self.{name} = channel.unary_unary(" not in stub
    ]


def shape_problems() -> list[str]:
    """What the installed client lacks of what this module uses; empty when the client is the one we know."""
    problems: list[str] = []

    def need(owner: Any, name: str, params: tuple[str, ...] = ()) -> None:
        member = getattr(owner, name, None)
        if member is None:
            problems.append(f"{owner.__name__}.{name} is gone")
            return
        if params:
            found = tuple(inspect.signature(member).parameters)
            if found[: len(params)] != params:
                problems.append(f"{owner.__name__}.{name}{found} no longer takes {params}")

    for method in ("send_message_async", "end_transaction_async", "ack_message_async"):
        need(RpcClient, method, ("self", "endpoints", "req", "metadata", "timeout"))
    need(RpcClient, "get_channel_io_loop")
    need(RpcClient, "retrieve_or_create_channel", ("self", "endpoints"))
    need(RpcChannel, "async_stub")
    problems += _stub_problems()
    need(RpcChannel, "channel_state", ("self", "wait_for_ready"))
    if Producer.on_new_endpoints.__qualname__ != "Client.on_new_endpoints" or (
        "self.__telemetry_manager.setting_write(" not in inspect.getsource(Producer.on_new_endpoints)
    ):
        problems.append("Client.on_new_endpoints no longer writes settings through _Client__telemetry_manager")
    for owner in (Producer, SimpleConsumer):
        need(owner, "_retrieve_topic_route_data", ("self", "topic"))
        need(owner, "reset_setting", ("self", "settings"))
        need(owner, "on_new_endpoints", ("self", "endpoints"))
        need(owner, "sign")
        need(owner, "route_manager")
        need(owner, "rpc_client")
    need(QueueSelector, "producer_queue_selector", ("topic_route",))
    need(MessageIdCodec, "next_message_id")
    need(MessagingResultChecker, "check", ("status",))
    sentinel = object()
    if getattr(RpcStreamStreamCall(None, sentinel, None), _STREAM_CALL, None) is not sentinel:
        problems.append(f"RpcStreamStreamCall no longer keeps its grpc call in {_STREAM_CALL}")
    if "aio.insecure_channel(" not in inspect.getsource(RpcChannel):
        problems.append("RpcChannel no longer makes its channels with grpc.aio.insecure_channel")
    if "_init_settings_event" not in inspect.getsource(Producer.reset_setting):
        problems.append("Producer.reset_setting no longer sets _init_settings_event")
    for message, fields in (
        (SendMessageRequest().messages.add().system_properties, ("born_timestamp", "message_id", "keys", "tag")),
        (EndTransactionRequest(), ("topic", "message_id", "transaction_id", "resolution", "source")),
        (AckMessageRequest(), ("group", "topic", "entries")),
    ):
        names = {f.name for f in message.DESCRIPTOR.fields}
        problems += [f"{message.DESCRIPTOR.name}.{f} is gone" for f in fields if f not in names]
    return problems
