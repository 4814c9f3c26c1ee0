"""The order desk (pipeline/orders.py) on a partitioned SKU: where it finds a token, where it decides it, and
what its message names. The real decide.lua is in tests/integration/test_order_decisions.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from flashsale.models import SOURCE_DECISION, DeductionMessage
from flashsale.pipeline.orders import OrderAnswer, OrderDesk
from flashsale.records import Decision, Layout, LogEntry
from tests.unit.fakes import FakeBus, FakePartitions

PARTS = ("s#0", "s#1", "s#2")
LAYOUT = Layout("s", PARTS, refill=5, threshold=0, epoch=1)


def _token_for(order: tuple[str, ...]) -> str:
    """A token whose order of the partitions starts with `order`."""
    return next(t for t in (f"tok-{n}" for n in range(10_000)) if tuple(LAYOUT.order(t))[: len(order)] == order)


def _awaiting(token: str, part: str) -> LogEntry:
    return LogEntry(token, "deducted", "s", "u1", 2, 0, "m-buy", part=part, order="awaiting", due_ms=60_000)


@dataclass
class FakeOrderStock(FakePartitions):
    """A partitioned SKU's logs, and decide.lua as it answers a cancel of an order awaiting payment."""

    decided_on: list[str] = field(default_factory=list)

    async def decide(
        self, shard: str, token: str, action: str, *, decision_id: str, message_id: str, user: str = ""
    ) -> tuple[Decision, LogEntry | None]:
        self.decided_on.append(shard)
        entry = self.logs.get(shard, {}).get(token)
        if entry is None:
            return Decision.NO_ORDER, None
        after = entry._replace(state="returned", order="cancelled", decided_by=message_id)
        self.logs[shard][token] = after
        return Decision.CANCELLED, after


def _desk(stock: FakeOrderStock, bus: FakeBus) -> OrderDesk:
    return OrderDesk(stock, bus, "deductions")


def test_a_token_sold_on_its_first_partition_is_found_there_with_one_read() -> None:
    stock = FakeOrderStock(LAYOUT, pool=0, stock={p: 0 for p in PARTS})
    token = _token_for(("s#1",))
    stock.logs["s#1"] = {token: _awaiting(token, "s#1")}
    entry = asyncio.run(_desk(stock, FakeBus()).show("s", token))
    assert entry is not None and entry.part == "s#1"
    assert stock.calls == ["layout s", "entries s#1"]


def test_a_token_sold_past_a_closed_partition_is_found_further_along_its_order() -> None:
    stock = FakeOrderStock(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1"})
    token = _token_for(("s#1", "s#2"))
    stock.logs["s#2"] = {token: _awaiting(token, "s#2")}
    entry = asyncio.run(_desk(stock, FakeBus()).show("s", token))
    assert entry is not None and entry.part == "s#2"
    # Its first partition first, then every other at once.
    assert stock.calls == ["layout s", "entries s#1", "entries s#0 s#2"]
    assert asyncio.run(_desk(stock, FakeBus()).show("s", _token_for(("s#2",)))) is None


def test_a_decision_on_a_partitioned_skus_order_runs_on_its_partition_and_its_message_names_it() -> None:
    stock = FakeOrderStock(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#0"})
    token = _token_for(("s#0", "s#2"))
    stock.logs["s#2"] = {token: _awaiting(token, "s#2")}
    bus = FakeBus()
    answer: OrderAnswer = asyncio.run(_desk(stock, bus).decide("s", token, "cancel", decision_id="c-1", user="u1"))
    assert answer.decision is Decision.CANCELLED and stock.decided_on == ["s#2"]
    ((_, key, body, _),) = bus.sent
    message = DeductionMessage.decode(body)
    # The checker fences, and the consumer reads, the partition's keys: where the decision was recorded.
    assert (key, message.sku, message.source, list(message.shards())) == (token, "s", SOURCE_DECISION, ["s#2"])
    assert bus.calls == [f"send_half {token}", f"commit {answer.message_id}"]


def test_a_token_no_partition_holds_has_no_order_and_nothing_is_sent() -> None:
    stock = FakeOrderStock(LAYOUT, pool=0, stock={p: 0 for p in PARTS})
    bus = FakeBus()
    answer = asyncio.run(_desk(stock, bus).decide("s", "nobody", "pay", decision_id="p-1"))
    assert answer.decision is Decision.NO_ORDER and bus.sent == [] and stock.decided_on == []
