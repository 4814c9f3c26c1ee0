from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.errors import ServiceUnavailable, StackError


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "client closed the connection early"
        data += chunk
    return data


def _frame(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">II", 4 + len(raw) + len(body), len(raw)) + raw + body


class FakeRemotingServer:
    """Answers one request frame with a fixed response frame and keeps what it received."""

    def __init__(self, header: dict[str, Any], body: bytes) -> None:
        self.response = _frame(header, body)
        self.received: dict[str, Any] = {}
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(5)
        self.addr = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._sock.accept()
        with conn:
            total = struct.unpack(">I", _read(conn, 4))[0]
            data = _read(conn, total)
            length_word = struct.unpack(">I", data[:4])[0]
            header_len = length_word & 0xFFFFFF
            self.received = {
                "serialization": length_word >> 24,
                "header": json.loads(data[4 : 4 + header_len]),
                "body": data[4 + header_len :],
            }
            conn.sendall(self.response)

    def close(self) -> None:
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def server() -> Iterator[FakeRemotingServer]:
    fake = FakeRemotingServer({"code": 0, "opaque": 1, "flag": 1, "remark": None}, b'{"answer":42}')
    yield fake
    fake.close()


def test_loads_accepts_fastjson_bare_integer_keys() -> None:
    assert rocketmq_admin._loads(b'{"brokerAddrs":{0:"127.0.0.1:10911",1:"b"}}') == {
        "brokerAddrs": {"0": "127.0.0.1:10911", "1": "b"}
    }


def test_loads_reads_plain_json_unchanged() -> None:
    assert rocketmq_admin._loads(b'{"a":"x,1:y"}') == {"a": "x,1:y"}


def test_call_returns_the_parsed_response_header_and_body(server: FakeRemotingServer) -> None:
    header, body = rocketmq_admin.call(server.addr, rocketmq_admin.GET_TOPIC_CONFIG, {"topic": "t"}, timeout_s=5)
    assert header["code"] == 0
    assert header["flag"] == 1
    assert body == b'{"answer":42}'


def test_call_sends_the_request_code_and_ext_fields_as_strings(server: FakeRemotingServer) -> None:
    ext = {"topic": "t", "readQueueNums": 8, "order": False, "force": True}
    rocketmq_admin.call(server.addr, rocketmq_admin.UPDATE_AND_CREATE_TOPIC, ext, body=b"payload", timeout_s=5)
    server.close()
    sent = server.received
    assert sent["serialization"] == 0
    assert sent["header"]["code"] == rocketmq_admin.UPDATE_AND_CREATE_TOPIC
    assert sent["header"]["extFields"] == {"topic": "t", "readQueueNums": "8", "order": "false", "force": "true"}
    assert sent["body"] == b"payload"


def test_call_to_a_closed_port_raises_service_unavailable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    with pytest.raises(ServiceUnavailable, match=f"RocketMQ at 127.0.0.1:{port} is unavailable"):
        rocketmq_admin.call(f"127.0.0.1:{port}", rocketmq_admin.GET_BROKER_CLUSTER_INFO, timeout_s=1)


def test_register_now_sets_the_brokers_permission_to_read_write(server: FakeRemotingServer) -> None:
    rocketmq_admin.register_now(server.addr)
    server.close()
    assert server.received["header"]["code"] == rocketmq_admin.UPDATE_BROKER_CONFIG
    assert server.received["body"] == b"brokerPermission=6\n"


def test_a_starting_broker_not_listed_is_asked_to_register_and_a_status_read_asks_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flashsale.stack.layout import StackLayout
    from flashsale.stack.rocketmq import GroupBroker
    from flashsale.stack.settings import StackSettings

    settings = StackSettings.from_env({"FLASHSALE_HOME": str(tmp_path)})
    broker = GroupBroker(StackLayout(settings.home), settings, 0)
    asked: list[str] = []
    monkeypatch.setattr(rocketmq_admin, "cluster_brokers", lambda namesrv, cluster: [])
    monkeypatch.setattr(rocketmq_admin, "register_now", asked.append)
    with pytest.raises(StackError, match="not registered"):
        broker.check()
    assert asked == []
    with pytest.raises(StackError, match="not registered"):
        broker.probe()
    assert asked == [broker.broker_addr]
