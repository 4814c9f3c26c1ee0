"""What one receive call costs, apart from the messages it brings: the same messages received in pages of
32 and in pages of one, against the stack's broker, on topics of their own.

    python -m tests.benchmarks.receive_calls [--messages 1500] [--rounds 2]

Each round sends MESSAGES normal messages of 3 KB (about a group's body) to the replay topic, then
receives them with the consumer's client, acking each, in pages of 32 and then in pages of one. It prints
the CPU per message of this process (the client) and of the broker's JVM: the difference between the
two page sizes, over the 31 receive calls more per 32 messages, is the cost of a call (LINGER_S in
adapters/rocketmq/consumer.py).
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from typing import Any

from rocketmq import FilterExpression

from flashsale.adapters.rocketmq import internals
from flashsale.adapters.rocketmq.base import shutdown_quietly, start_client
from flashsale.adapters.rocketmq.consumer import RECEIVE_MAX
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.bench.cpu import CpuMeter
from flashsale.models import Resolution
from tests.benchmarks.wrk_bench import own_database, server_pids

BODY = b"x" * 3000


def receive_all(consumer: Any, messages: int, page: int) -> int:
    """Receive and ack `messages` messages in pages of at most `page`; returns the receive calls made."""
    got = calls = 0
    while got < messages:
        received = consumer.receive(page, 30)
        calls += 1
        for message in received:
            consumer.ack(message)
        got += len(received)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    broker = server_pids().get("broker")
    if broker is None:
        raise SystemExit("the stack's broker is not running: flashsale stack up")
    with own_database("receive") as settings:
        topic, endpoint = settings.replay_topic, settings.rocketmq_endpoint
        producer = RocketMQProducer(endpoint, [topic], lambda delivery: Resolution.UNKNOWN).start()
        group = f"{settings.namespace}-bench-{uuid.uuid4().hex[:6]}"
        consumer = internals.new_simple_consumer(endpoint, 3.0, group, {topic: FilterExpression()}, 2)
        start_client(consumer, endpoint, "the bench's consumer", [topic])
        try:
            for _ in range(args.rounds):
                for page in (RECEIVE_MAX, 1):
                    for i in range(args.messages):
                        producer.send(topic, f"k{i}", BODY, "bench")
                    time.sleep(1)  # every message stored and dispatched before the clock starts
                    meter = CpuMeter({"client": os.getpid(), "broker": broker})
                    calls = receive_all(consumer, args.messages, page)
                    used = meter.used()
                    print(
                        f"pages of {page}: {calls} receive calls for {args.messages} messages; CPU per message: "
                        f"this process {1e3 * used['client'] / args.messages:.3f} ms, "
                        f"the broker {1e3 * used['broker'] / args.messages:.3f} ms",
                        flush=True,
                    )
        finally:
            shutdown_quietly(consumer)
            producer.shutdown()


if __name__ == "__main__":
    main()
