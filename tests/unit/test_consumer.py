from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from flashsale.errors import FlashSaleError, StoreError
from flashsale.models import Deduction, Delivery
from flashsale.pipeline.consumer import DeductionConsumer
from flashsale.records import ApplyReport, DeadLetter, Incoming


def _delivery(token: str, body: bytes | None = None) -> Delivery:
    body = body or Deduction(token, "sku-1", "u1", 1, ts_ms=1).encode()
    return Delivery(f"msg-{token}", "ns-deductions", token, body, born_ms=1, attempt=1)


class FakeStore:
    def __init__(self, calls: list[str], fail: Callable[[Sequence[Incoming]], FlashSaleError | None]) -> None:
        self.calls = calls
        self.fail = fail
        self.dead: list[DeadLetter] = []

    def apply_batch(self, items: Sequence[Incoming], dead: Sequence[DeadLetter] = ()) -> ApplyReport:
        self.calls.append(f"apply {[i.message_id for i in items]} dead {[d.message_id for d in dead]}")
        error = self.fail(items)
        if error:
            raise error
        self.dead += dead
        return ApplyReport(applied=[i.deduction for i in items], dead_letters=list(dead))

    def ping(self) -> None:
        self.calls.append("ping")


class FakeReceiver:
    def __init__(self, calls: list[str], batches: list[list[Delivery]]) -> None:
        self.calls = calls
        self.batches = batches
        self.consumer: DeductionConsumer | None = None

    def receive(self, max_messages: int) -> list[Delivery]:
        self.calls.append("receive")
        if not self.batches:
            assert self.consumer is not None
            self.consumer.stop()
            return []
        return self.batches.pop(0)

    def ack(self, deliveries: Sequence[Delivery]) -> int:
        self.calls.append(f"ack {[d.message_id for d in deliveries]}")
        return len(deliveries)

    def nack(self, deliveries: Sequence[Delivery], delay_s: int) -> None:
        self.calls.append(f"nack {[d.message_id for d in deliveries]}")


def _consumer(
    fail: Callable[[Sequence[Incoming]], FlashSaleError | None] = lambda _: None,
    batches: list[list[Delivery]] | None = None,
) -> tuple[DeductionConsumer, FakeStore, list[str]]:
    calls: list[str] = []
    store, receiver = FakeStore(calls, fail), FakeReceiver(calls, batches or [])
    consumer = DeductionConsumer(receiver, store, batch_size=16, max_backoff_s=0.01)
    receiver.consumer = consumer
    return consumer, store, calls


def test_consumer_acks_a_batch_only_after_it_was_applied() -> None:
    consumer, _, calls = _consumer()
    report = consumer.process([_delivery("a"), _delivery("b")])
    assert [d.token for d in report.applied] == ["a", "b"]
    assert calls == ["apply ['msg-a', 'msg-b'] dead []", "ack ['msg-a', 'msg-b']"]


def test_consumer_dead_letters_a_malformed_message_in_the_same_apply() -> None:
    consumer, store, calls = _consumer()
    consumer.process([_delivery("a"), _delivery("bad", b"not json")])
    assert calls == ["apply ['msg-a'] dead ['msg-bad']", "ack ['msg-a', 'msg-bad']"]
    assert store.dead[0].body == b"not json"
    assert "not JSON" in store.dead[0].reason


def test_consumer_does_not_ack_when_the_database_is_unavailable() -> None:
    consumer, _, calls = _consumer(lambda _: StoreError("connection lost", retriable=True))
    with pytest.raises(StoreError):
        consumer.process([_delivery("a"), _delivery("b")])
    assert not [c for c in calls if c.startswith("ack")]


def test_consumer_applies_a_rejected_batch_one_by_one_and_dead_letters_the_culprit() -> None:
    def fail(items: Sequence[Incoming]) -> StoreError | None:
        if any(i.deduction.token == "b" for i in items):
            return StoreError("data too long", retriable=False)
        return None

    consumer, store, calls = _consumer(fail)
    report = consumer.process([_delivery("a"), _delivery("b"), _delivery("c")])
    assert [d.token for d in report.applied] == ["a", "c"]
    assert [d.message_id for d in report.dead_letters] == ["msg-b"]
    assert "database rejected it: data too long" in store.dead[0].reason
    assert calls[-1] == "ack ['msg-a', 'msg-b', 'msg-c']"


def test_consumer_dead_letters_a_single_message_the_database_rejects_for_good() -> None:
    def fail(items: Sequence[Incoming]) -> StoreError | None:
        return StoreError("data too long", retriable=False) if items else None

    consumer, store, calls = _consumer(fail)
    consumer.process([_delivery("a")])
    assert [d.message_id for d in store.dead] == ["msg-a"]
    assert calls[-1] == "ack ['msg-a']"


@pytest.mark.timeout(10)
def test_consumer_hands_a_failed_batch_back_and_waits_for_the_database() -> None:
    failures = [StoreError("connection lost", retriable=True)]
    consumer, _, calls = _consumer(lambda _: failures.pop() if failures else None, [[_delivery("a")], [_delivery("a")]])
    consumer.run()
    assert calls == [
        "receive",
        "apply ['msg-a'] dead []",
        "nack ['msg-a']",
        "ping",
        "receive",
        "apply ['msg-a'] dead []",
        "ack ['msg-a']",
        "receive",
    ]
    assert consumer.stopping
