from __future__ import annotations

import asyncio
import time

import pytest

from flashsale import constants as c
from flashsale.errors import ServiceUnavailable, StockError
from flashsale.models import DeductionMessage, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline.partitions import Scheduler
from flashsale.pipeline.producer import PurchaseService
from flashsale.pipeline.sold_out import SoldOutCache
from flashsale.records import Layout, LogEntry, Prededuct, PredeductResult
from tests.unit.fakes import FakeBus, FakePartitions, FakeStock


class _Service:
    """The coroutine service driven from a test: each purchase on a fresh event loop."""

    def __init__(self, service: PurchaseService) -> None:
        self.service = service

    def purchase(self, *args: object) -> PurchaseResult:
        return asyncio.run(self.service.purchase(*args))


def _service(stock: FakeStock, bus: FakeBus) -> _Service:
    return _Service(PurchaseService(stock, bus, "ns-deductions", sold_out_cache_s=60))


def test_purchases_arriving_together_share_one_transaction_and_keep_their_own_answers() -> None:
    stock, bus = FakeStock(), FakeBus()
    stock.entries["seen"] = LogEntry("seen", "deducted", "sku-1", "u1", 1, 0, message_id="msg-before")
    service = PurchaseService(stock, bus, "ns-deductions", group_size=3, group_wait_s=5.0)
    groups: list[int] = []
    service._observe_group = groups.append

    async def crowd() -> list[PurchaseResult]:
        return list(
            await asyncio.gather(
                *(service.purchase("sku-1", f"u{i}", 1, token) for i, token in enumerate(["a", "seen", "b"]))
            )
        )

    results = asyncio.run(crowd())
    assert [r.status for r in results] == [PurchaseStatus.ACCEPTED, PurchaseStatus.DUPLICATE, PurchaseStatus.ACCEPTED]
    assert results[1].message_id == "msg-before" and results[0].message_id == results[2].message_id == "msg-1"
    # Three purchases closed the group at once (no 5 s wait): one read, one half message, one pre-deduct.
    assert stock.calls == ["peek sku-1 a seen b", "prededuct sku-1 a b msg-1"]
    assert bus.calls == ["send_half a", "commit msg-1"] and groups == [2]


def test_accepted_purchase_commits_the_half_message() -> None:
    stock, bus = FakeStock(PredeductResult(Prededuct.ACCEPTED, 9)), FakeBus()
    result = _service(stock, bus).purchase("sku-1", "u1", 1, "tok-1")
    assert (result.status, result.remaining, result.message_id) == (PurchaseStatus.ACCEPTED, 9, "msg-1")
    assert bus.calls == ["send_half tok-1", "commit msg-1"]
    assert stock.calls == ["peek sku-1 tok-1", "prededuct sku-1 tok-1 msg-1"]


def test_half_message_carries_the_purchase_and_names_its_own_id() -> None:
    bus = FakeBus()
    _service(FakeStock(), bus).purchase("sku-1", "u1", "2", "tok-1")
    topic, key, body, tag = bus.sent[0]
    assert (topic, key, tag) == ("ns-deductions", "tok-1", c.DEDUCTION_TAG)
    message = DeductionMessage.decode(body)
    assert (message.sku, message.gid) == ("sku-1", "msg-1")
    assert [(p.token, p.user_id, p.qty) for p in message.purchases] == [("tok-1", "u1", 2)]


@pytest.mark.parametrize(
    ("code", "remaining", "status"),
    [
        (Prededuct.SOLD_OUT, 0, PurchaseStatus.SOLD_OUT),
        (Prededuct.INSUFFICIENT, 1, PurchaseStatus.SOLD_OUT),
        (Prededuct.DUPLICATE, 5, PurchaseStatus.DUPLICATE),
        (Prededuct.LIMIT_EXCEEDED, 5, PurchaseStatus.LIMIT_EXCEEDED),
        (Prededuct.FENCED, 5, PurchaseStatus.ERROR),
        (Prededuct.UNKNOWN_SKU, None, PurchaseStatus.INVALID),
        (Prededuct.INVALID_QTY, None, PurchaseStatus.INVALID),
    ],
)
def test_rejected_purchase_rolls_back_the_half_message(
    code: Prededuct, remaining: int | None, status: PurchaseStatus
) -> None:
    bus = FakeBus()
    result = _service(FakeStock(PredeductResult(code, remaining)), bus).purchase("sku-1", "u1", 2, "tok-1")
    assert result.status is status
    assert bus.calls == ["send_half tok-1", "rollback msg-1"]


