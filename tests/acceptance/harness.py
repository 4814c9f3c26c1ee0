"""Run the real `flashsale ... run` processes for a test, in the session's namespace (see ops/fleet.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from flashsale.config import Settings
from flashsale.ops.fleet import Child, Fleet, free_port
from tests.conftest import clean_environment

__all__ = ["Child", "Pipeline", "free_port", "post"]


class Pipeline(Fleet):
    """Producer, consumer and checker of one test. The checker's grace is short so crash tests settle fast."""

    def __init__(self, settings: Settings, logs: Path) -> None:
        env = clean_environment()
        env.update(
            {
                "FLASHSALE_NAMESPACE": settings.namespace,
                "FLASHSALE_MYSQL_URL": settings.mysql_url,
                "FLASHSALE_CHECK_GRACE_S": "3",
            }
        )
        super().__init__(env, logs)
        self.settings = settings

    def producer(
        self,
        *options: str,
        port: int | None = None,
        failpoints: str = "",  # type: ignore[override]
        **env: str,
    ) -> tuple[Child, str]:
        return super().producer(*options, port=port, FLASHSALE_FAILPOINTS=failpoints, **env)

    def consumer(
        self,
        *options: str,
        failpoints: str = "",
        metrics_port: int | None = None,  # type: ignore[override]
        **env: str,
    ) -> Child:
        extra = ("--metrics-port", str(metrics_port)) if metrics_port else ()
        return super().consumer(*options, *extra, FLASHSALE_FAILPOINTS=failpoints, **env)


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
