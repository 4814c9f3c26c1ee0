"""What the RocketMQ producer and consumer adapters share: starting a client, and received messages as Deliveries.

rocketmq-python-client 5.1.2 is imported by the rocketmq_* adapters only; its internals by
rocketmq_internals.py only.
"""

from __future__ import annotations

import logging
from typing import Any

from rocketmq import Message

from flashsale.adapters.rocketmq import internals
from flashsale.errors import ServiceUnavailable
from flashsale.models import Delivery

logger = logging.getLogger(__name__)

#: Seconds to wait for the proxy's settings after startup.
SETTINGS_TIMEOUT_S = 10.0


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


def start_client(client: Any, endpoint: str, what: str) -> None:
    """Start a client and wait for the proxy's settings: `startup()` alone returns even when nothing answered."""
    try:
        client.startup()
    except Exception as exc:
        raise ServiceUnavailable("RocketMQ", endpoint, f"{what} did not start: {exc}") from exc
    if not internals.wait_for_settings(client, SETTINGS_TIMEOUT_S):
        shutdown_quietly(client)
        raise ServiceUnavailable(
            "RocketMQ",
            endpoint,
            f"{what} got no answer from the gRPC proxy",
            hint="is the stack up (`flashsale stack status`) and were the topics created (`flashsale init`)?",
        )


def shutdown_quietly(client: Any) -> None:
    try:
        client.shutdown()
    except Exception:
        logger.debug("shutdown of a RocketMQ client raised", exc_info=True)