def test_insufficient_stock_says_how_much_is_left() -> None:
    result = _service(FakeStock(PredeductResult(Prededuct.INSUFFICIENT, 1)), FakeBus()).purchase("s", "u", 3, "t")
    assert result.remaining == 1
    assert result.message == "only 1 left, 3 asked"


def test_duplicate_answers_the_original_message_id() -> None:
    entry = LogEntry("t", "deducted", "s", "u", 1, 0, message_id="msg-original")
    stock = FakeStock(PredeductResult(Prededuct.DUPLICATE, 4, entry))
    assert _service(stock, FakeBus()).purchase("s", "u", 1, "t").message_id == "msg-original"


def test_unknown_outcome_of_the_prededuct_is_left_pending_to_the_checker() -> None:
    stock, bus = FakeStock(error=ServiceUnavailable("Redis", "127.0.0.1:6379", "timeout")), FakeBus()
    result = _service(stock, bus).purchase("sku-1", "u1", 1, "tok-1")
    assert (result.status, result.message_id) == (PurchaseStatus.PENDING, "msg-1")
    assert bus.calls == ["send_half tok-1"]


def test_a_prededuct_that_certainly_did_not_run_rolls_back_and_answers_error_at_once() -> None:
    refused = ServiceUnavailable("Redis", "127.0.0.1:6379", "connection refused", reached=False)
    stock, bus = FakeStock(error=refused), FakeBus()
    result = _service(stock, bus).purchase("sku-1", "u1", 1, "tok-1")
    assert result.status is PurchaseStatus.ERROR
    assert "nothing was deducted" in result.message
    assert bus.calls == ["send_half tok-1", "rollback msg-1"]


def test_failed_script_rolls_back_and_answers_error() -> None:
    bus = FakeBus()
    result = _service(FakeStock(error=StockError("script failed")), bus).purchase("sku-1", "u1", 1, "tok-1")
    assert result.status is PurchaseStatus.ERROR
    assert bus.calls == ["send_half tok-1", "rollback msg-1"]


def test_unsent_half_message_answers_error_without_touching_stock() -> None:
    stock, bus = FakeStock(), FakeBus(fail_send=True)
    result = _service(stock, bus).purchase("sku-1", "u1", 1, "tok-1")
    assert result.status is PurchaseStatus.ERROR
    assert stock.calls == ["peek sku-1 tok-1"]  # a read; nothing was deducted


def test_lost_commit_still_answers_accepted() -> None:
    bus = FakeBus(fail_commit=True)
    result = _service(FakeStock(), bus).purchase("sku-1", "u1", 1, "tok-1")
    assert result.status is PurchaseStatus.ACCEPTED
    assert bus.calls == ["send_half tok-1", "commit msg-1"]


@pytest.mark.parametrize("code", [Prededuct.SOLD_OUT, Prededuct.ACCEPTED])
def test_sold_out_sku_is_refused_without_a_half_message(code: Prededuct) -> None:
    stock, bus = FakeStock(PredeductResult(code, 0)), FakeBus()
    service = _service(stock, bus)
    service.purchase("sku-1", "u1", 1, "tok-1")
    stock.stock = 0
    result = service.purchase("sku-1", "u2", 1, "tok-2")
    assert (result.status, result.remaining) == (PurchaseStatus.SOLD_OUT, 0)
    assert len(bus.sent) == 1
    # The token was looked up all the same: a sold-out answer never stands in for a retry's own answer.
    assert stock.calls == ["peek sku-1 tok-1", "prededuct sku-1 tok-1 msg-1", "peek sku-1 tok-2"]


