"""Placement, the scheduler's choices and the arithmetic of transfers under way: the pure parts of partitioned stock.

The scheduler runs here against FakePartitions, a partitioned SKU in memory; the real scripts and the
real cluster are in tests/integration/test_lua.py and tests/acceptance/test_partitions.py.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest
from redis.crc import key_slot

from flashsale.adapters.redis.codec import moving
from flashsale.adapters.redis.keys import STOCK_KEY, parent, place
from flashsale.errors import MalformedMessage, ServiceUnavailable
from flashsale.models import DeductionMessage, Purchase, PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline import partitions
from flashsale.pipeline.partitions import Placed, Scheduler, Sender
from flashsale.records import Layout, LogEntry, Registry, Transfer
from tests.unit.fakes import FakePartitions

PARTS = ("s#0", "s#1", "s#2")
LAYOUT = Layout("s", PARTS, refill=5, threshold=0, epoch=1)


def _three_masters(slot: int) -> str:
    return ("a", "b", "c")[slot * 3 // 16384]


def _token_for(part: str, *, then: str | None = None, avoid: str = "") -> str:
    """A token whose order starts at `part` (and goes on to `then`)."""
    for n in range(10_000):
        token = f"tok{avoid}-{n}"
        order = list(LAYOUT.order(token))
        if order[0] == part and (then is None or order[1] == then):
            return token
    raise AssertionError("no such token")


def test_partitions_land_on_the_masters_in_turn_and_never_share_a_name() -> None:
    names = place("hot", 6, ["a", "b", "c"], _three_masters)
    assert len(set(names)) == 6 and all(parent(n) == "hot" for n in names)
    owners = [_three_masters(key_slot(STOCK_KEY.format(sku=n).encode())) for n in names]
    assert owners == ["a", "b", "c", "a", "b", "c"]


def test_on_one_node_partitions_are_numbered_in_order() -> None:
    assert place("hot", 3, [""], lambda slot: "") == ["hot#0", "hot#1", "hot#2"]


def test_a_tokens_order_is_fixed_and_tokens_spread_evenly_over_every_place() -> None:
    orders = [tuple(LAYOUT.order(f"tok-{i}")) for i in range(3000)]
    assert all(sorted(o) == sorted(PARTS) for o in orders)
    assert orders[17] == tuple(LAYOUT.order("tok-17"))  # every attempt, in any process, walks the same way
    first = Counter(o[0] for o in orders)
    assert set(first) == set(PARTS) and min(first.values()) > 900
    # The tokens of one partition spread over the others when it closes.
    after = Counter(o[1] for o in orders if o[0] == "s#1")
    assert set(after) == {"s#0", "s#2"} and min(after.values()) > 0.4 * sum(after.values())


def test_a_token_is_sold_on_its_first_open_partition_passing_the_closed_ones() -> None:
    token = _token_for("s#1", then="s#2")
    assert Registry(0, {}).target(LAYOUT, token) == ("s#1", [])
    assert Registry(0, {}, closed=frozenset({"s#1"})).target(LAYOUT, token) == ("s#2", ["s#1"])
    # The anchor never closes, so every token has somewhere to go.
    assert Registry(0, {}, closed=frozenset({"s#1", "s#2"})).target(LAYOUT, token) == ("s#0", ["s#1", "s#2"])


def test_units_under_way_are_those_between_two_steps() -> None:
    transfers = {
        "r1": json.dumps({"dir": "out", "part": "s#0", "qty": 4, "ts": 1}),  # taken, not given yet
        "r2": json.dumps({"dir": "out", "part": "s#1", "qty": 3, "ts": 1}),  # given, record not deleted yet
        "d1": json.dumps({"dir": "in", "part": "s#1", "want": 5, "ts": 1}),  # drained 2, not received
        "d2": json.dumps({"dir": "in", "part": "s#0", "want": 5, "ts": 1}),  # expected, not drained yet
    }
    refills = {"s#1": {"r2": "3", "d1": "-2"}}
    assert moving(transfers, refills) == 4 + 2


def test_a_message_names_only_a_partition_of_its_own_sku() -> None:
    message = DeductionMessage("hot", (Purchase("t1", "u1", 1),), "g1", part="hot#3")
    decoded = DeductionMessage.decode(message.encode())
    assert decoded.part == "hot#3" and list(decoded.shards()) == ["hot#3"]
    assert list(
        DeductionMessage.decode(DeductionMessage("hot", (Purchase("t1", "u1", 1),), "g1").encode()).shards()
    ) == ["hot"]
    spread = DeductionMessage("hot", (Purchase("t1", "u1", 1, "hot#3"),), "g1").encode()
    for bad in ("cold#3", "hot#", "hot#x", 7, "hot"):
        for body, where in ((json.loads(message.encode()), None), (json.loads(spread), 0)):
            if where is None:
                body["part"] = bad
            else:
                body["purchases"][where]["part"] = bad
            with pytest.raises(MalformedMessage, match="part must name a partition of hot"):
                DeductionMessage.decode(json.dumps(body).encode())


def test_a_group_spread_over_partitions_is_one_message_each_purchase_naming_its_own() -> None:
    purchases = (Purchase("t1", "u1", 1, "hot#0"), Purchase("t2", "u2", 2, "hot#4"), Purchase("t3", "u3", 1, "hot#0"))
    body = DeductionMessage("hot", purchases, "g1").encode()
    assert json.loads(body)["v"] == 3  # what a consumer that knows only one partition per message refuses
    decoded = DeductionMessage.decode(body)
    assert decoded.purchases == purchases
    assert {shard: [p.token for p in ps] for shard, ps in decoded.shards().items()} == {
        "hot#0": ["t1", "t3"],
        "hot#4": ["t2"],
    }
    # A body of one partition (or none) keeps version 2, which every consumer reads.
    assert json.loads(DeductionMessage("hot", (Purchase("t1", "u1", 1),), "g1", part="hot#0").encode())["v"] == 2
    # Version 2 bodies knew no partition per purchase: one there is not read as one.
    old = json.loads(body)
    old["v"] = 2
    assert {p.part for p in DeductionMessage.decode(json.dumps(old).encode()).purchases} == {""}


def test_a_sku_is_sold_out_only_with_nothing_anywhere_and_nothing_on_its_way() -> None:
    empty = {"s#0": (0, 0), "s#1": (0, 0)}
    assert Registry(pool=0, parts=empty).sold_out
    assert not Registry(pool=0, parts=empty, transfers=1).sold_out  # units between the pool and a partition
    assert not Registry(pool=1, parts=empty).sold_out
    assert not Registry(pool=0, parts={"s#0": (0, 1), "s#1": (0, 0)}).sold_out  # a standby still holds one


def _requests(tokens: list[str], qty: int = 1) -> list[PurchaseRequest]:
    return [PurchaseRequest.build("s", f"u-{t}", qty, t) for t in tokens]


def _sell(fake: FakePartitions, requests: list[PurchaseRequest], layout: Layout = LAYOUT) -> list[PurchaseStatus]:
    async def run() -> list[PurchaseStatus]:
        scheduler = Scheduler(fake)
        try:
            return [r.status for r in await scheduler.sell(layout, requests, fake.sell)]
        finally:
            await scheduler.close()

    return asyncio.run(run())


def test_a_group_is_one_transaction_with_each_purchase_on_its_own_partition() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 10 for p in PARTS})
    tokens = [_token_for(p, avoid=str(i)) for i, p in enumerate(PARTS * 2)]
    assert _sell(fake, _requests(tokens)) == [PurchaseStatus.ACCEPTED] * 6
    assert fake.sales == [[(t, next(LAYOUT.order(t))) for t in tokens]]
    assert fake.stock == {p: 8 for p in PARTS}
    assert fake.calls == []  # nothing read or written beside the transaction


def test_a_retry_goes_where_its_first_attempt_went_and_hears_duplicate() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 10 for p in PARTS})
    token = _token_for("s#2")
    assert _sell(fake, _requests([token])) == [PurchaseStatus.ACCEPTED]
    assert _sell(fake, _requests([token])) == [PurchaseStatus.DUPLICATE]
    assert fake.sales[1] == [(token, "s#2")] and fake.stock["s#2"] == 9


def test_a_partition_short_of_its_share_is_refilled_from_the_pool_before_anything_is_sent_there() -> None:
    fake = FakePartitions(LAYOUT, pool=20, stock={"s#0": 5, "s#1": 0, "s#2": 5})
    token = _token_for("s#1")
    assert _sell(fake, _requests([token], qty=3)) == [PurchaseStatus.ACCEPTED]
    assert fake.sales == [[(token, "s#1")]]  # one transaction: none was sent to be refused
    assert "take s#1 5" in fake.calls and fake.stock["s#1"] == 2 and fake.closed == set()


def test_a_purchase_refused_by_a_partition_the_registry_thought_could_cover_it_pulls_stock_and_sells() -> None:
    fake = FakePartitions(LAYOUT, pool=20, stock={"s#0": 5, "s#1": 0, "s#2": 5})
    fake.registries = [Registry(20, {p: (5, 0) for p in PARTS})]  # read before s#1 sold its last units
    token = _token_for("s#1")
    assert _sell(fake, _requests([token], qty=3)) == [PurchaseStatus.ACCEPTED]
    assert fake.sales == [[(token, "s#1")], [(token, "s#1")]]
    assert "take s#1 5" in fake.calls and fake.stock["s#1"] == 2


def test_an_exhausted_partition_with_an_empty_pool_closes_and_its_tokens_sell_on_their_next() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={"s#0": 5, "s#1": 0, "s#2": 5})
    token = _token_for("s#1", then="s#2")
    assert _sell(fake, _requests([token])) == [PurchaseStatus.ACCEPTED]
    assert fake.closed == {"s#1"}
    assert fake.sales == [[(token, "s#2")]]  # closed before anything was sent to it
    # Nothing was drained to the empty partition: its tokens moved instead.
    assert not any(call.startswith("drain") for call in fake.calls)
    # The next token of s#1 goes straight to its next one, once the log of s#1 is read for it.
    other = _token_for("s#1", then="s#0", avoid="x")
    fake.calls.clear()
    assert _sell(fake, _requests([other])) == [PurchaseStatus.ACCEPTED]
    assert fake.sales[-1] == [(other, "s#0")] and fake.calls == ["entries s#1"]


def test_a_token_sold_on_a_partition_before_it_closed_still_hears_duplicate() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={"s#0": 5, "s#1": 1, "s#2": 5})
    token = _token_for("s#1", then="s#2")
    assert _sell(fake, _requests([token])) == [PurchaseStatus.ACCEPTED]  # the last unit of s#1
    fake.closed.add("s#1")
    sales = len(fake.sales)
    assert _sell(fake, _requests([token])) == [PurchaseStatus.DUPLICATE]
    assert len(fake.sales) == sales  # answered from the closed partition's log, with no transaction


def test_the_anchor_never_closes_it_takes_the_units_of_the_others() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={"s#0": 0, "s#1": 1, "s#2": 2})
    token = _token_for("s#0")
    assert _sell(fake, _requests([token], qty=3)) == [PurchaseStatus.ACCEPTED]
    assert fake.closed == set() and fake.stock == {"s#0": 0, "s#1": 0, "s#2": 0}
    assert "close s#0" not in fake.calls


def test_units_given_back_to_a_closed_partition_of_a_sold_out_sku_sell_again_to_one_buyer() -> None:
    # Sold out: the pool empty, the anchor empty, the others closed. A cancelled order of s#2 gives its unit
    # back to s#2, which sells nothing more: the anchor takes it (drained to the pool, then refilled).
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1", "s#2"})
    tokens = [_token_for(p, avoid=f"g{i}") for i, p in enumerate(PARTS)]
    assert _sell(fake, _requests(tokens[:1])) == [PurchaseStatus.SOLD_OUT] and fake.sales == []
    fake.stock["s#2"] = 1
    assert Counter(_sell(fake, _requests(tokens))) == {PurchaseStatus.ACCEPTED: 1, PurchaseStatus.SOLD_OUT: 2}
    assert "drain s#2 1" in fake.calls and "take s#0 1" in fake.calls
    assert {part for sale in fake.sales for _, part in sale} == {"s#0"}  # only the anchor sells
    assert fake.stock == {p: 0 for p in PARTS} and fake.pool == 0 and fake.closed == {"s#1", "s#2"}


def test_a_pull_takes_from_the_pool_what_another_producer_drained_before_its_own_drain_came() -> None:
    # The registry says the closed s#1 holds a unit; another producer drained it to the pool in between.
    # The anchor's drain of s#1 finds nothing, and the pull takes the unit from the pool all the same.
    fake = FakePartitions(LAYOUT, pool=1, stock={p: 0 for p in PARTS}, closed={"s#1", "s#2"})
    stale = Registry(0, {"s#0": (0, 0), "s#1": (1, 0), "s#2": (0, 0)}, closed=frozenset({"s#1", "s#2"}))
    fake.registries = [stale, stale]
    token = _token_for("s#0")
    assert _sell(fake, _requests([token])) == [PurchaseStatus.ACCEPTED]
    assert "drain s#1 0" in fake.calls and "take s#0 1" in fake.calls
    assert fake.pool == 0 and fake.sales == [[(token, "s#0")]]


def test_a_pull_waits_for_the_units_its_own_producer_is_draining_in_the_background() -> None:
    # The first sale sells the anchor's last unit, then drains, in the background, the unit an order gave
    # back to the closed s#2. The next purchase pulls while that unit is on its way: in neither the
    # partition nor the pool. It waits for it to land, and buys it.
    class SlowPool(FakePartitions):
        async def receive(self, layout: Layout, transfer_id: str, qty: int) -> None:
            await asyncio.sleep(0.05)
            await super().receive(layout, transfer_id, qty)

    fake = SlowPool(LAYOUT, pool=0, stock={"s#0": 1, "s#1": 0, "s#2": 1}, closed={"s#1", "s#2"})
    first, second = _token_for("s#0", avoid="a"), _token_for("s#0", avoid="b")

    async def run() -> list[PurchaseStatus]:
        scheduler = Scheduler(fake)
        try:
            said = [r.status for r in await scheduler.sell(LAYOUT, _requests([first]), fake.sell)]
            await asyncio.sleep(0.01)  # the drain of s#2 has begun: the unit left it, the pool has not got it
            assert fake.stock["s#2"] == 0 and fake.pool == 0
            return said + [r.status for r in await scheduler.sell(LAYOUT, _requests([second]), fake.sell)]
        finally:
            await scheduler.close()

    assert asyncio.run(run()) == [PurchaseStatus.ACCEPTED] * 2
    assert fake.stock == {p: 0 for p in PARTS} and fake.pool == 0


def test_a_group_larger_than_the_last_units_buys_them_and_only_the_rest_hear_sold_out() -> None:
    # The anchor holds 2 units, the others are closed and the pool is empty: nothing can be pulled, but 2 of
    # the 5 purchases still fit, so they are sent and the scripts say which.
    fake = FakePartitions(LAYOUT, pool=0, stock={"s#0": 2, "s#1": 0, "s#2": 0}, closed={"s#1", "s#2"})
    tokens = [_token_for("s#0", avoid=str(i)) for i in range(5)]
    assert Counter(_sell(fake, _requests(tokens))) == {PurchaseStatus.ACCEPTED: 2, PurchaseStatus.SOLD_OUT: 3}
    assert fake.stock == {p: 0 for p in PARTS} and len(fake.sales) == 1


def test_a_partition_that_can_cover_part_of_a_group_sells_that_part_then_closes_and_the_rest_go_on() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={"s#0": 5, "s#1": 2, "s#2": 5})
    tokens = [_token_for("s#1", then="s#2", avoid=str(i)) for i in range(4)]
    assert _sell(fake, _requests(tokens)) == [PurchaseStatus.ACCEPTED] * 4
    # s#1 sold the 2 it held; the other 2 found it empty, closed it and sold on their next partition.
    assert fake.stock == {"s#0": 5, "s#1": 0, "s#2": 3} and fake.closed == {"s#1"}
    assert not any(call.startswith("drain") for call in fake.calls)  # no unit was moved for them
    assert [len(sale) for sale in fake.sales] == [4, 2]


def test_sold_out_is_answered_from_the_logs_with_no_transaction_and_a_seen_token_keeps_its_answer() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1", "s#2"})
    seen = _token_for("s#2", then="s#1")
    fake.logs["s#2"] = {seen: LogEntry(seen, "deducted", "s", "u", 1, 0, "m-old", part="s#2")}
    fresh = _token_for("s#1", avoid="f")
    assert _sell(fake, _requests([seen, fresh])) == [PurchaseStatus.DUPLICATE, PurchaseStatus.SOLD_OUT]
    assert fake.sales == [] and fake.held == {}


def test_a_purchase_asked_again_where_its_partition_now_holds_less_than_it_hears_duplicate_not_sold_out() -> None:
    # Bought 2 on the anchor, whose last unit is all the SKU has left: the retry cannot be covered, the pull
    # finds nothing, and no pre-deduct reads the log for it. Its log is read before `sold_out` is told.
    token = _token_for("s#0")
    fake = FakePartitions(LAYOUT, pool=0, stock={"s#0": 1, "s#1": 0, "s#2": 0}, closed={"s#1", "s#2"})
    fake.logs["s#0"] = {token: LogEntry(token, "deducted", "s", f"u-{token}", 2, 0, "m-old", part="s#0")}
    fresh = _token_for("s#0", avoid="f")
    assert _sell(fake, _requests([token, fresh], qty=2)) == [PurchaseStatus.DUPLICATE, PurchaseStatus.SOLD_OUT]
    assert fake.sales == [] and fake.stock["s#0"] == 1


class _LogsDown(FakePartitions):
    """A Redis node that cannot be read: every look-up of a log fails."""

    async def entries(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, LogEntry | None]]:
        raise ServiceUnavailable("Redis", "127.0.0.1:7000", "read log: timed out")


def _sold_past_a_closed_partition(fake: FakePartitions) -> tuple[str, str]:
    """A token bought on s#2 after s#1, first in its order, closed; and one of the empty anchor's. The
    producer's registry is from before s#1 closed, so the first is sent there and refused as closed."""
    token, fresh = _token_for("s#1", then="s#2", avoid="t"), _token_for("s#0", avoid="f")
    fake.logs["s#2"] = {token: LogEntry(token, "deducted", "s", f"u-{token}", 1, 0, "m-old", part="s#2")}
    fake.registries = [Registry(0, {"s#0": (0, 0), "s#1": (5, 0), "s#2": (0, 0)})]
    return token, fresh


def test_a_purchase_asked_again_that_its_closed_partition_refused_never_hears_sold_out() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1"})
    token, fresh = _sold_past_a_closed_partition(fake)
    assert _sell(fake, _requests([token, fresh])) == [PurchaseStatus.DUPLICATE, PurchaseStatus.SOLD_OUT]
    # The group stops short (a log that cannot be read, the SKU loaded again) before it is placed again:
    # its refusal as closed is no answer, so its buyer hears `error` and asks again.
    down = _LogsDown(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1"})
    reloaded = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1"})
    reloaded.shape = Layout("s", PARTS, refill=5, threshold=0, epoch=2)
    for fake in (down, reloaded):
        token, fresh = _sold_past_a_closed_partition(fake)
        assert _sell(fake, _requests([token, fresh])) == [PurchaseStatus.ERROR] * 2


def test_a_sold_out_registry_read_before_a_partition_closed_still_finds_a_token_sold_past_it() -> None:
    # By the registry the token sells on s#1 (open then), but it was bought on s#2 once s#1 closed: every
    # log of its order is read before `sold_out` is told.
    token = _token_for("s#1", then="s#2", avoid="t")
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1"})
    fake.logs["s#2"] = {token: LogEntry(token, "deducted", "s", f"u-{token}", 1, 0, "m-old", part="s#2")}
    fake.registries = [Registry(0, {p: (0, 0) for p in PARTS})]
    assert _sell(fake, _requests([token])) == [PurchaseStatus.DUPLICATE]


def test_a_partition_sealed_by_a_reload_answers_sold_out_in_one_transaction_and_no_stock_moves() -> None:
    # A reload of a sealed SKU carries the seal into its partitions: nothing sells until it ends (seconds),
    # however much is pulled there. Its refusal stands; no pull, no transaction more.
    fake = FakePartitions(LAYOUT, pool=20, stock={p: 5 for p in PARTS}, sealed=set(PARTS))
    tokens = [_token_for(p, avoid=f"s{i}") for i, p in enumerate(PARTS)]
    assert _sell(fake, _requests(tokens)) == [PurchaseStatus.SOLD_OUT] * 3
    assert len(fake.sales) == 1 and fake.calls == [] and fake.pool == 20


def test_a_buyer_past_the_limit_is_answered_before_any_transaction() -> None:
    layout = Layout("s", PARTS, refill=5, threshold=0, epoch=1, per_user_limit=2)
    fake = FakePartitions(layout, pool=0, stock={p: 10 for p in PARTS})
    group = [PurchaseRequest.build("s", "u1", 1, _token_for(p, avoid=p[-1])) for p in PARTS]
    assert _sell(fake, group, layout) == [PurchaseStatus.ACCEPTED] * 2 + [PurchaseStatus.LIMIT_EXCEEDED]
    assert [t for t, _ in fake.sales[0]] == [r.token for r in group[:2]]


def test_a_buyer_told_sold_out_gets_the_held_share_of_the_limit_back() -> None:
    """Sold nothing, a buyer must not lose the limit: units that come back on sale later (an order
    cancelled or expired, a restock) are the buyer's to buy."""
    layout = Layout("s", PARTS, refill=5, threshold=0, epoch=1, per_user_limit=3)
    fake = FakePartitions(layout, pool=0, stock={"s#0": 1, "s#1": 0, "s#2": 0})
    big = PurchaseRequest.build("s", "u1", 3, _token_for("s#0", avoid="b"))
    assert _sell(fake, [big], layout) == [PurchaseStatus.SOLD_OUT]
    assert fake.held == {"u1": 0} and "release 3" in fake.calls
    small = PurchaseRequest.build("s", "u1", 1, _token_for("s#0", avoid="s"))
    assert _sell(fake, [small], layout) == [PurchaseStatus.ACCEPTED]
    assert fake.held == {"u1": 1} and fake.attempts  # an accepted purchase keeps its hold


def test_a_buyer_told_error_gets_the_held_share_of_the_limit_back_and_may_buy_with_a_new_token() -> None:
    """`error` says nothing was deducted, try again: a buyer at the limit who tries again with a new token
    must not be refused for units never sold."""
    layout = Layout("s", PARTS, refill=5, threshold=0, epoch=1, per_user_limit=1)
    fake = FakePartitions(layout, pool=0, stock={p: 5 for p in PARTS})

    async def broker_down(lay: Layout, requests: Sequence[PurchaseRequest], parts: Sequence[str]) -> list[Placed]:
        return [(PurchaseResult(PurchaseStatus.ERROR, r.token, message="broker down"), None) for r in requests]

    async def run(request: PurchaseRequest, send: Sender) -> PurchaseStatus:
        scheduler = Scheduler(fake)
        try:
            return (await scheduler.sell(layout, [request], send))[0].status
        finally:
            await scheduler.close()

    first = PurchaseRequest.build("s", "u1", 1, _token_for("s#0", avoid="e"))
    assert asyncio.run(run(first, broker_down)) is PurchaseStatus.ERROR
    assert fake.held == {"u1": 0} and "release 1" in fake.calls and fake.sales == []
    again = PurchaseRequest.build("s", "u1", 1, _token_for("s#1", avoid="n"))
    assert asyncio.run(run(again, fake.sell)) is PurchaseStatus.ACCEPTED
    assert fake.held == {"u1": 1}


def test_units_on_their_way_are_moved_by_a_pull_rather_than_a_partition_closed_beside_them() -> None:
    """A refiller died after it took units from the pool: they are in no partition until its transfer is
    completed, which a sweep does only once it is old. A pull short of stock completes it at once."""
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS})
    token = _token_for("s#1", avoid="w")
    fake.moving["x1"] = Transfer("x1", "out", "s#1", 5, 0)
    assert _sell(fake, _requests([token])) == [PurchaseStatus.ACCEPTED]
    assert "due 0" in fake.calls and not any(call.startswith("close") for call in fake.calls)
    assert fake.sales == [[(token, "s#1")]] and fake.stock["s#1"] == 4 and fake.moving == {}


