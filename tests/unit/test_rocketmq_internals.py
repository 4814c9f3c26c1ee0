"""The pinned RocketMQ client still has the shape flashsale relies on (see adapters/rocketmq/internals.py).

When this fails after an upgrade of rocketmq-python-client, read the list: each line names a private
attribute or a signature the adapters use, and each must be checked before the new client is trusted.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from grpc import ChannelConnectivity
from rocketmq import Producer
from rocketmq.v5.client import Client
from rocketmq.v5.client.connection.rpc_client import RpcClient

from flashsale.adapters.rocketmq import base, internals
from flashsale.adapters.rocketmq.recovery import StreamWatchdog, _Watched
from flashsale.errors import ServiceUnavailable


def test_the_installed_client_has_every_internal_the_adapters_use() -> None:
    assert internals.shape_problems() == []


def test_a_client_that_changed_shape_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Client, "_retrieve_topic_route_data")
    monkeypatch.setattr(Producer, "on_new_endpoints", lambda self: None)
    problems = internals.shape_problems()
    assert "Producer._retrieve_topic_route_data is gone" in problems
    assert any(p.startswith("Producer.on_new_endpoints") and "no longer takes" in p for p in problems)


def test_a_stub_whose_calls_changed_is_reported_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # The producer awaits the channel's stub itself on the client's loop: its calls must be where it looks.
    monkeypatch.setattr(internals, "_STUB_METHODS", {"send_message_async": "SendMessages"})
    monkeypatch.delattr(RpcClient, "retrieve_or_create_channel")
    problems = internals.shape_problems()
    assert "MessagingServiceStub.SendMessages is no longer a unary call" in problems
    assert "RpcClient.retrieve_or_create_channel is gone" in problems


def test_half_message_requests_carry_the_id_the_caller_chose_and_a_millisecond_born_time() -> None:
    request = internals.half_message_request("t", "key", b"body", "tag", "MSG-1", 1_700_000_000_123)
    props = request.messages[0].system_properties
    assert props.message_id == "MSG-1" and list(props.keys) == ["key"]
    assert props.born_timestamp.ToMilliseconds() == 1_700_000_000_123


def test_settings_loss_is_recognised_in_the_proxy_s_refusals() -> None:
    assert internals.settings_lost(
        Exception('50001, Cannot invoke "Settings.getSubscription()" because "settings" is null')
    )
    assert internals.settings_lost(Exception("code:40015, message:cannot find client settings for this client"))
    assert not internals.settings_lost(Exception("deadline exceeded"))


class _Call:
    def __init__(self, done: bool) -> None:
        self._done = done

    def done(self) -> bool:
        return self._done


class _Client:
    """A client with one endpoint whose telemetry stream and channel are as the test says."""

    def __init__(self, *, stream_done: bool, state: ChannelConnectivity) -> None:
        channel = SimpleNamespace(
            telemetry_stream_stream_call=SimpleNamespace(**{internals._STREAM_CALL: _Call(stream_done)}),
            channel_state=lambda wait_for_ready: state,
        )
        self.route_manager = SimpleNamespace(get_all_endpoints=lambda: {"proxy": "127.0.0.1:8081"})
        self.rpc_client = SimpleNamespace(channels={"127.0.0.1:8081": channel})


def test_a_stream_waiting_for_a_channel_that_is_not_connected_is_reported_down() -> None:
    # What a stream reopened while the broker is away looks like: not ended, its channel not connected.
    waiting = _Client(stream_done=False, state=ChannelConnectivity.TRANSIENT_FAILURE)
    watchdog = StreamWatchdog()
    watchdog._watched[id(waiting)] = _Watched(waiting, "producer")
    assert watchdog.problems() == ["producer: telemetry stream to 127.0.0.1:8081 is down"]
    assert internals.dead_streams(waiting) == []  # not ended: the watchdog does not reopen it again


def test_an_open_stream_on_a_connected_channel_is_no_problem() -> None:
    watchdog = StreamWatchdog()
    client = _Client(stream_done=False, state=ChannelConnectivity.READY)
    watchdog._watched[id(client)] = _Watched(client, "producer")
    assert watchdog.problems() == []


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[Any, Any]]]:
    """The watchdog's resyncs and connects, recorded as (client, endpoints) rather than made."""
    seen: dict[str, list[tuple[Any, Any]]] = {"resync": [], "connect": []}
    monkeypatch.setattr(
        internals, "resync", lambda client, endpoints=None: seen["resync"].append((client, endpoints)) or 1
    )
    monkeypatch.setattr(internals, "connect", lambda client, endpoints: seen["connect"].append((client, endpoints)))
    return seen


