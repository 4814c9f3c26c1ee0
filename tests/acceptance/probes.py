"""What a test reads from a running process over HTTP: /readyz and /metrics, as a supervisor reads them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


def readiness(url: str) -> tuple[int, dict[str, str]]:
    """The status and body of `url`/readyz."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_readiness(url: str, status: int, timeout_s: float) -> tuple[int, dict[str, str]]:
    """`url`/readyz once it answers `status` (or its last answer after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = readiness(url)
        if answer[0] == status or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    """The sum of every series of `name` on `url`/metrics (0 when it has none)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )
