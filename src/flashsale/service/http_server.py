"""granian, embedded: serves the producer's RSGI app on the purchase engine's own event loop.

granian's embedded server runs on whatever asyncio loop awaits it; awaiting it on the engine's loop
keeps every purchase, HTTP included, on the one loop where the broker client and Redis live. granian
is imported here only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from granian.constants import Interfaces
from granian.log import LogLevels
from granian.server.embed import Server

from flashsale.errors import InvalidInput
from flashsale.net import port_open
from flashsale.polling import poll_until

logger = logging.getLogger(__name__)

#: Seconds granian may take to bind and answer.
START_TIMEOUT_S = 10.0


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.port = port
        self._loop = loop
        # Its own log is for its errors only: the producer logs what matters of a request.
        self._server = Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.RSGI,
            runtime_threads=2,
            backlog=1024,
            log_level=LogLevels.error,
        )
        self._serving: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        """Listen; raises InvalidInput when the address cannot be bound."""
        serving = self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(), self._loop)
        probe = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        poll_until(lambda: serving.done() or port_open(probe, self.port), START_TIMEOUT_S, interval_s=0.02)
        if serving.done():
            error = serving.exception()
            raise InvalidInput(
                f"cannot listen on {self.host}:{self.port}: {getattr(error, 'strerror', None) or error}",
                hint="choose another port with --port or FLASHSALE_HTTP_PORT",
            ) from error

    def stop(self, timeout_s: float) -> None:
        """Stop accepting and close the connections (purchases in flight go on: see PurchaseEngine.drain)."""
        if self._serving is None:
            return
        self._loop.call_soon_threadsafe(self._server.stop)
        try:
            self._serving.result(timeout_s)
        except concurrent.futures.TimeoutError:
            logger.warning("the HTTP server did not stop within %.0f s", timeout_s)
