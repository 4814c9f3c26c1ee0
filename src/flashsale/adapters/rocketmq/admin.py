"""RocketMQ administration over the broker's remoting protocol (what `mqadmin` speaks).

A frame is: 4-byte total length, 4-byte header length (high byte: serialization type, 0 = JSON), a JSON
header `{code, opaque, flag, extFields, ...}` and an optional body. Request codes and header fields
are those of org.apache.rocketmq.remoting.protocol.RequestCode and the *RequestHeader classes.
Speaking it directly creates a topic in milliseconds instead of a JVM start per `mqadmin` call.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

from flashsale.errors import BusError, ServiceUnavailable

# Request codes (RequestCode.java).
UPDATE_AND_CREATE_TOPIC = 17
UPDATE_BROKER_CONFIG = 25
GET_MAX_OFFSET = 30
GET_BROKER_CLUSTER_INFO = 106
UPDATE_AND_CREATE_SUBSCRIPTIONGROUP = 200
GET_SUBSCRIPTIONGROUP_CONFIG = 352
GET_TOPIC_CONFIG = 351
DELETE_TOPIC_IN_BROKER = 215
DELETE_TOPIC_IN_NAMESRV = 216
DELETE_SUBSCRIPTIONGROUP = 207

# Response codes (ResponseCode.java).
SUCCESS = 0
TOPIC_NOT_EXIST = 17

#: perm = PERM_READ | PERM_WRITE (PermName.java).
PERM_READ_WRITE = 6
MESSAGE_TYPES = ("NORMAL", "FIFO", "DELAY", "TRANSACTION")

_opaque = itertools.count(1)
_opaque_lock = threading.Lock()
#: fastjson writes integer map keys bare ({0:"127.0.0.1:10911"}); quote them so json can read it.
_BARE_INT_KEY = re.compile(r"([{,])(-?\d+):")


@dataclass(frozen=True)
class TopicInfo:
    name: str
    read_queues: int
    write_queues: int
    message_type: str


def _next_opaque() -> int:
    with _opaque_lock:
        return next(_opaque)


def _loads(body: bytes) -> Any:
    text = body.decode("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(_BARE_INT_KEY.sub(r'\1"\2":', text))


def call(
    addr: str, code: int, ext: dict[str, object] | None = None, body: bytes = b"", timeout_s: float = 5.0
) -> tuple[dict[str, Any], bytes]:
    """Send one request and return (response header, response body)."""
    header = json.dumps(
        {
            "code": code,
            "language": "PYTHON",
            "version": 453,
            "opaque": _next_opaque(),
            "flag": 0,
            "serializeTypeCurrentRPC": "JSON",
            "extFields": {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in (ext or {}).items()},
        }
    ).encode()
    frame = struct.pack(">I", len(header)) + header + body
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">I", len(frame)) + frame)
            total = struct.unpack(">I", _read(sock, 4))[0]
            data = _read(sock, total)
    except (OSError, EOFError) as exc:
        raise ServiceUnavailable("RocketMQ", addr, str(exc) or type(exc).__name__) from exc
    header_len = struct.unpack(">I", data[:4])[0] & 0xFFFFFF
    return json.loads(data[4 : 4 + header_len]), data[4 + header_len :]


def _read(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise EOFError("connection closed by the server")
        chunks += chunk
    return bytes(chunks)


def _expect_success(addr: str, what: str, header: dict[str, Any]) -> None:
    if header.get("code") != SUCCESS:
        raise BusError(f"{what} failed at {addr}: code {header.get('code')}: {header.get('remark', '')}")


def cluster_brokers(namesrv: str, cluster: str) -> list[str]:
    """Addresses of the master brokers of `cluster`, as registered with the name server."""
    header, body = call(namesrv, GET_BROKER_CLUSTER_INFO)
    _expect_success(namesrv, "cluster info", header)
    info = _loads(body) if body else {}
    names = (info.get("clusterAddrTable") or {}).get(cluster) or []
    addrs = []
    for name in names:
        broker = (info.get("brokerAddrTable") or {}).get(name) or {}
        master = (broker.get("brokerAddrs") or {}).get("0")
        if master:
            addrs.append(master)
    return sorted(addrs)


def topic_info(broker: str, topic: str) -> TopicInfo | None:
    header, body = call(broker, GET_TOPIC_CONFIG, {"topic": topic})
    if header.get("code") == TOPIC_NOT_EXIST or (header.get("code") == SUCCESS and not body):
        return None
    _expect_success(broker, f"config of {topic}", header)
    cfg = _loads(body)
    attrs = cfg.get("attributes") or {}
    return TopicInfo(
        name=cfg["topicName"],
        read_queues=int(cfg["readQueueNums"]),
        write_queues=int(cfg["writeQueueNums"]),
        message_type=attrs.get("message.type", "NORMAL"),
    )


def register_now(broker: str) -> None:
    """Have a broker register with its name servers at once, its topics included: it does so whenever its
    permission is set, and this sets it to read-write, which the stack's brokers are. (Its own first
    registration after a start is sometimes lost; the next comes only with its 10 s period.)"""
    body = f"brokerPermission={PERM_READ_WRITE}\n".encode()
    header, _ = call(broker, UPDATE_BROKER_CONFIG, body=body)
    _expect_success(broker, "registering the broker again", header)


def create_topic(broker: str, topic: str, *, queues: int, message_type: str) -> None:
    """Create or update `topic` on one broker with the given message type (TopicAttributes message.type)."""
    if message_type not in MESSAGE_TYPES:
        raise ValueError(f"message type must be one of {MESSAGE_TYPES}")
    existing = topic_info(broker, topic)
    # An existing attribute is changed with '-'+'+' pairs; creating takes '+key=value' only.
    attributes = f"+message.type={message_type}"
    header, _ = call(
        broker,
        UPDATE_AND_CREATE_TOPIC,
        {
            "topic": topic,
            "defaultTopic": "TBW102",
            "readQueueNums": queues,
            "writeQueueNums": queues,
            "perm": PERM_READ_WRITE,
            "topicFilterType": "SINGLE_TAG",
            "topicSysFlag": 0,
            "order": False,
            "attributes": attributes,
            "force": existing is not None and existing.message_type != message_type,
        },
    )
    _expect_success(broker, f"create topic {topic}", header)


def max_offset(broker: str, topic: str, queue_id: int) -> int:
    """How many messages queue `queue_id` of `topic` on `broker` has ever held (its next offset)."""
    header, _ = call(broker, GET_MAX_OFFSET, {"topic": topic, "queueId": queue_id})
    _expect_success(broker, f"max offset of {topic}/{queue_id}", header)
    return int(header["extFields"]["offset"])


def delete_topic(namesrv: str, brokers: list[str], topic: str) -> None:
    for broker in brokers:
        header, _ = call(broker, DELETE_TOPIC_IN_BROKER, {"topic": topic})
        _expect_success(broker, f"delete topic {topic}", header)
    header, _ = call(namesrv, DELETE_TOPIC_IN_NAMESRV, {"topic": topic})
    _expect_success(namesrv, f"delete topic {topic}", header)


def group_config(broker: str, group: str) -> dict[str, Any]:
    """The subscription group's config (the broker creates a default one on first lookup)."""
    header, body = call(broker, GET_SUBSCRIPTIONGROUP_CONFIG, {"group": group})
    _expect_success(broker, f"config of group {group}", header)
    config: dict[str, Any] = _loads(body) if body else {}
    return config


def create_group(broker: str, group: str, *, retry_max_times: int) -> None:
    """Create or update a consumer (subscription) group."""
    body = json.dumps(
        {
            "groupName": group,
            "consumeEnable": True,
            "consumeFromMinEnable": True,
            "consumeBroadcastEnable": False,
            "retryQueueNums": 1,
            "retryMaxTimes": retry_max_times,
            "brokerId": 0,
            "whichBrokerWhenConsumeSlowly": 1,
            "notifyConsumerIdsChangedEnable": True,
        }
    ).encode()
    header, _ = call(broker, UPDATE_AND_CREATE_SUBSCRIPTIONGROUP, body=body)
    _expect_success(broker, f"create group {group}", header)


def delete_group(broker: str, group: str) -> None:
    header, _ = call(broker, DELETE_SUBSCRIPTIONGROUP, {"groupName": group, "cleanOffset": True})
    _expect_success(broker, f"delete group {group}", header)
