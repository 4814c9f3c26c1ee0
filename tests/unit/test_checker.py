from __future__ import annotations

import pytest

from flashsale.errors import ServiceUnavailable
from flashsale.models import (
    RESTOCK_USER,
    SOURCE_DECISION,
    SOURCE_RESTOCK,
    DeductionMessage,
    Delivery,
    Purchase,
    Resolution,
)
from flashsale.pipeline.checker import DeductionChecker
from flashsale.records import CheckView, LogEntry, Prededuct, TxRecord
from tests.unit.fakes import FakeCheckStock

BORN_MS = 1_700_000_000_000
GRACE_S = 6.0
GID = "msg-1"
PURCHASES = (Purchase("tok-1", "u1", 2), Purchase("tok-2", "u2", 1))


def _delivery(body: bytes | None = None, born_ms: int | None = BORN_MS, message_id: str = GID) -> Delivery:
    body = body or DeductionMessage("sku-1", PURCHASES, GID, ts_ms=BORN_MS - 5).encode()
    return Delivery(message_id, "ns-deductions", "tok-1", body, born_ms, attempt=1)


def _entry(token: str, user: str, qty: int, state: str = "deducted", gid: str = GID) -> LogEntry:
    return LogEntry(token, state, "sku-1", user, qty, BORN_MS, message_id=gid)


def _ran(*entries: LogEntry | None) -> CheckView:
    accepted = sum(1 for e in entries if e is not None)
    record = TxRecord("ran", (Prededuct.ACCEPTED,) * accepted, accepted, BORN_MS)
    return CheckView("ran", record, {p.token: e for p, e in zip(PURCHASES, entries, strict=False)})


def _check(stock: FakeCheckStock, delivery: Delivery | None = None) -> Resolution:
    return DeductionChecker(stock, GRACE_S).check(delivery or _delivery())


def test_checker_asks_redis_about_the_message_with_its_tokens_and_grace_and_no_clock_of_its_own() -> None:
    stock = FakeCheckStock()
    _check(stock)
    # The grace runs on Redis's clock (fence.lua): neither the producer's born time nor the checker's clock.
    assert stock.calls == [("sku-1", GID, ("tok-1", "tok-2"), 6000)]


@pytest.mark.parametrize("state", ["deducted", "returned"])
def test_checker_commits_when_the_log_names_the_message_with_the_bodys_values(state: str) -> None:
    stock = FakeCheckStock(_ran(_entry("tok-1", "u1", 2, state), None))
    assert _check(stock) is Resolution.COMMIT


def test_checker_rolls_back_a_message_whose_prededuct_accepted_nothing() -> None:
    assert _check(FakeCheckStock(_ran(None, None))) is Resolution.ROLLBACK


def test_checker_does_not_commit_for_an_entry_written_by_another_message() -> None:
    stock = FakeCheckStock(_ran(_entry("tok-1", "u1", 2, gid="msg-other"), None))
    assert _check(stock) is Resolution.ROLLBACK


@pytest.mark.parametrize(("user", "qty"), [("u1", 3), ("u9", 2)])
def test_checker_commits_a_message_whose_log_names_it_even_where_the_body_disagrees(user: str, qty: int) -> None:
    # The units are deducted in Redis by this message: rolling it back would leave them with no order. The
    # consumer applies the log's user and quantity, never the body's.
    stock = FakeCheckStock(_ran(_entry("tok-1", user, qty), _entry("tok-2", "u2", 1)))
    assert _check(stock) is Resolution.COMMIT


def test_checker_rolls_back_a_body_that_names_another_message() -> None:
    stock = FakeCheckStock(_ran(_entry("tok-1", "u1", 2)))
    assert _check(stock, _delivery(message_id="msg-forged")) is Resolution.ROLLBACK
    assert stock.calls == []


def test_checker_answers_unknown_for_a_young_message() -> None:
    assert _check(FakeCheckStock(CheckView("young", None, {}))) is Resolution.UNKNOWN


def test_checker_treats_a_share_refused_as_another_loads_as_one_that_deducted_nothing() -> None:
    stale = CheckView("stale", TxRecord("stale"), {"tok-1": None})
    accepted = _ran(None, _entry("tok-2", "u2", 1))
    assert _check(FakeCheckStock(views={"sku-1#0": stale, "sku-1#3": accepted}), _spread()) is Resolution.COMMIT
    assert _check(FakeCheckStock(views={"sku-1#0": stale, "sku-1#3": stale}), _spread()) is Resolution.ROLLBACK


def test_checker_rolls_back_a_fenced_message() -> None:
    view = CheckView("fenced", TxRecord("fenced", ts_ms=BORN_MS), {"tok-1": None, "tok-2": None})
    assert _check(FakeCheckStock(view)) is Resolution.ROLLBACK


def test_checker_answers_unknown_when_redis_is_unreachable() -> None:
    stock = FakeCheckStock(error=ServiceUnavailable("Redis", "127.0.0.1:6379", "refused"))
    assert _check(stock) is Resolution.UNKNOWN


@pytest.mark.parametrize("body", [b"garbage", b'{"v": 2}', b"[]", b'{"v": 1, "token": 5}', b"\xff\xfe"])
def test_checker_rolls_back_a_malformed_half_message_without_asking_redis(body: bytes) -> None:
    stock = FakeCheckStock()
    assert _check(stock, _delivery(body)) is Resolution.ROLLBACK
    assert stock.calls == []


