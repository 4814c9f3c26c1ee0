"""Processes the stack starts: spawn detached, record, recognise again, stop, and see what they listen on.

A PID alone can be reused by an unrelated process after a reboot or a crash, so a record also keeps the
process start time (field 22 of /proc/<pid>/stat); a PID whose start time differs is not ours.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int
    command: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PidRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]), command=str(data["command"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


#: Children spawned by this process: reaped when seen dead, so no zombie outlives a check.
_CHILDREN: set[int] = set()


def start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def is_alive(record: PidRecord) -> bool:
    if record.pid in _CHILDREN:
        try:
            reaped, _ = os.waitpid(record.pid, os.WNOHANG)
        except ChildProcessError:
            reaped = record.pid
        if reaped:
            _CHILDREN.discard(record.pid)
            return False
    ticks = start_ticks(record.pid)
    if ticks is None or ticks != record.start_ticks:
        return False
    try:
        state = Path(f"/proc/{record.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def spawn(command: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None) -> PidRecord:
    """Start `command` in its own session (it outlives this process), stdout and stderr to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    stdin = os.open(os.devnull, os.O_RDONLY)
    try:
        pid = os.posix_spawnp(
            command[0],
            list(command),
            dict(os.environ if env is None else env),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin, 0),
                (os.POSIX_SPAWN_DUP2, log, 1),
                (os.POSIX_SPAWN_DUP2, log, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(log)
        os.close(stdin)
    _CHILDREN.add(pid)
    ticks = start_ticks(pid)
    if ticks is None:
        raise OSError(f"{command[0]} exited immediately; see {log_path}")
    return PidRecord(pid=pid, start_ticks=ticks, command=command[0])


def terminate(record: PidRecord, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL. Only signals the process if it is still ours."""
    if not is_alive(record):
        return
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait_until(lambda: not is_alive(record), grace_s, interval_s=0.1):
        return
    try:
        os.kill(record.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_until(lambda: not is_alive(record), 10, interval_s=0.1)


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        return sock.connect_ex((host, port)) == 0


def listening_addresses(pid: int) -> list[str]:
    """TCP addresses (host:port) the process listens on, read from /proc (what `ss -ltnp` shows)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A = LISTEN
                continue
            hex_addr, hex_port = parts[1].split(":")
            found.append(f"{_decode_addr(hex_addr, width)}:{int(hex_port, 16)}")
    return sorted(set(found))


def _decode_addr(hex_addr: str, width: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if width == 8:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc stores IPv6 as four little-endian 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    text = socket.inet_ntop(socket.AF_INET6, words)
    if text.startswith("::ffff:") and "." in text:
        return text[7:]
    return f"[{text}]"


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host.startswith("127.") or host == "[::1]"
