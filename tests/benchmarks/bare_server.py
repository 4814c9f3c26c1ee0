"""The ceiling no purchase can beat on this box, for `make wrk`: flashsale's own HTTP server (granian,
embedded, on a uvloop loop, as the producer serves) with an application that reads each body and
answers a fixed JSON the size of a sold-out answer, doing nothing else.

    python -m tests.benchmarks.bare_server PORT     # until SIGTERM
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from typing import Any

import orjson
import uvloop

from flashsale import constants as c
from flashsale.service.http_server import HttpServer

ANSWER = orjson.dumps(
    {"status": "sold_out", "token": "wrk-0000000-0-000000", "remaining": 0, "message_id": None, "message": "sold out"}
)
HEADERS = [("content-type", "application/json")]


class BareApp:
    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        await proto()  # the body, read as the producer reads it
        proto.response_bytes(200, HEADERS, ANSWER)


def main() -> None:
    port = int(sys.argv[1])
    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, name="http-loop", daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = HttpServer(BareApp(), c.DEFAULT_HOST, port, loop)
    server.start()
    print(f"bare server on http://{c.DEFAULT_HOST}:{port}", flush=True)
    stop.wait()
    server.stop(5)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    main()