def test_units_back_on_sale_sell_at_once_however_long_the_sku_was_answered_sold_out() -> None:
    # Each sold-out answer used to renew the producer's sold-out flag: under load it never ran out, and
    # units given back or restocked were never sold again.
    stock, bus = FakeStock(PredeductResult(Prededuct.ACCEPTED, 0)), FakeBus()
    service = _service(stock, bus)
    stock.stock = 0
    assert {service.purchase("sku-1", f"u{i}", 1, f"t{i}").status for i in range(20)} == {PurchaseStatus.SOLD_OUT}
    stock.stock = 3
    assert service.purchase("sku-1", "u-late", 1, "t-late").status is PurchaseStatus.ACCEPTED
    assert len(bus.sent) == 1


def test_a_sold_out_skus_purchases_wait_for_no_group_timer_and_a_restocked_skus_group_again() -> None:
    stock, bus = FakeStock(PredeductResult(Prededuct.ACCEPTED, 4)), FakeBus()
    stock.stock = 0
    service = PurchaseService(stock, bus, "ns-deductions", group_size=100, group_wait_s=0.5, sold_out_cache_s=60)

    async def timed(token: str) -> tuple[PurchaseStatus, float]:
        started = time.monotonic()
        result = await service.purchase("sku-1", "u1", 1, token)
        return result.status, time.monotonic() - started

    async def sale() -> list[tuple[PurchaseStatus, float]]:
        found = [await timed("t1"), await timed("t2")]
        stock.stock = 5
        return [*found, await timed("t3"), await timed("t4")]

    (first, waited), (second, at_once), (third, restocked), (fourth, grouped) = asyncio.run(sale())
    # Not yet known sold out: its group waited for its timer. Known: answered from a read at once.
    assert (first, second) == (PurchaseStatus.SOLD_OUT, PurchaseStatus.SOLD_OUT)
    assert waited >= 0.45 and at_once < 0.25
    # Units back on sale are sold by the very next read; from then on purchases group again.
    assert (third, fourth) == (PurchaseStatus.ACCEPTED, PurchaseStatus.ACCEPTED)
    assert restocked < 0.25 and grouped >= 0.45


def test_a_retry_of_an_accepted_token_after_the_sell_out_gets_duplicate_with_its_message_id() -> None:
    stock, bus = FakeStock(PredeductResult(Prededuct.ACCEPTED, 0)), FakeBus()
    service = _service(stock, bus)
    first = service.purchase("sku-1", "u1", 1, "tok-1")
    stock.entries["tok-1"] = LogEntry("tok-1", "deducted", "sku-1", "u1", 1, 0, message_id=first.message_id)
    stock.stock = 0
    retry = service.purchase("sku-1", "u1", 1, "tok-1")
    assert (first.status, retry.status) == (PurchaseStatus.ACCEPTED, PurchaseStatus.DUPLICATE)
    assert retry.message_id == first.message_id == "msg-1"
    assert len(bus.sent) == 1


def test_a_sold_out_group_is_answered_from_its_one_read_and_a_seen_token_keeps_its_own_answer() -> None:
    stock, bus = FakeStock(PredeductResult(Prededuct.SOLD_OUT, 0)), FakeBus()
    stock.stock = 0
    stock.entries["seen"] = LogEntry("seen", "deducted", "sku-1", "u1", 1, 0, message_id="msg-before")
    service = PurchaseService(stock, bus, "ns-deductions", group_size=3, group_wait_s=5.0)

    async def group(tokens: list[str]) -> list[PurchaseResult]:
        return list(await asyncio.gather(*(service.purchase("sku-1", f"u{i}", 1, t) for i, t in enumerate(tokens))))

    async def sale() -> tuple[list[PurchaseResult], list[PurchaseResult]]:
        return await group(["a", "seen", "b"]), await group(["c", "d", "e"])

    mixed, fresh = asyncio.run(sale())
    assert [r.status for r in mixed] == [PurchaseStatus.SOLD_OUT, PurchaseStatus.DUPLICATE, PurchaseStatus.SOLD_OUT]
    assert mixed[1].message_id == "msg-before"
    # No token seen: one answer for all, each with its own token.
    sold_out = [(PurchaseStatus.SOLD_OUT, t, 0, None, "sku-1 is sold out") for t in "cde"]
    assert [(r.status, r.token, r.remaining, r.message_id, r.message) for r in fresh] == sold_out
    assert bus.calls == [] and stock.calls == ["peek sku-1 a seen b", "peek sku-1 c d e"]


