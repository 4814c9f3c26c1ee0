"""The consumer's Python before MySQL, with no server at all: a batch's bodies decoded, the tokens to look up
gathered, their log entries parsed from the bytes Redis would return, and the plan made.

    python -m tests.benchmarks.consumer_plan [--messages 14] [--purchases 54] [--rounds 3]

It prints the CPU per purchase of each round. The defaults are the batches a live run under wrk makes
(about 14 messages of about 54 purchases each: docs/performance.md, run K).
"""

from __future__ import annotations

import argparse
import time
import uuid

import orjson

from flashsale.adapters.redis.codec import parse_entries
from flashsale.models import Delivery, PurchaseRequest
from flashsale.pipeline import accepted, local_tx
from flashsale.pipeline.consumer import decode
from flashsale.records import LookedUp

SKU = "bench-sku"
REPEATS = 200


def batch(messages: int, purchases: int) -> tuple[list[Delivery], dict[str, bytes]]:
    """Deliveries of `messages` messages of `purchases` purchases each, and the log entries their pre-deducts
    wrote, by token (as prededuct.lua writes them)."""
    deliveries, log = [], {}
    for _ in range(messages):
        gid = uuid.uuid4().hex
        requests = [PurchaseRequest(SKU, f"u{i}", 1, uuid.uuid4().hex) for i in range(purchases)]
        body = local_tx.message(SKU, requests, [SKU] * purchases, gid).encode()
        deliveries.append(Delivery(uuid.uuid4().hex, "deductions", None, body, None, 1))
        for r in requests:
            entry = {"state": "deducted", "sku": SKU, "user": r.user_id, "qty": 1, "from": 9, "to": 8, "ts": 1}
            log[r.token] = orjson.dumps({**entry, "msg": gid})
    return deliveries, log


def plan_once(deliveries: list[Delivery], log: dict[str, bytes]) -> accepted.Plan:
    decoded, _ = decode(deliveries)
    found = {
        shard: LookedUp(parse_entries(tokens, [log[t] for t in tokens]), dict.fromkeys(gids), 0, None)
        for shard, (tokens, gids) in accepted.wanted(decoded).items()
    }
    return accepted.plan(decoded, found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=14)
    parser.add_argument("--purchases", type=int, default=54)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    deliveries, log = batch(args.messages, args.purchases)
    if len(plan_once(deliveries, log).apply) != args.messages * args.purchases:
        raise SystemExit("the plan did not apply every purchase: the benchmark's batch is wrong")
    for _ in range(args.rounds):
        started = time.process_time()
        for _ in range(REPEATS):
            plan_once(deliveries, log)
        spent = time.process_time() - started
        print(f"CPU {1e6 * spent / (REPEATS * len(log)):.2f} µs a purchase", flush=True)


if __name__ == "__main__":
    main()
