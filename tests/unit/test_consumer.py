from __future__ import annotations

import ast
import json
from collections.abc import Callable, Mapping, Sequence

import pytest

from flashsale.adapters.mysql.store import SHORTFALL_ATTEMPTS
from flashsale.errors import BusError, FlashSaleError, LoadUnderWay, ServiceUnavailable, StockShort, StoreError
from flashsale.models import SOURCE_REPLAY, DeductionMessage, Delivery, Purchase
from flashsale.pipeline.consumer import DeductionConsumer
from flashsale.records import Addition, ApplyReport, Conflict, DeadLetter, Incoming, Prededuct, TxRecord
from tests.unit.fakes import FakeLog


def _delivery(
    *tokens: str, gid: str | None = None, body: bytes | None = None, source: str = "purchase", attempt: int = 1
) -> Delivery:
    gid = gid if gid is not None else f"msg-{tokens[0]}"
    purchases = tuple(Purchase(t, "u1", 1) for t in tokens)
    body = body or DeductionMessage("sku-1", purchases, "" if source == SOURCE_REPLAY else gid, 1, source).encode()
    return Delivery(gid or f"replay-{tokens[0]}", "ns-deductions", tokens[0], body, born_ms=1, attempt=attempt)


class FakeStore:
    def __init__(self, calls: list[str], fail: Callable[[Sequence[Incoming]], FlashSaleError | None]) -> None:
        self.calls = calls
        self.fail = fail
        self.dead: list[DeadLetter] = []
        self.conflicts: list[Conflict] = []
        self.pings: list[Exception | None] = []
        self.additions: list[Addition] = []
        self.loads: dict[str, int] = {}

    def apply_batch(
        self,
        items: Sequence[Incoming],
        dead: Sequence[DeadLetter] = (),
        conflicts: Sequence[Conflict] = (),
        additions: Sequence[Addition] = (),
        loads: Mapping[str, int] | None = None,
    ) -> ApplyReport:
        self.calls.append(f"apply {[i.deduction.token for i in items]} dead {[d.message_id for d in dead]}")
        self.loads = dict(loads or {})
        self.additions += additions
        error = self.fail(items)
        if error:
            raise error
        self.dead += dead
        self.conflicts += conflicts
        return ApplyReport(
            applied=[i.deduction for i in items],
            dead_letters=list(dead),
            conflicts=[c.deduction for c in conflicts],
        )

    def ping(self) -> None:
        self.calls.append("ping")
        error = self.pings.pop(0) if self.pings else None
        if error:
            raise error


class FakeReceiver:
    def __init__(self, calls: list[str], batches: list[list[Delivery]]) -> None:
        self.calls = calls
        self.batches = batches
        self.consumer: DeductionConsumer | None = None
        self.delays: list[tuple[str, int]] = []  # (message id, seconds) of every hand-back

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
        self.delays += [(d.message_id, delay_s) for d in deliveries]

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def wake(self) -> None:
        pass


def _consumer(
    fail: Callable[[Sequence[Incoming]], FlashSaleError | None] = lambda _: None,
    batches: list[list[Delivery]] | None = None,
    log: FakeLog | None = None,
) -> tuple[DeductionConsumer, FakeStore, list[str], FakeLog]:
    calls: list[str] = []
    log = log or FakeLog()
    store, receiver = FakeStore(calls, fail), FakeReceiver(calls, batches or [])
    consumer = DeductionConsumer(receiver, store, log, batch_size=16, max_backoff_s=0.01)
    receiver.consumer = consumer
    return consumer, store, calls, log


def _deducted(log: FakeLog, *tokens: str, gid: str | None = None) -> None:
    for token in tokens:
        log.deducted("sku-1", token, "u1", 1, gid or f"msg-{token}")


def test_consumer_acks_a_batch_only_after_it_was_applied() -> None:
    consumer, _, calls, log = _consumer()
    _deducted(log, "a", "b")
    report = consumer.process([_delivery("a"), _delivery("b")])
    assert [d.token for d in report.applied] == ["a", "b"]
    assert calls == ["apply ['a', 'b'] dead []", "ack ['msg-a', 'msg-b']"]


def test_consumer_applies_exactly_the_purchases_the_prededuct_accepted() -> None:
    log = FakeLog()
    consumer, _, _, _ = _consumer(log=log)
    # The group carried three purchases; the pre-deduct accepted a and c, b was a duplicate of another message.
    _deducted(log, "a", "c", gid="msg-g")
    log.deducted("sku-1", "b", "u1", 1, "msg-earlier")
    log.records[("sku-1", "msg-g")] = TxRecord(
        "ran", (Prededuct.ACCEPTED, Prededuct.DUPLICATE, Prededuct.ACCEPTED, Prededuct.SOLD_OUT), 2
    )
    report = consumer.process([_delivery("a", "b", "c", "d", gid="msg-g")])
    assert sorted(d.token for d in report.applied) == ["a", "c"]
    assert (report.duplicates, report.skipped, report.conflicts) == (1, 1, [])


