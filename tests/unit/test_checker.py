from __future__ import annotations

import pytest

from flashsale.errors import ServiceUnavailable
from flashsale.models import Deduction, Delivery, Resolution
from flashsale.pipeline.checker import DeductionChecker
from flashsale.records import LogEntry
from tests.unit.fakes import FakeStock

BORN_MS = 1_700_000_000_000
GRACE_S = 6.0


def _delivery(body: bytes | None = None, born_ms: int | None = BORN_MS) -> Delivery:
    body = body or Deduction("tok-1", "sku-1", "u1", 2, ts_ms=BORN_MS).encode()
    return Delivery("msg-1", "ns-deductions", "tok-1", body, born_ms, attempt=1)


def _check(stock: FakeStock, age_s: float, delivery: Delivery | None = None) -> Resolution:
    checker = DeductionChecker(stock, GRACE_S, clock=lambda: BORN_MS / 1000 + age_s)
    return checker.check(delivery or _delivery())


def _entry(state: str) -> LogEntry:
    return LogEntry("tok-1", state, "sku-1", "u1", 2, BORN_MS)


@pytest.mark.parametrize(
    ("state", "resolution"),
    [("deducted", Resolution.COMMIT), ("returned", Resolution.COMMIT), ("fenced", Resolution.ROLLBACK)],
)
def test_checker_answers_from_the_logged_state(state: str, resolution: Resolution) -> None:
    stock = FakeStock(entry=_entry(state))
    assert _check(stock, age_s=60) is resolution
    assert stock.calls == ["log_entry sku-1 tok-1"]


def test_checker_answers_unknown_for_a_young_message_without_fencing() -> None:
    stock = FakeStock()
    assert _check(stock, age_s=GRACE_S - 0.5) is Resolution.UNKNOWN
    assert stock.calls == ["log_entry sku-1 tok-1"]


def test_checker_fences_token_before_rollback() -> None:
    stock = FakeStock(fence_state="fenced")
    assert _check(stock, age_s=GRACE_S + 0.5) is Resolution.ROLLBACK
    assert stock.calls == ["log_entry sku-1 tok-1", "fence sku-1 tok-1"]


def test_checker_commits_when_the_prededuct_won_the_race_with_the_fence() -> None:
    stock = FakeStock(fence_state="deducted")
    assert _check(stock, age_s=GRACE_S + 0.5) is Resolution.COMMIT
    assert stock.calls[-1] == "fence sku-1 tok-1"


def test_checker_answers_unknown_when_redis_is_unreachable() -> None:
    stock = FakeStock(error=ServiceUnavailable("Redis", "127.0.0.1:6379", "refused"))
    assert _check(stock, age_s=60) is Resolution.UNKNOWN


@pytest.mark.parametrize("body", [b"garbage", b'{"v": 1}', b"[]"])
def test_checker_rolls_back_a_malformed_half_message_without_asking_redis(body: bytes) -> None:
    stock = FakeStock()
    assert _check(stock, age_s=60, delivery=_delivery(body)) is Resolution.ROLLBACK
    assert stock.calls == []


def test_checker_ages_a_message_by_born_ms_first_then_by_the_body_timestamp() -> None:
    body = Deduction("tok-1", "sku-1", "u1", 2, ts_ms=BORN_MS + 5_000).encode()
    with_born = FakeStock()
    assert _check(with_born, age_s=GRACE_S + 1, delivery=_delivery(body)) is Resolution.ROLLBACK
    assert with_born.calls[-1] == "fence sku-1 tok-1"
    without_born = FakeStock()
    assert _check(without_born, age_s=GRACE_S + 1, delivery=_delivery(body, born_ms=None)) is Resolution.UNKNOWN
    assert without_born.calls == ["log_entry sku-1 tok-1"]


def test_checker_reports_each_resolution_to_its_observer() -> None:
    seen: list[Resolution] = []
    checker = DeductionChecker(FakeStock(entry=_entry("deducted")), GRACE_S, clock=lambda: 0.0, observe=seen.append)
    checker.check(_delivery())
    assert seen == [Resolution.COMMIT]
