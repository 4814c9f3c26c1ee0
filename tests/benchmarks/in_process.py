"""The Python of a purchase without HTTP: the producer's `HttpApp.purchase` on the engine's event loop (uvloop,
as the producer runs it), against the stack's Redis and broker, with many buyers at once.

    python -m tests.benchmarks.in_process [--mode sold_out|live] [--purchases 100000] [--buyers 200]

It prints the purchases answered per second and the CPU the whole process spent per purchase (its
buyers' loop included), three rounds on fresh tokens. No HTTP server, no wrk: what is left is the
Python of validation, grouping, the Redis reads and scripts, the broker calls and the answer's JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import orjson
import uvloop

from flashsale.ops.setup import init, set_stock
from flashsale.service.engine import PurchaseEngine
from flashsale.service.http_app import HttpApp
from flashsale.service.metrics import Metrics
from tests.conftest import isolated_settings

ROUNDS = 3


def _bodies(sku: str, purchases: int) -> list[bytes]:
    return [
        orjson.dumps({"sku": sku, "user_id": f"u{i % 5000}", "qty": 1, "token": uuid.uuid4().hex})
        for i in range(purchases)
    ]


async def _crowd(app: HttpApp, bodies: list[bytes], buyers: int) -> None:
    async def buyer(first: int) -> None:
        for body in bodies[first::buyers]:
            await app.purchase(body)

    await asyncio.gather(*(buyer(b) for b in range(buyers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("sold_out", "live"), default="sold_out")
    parser.add_argument("--purchases", type=int, default=100_000)
    parser.add_argument("--buyers", type=int, default=200)
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # before the engine makes its loop
    settings = isolated_settings("i")
    init(settings)
    sku = f"inproc-{uuid.uuid4().hex[:6]}"
    set_stock(settings, sku, 0 if args.mode == "sold_out" else 10**9)
    metrics = Metrics()
    engine = PurchaseEngine(settings, metrics)
    app = HttpApp(engine.service, engine.stock, metrics, max_in_flight=10 * args.buyers)
    try:
        for _ in range(ROUNDS):
            bodies = _bodies(sku, args.purchases)
            cpu, wall = time.process_time(), time.perf_counter()
            engine.run(_crowd(app, bodies, args.buyers))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            per = 1e6 * cpu / args.purchases
            print(f"{args.mode}: {args.purchases / wall:,.0f}/s, {per:.1f} µs of CPU per purchase")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
