"""When a deadline fires: which timers are acked, and when the others come back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from flashsale.errors import InvalidInput, ServiceUnavailable
from flashsale.models import Deadline, Delivery
from flashsale.pipeline.expiry import Expirer
from flashsale.pipeline.orders import OrderAnswer
from flashsale.records import Decision, LogEntry


def _timer(due_ms: int, *tokens: str) -> Delivery:
    return Delivery("timer-1", "ns-deadlines", tokens[0], Deadline("sku", tokens, due_ms).encode(), due_ms, 1)


def _expirer(answers: dict[str, Decision | Exception]) -> tuple[Expirer, list[str]]:
    asked: list[str] = []

    async def expire(sku: str, token: str) -> OrderAnswer:
        asked.append(token)
        answer = answers[token]
        if isinstance(answer, Exception):
            raise answer
        entry = LogEntry(token, "returned", sku, "u1", 1, 0, "m", order="expired", due_ms=1000)
        return OrderAnswer(answer, entry)

    return Expirer(receiver=None, expire=expire, run=asyncio.run), asked  # type: ignore[arg-type]


def test_a_timer_whose_orders_are_all_decided_is_acked_whatever_each_answer() -> None:
    expirer, asked = _expirer({"a": Decision.EXPIRED, "b": Decision.ALREADY_PAID, "c": Decision.NO_ORDER})
    assert expirer.fire(_timer(1000, "a", "b", "c")) is None
    assert asked == ["a", "b", "c"]


def test_a_timer_fired_before_its_deadline_comes_back_when_it_is_due() -> None:
    expirer, _ = _expirer({"a": Decision.NOT_DUE})
    due_ms = int(time.time() * 1000) + 4_500
    assert expirer.fire(_timer(due_ms, "a")) == 5


def test_a_timer_that_could_not_be_decided_comes_back_a_second_later() -> None:
    expirer, _ = _expirer({"a": ServiceUnavailable("Redis", "x", "down"), "b": Decision.EXPIRED})
    assert expirer.fire(_timer(1000, "a", "b")) == 1


def test_a_timer_met_by_an_outage_starts_no_other_order_and_comes_back_a_second_later() -> None:
    # Each expiry sends a half message first: with the broker down (or hanging), asking for each of a
    # timer's up to 1,024 orders would cost one timeout each, and a warning each, for nothing.
    down = ServiceUnavailable("RocketMQ", "ns-deductions", "connection refused")
    expirer, asked = _expirer({"a": down, "b": down, "c": down})
    assert expirer.fire(_timer(1000, "a", "b", "c")) == 1
    assert asked == ["a"]


def test_an_order_that_cannot_be_decided_for_good_does_not_hold_back_the_others_of_its_timer() -> None:
    expirer, asked = _expirer({"a": InvalidInput("token 'a' is malformed"), "b": Decision.EXPIRED})
    assert expirer.fire(_timer(1000, "a", "b")) == 1
    assert asked == ["a", "b"]


def test_an_order_is_reported_expired_once_and_late_from_its_own_deadline() -> None:
    # A timer delivered again hears `expired` again (the same decision id), with no message of its own.
    observed: list[float] = []
    answers = iter(
        [OrderAnswer(Decision.EXPIRED, _expired(1_250), "m1"), OrderAnswer(Decision.EXPIRED, _expired(1_250))]
    )

    async def expire(sku: str, token: str) -> OrderAnswer:
        return next(answers)

    expirer = Expirer(None, expire, asyncio.run, observe_lateness=observed.append)  # type: ignore[arg-type]
    assert expirer.fire(_timer(1_900, "a")) is None
    assert expirer.fire(_timer(1_900, "a")) is None
    assert observed == [0.25]  # decided at 1,250 ms, due at 1,000 (the timer's 1,900 is its group's latest)


def _expired(decided_ms: int) -> LogEntry:
    return LogEntry("a", "returned", "sku", "u1", 1, 0, "m", order="expired", due_ms=1_000, decided_ms=decided_ms)


def test_a_malformed_timer_is_dropped() -> None:
    expirer, asked = _expirer({})
    assert expirer.fire(Delivery("t", "ns-deadlines", "k", b"{not json", 0, 1)) is None
    assert asked == []


class _Timers:
    def __init__(self) -> None:
        self.sent: list[Deadline] = []

    def schedule(self, deadlines: Sequence[Deadline]) -> None:
        self.sent += deadlines


def test_the_consumer_schedules_one_timer_per_sku_and_second_of_at_most_a_group_each() -> None:
    from flashsale.constants import MAX_GROUP
    from flashsale.models import Deduction
    from flashsale.pipeline.consumer import DeductionConsumer
    from flashsale.records import Incoming, Order

    def awaiting(sku: str, token: str, due_ms: int) -> Incoming:
        return Incoming(Deduction(token, sku, "u1", 1), "m", "topic", Order("awaiting", due_ms))

    timers = _Timers()
    consumer = DeductionConsumer(None, None, None, batch_size=1, max_backoff_s=1, deadlines=timers)  # type: ignore[arg-type]
    items = [awaiting("a", f"t{i}", 10_001 + i % 900) for i in range(MAX_GROUP + 5)]  # all due in second 11
    items += [awaiting("a", "later", 11_001), awaiting("b", "other", 10_500)]  # second 12; another SKU
    consumer._schedule(items)
    assert [(d.sku, len(d.tokens), d.due_ms) for d in timers.sent] == [
        ("a", MAX_GROUP, 10_900),
        ("a", 5, 10_129),
        ("a", 1, 11_001),
        ("b", 1, 10_500),
    ]


def test_a_timer_whose_expiry_the_checker_fenced_comes_back_for_a_decision() -> None:
    # A fenced decision decided nothing: acking its timer would leave the order awaiting for good.
    expirer, _ = _expirer({"a": Decision.FENCED, "b": Decision.FROZEN})
    assert expirer.fire(_timer(1000, "a")) == 1
    assert expirer.fire(_timer(1000, "b")) == 1


def test_a_timers_orders_are_expired_concurrently_up_to_a_window() -> None:
    # One at a time, each order waits out two round trips (the broker's, Redis's): a timer of 1,024
    # orders took most of a minute under load.
    from flashsale.pipeline.expiry import CONCURRENCY

    running, most = 0, 0

    async def expire(sku: str, token: str) -> OrderAnswer:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        return OrderAnswer(Decision.ALREADY_PAID, None)

    expirer = Expirer(None, expire, asyncio.run)  # type: ignore[arg-type]
    tokens = [f"t{i}" for i in range(CONCURRENCY * 3)]
    assert expirer.fire(_timer(1000, *tokens)) is None
    assert most == CONCURRENCY


def test_orders_expired_before_an_outage_are_reported_and_only_their_timer_comes_back() -> None:
    observed: list[float] = []
    down = ServiceUnavailable("RocketMQ", "ns-deductions", "connection refused")

    async def expire(sku: str, token: str) -> OrderAnswer:
        if token == "b":
            await asyncio.sleep(0.01)  # "a" is decided first
            raise down
        return OrderAnswer(Decision.EXPIRED, _expired(1_250), "m1")

    expirer = Expirer(None, expire, asyncio.run, observe_lateness=observed.append)  # type: ignore[arg-type]
    assert expirer.fire(_timer(1_900, "a", "b")) == 1
    assert observed == [0.25]
