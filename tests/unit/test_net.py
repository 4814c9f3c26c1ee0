from __future__ import annotations

import socket

import pytest

from flashsale.net import is_loopback, port_open


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:1", True), ("[::1]:2", True), ("[::]:3", False), ("0.0.0.0:4", False), ("10.0.0.1:5", False)],
)
def test_is_loopback_tells_local_only_addresses_apart(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_port_open_sees_a_listener_and_no_longer_once_it_closes() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_open("127.0.0.1", port)
    assert not port_open("127.0.0.1", port)
