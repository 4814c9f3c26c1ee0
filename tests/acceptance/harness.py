"""Run the real `flashsale ... run` processes for a test: start, wait until ready, kill -9 or SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flashsale.config import Settings
from tests.conftest import test_environment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Proc:
    def __init__(self, role: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.role = role
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen([sys.executable, "-m", "flashsale", *args], env=env, stdout=self._out,
                                      stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, ready: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.role} exited ({self.popen.returncode}) before {what}:\n{self.text()[-3000:]}")
            if ready():
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.role} not {what} after {timeout_s} s:\n{self.text()[-3000:]}")

    def wait_log(self, marker: str, timeout_s: float = 60) -> None:
        self.wait_for(lambda: marker in self.text(), f"logging {marker!r}", timeout_s)

    def kill(self) -> None:
        """kill -9: no clean-up at all."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)

    def terminate(self, timeout_s: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        finally:
            self._out.close()

    def wait_exit(self, timeout_s: float) -> int:
        return self.popen.wait(timeout_s)


class Pipeline:
    """Producer, consumer and checker processes of one test, all in the session's namespace."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        self.settings = settings
        self.logs = logs
        self.procs: list[Proc] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = test_environment()
        env.update({
            "FLASHSALE_NAMESPACE": self.settings.namespace,
            "FLASHSALE_MYSQL_URL": self.settings.mysql_url,
            "FLASHSALE_CHECK_GRACE_S": "3",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def _start(self, role: str, *, failpoints: str = "", options: tuple[str, ...] = (), **extra: str) -> Proc:
        env = self.env(FLASHSALE_FAILPOINTS=failpoints, **extra)
        log = self.logs / f"{role}-{len(self.procs)}.log"
        proc = Proc(role, [role, "run", *options], env, log)
        self.procs.append(proc)
        return proc

    def producer(self, *, failpoints: str = "", **extra: str) -> tuple[Proc, str]:
        port = free_port()
        proc = self._start("producer", failpoints=failpoints, FLASHSALE_HTTP_PORT=str(port), **extra)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        proc.wait_for(healthy, "answering /healthz")
        return proc, url

    def consumer(self, *, failpoints: str = "", metrics_port: int | None = None, **extra: str) -> Proc:
        options = ("--metrics-port", str(metrics_port)) if metrics_port else ()
        proc = self._start("consumer", failpoints=failpoints, options=options, **extra)
        proc.wait_log("consumer of group")
        return proc

    def checker(self, **extra: str) -> Proc:
        proc = self._start("checker", **extra)
        proc.wait_log("checker answering")
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.terminate()
        for proc in self.procs:
            proc._out.close()


def post(url: str, payload: dict[str, object], timeout_s: float = 10) -> tuple[int, dict[str, object]]:
    import json

    request = urllib.request.Request(url + "/purchase", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
