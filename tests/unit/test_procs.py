from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psutil
import pytest

from flashsale.polling import poll_until
from flashsale.stack import procs
from flashsale.stack.procs import PidRecord


def test_pid_record_survives_a_save_load_round_trip(tmp_path: Path) -> None:
    record = PidRecord(pid=1234, started=1_700_000_000.25, command="redis-server")
    path = tmp_path / "run" / "redis.json"
    record.save(path)
    assert PidRecord.load(path) == record
    assert not path.with_suffix(".tmp").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"pid": 1}', '{"pid": "x", "started": 1, "command": ""}'])
def test_pid_record_load_of_a_corrupt_file_is_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / "redis.json"
    path.write_text(text)
    assert PidRecord.load(path) is None


def test_pid_record_load_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert PidRecord.load(tmp_path / "absent.json") is None


def test_is_alive_recognises_the_current_process() -> None:
    started = procs.started_at(os.getpid())
    assert started is not None
    assert procs.is_alive(PidRecord(os.getpid(), started, "python"))


def test_is_alive_refuses_a_pid_whose_start_time_differs() -> None:
    started = procs.started_at(os.getpid())
    assert started is not None
    assert not procs.is_alive(PidRecord(os.getpid(), started + 1, "python"))


def test_a_record_of_an_earlier_flashsale_in_clock_ticks_still_recognises_its_process(tmp_path: Path) -> None:
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"pid": os.getpid(), "start_ticks": ticks, "command": "python"}))
    record = PidRecord.load(path)
    assert record is not None and procs.is_alive(record)


def test_a_record_still_recognises_its_process_after_the_wall_clock_is_set_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = PidRecord(os.getpid(), procs.started_at(os.getpid()) or 0.0, "python")
    # A clock set 6 s forward moves the boot's wall-clock time (psutil reads it again each time) and
    # every process's creation with it, as NTP stepping the clock of a running machine does.
    stepped = psutil.boot_time() + 6.0
    monkeypatch.setattr(psutil, "boot_time", lambda: stepped)
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: stepped)
    assert abs(psutil.Process(os.getpid()).create_time() - (stepped + record.started)) < 0.05
    assert procs.is_alive(record)


def test_a_record_of_an_earlier_flashsale_in_wall_clock_seconds_still_recognises_its_process(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"pid": os.getpid(), "started": psutil.Process().create_time(), "command": "python"}))
    record = PidRecord.load(path)
    assert record is not None and procs.is_alive(record)


def test_listening_addresses_finds_a_socket_this_process_listens_on() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert f"127.0.0.1:{port}" in procs.listening_addresses(os.getpid())
    assert f"127.0.0.1:{port}" not in procs.listening_addresses(os.getpid())


def test_listening_addresses_shows_ipv6_in_brackets() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert f"[::1]:{port}" in procs.listening_addresses(os.getpid())


def test_terminate_all_lets_processes_stop_side_by_side(tmp_path: Path) -> None:
    """Each process, on SIGTERM, waits for the other to have had its SIGTERM too before it exits: only
    signals sent to both at once let both stop by themselves within their grace (else one is SIGKILLed)."""
    script = (
        'trap \'touch "$1.term"; while [ ! -e "$2.term" ]; do sleep 0.05; done; touch "$1.done"; exit 0\' TERM; '
        'touch "$1.ready"; while :; do sleep 0.05; done'
    )
    a, b = tmp_path / "a", tmp_path / "b"
    records = [
        procs.spawn(["sh", "-c", script, "sh", str(me), str(other)], log_path=tmp_path / "log")
        for me, other in ((a, b), (b, a))
    ]
    # A SIGTERM before the trap is set would end the shell at once.
    assert poll_until(lambda: (tmp_path / "a.ready").exists() and (tmp_path / "b.ready").exists(), 10)
    procs.terminate_all([(record, 5.0) for record in records])
    assert not any(procs.is_alive(r) for r in records)
    assert (tmp_path / "a.done").exists() and (tmp_path / "b.done").exists()