def test_consumer_applies_the_logs_values_not_the_bodys() -> None:
    consumer, _, _, log = _consumer()
    log.deducted("sku-1", "a", "u-real", 3, "msg-a")
    report = consumer.process([_delivery("a")])
    assert [(d.user_id, d.qty) for d in report.applied] == [("u-real", 3)]


def test_consumer_records_a_conflict_when_an_accepted_purchase_is_missing_from_the_log() -> None:
    consumer, store, _, log = _consumer()
    log.records[("sku-1", "msg-a")] = TxRecord("ran", (Prededuct.ACCEPTED,), 1)
    report = consumer.process([_delivery("a")])
    assert report.applied == []
    assert [c.deduction.token for c in store.conflicts] == ["a"]
    assert "no deduction by that message" in store.conflicts[0].reason


def test_consumer_records_a_conflict_for_a_committed_message_redis_knows_nothing_of() -> None:
    consumer, store, _, _ = _consumer()
    consumer.process([_delivery("a", "b")])
    assert [c.deduction.token for c in store.conflicts] == ["a", "b"]
    assert "no record" in store.conflicts[0].reason


def test_consumer_applies_a_replay_from_the_log_whatever_message_deducted_it() -> None:
    consumer, _, _, log = _consumer()
    _deducted(log, "a", gid="msg-original")
    report = consumer.process([_delivery("a", "never-deducted", source=SOURCE_REPLAY)])
    assert [d.token for d in report.applied] == ["a"]
    assert report.skipped == 1


def test_consumer_dead_letters_a_malformed_message_in_the_same_apply() -> None:
    consumer, store, calls, log = _consumer()
    _deducted(log, "a")
    consumer.process([_delivery("a"), _delivery("bad", body=b"not json")])
    assert calls == ["apply ['a'] dead ['msg-bad']", "ack ['msg-a', 'msg-bad']"]
    assert store.dead[0].body == b"not json"
    assert "not JSON" in store.dead[0].reason


@pytest.mark.parametrize(
    "body",
    [
        b'{"v": 2, "sku": "s", "gid": "g", "ts_ms": 1, "purchases": [{"token": "t", "user_id": "u", "qty": '
        + b"9" * 5000
        + b"}]}",
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe\xfd",
        json.dumps({"v": 2, "sku": ["x"], "gid": "g", "ts_ms": 1, "purchases": []}).encode(),
        json.dumps({"v": 2, "sku": "s", "gid": {}, "ts_ms": 1, "purchases": [{}]}).encode(),
        json.dumps(
            {"v": 2, "sku": "s", "gid": "g", "ts_ms": 1.5, "purchases": [{"token": "t", "user_id": "u", "qty": 1}]}
        ).encode(),
    ],
    ids=["5000-digit-int", "deep-nesting", "invalid-utf8", "sku-a-list", "gid-an-object", "float-ts"],
)
def test_no_body_can_stop_the_consumer(body: bytes) -> None:
    consumer, store, calls, _ = _consumer()
    consumer.process([_delivery("x", body=body)])
    assert [d.message_id for d in store.dead] == ["msg-x"]
    assert calls[-1] == "ack ['msg-x']"


def test_consumer_does_not_ack_when_the_database_is_unavailable() -> None:
    consumer, _, calls, log = _consumer(lambda _: StoreError("connection lost", retriable=True))
    _deducted(log, "a", "b")
    with pytest.raises(StoreError):
        consumer.process([_delivery("a"), _delivery("b")])
    assert not [c for c in calls if c.startswith("ack")]


def test_consumer_does_not_ack_when_redis_is_unavailable() -> None:
    log = FakeLog(error=ServiceUnavailable("Redis", "127.0.0.1:6379", "refused"))
    consumer, _, calls, _ = _consumer(log=log)
    with pytest.raises(ServiceUnavailable):
        consumer.process([_delivery("a")])
    assert calls == []


def test_consumer_applies_a_rejected_batch_one_by_one_and_dead_letters_the_culprit() -> None:
    def fail(items: Sequence[Incoming]) -> StoreError | None:
        if any(i.deduction.token == "b" for i in items):
            return StoreError("data too long", retriable=False)
        return None

    consumer, store, calls, log = _consumer(fail)
    _deducted(log, "a", "b", "c")
    report = consumer.process([_delivery("a"), _delivery("b"), _delivery("c")])
    assert [d.token for d in report.applied] == ["a", "c"]
    assert [d.message_id for d in report.dead_letters] == ["msg-b"]
    assert "database rejected it: data too long" in store.dead[0].reason
    assert calls[-1] == "ack ['msg-a', 'msg-b', 'msg-c']"