def test_the_sold_out_fast_path_answers_error_when_it_cannot_look_the_token_up() -> None:
    stock, bus = FakeStock(PredeductResult(Prededuct.ACCEPTED, 0)), FakeBus()
    service = _service(stock, bus)
    service.purchase("sku-1", "u1", 1, "tok-1")
    stock.peek_error = ServiceUnavailable("Redis", "127.0.0.1:6379", "refused", reached=False)
    assert service.purchase("sku-1", "u1", 1, "tok-2").status is PurchaseStatus.ERROR
    assert len(bus.sent) == 1


def test_a_failed_read_ahead_of_a_live_sku_leaves_the_decision_to_the_pre_deduct() -> None:
    stock, bus = FakeStock(peek_error=ServiceUnavailable("Redis", "x:1", "timeout")), FakeBus()
    assert _service(stock, bus).purchase("sku-1", "u1", 1, "tok-1").status is PurchaseStatus.ACCEPTED
    assert bus.calls == ["send_half tok-1", "commit msg-1"]


@pytest.mark.parametrize(
    ("setup", "status", "remaining"),
    [
        ("seen", PurchaseStatus.DUPLICATE, 10),
        ("unknown", PurchaseStatus.INVALID, None),
        ("empty", PurchaseStatus.SOLD_OUT, 0),
        ("limit", PurchaseStatus.LIMIT_EXCEEDED, 10),
    ],
)
def test_what_one_read_can_answer_is_answered_without_the_broker(
    setup: str, status: PurchaseStatus, remaining: int | None
) -> None:
    stock, bus = FakeStock(), FakeBus()
    if setup == "seen":
        stock.entries["tok-1"] = LogEntry("tok-1", "deducted", "sku-1", "u1", 1, 0, message_id="msg-before")
    elif setup == "unknown":
        stock.stock = None
    elif setup == "empty":
        stock.stock = 0
    else:
        stock.limit, stock.bought = 2, {"u1": 2}
    result = _service(stock, bus).purchase("sku-1", "u1", 1, "tok-1")
    assert (result.status, result.remaining) == (status, remaining)
    assert result.message_id == ("msg-before" if setup == "seen" else None)
    assert bus.calls == [] and stock.calls == ["peek sku-1 tok-1"]


def test_invalid_input_answers_invalid_without_a_half_message() -> None:
    bus = FakeBus()
    result = _service(FakeStock(), bus).purchase("bad sku", "u1", 1, "tok-1")
    assert result.status is PurchaseStatus.INVALID
    assert "sku must be" in result.message
    assert bus.calls == []


def test_observer_sees_every_answer() -> None:
    seen: list[PurchaseStatus] = []
    service = _Service(
        PurchaseService(FakeStock(), FakeBus(), "t", observe=lambda result, _s: seen.append(result.status))
    )
    service.purchase("sku-1", "u1", 1, "tok-1")
    service.purchase("sku-1", "u1", 0, "tok-2")
    assert seen == [PurchaseStatus.ACCEPTED, PurchaseStatus.INVALID]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_sold_out_cache_trusts_its_flag_until_the_ttl_then_asks_the_stock() -> None:
    stock, clock = FakeStock(sold_out=True), Clock()
    cache = SoldOutCache(stock, ttl_s=0.5, clock=clock)
    assert not asyncio.run(cache.is_sold_out("sku-1"))
    cache.mark("sku-1")
    clock.now += 0.4
    assert asyncio.run(cache.is_sold_out("sku-1"))
    assert stock.calls == []
    clock.now += 0.2
    assert asyncio.run(cache.is_sold_out("sku-1"))
    assert stock.calls == ["is_sold_out sku-1"]


