"""Run producer, consumer and checker as real child processes (for `demo`, `bench` and the tests)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

from flashsale import constants as c
from flashsale.errors import FlashSaleError
from flashsale.polling import poll_until

#: Where ports for child processes are picked: above the ports a stack is given by default or in the
#: tests (all under 21,000) and below the kernel's ephemeral range. A port the kernel handed out
#: (binding port 0) is free only when checked: any outgoing connection on the machine may take it before
#: the child binds it, and the child then exits with "Address already in use". Outgoing connections
#: never take a port below that range.
PORT_RANGE = (24_000, 32_768)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_PICK = random.SystemRandom()  # not the `random` module's state, which a test may have seeded


def free_port() -> int:
    """A port nothing listens on now, out of the ephemeral range (see PORT_RANGE)."""
    top = min(PORT_RANGE[1], ephemeral_start())
    for _ in range(200):
        port = _PICK.randrange(PORT_RANGE[0], top) if top > PORT_RANGE[0] else 0
        with socket.socket() as sock:
            try:
                sock.bind((c.DEFAULT_HOST, port))
            except OSError:  # listened on, or closed a moment ago (TIME_WAIT): another one
                continue
            return int(sock.getsockname()[1])
    raise FlashSaleError(f"no free port on {c.DEFAULT_HOST} between {PORT_RANGE[0]} and {top} in 200 tries")


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default when it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def answers(url: str, path: str) -> bool:
    """Does `url` answer `path` (/healthz: alive, /readyz: its servers answer) with 200?"""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=2) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def healthy(url: str) -> bool:
    return answers(url, "/healthz")


def ready(url: str) -> bool:
    return answers(url, "/readyz")


class Child:
    def __init__(self, role: str, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.role = role
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "wb")
        self.stopping = False
        #: Where it serves /metrics, /healthz and /readyz.
        self.url = ""
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "flashsale", *args],
            env=dict(env),
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, ready: Callable[[], bool], what: str, timeout_s: float = 60, interval_s: float = 0.2) -> None:
        def check() -> bool:
            if self.popen.poll() is not None:
                raise FlashSaleError(
                    f"{self.role} exited ({self.popen.returncode}) before {what}; log {self.log}:\n"
                    f"{self.text()[-2000:]}"
                )
            return ready()

        if not poll_until(check, timeout_s, interval_s=interval_s):
            raise FlashSaleError(f"{self.role} not {what} after {timeout_s:.0f} s; log {self.log}")

    def wait_log(self, marker: str, timeout_s: float = 60) -> None:
        self.wait_for(lambda: marker in self.text(), f"logging {marker!r}", timeout_s)

    def ask_to_stop(self) -> None:
        """One SIGTERM (a second one would stop the process at once, unfinished)."""
        if self.popen.poll() is None and not self.stopping:
            self.stopping = True
            self.popen.send_signal(signal.SIGTERM)

    def terminate(self, timeout_s: float = 60) -> int | None:
        """SIGTERM, then wait for the graceful stop (SIGKILL after `timeout_s`)."""
        if self.popen.poll() is None:
            self.ask_to_stop()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._out.close()
        return self.popen.returncode

    def wait_exit(self, timeout_s: float) -> int:
        return self.popen.wait(timeout_s)


class Fleet:
    """The three processes of one namespace, with their logs in `logs`."""

    def __init__(self, env: Mapping[str, str], logs: Path) -> None:
        self.base_env = dict(env)
        self.base_env.setdefault("PYTHONUNBUFFERED", "1")
        self.logs = logs
        self.children: list[Child] = []
        #: Launched, and not known to be ready yet.
        self._starting: list[Child] = []

    def start(self, role: str, *options: str, **env: str) -> Child:
        merged = {**self.base_env, **env}
        child = Child(role, [role, "run", *options], merged, self.logs / f"{role}-{len(self.children)}.log")
        self.children.append(child)
        return child

    def producer(self, *options: str, port: int | None = None, **env: str) -> tuple[Child, str]:
        """A producer, ready to take purchases, once every process launched before it is ready too."""
        port = port or free_port()
        child = self.start("producer", *options, FLASHSALE_HTTP_PORT=str(port), **env)
        child.url = f"http://{c.DEFAULT_HOST}:{port}"
        self.ready(child, *self._starting)
        return child, child.url

    def baseline(self, strategy: str, *, workers: int) -> Child:
        """A plain-MySQL purchase service (`flashsale baseline run`), ready to take purchases."""
        port = free_port()
        child = self.start("baseline", "--strategy", strategy, "--workers", str(workers), FLASHSALE_HTTP_PORT=str(port))
        child.url = f"http://{c.DEFAULT_HOST}:{port}"
        self.ready(child)
        return child

    def consumer(self, *options: str, metrics_port: int | None = None, **env: str) -> Child:
        return self.ready(self.launch("consumer", *options, metrics_port=metrics_port, **env))

    def checker(self, *options: str, metrics_port: int | None = None, **env: str) -> Child:
        return self.ready(self.launch("checker", *options, metrics_port=metrics_port, **env))

    def expirer(self, *options: str, metrics_port: int | None = None, **env: str) -> Child:
        return self.ready(self.launch("expirer", *options, metrics_port=metrics_port, **env))

    def launch(self, role: str, *options: str, metrics_port: int | None = None, **env: str) -> Child:
        """Start a consumer, checker or expirer with its status port, without waiting for it: processes
        launched together start side by side. The next producer, `ready` or `stop` waits for it."""
        port = metrics_port or free_port()
        child = self.start(role, *options, "--metrics-port", str(port), **env)
        child.url = f"http://{c.DEFAULT_HOST}:{port}"
        self._starting.append(child)
        return child

    def ready(self, first: Child, *others: Child) -> Child:
        """Wait until each child says it is ready (/readyz); returns the first."""
        for child in (first, *others):
            # Asked often: a process is ready within a second or two, and everything after waits for it.
            child.wait_for(partial(ready, child.url), "ready (/readyz)", interval_s=0.05)
            if child in self._starting:
                self._starting.remove(child)
        return first

    def ready_all(self) -> None:
        """Wait for every process launched and not known to be ready yet."""
        if self._starting:
            self.ready(*self._starting)

    def start_all(self) -> str:
        """Checker, consumer and producer, side by side; returns the producer's URL once all three are ready."""
        self.launch("checker")
        self.launch("consumer")
        return self.producer()[1]

    def stop(self) -> None:
        """SIGTERM every child (all at once), then wait for each to finish its work."""
        # One still starting may not handle SIGTERM yet: its stop would look like a crash.
        for child in list(self._starting):
            try:
                self.ready(child)
            except FlashSaleError:  # it died, or never got ready: its exit code tells
                pass
        for child in self.children:
            child.ask_to_stop()
        for child in self.children:
            child.terminate()


def environment(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env