def test_a_client_whose_channel_connects_again_sends_its_settings_again(calls: dict[str, list[Any]]) -> None:
    # A restarted proxy answered every heartbeat with 40015 after the channel came back: the settings a
    # stream opened during the outage should have carried never arrived, and no check reached a checker.
    watchdog = StreamWatchdog(min_gap_s=0)
    away = _Client(stream_done=False, state=ChannelConnectivity.TRANSIENT_FAILURE)
    watched = _Watched(away, "producer")
    watchdog._look_at(watched)
    assert calls["resync"] == []  # the stream waits for the channel: nothing to send yet
    back = _Client(stream_done=False, state=ChannelConnectivity.READY)
    watched.client = back
    watchdog._look_at(watched)
    watchdog._look_at(watched)
    assert [client for client, _ in calls["resync"]] == [back]  # once, when the channel connected


def test_a_stream_that_ended_while_the_broker_is_away_is_reopened_only_once_the_channel_is_up(
    calls: dict[str, list[Any]],
) -> None:
    # A stream opened while away starts when the channel connects, beside the one the reconnect calls
    # for: the proxy may then take the settings of the stale one last and write every check to it.
    watchdog = StreamWatchdog(min_gap_s=0)
    away = _Client(stream_done=True, state=ChannelConnectivity.TRANSIENT_FAILURE)
    watched = _Watched(away, "producer")
    for _ in range(3):
        watchdog._look_at(watched)
    assert calls["resync"] == [] and [client for client, _ in calls["connect"]] == [away] * 3
    watched.client = _Client(stream_done=True, state=ChannelConnectivity.READY)
    watchdog._look_at(watched)
    assert [client for client, _ in calls["resync"]] == [watched.client]


def test_a_connected_client_writes_its_settings_again_every_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each settings message makes the proxy write checks to the stream it came on: a channel left with a
    # stale stream, or none, is set right within one period.
    written: list[object] = []
    monkeypatch.setattr(internals, "resend_settings", lambda client, endpoints: written.append(client))
    watchdog = StreamWatchdog()
    client = _Client(stream_done=False, state=ChannelConnectivity.READY)
    watched = _Watched(client, "producer", next_settings=0.0)
    watchdog._look_at(watched)
    watchdog._look_at(watched)
    assert written == [client]
    watched.next_settings = 0.0
    watchdog._look_at(watched)
    assert written == [client, client]


class _TwoEndpoints(_Client):
    """A client of two proxies: `away` not connected, `restarted` connected with its stream ended."""

    def __init__(self) -> None:
        super().__init__(stream_done=True, state=ChannelConnectivity.READY)
        away = SimpleNamespace(
            telemetry_stream_stream_call=SimpleNamespace(**{internals._STREAM_CALL: _Call(False)}),
            channel_state=lambda wait_for_ready: ChannelConnectivity.TRANSIENT_FAILURE,
        )
        self.route_manager = SimpleNamespace(get_all_endpoints=lambda: {"a": "away:8081", "r": "restarted:8081"})
        self.rpc_client = SimpleNamespace(
            channels={"away:8081": away, "restarted:8081": self.rpc_client.channels["127.0.0.1:8081"]}
        )


