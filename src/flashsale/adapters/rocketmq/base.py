"""What the RocketMQ producer and consumer adapters share: starting a client, and received messages as Deliveries.

rocketmq-python-client 5.1.2 is imported by the rocketmq_* adapters only; its internals by
rocketmq_internals.py only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from rocketmq import Message

from flashsale.adapters.rocketmq import internals
from flashsale.errors import ServiceUnavailable
from flashsale.models import Delivery

logger = logging.getLogger(__name__)

#: Seconds to wait for the proxy's settings after startup.
SETTINGS_TIMEOUT_S = 10.0
#: Meanwhile, how often the routes of a client's topics are asked again.
ROUTE_RETRY_S = 1.0


def to_delivery(message: Message) -> Delivery:
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


def start_client(client: Any, endpoint: str, what: str, topics: Iterable[str] = ()) -> None:
    """Start a client and wait for the proxy's settings: `startup()` alone returns even when nothing answered.

    A client finds the proxy through its topics' routes. Right after a broker or name server came back,
    the proxy may still hand out a "no route" it cached meanwhile (until its next refresh, and once more
    on the first request after it): the routes of `topics` are asked again every second while no settings
    came, rather than leaving the process to fail and be started again."""
    try:
        client.startup()
    except Exception as exc:
        raise ServiceUnavailable("RocketMQ", endpoint, f"{what} did not start: {exc}") from exc
    deadline = time.monotonic() + SETTINGS_TIMEOUT_S
    asked_again = False
    while not internals.wait_for_settings(client, min(ROUTE_RETRY_S, max(0.0, deadline - time.monotonic()))):
        if not asked_again and topics:
            logger.warning("%s: no answer from the proxy yet; asking for the routes of its topics again", what)
            asked_again = True
        if time.monotonic() >= deadline:
            shutdown_quietly(client)
            raise ServiceUnavailable(
                "RocketMQ",
                endpoint,
                f"{what} got no answer from the gRPC proxy",
                hint="is the stack up (`flashsale stack status`) and were the topics created (`flashsale init`)?",
            )
        internals.fetch_routes(client, topics)


def shutdown_quietly(client: Any) -> None:
    try:
        client.shutdown()
    except Exception:
        logger.debug("shutdown of a RocketMQ client raised", exc_info=True)
