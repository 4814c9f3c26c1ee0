"""A restock's transaction (pipeline/restock.py): committed only when its script added the units."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from flashsale.errors import InvalidInput, ServiceUnavailable
from flashsale.models import RESTOCK_USER, SOURCE_RESTOCK, DeductionMessage
from flashsale.pipeline.restock import RestockAnswer, Restocker
from flashsale.records import Restock, RestockResult
from tests.unit.fakes import FakeBus


@dataclass
class FakeRestocks:
    code: Restock = Restock.ADDED
    error: Exception | None = None
    calls: list[tuple[str, int, str, str]] = field(default_factory=list)

    async def add_stock(self, sku: str, qty: int, *, request_id: str, message_id: str) -> RestockResult:
        self.calls.append((sku, qty, request_id, message_id))
        if self.error:
            raise self.error
        added = qty if self.code in (Restock.ADDED, Restock.ALREADY_ADDED) else 0
        return RestockResult(self.code, 10 + added, added, message_id if added else "")


def _add(stock: FakeRestocks, bus: FakeBus, qty: object = 5, request_id: str = "r1") -> RestockAnswer:
    return asyncio.run(Restocker(stock, bus, "topic").add("sku-1", qty, request_id=request_id))


def test_a_restock_that_added_its_units_is_committed_with_a_body_naming_the_request() -> None:
    stock, bus = FakeRestocks(), FakeBus()
    answer = _add(stock, bus)
    assert (answer.outcome, answer.qty, answer.message_id) == (Restock.ADDED, 5, "msg-1")
    assert bus.calls == ["send_half r1", "commit msg-1"]
    body = DeductionMessage.decode(bus.sent[0][2])
    assert (body.source, body.gid, [(p.token, p.user_id, p.qty) for p in body.purchases]) == (
        SOURCE_RESTOCK,
        "msg-1",
        [("r1", RESTOCK_USER, 5)],
    )
    assert stock.calls == [("sku-1", 5, "r1", "msg-1")]


@pytest.mark.parametrize("code", [Restock.ALREADY_ADDED, Restock.FROZEN, Restock.FENCED, Restock.UNKNOWN_SKU])
def test_a_restock_that_added_nothing_is_rolled_back(code: Restock) -> None:
    bus = FakeBus()
    answer = _add(FakeRestocks(code), bus)
    assert answer.outcome is code and answer.message_id is None
    assert bus.calls == ["send_half r1", "rollback msg-1"]


def test_a_lost_commit_still_answers_added_the_checker_commits_from_the_record() -> None:
    bus = FakeBus(fail_commit=True)
    answer = _add(FakeRestocks(), bus)
    assert answer.outcome is Restock.ADDED
    assert bus.calls == ["send_half r1", "commit msg-1"]


def test_a_script_that_certainly_did_not_run_is_rolled_back_and_one_that_may_have_is_left_to_the_checker() -> None:
    unrun, bus = FakeRestocks(error=ServiceUnavailable("Redis", "x:1", "refused", reached=False)), FakeBus()
    with pytest.raises(ServiceUnavailable):
        _add(unrun, bus)
    assert bus.calls == ["send_half r1", "rollback msg-1"]
    maybe, bus = FakeRestocks(error=ServiceUnavailable("Redis", "x:1", "timeout", reached=True)), FakeBus()
    with pytest.raises(ServiceUnavailable):
        _add(maybe, bus)
    assert bus.calls == ["send_half r1"]


def test_bad_input_is_refused_before_anything_is_sent() -> None:
    for qty, request_id in ((0, "r1"), (-2, "r1"), ("many", "r1"), (5, "bad id!")):
        bus = FakeBus()
        with pytest.raises(InvalidInput):
            _add(FakeRestocks(), bus, qty, request_id)
        assert bus.calls == []


def test_an_unsent_half_message_adds_nothing() -> None:
    stock, bus = FakeRestocks(), FakeBus(fail_send=True)
    with pytest.raises(ServiceUnavailable) as raised:
        _add(stock, bus)
    assert raised.value.reached is False and stock.calls == []
