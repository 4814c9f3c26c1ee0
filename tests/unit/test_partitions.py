"""Placement, picking and the arithmetic of transfers under way: the pure parts of partitioned stock."""

from __future__ import annotations

import json
import random

import pytest
from redis.crc import key_slot

from flashsale import constants as c
from flashsale.adapters.redis_partitions import claims_key, moving, parent, place
from flashsale.errors import MalformedMessage
from flashsale.models import DeductionMessage, Purchase
from flashsale.pipeline.partitions import Scheduler
from flashsale.records import Registry


def _three_masters(slot: int) -> str:
    return ("a", "b", "c")[slot * 3 // 16384]


def test_partitions_land_on_the_masters_in_turn_and_never_share_a_name() -> None:
    names = place("hot", 6, ["a", "b", "c"], _three_masters)
    assert len(set(names)) == 6 and all(parent(n) == "hot" for n in names)
    owners = [_three_masters(key_slot(c.STOCK_KEY.format(sku=n).encode())) for n in names]
    assert owners == ["a", "b", "c", "a", "b", "c"]


def test_on_one_node_partitions_are_numbered_in_order() -> None:
    assert place("hot", 3, [""], lambda slot: "") == ["hot#0", "hot#1", "hot#2"]


def test_claims_of_one_token_always_go_to_the_same_shard_and_tokens_spread() -> None:
    assert claims_key("tok-1") == claims_key("tok-1")
    assert len({claims_key(f"tok-{i}") for i in range(1000)}) == c.CLAIM_SHARDS


def test_pick_chooses_at_random_among_partitions_that_can_cover_and_never_an_exhausted_one() -> None:
    scheduler = Scheduler(stock=None, rng=random.Random(7))  # type: ignore[arg-type]
    registry = Registry(pool=0, parts={"s#0": (0, 0), "s#1": (2, 0), "s#2": (0, 5)})
    picks = {scheduler.pick(registry, 1) for _ in range(200)}
    assert picks == {"s#1", "s#2"}
    assert {scheduler.pick(registry, 3) for _ in range(50)} == {"s#2"}
    assert scheduler.pick(registry, 9) == "s#2"  # none can: the fullest, which a pull then tops up


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
    assert (decoded.part, decoded.shard) == ("hot#3", "hot#3")
    assert DeductionMessage.decode(DeductionMessage("hot", (Purchase("t1", "u1", 1),), "g1").encode()).shard == "hot"
    for bad in ("cold#3", "hot#", "hot#x", 7, "hot"):
        body = json.loads(message.encode())
        body["part"] = bad
        with pytest.raises(MalformedMessage, match="part must name a partition of hot"):
            DeductionMessage.decode(json.dumps(body).encode())


def test_a_group_goes_to_one_partition_when_one_can_cover_it_all() -> None:
    from flashsale.models import PurchaseRequest

    scheduler = Scheduler(stock=None, rng=random.Random(3))  # type: ignore[arg-type]
    group = [PurchaseRequest.build("s", f"u{i}", 1, f"t{i}") for i in range(4)]
    registry = Registry(pool=0, parts={"s#0": (3, 0), "s#1": (2, 2), "s#2": (5, 0)})
    for _ in range(20):
        parts = {part for _, part in scheduler.propose(registry, group)}
        assert len(parts) == 1 and parts <= {"s#1", "s#2"}
    tight = Registry(pool=0, parts={"s#0": (2, 0), "s#1": (1, 0), "s#2": (1, 0)})
    # No partition holds 4: each purchase gets its own pick, so the group spreads.
    picked = {part for _ in range(20) for _, part in scheduler.propose(tight, group)}
    assert picked == {"s#0", "s#1", "s#2"}


def test_a_sku_is_sold_out_only_with_nothing_anywhere_and_nothing_on_its_way() -> None:
    empty = {"s#0": (0, 0), "s#1": (0, 0)}
    assert Registry(pool=0, parts=empty).sold_out
    assert not Registry(pool=0, parts=empty, transfers=1).sold_out  # units between the pool and a partition
    assert not Registry(pool=1, parts=empty).sold_out
    assert not Registry(pool=0, parts={"s#0": (0, 1), "s#1": (0, 0)}).sold_out  # a standby still holds one
