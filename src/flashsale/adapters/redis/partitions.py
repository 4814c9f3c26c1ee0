"""Partitioned stock: names, placement and views shared by the sync and async Redis adapters.

A partitioned SKU keeps its layout and its pool under its own hash tag {sku}; each partition `sku#n`
is a small SKU of its own under {sku#n}, with two sub-domains (the stock key is the active one, the
meta field `standby` the other). docs/scaling.md has the design.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.crc import key_slot

from flashsale import constants as c
from flashsale.records import Layout, PartitionView, StockView, Transfer


def part_name(sku: str, n: int) -> str:
    return f"{sku}{c.PART_SEP}{n}"


def parent(shard: str) -> str:
    """The SKU a partition belongs to (a SKU is its own)."""
    return shard.split(c.PART_SEP, 1)[0]


def holds_key(layout: Layout, user: str) -> str:
    shard = zlib.crc32(user.encode()) % c.HOLD_SHARDS
    return c.USER_HOLDS_KEY.format(shard=shard, sku=layout.sku, epoch=layout.epoch)


def all_holds_keys(layout: Layout) -> list[str]:
    """Every holds key of one load of the SKU (deleted when it is loaded again)."""
    return [c.USER_HOLDS_KEY.format(shard=n, sku=layout.sku, epoch=layout.epoch) for n in range(c.HOLD_SHARDS)]


def place(sku: str, count: int, masters: Sequence[str], master_of_slot: Callable[[int], str]) -> list[str]:
    """`count` partition names for `sku`, the i-th on masters[i % len(masters)] (any name on one node)."""
    if len(masters) <= 1:
        return [part_name(sku, n) for n in range(count)]
    names: list[str] = []
    n = 0
    for i in range(count):
        target = masters[i % len(masters)]
        while master_of_slot(key_slot(c.STOCK_KEY.format(sku=part_name(sku, n)).encode())) != target:
            n += 1
        names.append(part_name(sku, n))
        n += 1
    return names


def parse_layout(sku: str, meta: Mapping[str, str]) -> Layout | None:
    """The layout from a SKU's meta; None for a SKU that is not partitioned."""
    parts = (meta.get("parts") or "").split()
    if not parts:
        return None
    return Layout(
        sku=sku,
        parts=tuple(parts),
        refill=int(meta.get("refill") or 0),
        threshold=int(meta.get("threshold") or 0),
        epoch=int(meta.get("loaded_ms") or 0),
        per_user_limit=int(meta.get("per_user_limit") or 0),
    )


def parse_partition(part: str, stock: str | None, meta: Mapping[str, str], node: str = "") -> PartitionView:
    def num(name: str) -> int:
        return int(meta.get(name) or 0)

    return PartitionView(
        part=part,
        active=int(stock or 0),
        standby=num("standby"),
        deducted_qty=num("deducted_qty"),
        refilled_qty=num("refilled_qty"),
        drained_qty=num("drained_qty"),
        switches=num("switches"),
        node=node,
        closed=meta.get("closed") == "1",
    )


def moving(transfers: Mapping[str, str], refills: Mapping[str, Mapping[str, Any]]) -> int:
    """Units on their way between the pool and a partition: in neither.

    A refill's units left the pool when its record was written, and reach the partition when the
    partition records its id. A drain's units leave the partition when it records the id, and reach
    the pool when the record is deleted.
    """
    total = 0
    for transfer_id, raw in transfers.items():
        t = Transfer.parse(transfer_id, raw)
        done = refills.get(t.part, {}).get(transfer_id)
        if t.dir == "out" and done is None:
            total += t.qty
        elif t.dir == "in" and done is not None:
            total += -int(done)
    return total


def aggregate(
    sku: str,
    meta: Mapping[str, str],
    pool: str | None,
    parts: Sequence[tuple[PartitionView, Mapping[str, str], int]],
    in_transit: int,
) -> StockView:
    """The SKU's view: its partitions' counters summed, its stock = pool + partitions + units moving."""
    views = tuple(p for p, _, _ in parts)
    remaining = int(pool or 0) + sum(p.remaining for p in views) + in_transit

    def total(name: str) -> int:
        return sum(int(m.get(name) or 0) for _, m, _ in parts)

    return StockView(
        sku=sku,
        stock=remaining,
        initial=int(meta.get("initial") or 0),
        per_user_limit=int(meta.get("per_user_limit") or 0),
        sold_out=remaining == 0,
        deducted_qty=total("deducted_qty"),
        deducted_count=total("deducted_count"),
        returned_qty=total("returned_qty"),
        returned_count=total("returned_count"),
        fenced_count=total("fenced_count"),
        log_entries=sum(n for _, _, n in parts),
        loaded_ms=int(meta.get("loaded_ms") or 0),
        pool=int(pool or 0),
        partitions=views,
        moving=in_transit,
    )
