"""What a process tells its supervisor: /metrics, /healthz (alive) and /readyz (its servers answer).

The consumer and the checker serve these on their --metrics-port, from a thread; the producer serves the
same paths on its HTTP port (service/http_app.py). Readiness is asked of the servers at most once a
second, whatever the polling rate, so a supervisor cannot turn into load.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flashsale.errors import FlashSaleError
from flashsale.service.metrics import Metrics

logger = logging.getLogger(__name__)

#: A dependency's check: returns None when it answers, raises FlashSaleError (or returns a reason) otherwise.
Probe = Callable[[], str | None]
#: Seconds a readiness answer is reused.
READY_TTL_S = 1.0


class Readiness:
    """Each dependency's state, asked at most once per READY_TTL_S; thread-safe."""

    def __init__(self, probes: Mapping[str, Probe]) -> None:
        self._probes = dict(probes)
        self._lock = threading.Lock()
        self._at = 0.0
        self._last: dict[str, str | None] = {}

    def check(self) -> dict[str, str | None]:
        """Dependency -> None when it answers, or why it does not."""
        with self._lock:
            if time.monotonic() - self._at >= READY_TTL_S:
                self._last = {name: _ask(probe) for name, probe in self._probes.items()}
                self._at = time.monotonic()
            return dict(self._last)

    def answer(self) -> tuple[int, dict[str, object]]:
        states = self.check()
        ready = all(v is None for v in states.values())
        body: dict[str, object] = {"status": "ready" if ready else "unavailable"}
        body.update({k: v or "ok" for k, v in states.items()})
        return (200 if ready else 503), body


def _ask(probe: Probe) -> str | None:
    try:
        return probe()
    except FlashSaleError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a probe must answer, whatever breaks inside it
        return f"{type(exc).__name__}: {exc}"


class StatusServer:
    """/metrics, /healthz and /readyz on host:port, served from a daemon thread."""

    def __init__(self, metrics: Metrics, readiness: Readiness, host: str, port: int) -> None:
        handler = _handler(metrics, readiness)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-http", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        host, port = self._server.server_address[:2]
        logger.info("status on http://%s:%d (/metrics, /healthz, /readyz)", host, port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: Metrics, readiness: Readiness) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._json(200, {"status": "ok"})
            elif path == "/readyz":
                self._json(*readiness.answer())
            else:
                self._json(404, {"error": f"no such path {path}; try /metrics, /healthz or /readyz"})

        def _json(self, status: int, body: dict[str, object]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Requests are not logged: a supervisor polls often."""

    return Handler