def test_consumer_dead_letters_a_message_whose_apply_raises_anything_at_all() -> None:
    def fail(items: Sequence[Incoming]) -> FlashSaleError | None:
        if any(i.deduction.token == "b" for i in items):
            raise RecursionError("a bug nobody foresaw")
        return None

    consumer, store, calls, log = _consumer(fail)
    _deducted(log, "a", "b")
    report = consumer.process([_delivery("a"), _delivery("b")])
    assert [d.token for d in report.applied] == ["a"]
    assert [d.message_id for d in store.dead] == ["msg-b"]
    assert "RecursionError" in store.dead[0].reason
    assert calls[-1] == "ack ['msg-a', 'msg-b']"


@pytest.mark.timeout(10)
def test_consumer_pauses_receipt_until_the_database_takes_writes_again() -> None:
    failures = [StoreError("read-only", retriable=True)]
    consumer, store, calls, log = _consumer(
        lambda _: failures.pop() if failures else None, [[_delivery("a")], [_delivery("a")]]
    )
    _deducted(log, "a")
    store.pings = [StoreError("still read-only", retriable=True), None]
    consumer.run()
    assert calls == [
        "receive",
        "apply ['a'] dead []",
        "nack ['msg-a']",
        "pause",
        "ping",
        "ping",
        "resume",
        "receive",
        "apply ['a'] dead []",
        "ack ['msg-a']",
        "receive",
    ]
    assert consumer.stopping


@pytest.mark.timeout(10)
def test_a_batch_short_of_units_on_their_way_is_handed_back_and_receipt_goes_on() -> None:
    # The resale "b" waits for the return of "a", which travels in the next message: a pause would hand
    # that message back with it, at every try, and the two could wait on each other for many deliveries.
    returned: list[str] = []

    def short(items: Sequence[Incoming]) -> FlashSaleError | None:
        tokens = [i.deduction.token for i in items]
        if "b" in tokens and not returned:
            return StockShort("sku-1", 0)
        returned.extend(t for t in tokens if t == "a")
        return None

    consumer, _, calls, log = _consumer(short, [[_delivery("b")], [_delivery("a")], [_delivery("b")]])
    _deducted(log, "a", "b")
    consumer.run()
    assert "pause" not in calls
    assert calls == [
        "receive",
        "apply ['b'] dead []",
        "nack ['msg-b']",
        "receive",
        "apply ['a'] dead []",
        "ack ['msg-a']",
        "receive",
        "apply ['b'] dead []",
        "ack ['msg-b']",
        "receive",
    ]


def test_a_sku_short_of_units_on_their_way_hands_back_its_messages_alone() -> None:
    """The wait for units on their way counts each message's own deliveries: handed back with a short SKU's
    batch, another SKU's message would count deliveries for nothing, and could become a conflict at once
    the day its own SKU is short."""

    def short(items: Sequence[Incoming]) -> FlashSaleError | None:
        return StockShort("sku-1", 0) if any(i.deduction.sku == "sku-1" for i in items) else None

    consumer, _, calls, log = _consumer(short)
    _deducted(log, "a")
    log.deducted("sku-2", "b", "u1", 1, "msg-b")
    other = DeductionMessage("sku-2", (Purchase("b", "u1", 1),), "msg-b", 1).encode()
    report = consumer.process([_delivery("a"), _delivery("b", body=other)])
    assert [d.token for d in report.applied] == ["b"]
    assert calls == ["apply ['a', 'b'] dead []", "apply ['b'] dead []", "nack ['msg-a']", "ack ['msg-b']"]


def test_the_deliveries_a_shortfall_waits_span_the_slowest_path_of_a_return() -> None:
    """A resale ahead of its return is a conflict at its SHORTFALL_ATTEMPTS-th delivery: the deliveries before
    it are spaced out to outlast a return the checker commits (~10 s) or one on a broker group that
    restarts (~1 minute), and no single wait leaves the SKU's messages hidden for long."""
    calls: list[str] = []
    log, receiver = FakeLog(), FakeReceiver(calls, [])
    store = FakeStore(calls, lambda items: StockShort("sku-1", 0))
    consumer = DeductionConsumer(receiver, store, log, batch_size=16, max_backoff_s=0.01)
    _deducted(log, "a")
    for attempt in range(1, SHORTFALL_ATTEMPTS):
        consumer.process([_delivery("a", attempt=attempt)])
    waits = [s for _, s in receiver.delays]
    assert waits == sorted(waits) and waits[0] == 1 and max(waits) <= 30
    assert sum(waits) >= 120


