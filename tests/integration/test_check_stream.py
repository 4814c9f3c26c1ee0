"""Transaction checks reach a checker again after the proxy lost track of its telemetry stream.

The proxy keeps one channel per client id and writes a client's checks to the stream whose settings it
handled last; a write to a stream that was cancelled fails, and then it writes to none. After a broker
restart, a stream opened while the broker was away and the one opened once it was back could reach the
proxy in either order, and a checker was seen to get no check for minutes. Here a second client with the
checker's id puts the proxy in that state for certain: its settings, then its stream cancelled.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flashsale.adapters.rocketmq import internals
from flashsale.adapters.rocketmq.base import start_client
from flashsale.adapters.rocketmq.producer import RocketMQProducer, _Checker
from flashsale.adapters.rocketmq.recovery import SETTINGS_EVERY_S
from flashsale.config import Settings
from flashsale.models import Delivery, Resolution
from flashsale.polling import poll_until

#: The broker checks a half message first once it is 6 s old, then every 3 s (infra/rocketmq/broker.conf);
#: the checker writes its settings again every 10 s.
CHECK_WITHIN_S = 6 + 10 + 3 + 6


def _usurp(checker: RocketMQProducer, endpoint: str, topic: str) -> Any:
    """A client with the checker's id whose settings the proxy handles last, and whose stream then ends."""
    # The client writes its settings once more a second after it started, and the watchdog every
    # SETTINGS_EVERY_S: after the next of those, whichever it is (the first may be over already).
    first = checker._client.settings_at
    assert poll_until(lambda: checker._client.settings_at > first, 2 * SETTINGS_EVERY_S)
    usurper = internals.new_producer(endpoint, 3, [topic], _Checker(lambda _: Resolution.UNKNOWN))
    usurper._Client__client_id = checker._client.client_id
    start_client(usurper, endpoint, "usurper", [topic])
    for endpoints in internals.all_endpoints(usurper):
        usurper.rpc_client.channels.get(endpoints).telemetry_stream_stream_call.close()
    return usurper


def test_a_checker_whose_stream_the_proxy_lost_track_of_gets_its_checks_again_within_seconds(
    settings: Settings,
) -> None:
    topic, endpoint = settings.deduction_topic, settings.rocketmq_endpoint
    checked: list[str] = []

    def check(delivery: Delivery) -> Resolution:
        checked.append(delivery.key)
        return Resolution.ROLLBACK

    checker = RocketMQProducer(endpoint, [topic], check).start()
    usurper = _usurp(checker, endpoint, topic)
    sender = RocketMQProducer(endpoint, [topic], lambda _: Resolution.UNKNOWN).start()
    try:
        sender.send_half(topic, "orphan", b"{}", "deduction")  # never ended: only a check can end it
        sender.shutdown()
        started = time.monotonic()
        assert poll_until(lambda: "orphan" in checked, CHECK_WITHIN_S), "no check reached the checker"
        assert time.monotonic() - started < CHECK_WITHIN_S
    finally:
        sender.shutdown()
        checker.shutdown()
        threading.Thread(target=usurper.shutdown, daemon=True).start()