def test_a_token_whose_partition_closed_meanwhile_goes_on_to_its_next_one_without_spending_a_pull(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No pull is left (the last round sends everything as it stands): a partition that closed under the
    # registry's feet still sends its tokens on, rather than telling them `sold_out` beside stock elsewhere.
    monkeypatch.setattr(partitions, "PULLS", 0)
    fake = FakePartitions(LAYOUT, pool=0, stock={"s#0": 5, "s#1": 0, "s#2": 5}, closed={"s#1"})
    fake.registries = [Registry(0, {p: (5, 0) for p in PARTS})]  # read before s#1 closed
    token = _token_for("s#1", then="s#2")
    assert _sell(fake, _requests([token])) == [PurchaseStatus.ACCEPTED]
    assert fake.sales == [[(token, "s#1")], [(token, "s#2")]]


def test_a_layout_a_pre_deduct_reports_stale_moves_no_stock_and_is_read_again() -> None:
    fake = FakePartitions(LAYOUT, pool=20, stock={"s#0": 0, "s#1": 0, "s#2": 0}, stale={"s#1"})
    token = _token_for("s#1")

    async def run() -> tuple[list[PurchaseStatus], bool]:
        scheduler = Scheduler(fake)
        await scheduler.layout("s")
        fake.registries = [Registry(20, {p: (5, 0) for p in PARTS})]  # says s#1 can cover it: sent at once
        results = await scheduler.sell(LAYOUT, _requests([token]), fake.sell)
        await asyncio.sleep(0)  # a top-up would have been spawned by now
        cached = "s" in scheduler._layouts
        await scheduler.close()
        return [r.status for r in results], cached

    statuses, cached = asyncio.run(run())
    assert statuses == [PurchaseStatus.ERROR] and not cached
    assert not any(call.startswith(("take", "drain", "close")) for call in fake.calls)  # no pull, no top-up
    assert fake.pool == 20


def test_a_token_seen_before_is_told_pending_until_a_replica_holds_its_entry() -> None:
    fake = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS}, closed={"s#1", "s#2"})
    seen = _token_for("s#2", then="s#1")
    fake.logs["s#2"] = {seen: LogEntry(seen, "deducted", "s", "u", 1, 0, "m-old", part="s#2")}
    fake.unconfirmed = ServiceUnavailable("Redis", "127.0.0.1:7000", "no replica acknowledged within 500 ms")
    assert _sell(fake, _requests([seen])) == [PurchaseStatus.PENDING]
    fake.unconfirmed = None
    assert _sell(fake, _requests([seen])) == [PurchaseStatus.DUPLICATE]
    assert fake.sales == []


def test_a_sold_out_layout_loaded_again_since_answers_error_not_sold_out() -> None:
    # The SKU was loaded again (another epoch, or no longer partitioned): a token sold since is in no log
    # this layout names, so `sold_out` could be told to a buyer told `accepted`. The buyer asks again.
    for now in (Layout("s", PARTS, refill=5, threshold=0, epoch=2), None):
        fake = FakePartitions(LAYOUT, pool=0, stock={p: 0 for p in PARTS})
        fake.shape = now  # type: ignore[assignment]
        assert _sell(fake, _requests(["a", "b"]), LAYOUT) == [PurchaseStatus.ERROR] * 2
        assert fake.sales == []
