"""Processes the stack starts: spawn detached, record, recognise again, stop, and see what they listen on.

A PID alone can be reused by an unrelated process after a reboot or a crash, so a record also keeps the
process's start time; a PID whose start time differs is not ours. The start time is counted from the
machine's boot, as the kernel keeps it: a wall clock set forward or back (NTP, a resumed VM) moves the
boot's wall-clock time and every process's with it, and would make the stack disown its own servers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from flashsale.polling import poll_until

#: Start times of one process, read twice, agree to far better than this (seconds).
_SAME_START_S = 0.05


@dataclass(frozen=True)
class PidRecord:
    pid: int
    started: float  # seconds from the machine's boot to the process's creation
    command: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "since_boot": self.started, "command": self.command}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PidRecord | None:
        try:
            data = json.loads(path.read_text())
            if "since_boot" in data:
                started = float(data["since_boot"])
            elif "start_ticks" in data:  # written by an earlier flashsale: clock ticks since boot
                started = int(data["start_ticks"]) / os.sysconf("SC_CLK_TCK")
            else:  # written by an earlier flashsale: seconds since the epoch
                started = float(data["started"]) - psutil.boot_time()
            return cls(pid=int(data["pid"]), started=started, command=str(data["command"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


#: Children spawned by this process: reaped when seen dead, so no zombie outlives a check.
_CHILDREN: set[int] = set()


def started_at(pid: int) -> float | None:
    """Seconds from boot to the process's creation (psutil adds the boot's wall-clock time, read now)."""
    try:
        boot = psutil.boot_time()
        return float(psutil.Process(pid).create_time()) - boot
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(record: PidRecord) -> bool:
    if record.pid in _CHILDREN:
        try:
            reaped, _ = os.waitpid(record.pid, os.WNOHANG)
        except ChildProcessError:
            reaped = record.pid
        if reaped:
            _CHILDREN.discard(record.pid)
            return False
    try:
        started = started_at(record.pid)
        if started is None or abs(started - record.started) > _SAME_START_S:
            return False
        return psutil.Process(record.pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


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
    started = started_at(pid)
    if started is None:
        raise OSError(f"{command[0]} exited immediately; see {log_path}")
    return PidRecord(pid=pid, started=started, command=command[0])


def terminate(record: PidRecord, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL. Only signals the process if it is still ours."""
    terminate_all([(record, grace_s)])


def terminate_all(records: list[tuple[PidRecord, float]]) -> None:
    """SIGTERM each process at once, then wait for each up to its own grace and SIGKILL it past that: their
    graceful stops (a JVM's takes 10 s and more) run side by side. Only signals processes still ours."""
    started = time.monotonic()
    for record, _ in records:
        if is_alive(record):
            try:
                os.kill(record.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for record, grace_s in records:
        left_s = max(0.0, started + grace_s - time.monotonic())
        if poll_until(_gone(record), left_s, interval_s=0.1):
            continue
        try:
            os.kill(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        poll_until(_gone(record), 10, interval_s=0.1)


def _gone(record: PidRecord) -> Callable[[], bool]:
    return lambda: not is_alive(record)


def listening_addresses(pid: int) -> list[str]:
    """TCP addresses (host:port) the process listens on (what `ss -ltnp` shows)."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    found = set()
    for conn in connections:
        if conn.status != psutil.CONN_LISTEN:
            continue
        host, port = conn.laddr.ip, conn.laddr.port
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        found.add(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return sorted(found)
