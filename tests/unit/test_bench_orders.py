"""The bench of a sale with non-payers, without servers: its options, who pays, and what the logs say."""

from __future__ import annotations

import pytest

from flashsale.bench.lifecycle import measure
from flashsale.bench.payers import Payers
from flashsale.bench.runner import BenchConfig
from flashsale.errors import InvalidInput
from flashsale.records import LogEntry


def _entry(
    token: str, ts: int, order: str | None = None, due: int | None = None, decided: int | None = None
) -> LogEntry:
    state = "returned" if order == "expired" else "deducted"
    return LogEntry(token, state, "s", "u", 1, ts, order=order, due_ms=due, decided_ms=decided)


def test_with_unpaid_and_no_rate_the_attempts_are_spread_over_three_deadlines() -> None:
    config = BenchConfig(attempts=3000, unpaid=0.3, pay_within_ms=2000).resolved()
    assert config.rate == 500.0 and config.pay_within_ms == 2000
    assert BenchConfig(attempts=3000, unpaid=0.3).resolved().rate == 200.0  # over 3 x the default 5 s
    given = BenchConfig(attempts=3000, unpaid=0.3, rate=300.0).resolved()
    assert (given.rate, given.pay_within_ms) == (300.0, 5000)
    assert BenchConfig(attempts=3000).resolved().rate is None  # no orders: a closed loop, as before


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"unpaid": 1.0}, "--unpaid must be a fraction from 0 up to, not including, 1"),
        ({"unpaid": -0.1}, "--unpaid must be a fraction"),
        ({"pay_within_ms": 5000}, "--pay-within goes with --unpaid"),
        ({"unpaid": 0.3, "pay_within_ms": 86_400_001}, "at most 1d"),
        ({"unpaid": 0.3, "pay_within_ms": -1}, "--pay-within must be above 0"),
        ({"unpaid": 0.3, "backlog": True}, "drop --backlog"),
        ({"unpaid": 0.3, "pay_within_ms": 2000, "rate": 1000.0}, "stop after 3.0 s"),
    ],
)
def test_a_sale_with_orders_refuses_options_it_cannot_measure_saying_which(options: dict, says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        BenchConfig(attempts=3000, **options).resolved()


def test_exactly_the_given_share_of_accepted_buyers_never_pays_spread_over_the_sale() -> None:
    payers = Payers("secret", 0.3)
    pays = [payers.pays() for _ in range(20)]
    assert pays.count(False) == 6 and pays[:10].count(False) == 3
    assert all(Payers("s", 0.0).pays() for _ in range(20))


def test_the_kth_unit_given_back_is_the_kth_sold_beyond_the_stock() -> None:
    # 3 units loaded; t1 and t2 expire (due 1000, 1200; back at 1500, 1300); r1 and r2 buy them again.
    entries = [
        _entry("t0", 10, "paid", due=1010, decided=20),
        _entry("t1", 11, "expired", due=1000, decided=1500),
        _entry("t2", 12, "expired", due=1200, decided=1300),
        _entry("r1", 1400, "paid", due=2400, decided=1410),
        _entry("r2", 1600, "awaiting", due=2600),
    ]
    life = measure([(entries, 3)], sale_end_ms=1100)
    assert (life.orders, life.paid, life.expired, life.awaiting) == (5, 2, 2, 1)
    assert (life.resold, life.back_unsold, life.oversold) == (2, 0, 0)
    # Back in decided order (t2 at 1300, then t1 at 1500), sold at 1400 and 1600: 1400-1200, 1600-1000.
    assert (life.resold_after_due_p50_ms, life.resold_after_due_p99_ms) == (600.0, 600.0)
    assert life.resold_per_s == round(2 / 0.3, 2)  # from the first unit back (1300) to the last resold (1600)
    # Only t1 was due before the buyers stopped (1100): t2's lateness is not under load.
    assert (life.expired_under_load, life.lateness_p50_ms, life.lateness_max_ms) == (1, 500.0, 500.0)


def test_units_sold_beyond_those_loaded_and_given_back_are_counted_as_oversold() -> None:
    entries = [_entry("t0", 10), _entry("t1", 11, "expired", due=20, decided=30), _entry("t2", 40), _entry("t3", 50)]
    life = measure([(entries, 1)], sale_end_ms=100)
    assert (life.resold, life.oversold, life.back_unsold) == (3, 2, 0)


def test_a_sale_without_orders_has_no_lifecycle_to_measure() -> None:
    life = measure([([_entry(f"t{i}", i) for i in range(4)], 4)], sale_end_ms=100)
    assert (life.orders, life.resold, life.expired, life.resold_per_s, life.lateness_p99_ms) == (4, 0, 0, 0.0, 0.0)
