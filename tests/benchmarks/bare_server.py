"""The ceiling no purchase can beat on this box, for `make wrk`: flashsale's own HTTP server (granian,
embedded, on a uvloop loop, as the producer serves) with an application that reads each body and
answers a fixed JSON the size of a sold-out answer, doing nothing else.

    python -m tests.benchmarks.bare_server PORT [--validating]     # until SIGTERM

With --validating it serves the producer's own HTTP app (service/http_app.py) over a purchaser that
answers every purchase `sold_out` at once: the body parsed and validated into a PurchaseRequest, the
admission count, the purchase timed and counted, and the answer's JSON, as every purchase pays them,
with no group and no Redis. The ceiling of any sold-out answer that still reads its request in Python.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
import time
from typing import Any

import orjson
import uvloop

from flashsale import constants as c
from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.records import StockView
from flashsale.service.http_app import HttpApp
from flashsale.service.http_server import HttpServer
from flashsale.service.metrics import Metrics

ANSWER = orjson.dumps(
    {"status": "sold_out", "token": "wrk-0000000-0-000000", "remaining": 0, "message_id": None, "message": "sold out"}
)
HEADERS = [("content-type", "application/json")]


class BareApp:
    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        await proto()  # the body, read as the producer reads it
        proto.response_bytes(200, HEADERS, ANSWER)


class SoldOut:
    """A Purchaser that answers every purchase `sold_out` at once, timed and counted as the producer's."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def submit(self, request: PurchaseRequest) -> PurchaseResult:
        started = time.perf_counter()
        sold_out = f"{request.sku} is sold out"
        result = PurchaseResult(PurchaseStatus.SOLD_OUT, request.token, remaining=0, message=sold_out)
        self._metrics.purchase(result, time.perf_counter() - started)
        return result


class NoStock:
    """A StockReader for the routes besides /purchase, which the load never asks."""

    async def view(self, sku: str) -> StockView:
        raise NotImplementedError

    async def ping(self) -> None:
        return None


def validating_app() -> HttpApp:
    metrics = Metrics()
    return HttpApp(SoldOut(metrics), NoStock(), metrics, max_in_flight=10_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--validating", action="store_true")
    args = parser.parse_args()
    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, name="http-loop", daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    app = validating_app() if args.validating else BareApp()
    server = HttpServer(app, c.DEFAULT_HOST, args.port, loop)
    server.start()
    print(f"bare server on http://{c.DEFAULT_HOST}:{args.port}", flush=True)
    stop.wait()
    server.stop(5)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    main()