def test_sold_out_cache_forgets_a_restocked_sku() -> None:
    stock, clock = FakeStock(sold_out=False), Clock()
    cache = SoldOutCache(stock, ttl_s=0.5, clock=clock)
    cache.mark("sku-1")
    clock.now += 1
    assert not asyncio.run(cache.is_sold_out("sku-1"))
    stock.sold_out = True
    assert not asyncio.run(cache.is_sold_out("sku-1"))
    assert stock.calls == ["is_sold_out sku-1"]


def test_sold_out_cache_lets_the_prededuct_decide_when_the_stock_cannot_tell() -> None:
    stock, clock = FakeStock(error=ServiceUnavailable("Redis", "x:1", "down")), Clock()
    cache = SoldOutCache(stock, ttl_s=0.5, clock=clock)
    cache.mark("sku-1")
    clock.now += 1
    assert not asyncio.run(cache.is_sold_out("sku-1"))


def test_a_sku_seen_with_stock_skips_the_read_until_the_ttl_then_reads_again() -> None:
    stock, bus, clock = FakeStock(PredeductResult(Prededuct.ACCEPTED, 9)), FakeBus(), Clock()
    service = PurchaseService(stock, bus, "ns-deductions", sold_out_cache_s=0.5, clock=clock)
    buy = _Service(service).purchase
    assert buy("sku-1", "u1", 1, "t1").status is PurchaseStatus.ACCEPTED
    clock.now += 0.4
    assert buy("sku-1", "u2", 1, "t2").status is PurchaseStatus.ACCEPTED  # straight to its transaction
    clock.now += 0.4  # 0.8 s after the read, 0.4 after the pre-deduct that saw 9 left: still trusted
    assert buy("sku-1", "u3", 1, "t3").status is PurchaseStatus.ACCEPTED
    clock.now += 0.6
    assert buy("sku-1", "u4", 1, "t4").status is PurchaseStatus.ACCEPTED
    assert stock.calls == [
        "peek sku-1 t1",
        "prededuct sku-1 t1 msg-1",
        "prededuct sku-1 t2 msg-2",
        "prededuct sku-1 t3 msg-3",
        "peek sku-1 t4",
        "prededuct sku-1 t4 msg-4",
    ]
    # Another SKU is not this one: it is read.
    buy("sku-2", "u1", 1, "t5")
    assert stock.calls[-2:] == ["peek sku-2 t5", "prededuct sku-2 t5 msg-5"]


@pytest.mark.parametrize(
    ("last", "left"),
    [
        (PredeductResult(Prededuct.ACCEPTED, 0), "the last unit sold"),
        (PredeductResult(Prededuct.SOLD_OUT, 0), "none left"),
        (PredeductResult(Prededuct.UNKNOWN_SKU, None), "no stock known"),
    ],
)
def test_a_prededuct_that_leaves_no_stock_or_cannot_tell_brings_the_read_back(last: PredeductResult, left: str) -> None:
    stock, bus, clock = FakeStock(PredeductResult(Prededuct.ACCEPTED, 9)), FakeBus(), Clock()
    service = PurchaseService(stock, bus, "ns-deductions", sold_out_cache_s=60, clock=clock)
    buy = _Service(service).purchase
    buy("sku-1", "u1", 1, "t1")
    stock.result = last
    buy("sku-1", "u2", 1, "t2")  # skipped the read: the SKU had 9 left
    stock.result = PredeductResult(Prededuct.ACCEPTED, 9)
    buy("sku-1", "u3", 1, "t3")
    assert stock.calls[1:4] == ["prededuct sku-1 t1 msg-1", "prededuct sku-1 t2 msg-2", "peek sku-1 t3"], left


