"""The consumer's MySQL write alone: `MySQLStore.apply_batch` on batches of new deductions of one SKU, on a
database of its own (dropped after), against the stack's MariaDB.

    python -m tests.benchmarks.apply_batch [--sizes 64,256,800] [--batches 40]

For each batch size it prints, three rounds on fresh tokens, the consumer's CPU per purchase spent in
`apply_batch` (this process's CPU time around the call: binding the rows, reading the answers, SQLAlchemy)
and the wall time per purchase (the server's work and the round trips too). Building the batches is not
counted. The CPU of a purchase in the pipeline is this plus the consumer's receipt, decoding, Redis
look-up and planning.
"""

from __future__ import annotations

import argparse
import time
import uuid

from flashsale.adapters.mysql.store import MySQLStore
from flashsale.models import Deduction
from flashsale.ops.setup import set_stock
from flashsale.records import Incoming
from tests.benchmarks.wrk_bench import own_database

ROUNDS = 3
#: Above any load number MySQL holds: the batches are read under the latest load.
LATEST_LOAD = 10**15


def _batch(sku: str, size: int) -> list[Incoming]:
    ts = int(time.time() * 1000)
    return [
        Incoming(Deduction(uuid.uuid4().hex, sku, f"u{i}", 1, ts_ms=ts), message_id=uuid.uuid4().hex, topic="bench")
        for i in range(size)
    ]


def measure(store: MySQLStore, sku: str, size: int, batches: int) -> tuple[float, float]:
    """CPU and wall µs per purchase over `batches` batches of `size` new deductions."""
    cpu = wall = 0.0
    for _ in range(batches):
        items = _batch(sku, size)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        store.apply_batch(items, loads={sku: LATEST_LOAD})
        cpu += time.process_time() - cpu_start
        wall += time.perf_counter() - wall_start
    purchases = size * batches
    return 1e6 * cpu / purchases, 1e6 * wall / purchases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,800", help="comma-separated purchases per batch")
    parser.add_argument("--batches", type=int, default=40, help="batches per round")
    args = parser.parse_args()
    with own_database("apply") as settings:
        sku = f"apply-{uuid.uuid4().hex[:6]}"
        set_stock(settings, sku, 10**9)
        store = MySQLStore(settings.mysql_url)
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                for _ in range(ROUNDS):
                    cpu_us, wall_us = measure(store, sku, size, args.batches)
                    print(f"{size} a batch: CPU {cpu_us:.1f} µs a purchase, wall {wall_us:.1f} µs", flush=True)
        finally:
            store.close()


if __name__ == "__main__":
    main()