def test_the_messages_of_a_sku_being_loaded_wait_for_the_load_and_the_others_are_applied() -> None:
    loading = {"sku-1"}

    def load_under_way(items: Sequence[Incoming]) -> FlashSaleError | None:
        skus = {i.deduction.sku for i in items} & loading
        return LoadUnderWay(sorted(skus)) if skus else None

    consumer, store, calls, log = _consumer(load_under_way)
    _deducted(log, "a")
    log.deducted("sku-2", "b", "u1", 1, "msg-b")
    log.tickets["sku-2"] = 7
    other = DeductionMessage("sku-2", (Purchase("b", "u1", 1),), "msg-b", 1).encode()
    report = consumer.process([_delivery("a"), _delivery("b", body=other)])
    assert [d.token for d in report.applied] == ["b"]
    assert calls == ["apply ['a', 'b'] dead []", "apply ['b'] dead []", "nack ['msg-a']", "ack ['msg-b']"]
    assert store.loads == {"sku-2": 7}  # the load Redis was read under goes with the batch
    loading.clear()  # loaded: it comes again, and is applied
    assert [d.token for d in consumer.process([_delivery("a")]).applied] == ["a"]


def test_an_ack_that_fails_after_the_commit_neither_reapplies_nor_hands_back() -> None:
    consumer, _, calls, log = _consumer()
    _deducted(log, "a")
    receiver = consumer._receiver
    assert isinstance(receiver, FakeReceiver)

    def broken_ack(deliveries: Sequence[Delivery]) -> int:
        calls.append("ack failed")
        raise BusError("the broker went away")

    receiver.ack = broken_ack  # type: ignore[method-assign]
    report = consumer.process([_delivery("a")])
    assert [d.token for d in report.applied] == ["a"]
    # Committed is committed: the message will come back, and its second apply is a duplicate.
    assert calls == ["apply ['a'] dead []", "ack failed"]


def test_a_message_of_many_purchases_is_applied_in_transactions_of_at_most_the_batch_size() -> None:
    consumer, _, calls, log = _consumer()
    tokens = [f"p{i:02d}" for i in range(40)]
    _deducted(log, *tokens, gid="msg-big")
    report = consumer.process([_delivery(*tokens, gid="msg-big")])
    assert len(report.applied) == 40
    applies = [c for c in calls if c.startswith("apply")]
    assert [len(ast.literal_eval(c.split(" dead ")[0].removeprefix("apply "))) for c in applies] == [16, 16, 8]
    assert calls[-1] == "ack ['msg-big']" and sum(c.startswith("ack") for c in calls) == 1


def test_consumer_applies_each_share_of_a_spread_message_from_its_own_partitions_log_and_record() -> None:
    consumer, store, _, log = _consumer()
    # One message over two partitions: hot#0 accepted a, rejected b; hot#4 accepted c, and lost d.
    purchases = (Purchase("a", "u1", 1, "hot#0"), Purchase("c", "u1", 1, "hot#4"))
    purchases += (Purchase("b", "u1", 1, "hot#0"), Purchase("d", "u1", 1, "hot#4"))
    log.deducted("hot#0", "a", "u1", 1, "msg-g")
    log.records[("hot#0", "msg-g")] = TxRecord("ran", (Prededuct.ACCEPTED, Prededuct.SOLD_OUT), 1)
    log.deducted("hot#4", "c", "u1", 1, "msg-g")
    log.records[("hot#4", "msg-g")] = TxRecord("ran", (Prededuct.ACCEPTED, Prededuct.ACCEPTED), 2)
    body = DeductionMessage("hot", purchases, "msg-g", 1).encode()
    report = consumer.process([Delivery("msg-g", "ns-deductions", "a", body, born_ms=1, attempt=1)])
    assert sorted(d.token for d in report.applied) == ["a", "c"]
    assert report.skipped == 1 and [c.deduction.token for c in store.conflicts] == ["d"]


def test_a_share_refused_as_another_loads_is_skipped_not_filed_as_a_conflict() -> None:
    consumer, store, _, log = _consumer()
    # hot#0 accepted a; hot#4 belonged to another load by then and refused b (its record says stale).
    purchases = (Purchase("a", "u1", 1, "hot#0"), Purchase("b", "u1", 1, "hot#4"))
    log.deducted("hot#0", "a", "u1", 1, "msg-g")
    log.records[("hot#0", "msg-g")] = TxRecord("ran", (Prededuct.ACCEPTED,), 1)
    log.records[("hot#4", "msg-g")] = TxRecord("stale")
    body = DeductionMessage("hot", purchases, "msg-g", 1).encode()
    report = consumer.process([Delivery("msg-g", "ns-deductions", "a", body, born_ms=1, attempt=1)])
    assert [d.token for d in report.applied] == ["a"]
    assert report.skipped == 1 and store.conflicts == []