def test_a_token_seen_before_on_a_sku_in_stock_is_answered_by_its_prededuct() -> None:
    # No read ahead of the transaction: the pre-deduct's own `duplicate` (with the message that deducted
    # the token) is the answer, and nothing is deducted again.
    before = LogEntry("seen", "deducted", "sku-1", "u1", 1, 0, message_id="msg-before")
    stock, bus, clock = FakeStock(PredeductResult(Prededuct.ACCEPTED, 9)), FakeBus(), Clock()
    buy = _Service(PurchaseService(stock, bus, "ns-deductions", sold_out_cache_s=60, clock=clock)).purchase
    buy("sku-1", "u1", 1, "t1")
    stock.entries["seen"] = before  # a read would find it: none is made
    stock.result = PredeductResult(Prededuct.DUPLICATE, 8, entry=before)
    again = buy("sku-1", "u1", 1, "seen")
    assert (again.status, again.message_id, again.remaining) == (PurchaseStatus.DUPLICATE, "msg-before", 8)
    assert stock.calls[-1] == "prededuct sku-1 seen msg-2" and "peek sku-1 seen" not in stock.calls
    assert bus.calls[-2:] == ["send_half seen", "rollback msg-2"]  # nothing accepted: rolled back


def test_a_broker_that_refuses_the_half_message_brings_the_read_back() -> None:
    # With no broker, the read's answers (a token seen before, sold out, the limit) are the only ones a
    # buyer can have: the group after the refused one is read first again.
    before = LogEntry("seen", "deducted", "sku-1", "u1", 1, 0, message_id="msg-before")
    stock, bus, clock = FakeStock(PredeductResult(Prededuct.ACCEPTED, 9)), FakeBus(), Clock()
    buy = _Service(PurchaseService(stock, bus, "ns-deductions", sold_out_cache_s=60, clock=clock)).purchase
    buy("sku-1", "u1", 1, "t1")
    bus.fail_send = True
    stock.entries["seen"] = before
    assert buy("sku-1", "u1", 1, "seen").status is PurchaseStatus.ERROR  # straight to the broker: refused
    again = buy("sku-1", "u1", 1, "seen")
    assert (again.status, again.message_id) == (PurchaseStatus.DUPLICATE, "msg-before")
    assert stock.calls == ["peek sku-1 t1", "prededuct sku-1 t1 msg-1", "peek sku-1 seen"]


def test_a_sold_out_flag_read_clear_is_no_sign_of_stock_left() -> None:
    # The flag says only that the SKU is not sold out (or could not be read): its groups are still read.
    for flag in (FakeStock(sold_out=False), FakeStock(error=ServiceUnavailable("Redis", "x:1", "down"))):
        clock = Clock()
        cache = SoldOutCache(flag, ttl_s=0.5, clock=clock)
        cache.mark("sku-1")
        clock.now += 1
        assert not asyncio.run(cache.is_sold_out("sku-1"))
        assert not cache.in_stock("sku-1")
        cache.saw_stock("sku-1")
        assert cache.in_stock("sku-1") and not cache.marked("sku-1")


def _spread(stock: FakeStock, bus: FakeBus) -> list[PurchaseResult]:
    """Three purchases of one SKU on two partitions, as the scheduler places them: one transaction."""
    service = PurchaseService(stock, bus, "ns-deductions")
    requests = [PurchaseRequest.build("hot", f"u{i}", 1, f"t{i}") for i in range(3)]
    placed = asyncio.run(service._transact("hot", requests, ["hot#0", "hot#2", "hot#0"], 7))
    return [result for result, _ in placed]


def test_a_group_spread_over_partitions_is_one_half_message_and_a_pre_deduct_on_each() -> None:
    stock, bus = FakeStock(), FakeBus()
    assert [r.status for r in _spread(stock, bus)] == [PurchaseStatus.ACCEPTED] * 3
    assert sorted(stock.calls) == ["prededuct hot#0 t0 t2 msg-1", "prededuct hot#2 t1 msg-1"]
    assert bus.calls == ["send_half t0", "commit msg-1"]
    message = DeductionMessage.decode(bus.sent[0][2])
    assert [(p.token, p.part) for p in message.purchases] == [("t0", "hot#0"), ("t1", "hot#2"), ("t2", "hot#0")]