def test_one_proxy_away_does_not_keep_the_stream_to_another_from_being_reopened(calls: dict[str, list[Any]]) -> None:
    StreamWatchdog(min_gap_s=0)._look_at(_Watched(_TwoEndpoints(), "consumer of t"))
    assert [endpoints for _, endpoints in calls["resync"]] == [["restarted:8081"]]
    assert [endpoints for _, endpoints in calls["connect"]] == [["away:8081"]]


def test_a_consumer_s_settings_are_not_written_again_on_a_timer() -> None:
    # The proxy takes a consumer's settings for its group's subscription; one client per topic, one group.
    watchdog = StreamWatchdog()
    client = _Client(stream_done=False, state=ChannelConnectivity.READY)
    watchdog.watch(client, "consumer of t")
    try:
        assert watchdog._watched[id(client)].next_settings == float("inf")
    finally:
        watchdog.stop()


class _NoRouteYet:
    """A client whose proxy answers "no route" to the first `stale` route requests (a cache it has not
    refreshed), then finds the route, which brings the settings."""

    def __init__(self, stale: int) -> None:
        self._init_settings_event = threading.Event()
        self.stale = stale
        self.asked: list[str] = []

    def startup(self) -> None:  # the client's own first ask, answered "no route"
        self.asked.append("t")

    def _retrieve_topic_route_data(self, topic: str) -> object:
        self.asked.append(topic)
        if len(self.asked) <= self.stale:
            raise RuntimeError("40402, No topic route info in name server")
        self._init_settings_event.set()
        return object()

    def shutdown(self) -> None:
        pass


def test_a_client_started_while_the_proxy_has_no_route_asks_again_until_it_finds_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(base, "ROUTE_RETRY_S", 0.01)
    client = _NoRouteYet(stale=3)
    base.start_client(client, "127.0.0.1:1", "producer", ["t"])
    assert client.asked == ["t"] * 4


def test_a_client_that_never_finds_a_route_fails_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "ROUTE_RETRY_S", 0.01)
    monkeypatch.setattr(base, "SETTINGS_TIMEOUT_S", 0.2)
    client = _NoRouteYet(stale=10**6)
    with pytest.raises(ServiceUnavailable, match="got no answer from the gRPC proxy"):
        base.start_client(client, "127.0.0.1:1", "producer", ["t"])
    assert len(client.asked) > 2


def test_asking_a_route_again_keeps_the_clients_no_route_errors_out_of_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client_log = logging.getLogger("rocketmq-python-client")

    class _Logs(_NoRouteYet):
        def _retrieve_topic_route_data(self, topic: str) -> object:
            client_log.error("query topic raise exception, 40402, CODE: 17  DESC: No topic route info")
            client_log.error("some other failure")
            raise RuntimeError("no route")

    internals.fetch_routes(_Logs(stale=0), ["t"])
    assert [r.getMessage() for r in caplog.records] == ["some other failure"]
    client_log.error("query topic raise exception, 40402, after the asking")  # no longer dropped
    assert len(caplog.records) == 2


def test_two_clients_asking_at_once_keep_the_no_route_errors_out_until_both_are_done(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client_log = logging.getLogger("rocketmq-python-client")
    first_inside, second_done = threading.Event(), threading.Event()

    class _Slow(_NoRouteYet):
        def _retrieve_topic_route_data(self, topic: str) -> object:
            first_inside.set()
            assert second_done.wait(5)
            client_log.error("query topic raise exception, 40402, while the other client is done")
            raise RuntimeError("no route")

    slow = threading.Thread(target=internals.fetch_routes, args=(_Slow(stale=0), ["t"]))
    slow.start()
    assert first_inside.wait(5)
    internals.fetch_routes(_NoRouteYet(stale=0), ["t"])  # starts and ends while the first is still asking
    second_done.set()
    slow.join(5)
    assert caplog.records == []
    client_log.error("query topic raise exception, 40402, after both")
    assert len(caplog.records) == 1
