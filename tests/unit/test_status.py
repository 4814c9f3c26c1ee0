from __future__ import annotations

import json
import urllib.error
import urllib.request

from flashsale.bench.fleet import free_port
from flashsale.errors import ServiceUnavailable
from flashsale.service.metrics import Metrics
from flashsale.service.status import Readiness, StatusServer


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_status_server_answers_liveness_readiness_and_metrics() -> None:
    states: dict[str, str | None] = {"mysql": None}

    def mysql() -> str | None:
        if states["mysql"]:
            raise ServiceUnavailable("MySQL", "127.0.0.1:3306", states["mysql"])
        return None

    readiness = Readiness({"mysql": mysql, "broker": lambda: None})
    port = free_port()
    server = StatusServer(Metrics(), readiness, "127.0.0.1", port).start()
    try:
        assert _get(port, "/healthz") == (200, '{"status": "ok"}')
        status, body = _get(port, "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready", "mysql": "ok", "broker": "ok"})
        status, text = _get(port, "/metrics")
        assert status == 200 and "flashsale_build_info" in text and "process_cpu_seconds_total" in text
        assert _get(port, "/nope")[0] == 404
    finally:
        server.stop()


def test_readiness_names_what_is_down_and_asks_at_most_once_a_second() -> None:
    asked: list[int] = []

    def broker() -> str | None:
        asked.append(1)
        return "telemetry stream down"

    readiness = Readiness({"broker": broker, "redis": lambda: None})
    status, body = readiness.answer()
    assert (status, body) == (503, {"status": "unavailable", "broker": "telemetry stream down", "redis": "ok"})
    for _ in range(20):
        readiness.answer()
    assert len(asked) == 1


def test_a_probe_that_raises_anything_makes_the_process_unready_not_dead() -> None:
    def broken() -> str | None:
        raise ZeroDivisionError("boom")

    status, body = Readiness({"redis": broken}).answer()
    assert status == 503 and body["redis"] == "ZeroDivisionError: boom"