def test_a_share_with_an_unknown_outcome_leaves_the_whole_message_to_the_checker() -> None:
    stock, bus = FakeStock(errors={"hot#2": ServiceUnavailable("Redis", "127.0.0.1:7001", "timeout")}), FakeBus()
    # hot#0 accepted t0 and t2, but the message is not committed: its buyers hear pending, as t1's does.
    assert [r.status for r in _spread(stock, bus)] == [PurchaseStatus.PENDING] * 3
    assert bus.calls == ["send_half t0"]


def test_a_share_that_did_not_run_beside_one_that_deducted_is_left_to_the_checker() -> None:
    refused = ServiceUnavailable("Redis", "127.0.0.1:7001", "connection refused", reached=False)
    stock, bus = FakeStock(errors={"hot#2": refused}), FakeBus()
    statuses = [r.status for r in _spread(stock, bus)]
    assert statuses == [PurchaseStatus.PENDING, PurchaseStatus.ERROR, PurchaseStatus.PENDING]
    assert bus.calls == ["send_half t0"]  # committed by the checker once hot#2 is fenced


def test_a_share_that_did_not_run_beside_ones_that_deducted_nothing_rolls_back() -> None:
    refused = ServiceUnavailable("Redis", "127.0.0.1:7001", "connection refused", reached=False)
    stock = FakeStock(result=PredeductResult(Prededuct.SOLD_OUT, 0), errors={"hot#2": refused})
    bus = FakeBus()
    statuses = [r.status for r in _spread(stock, bus)]
    assert statuses == [PurchaseStatus.SOLD_OUT, PurchaseStatus.ERROR, PurchaseStatus.SOLD_OUT]
    assert bus.calls == ["send_half t0", "rollback msg-1"]


def test_a_partition_of_another_load_answers_error_and_the_layout_is_read_again() -> None:
    fake = FakePartitions(Layout("hot", ("hot#0",), refill=5, threshold=0, epoch=7), pool=0, stock={"hot#0": 5})
    stock, bus = FakeStock(result=PredeductResult(Prededuct.STALE_LAYOUT, None)), FakeBus()
    scheduler = Scheduler(fake)
    service = PurchaseService(stock, bus, "ns-deductions", scheduler=scheduler)

    async def twice() -> list[PurchaseResult]:
        first = await service.purchase("hot", "u1", 1, "t1")
        second = await service.purchase("hot", "u1", 1, "t2")
        await scheduler.close()
        return [first, second]

    results = asyncio.run(twice())
    assert [r.status for r in results] == [PurchaseStatus.ERROR] * 2
    assert "loaded again" in results[0].message
    assert bus.calls == ["send_half t1", "rollback msg-1", "send_half t2", "rollback msg-2"]
    # The layout was read for each purchase: the first refusal dropped the one cached (for 2 s).
    assert [call for call in fake.calls if call.startswith("layout")] == ["layout hot", "layout hot"]


def test_a_token_seen_before_is_told_duplicate_only_once_a_replica_holds_its_entry() -> None:
    entry = LogEntry("seen", "deducted", "sku-1", "u1", 1, 0, message_id="msg-before")
    stock = FakeStock(entries={"seen": entry})
    stock.unconfirmed = ServiceUnavailable("Redis", "127.0.0.1:7000", "no replica acknowledged within 500 ms")
    # Every group read first (no stock seen is trusted): the retry is answered by the read, as the first.
    service = PurchaseService(stock, FakeBus(), "ns-deductions", sold_out_cache_s=0)
    pending = asyncio.run(service.purchase("sku-1", "u1", 1, "seen"))
    # The master holds the entry, no replica does yet: a failover could still lose it, so not `duplicate`.
    assert (pending.status, pending.message_id) == (PurchaseStatus.PENDING, "msg-before")
    stock.unconfirmed = None
    again = asyncio.run(service.purchase("sku-1", "u1", 1, "seen"))
    assert (again.status, again.message_id) == (PurchaseStatus.DUPLICATE, "msg-before")
