from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from flashsale.stack import procs
from flashsale.stack.procs import PidRecord


def test_pid_record_survives_a_save_load_round_trip(tmp_path: Path) -> None:
    record = PidRecord(pid=1234, start_ticks=5678, command="redis-server")
    path = tmp_path / "run" / "redis.json"
    record.save(path)
    assert PidRecord.load(path) == record
    assert not path.with_suffix(".tmp").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"pid": 1}', '{"pid": "x", "start_ticks": 1, "command": ""}'])
def test_pid_record_load_of_a_corrupt_file_is_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / "redis.json"
    path.write_text(text)
    assert PidRecord.load(path) is None


def test_pid_record_load_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert PidRecord.load(tmp_path / "absent.json") is None


def test_is_alive_recognises_the_current_process() -> None:
    ticks = procs.start_ticks(os.getpid())
    assert ticks is not None
    assert procs.is_alive(PidRecord(os.getpid(), ticks, "python"))


def test_is_alive_refuses_a_pid_whose_start_time_differs() -> None:
    ticks = procs.start_ticks(os.getpid())
    assert ticks is not None
    assert not procs.is_alive(PidRecord(os.getpid(), ticks + 1, "python"))


def test_listening_addresses_finds_a_socket_this_process_listens_on() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert f"127.0.0.1:{port}" in procs.listening_addresses(os.getpid())
    assert f"127.0.0.1:{port}" not in procs.listening_addresses(os.getpid())


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:1", True), ("[::1]:2", True), ("[::]:3", False), ("0.0.0.0:4", False), ("10.0.0.1:5", False)],
)
def test_is_loopback_tells_local_only_addresses_apart(address: str, loopback: bool) -> None:
    assert procs.is_loopback(address) is loopback


@pytest.mark.parametrize(
    ("hex_addr", "width", "text"),
    [
        ("0100007F", 8, "127.0.0.1"),
        ("00000000", 8, "0.0.0.0"),
        ("0000000000000000FFFF00000100007F", 32, "127.0.0.1"),
        ("00000000000000000000000001000000", 32, "[::1]"),
        ("00000000000000000000000000000000", 32, "[::]"),
    ],
)
def test_decode_addr_reads_the_proc_net_tcp_hex_format(hex_addr: str, width: int, text: str) -> None:
    assert procs._decode_addr(hex_addr, width) == text
