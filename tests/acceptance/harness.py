"""Run the real `flashsale ... run` processes for a test, in the session's namespace (see bench/fleet.py).

Every child is watched: a child that exits without the test asking for it, stops with a non-zero code,
or logs a traceback from flashsale's own code fails the test, with each such child's log attached.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from flashsale.bench.fleet import Child, Fleet, free_port
from flashsale.config import Settings
from tests.conftest import session_env

__all__ = ["Child", "Pipeline", "free_port", "post"]

#: The head of a log line: time, level, process, logger name (see flashsale/logs.py).
_HEAD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ \S+ (?P<logger>[\w.\-]+): ")


def tracebacks(log: str) -> list[str]:
    """The log lines of flashsale's own loggers that carry a traceback."""
    found, head = [], ""
    for line in log.splitlines():
        if _HEAD.match(line):
            head = line
        elif line.startswith("Traceback (most recent call last)"):
            match = _HEAD.match(head)
            if match is None or match["logger"].startswith("flashsale"):
                found.append(head or line)
    return found


class Pipeline(Fleet):
    """Producer, consumer and checker of one test. The checker's grace is short so crash tests settle fast."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        super().__init__({**session_env(settings), "FLASHSALE_CHECK_GRACE_S": "3"}, logs)
        self.settings = settings
        self._doomed: set[int] = set()

    def doomed(self, child: Child) -> Child:
        """The test kills this child, or a failpoint does: its death is not a failure."""
        self._doomed.add(id(child))
        return child

    def start(self, role: str, *options: str, **env: str) -> Child:
        if role != "expirer":
            return super().start(role, *options, **env)
        # The CLI logs INFO only for the processes it lists as long-running, and the expirer is not among
        # them: without this its log would hold no line of what it expired, nor a traceback's header.
        log = self.logs / f"{role}-{len(self.children)}.log"
        child = Child(role, ["--log-level", "INFO", role, "run", *options], {**self.base_env, **env}, log)
        self.children.append(child)
        return child

    def producer(
        self,
        *options: str,
        port: int | None = None,
        failpoints: str = "",  # type: ignore[override]
        **env: str,
    ) -> tuple[Child, str]:
        child, url = super().producer(*options, port=port, FLASHSALE_FAILPOINTS=failpoints, **env)
        if failpoints:
            self.doomed(child)
        return child, url

    def consumer(
        self,
        *options: str,
        failpoints: str = "",
        metrics_port: int | None = None,
        **env: str,
    ) -> Child:
        child = super().consumer(*options, metrics_port=metrics_port, FLASHSALE_FAILPOINTS=failpoints, **env)
        if failpoints:
            self.doomed(child)
        return child

    def stop(self) -> None:
        """Stop every child gracefully, then fail if any of them misbehaved."""
        died = {id(c) for c in self.children if c.popen.poll() is not None and not c.stopping}
        super().stop()
        problems = []
        for child in self.children:
            if id(child) in self._doomed:
                continue
            own = [f"{child.role} logged a traceback: {line}" for line in tracebacks(child.text())]
            if id(child) in died:
                own.append(f"{child.role} exited on its own with code {child.popen.returncode}")
            elif child.popen.returncode != 0:
                own.append(f"{child.role} stopped with code {child.popen.returncode}")
            if own:
                problems += [*own, f"--- {child.log} ---\n{child.text()[-4000:]}"]
        assert not problems, "\n".join(problems)


def post(url: str, payload: dict[str, object], timeout_s: float = 10) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url + "/purchase",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