def test_checker_reports_each_resolution_and_its_time_to_its_observer() -> None:
    seen: list[tuple[Resolution, float]] = []
    stock = FakeCheckStock(_ran(_entry("tok-1", "u1", 2)))
    DeductionChecker(stock, GRACE_S, observe=lambda r, s: seen.append((r, s))).check(_delivery())
    assert [r for r, _ in seen] == [Resolution.COMMIT]
    assert 0 <= seen[0][1] < 5


def _spread() -> Delivery:
    purchases = (Purchase("tok-1", "u1", 2, "sku-1#0"), Purchase("tok-2", "u2", 1, "sku-1#3"))
    return _delivery(DeductionMessage("sku-1", purchases, GID, ts_ms=BORN_MS - 5).encode())


def test_checker_looks_at_each_partition_a_spread_message_went_to_with_its_own_tokens() -> None:
    stock = FakeCheckStock()
    _check(stock, _spread())
    assert [(sku, tokens) for sku, _, tokens, _ in stock.calls] == [("sku-1#0", ("tok-1",))]  # young: asked again
    ran = CheckView("ran", TxRecord("ran", (Prededuct.SOLD_OUT,)), {"tok-1": None})
    stock = FakeCheckStock(views={"sku-1#0": ran, "sku-1#3": _ran(None, _entry("tok-2", "u2", 1))})
    assert _check(stock, _spread()) is Resolution.COMMIT
    assert [(sku, tokens) for sku, _, tokens, _ in stock.calls] == [("sku-1#0", ("tok-1",)), ("sku-1#3", ("tok-2",))]


def test_checker_commits_a_spread_message_once_every_share_ran_or_is_fenced() -> None:
    fenced = CheckView("fenced", TxRecord("fenced"), {"tok-1": None})
    accepted = _ran(None, _entry("tok-2", "u2", 1))
    assert _check(FakeCheckStock(views={"sku-1#0": fenced, "sku-1#3": accepted}), _spread()) is Resolution.COMMIT
    young = CheckView("young", None, {"tok-2": None})
    assert _check(FakeCheckStock(views={"sku-1#0": fenced, "sku-1#3": young}), _spread()) is Resolution.UNKNOWN
    down = ServiceUnavailable("Redis", "127.0.0.1:7001", "timeout")
    assert _check(FakeCheckStock(views={"sku-1#0": accepted, "sku-1#3": down}), _spread()) is Resolution.UNKNOWN
    assert _check(FakeCheckStock(views={"sku-1#0": fenced, "sku-1#3": fenced}), _spread()) is Resolution.ROLLBACK


def _decision(gid: str = GID, part: str = "") -> Delivery:
    purchases = (Purchase("tok-1", "u1", 2),)
    body = DeductionMessage("sku-1", purchases, gid, ts_ms=BORN_MS, source=SOURCE_DECISION, part=part)
    return Delivery(gid, "ns-deductions", "tok-1", body.encode(), BORN_MS, attempt=1)


def _ordered(decided_by: str, order: str = "paid") -> CheckView:
    entry = LogEntry(
        "tok-1",
        "deducted",
        "sku-1",
        "u1",
        2,
        BORN_MS,
        "msg-purchase",
        order=order,
        due_ms=BORN_MS + 1,
        decided_by=decided_by,
    )
    return CheckView("ran", TxRecord("ran", (), 0, BORN_MS), {"tok-1": entry})


def test_checker_commits_a_decision_whose_order_names_it_as_its_decision() -> None:
    assert _check(FakeCheckStock(_ordered(GID)), _decision()) is Resolution.COMMIT


def test_checker_looks_at_a_decision_on_a_partition_on_that_partitions_keys_alone() -> None:
    # The order of a partitioned SKU was decided on the partition that sold it: its record and entry are there.
    stock = FakeCheckStock(views={"sku-1#2": _ordered(GID)})
    assert _check(stock, _decision(part="sku-1#2")) is Resolution.COMMIT
    assert stock.calls == [("sku-1#2", GID, ("tok-1",), 6000)]


def test_checker_rolls_back_a_decision_that_changed_nothing_even_where_the_log_names_its_purchase() -> None:
    # The entry names the purchase's message, and another decision: this one (already_paid) carries nothing.
    assert _check(FakeCheckStock(_ordered("msg-other")), _decision()) is Resolution.ROLLBACK
    assert _check(FakeCheckStock(_ordered(GID)), _decision("msg-purchase")) is Resolution.ROLLBACK


def _restock() -> Delivery:
    body = DeductionMessage("sku-1", (Purchase("r-1", RESTOCK_USER, 30),), GID, BORN_MS, SOURCE_RESTOCK).encode()
    return Delivery(GID, "ns-deductions", "r-1", body, BORN_MS, attempt=1)


def test_checker_commits_a_restock_whose_record_says_it_added_units_and_rolls_back_any_other() -> None:
    added = TxRecord.parse('{"state": "ran", "kind": "restock", "request": "r-1", "qty": 30, "code": 1, "ts": 1}')
    assert _check(FakeCheckStock(CheckView("ran", added, {"r-1": None})), _restock()) is Resolution.COMMIT
    fenced = CheckView("fenced", TxRecord("fenced"), {"r-1": None})
    assert _check(FakeCheckStock(fenced), _restock()) is Resolution.ROLLBACK
    young = CheckView("young", None, {"r-1": None})
    assert _check(FakeCheckStock(young), _restock()) is Resolution.UNKNOWN
