"""What the Redis clients send and how they read what comes back: call builders and reply parsers.

Both clients (stock.py and stock_async.py) run the same scripts and read the same keys; only their I/O
differs. Everything here is a pure function of names and replies, so each reply is read in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from flashsale.adapters.redis.keys import SkuKeys
from flashsale.errors import UnknownSku
from flashsale.models import Purchase
from flashsale.records import (
    CheckView,
    Decision,
    Layout,
    LogEntry,
    LookedUp,
    PartitionView,
    Peek,
    Prededuct,
    PredeductResult,
    Restock,
    RestockResult,
    Seal,
    StockView,
    Transfer,
    TxRecord,
)

#: What a script that moves stock answers when the caller's layout is not the SKU's load.
STALE = -2


# --- pre-deduct and check ---------------------------------------------------------------------------
def prededuct_call(sku: str, gid: str, purchases: Sequence[Purchase], epoch: int = 0) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of prededuct.lua; `epoch` is that of the layout a partition's purchases were placed by."""
    args = [gid, sku, str(epoch) if epoch else ""]
    for p in purchases:
        args += [p.token, p.user_id, str(p.qty)]
    return SkuKeys.of(sku).all(), args


def decide_call(
    shard: str, token: str, action: str, *, decision_id: str, message_id: str, user: str = ""
) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of decide.lua, on the keys of the token's partition (or its SKU)."""
    return SkuKeys.of(shard).all(), [action, token, user, decision_id, message_id]


def add_stock_call(sku: str, qty: int, *, request_id: str, message_id: str) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of add_stock.lua."""
    return SkuKeys.of(sku).restock(), [str(qty), request_id, message_id]


def parse_restock(reply: list[Any]) -> RestockResult:
    """add_stock.lua's reply: the answer, the stock after it, and what the request added."""
    code, stock, raw = reply
    record = json.loads(raw) if raw else {}
    return RestockResult(
        Restock(int(code)),
        int(stock) if int(stock) >= 0 else None,
        int(record["qty"]) if record else 0,
        str(record.get("msg", "")) if record else "",
    )


def parse_additions(raw: Mapping[Any, Any]) -> dict[str, tuple[int, int, str]]:
    """The added hash (add_stock.lua): request id -> (units, ms, the message that carries them)."""
    out = {}
    for request, value in raw.items():
        record = json.loads(value)
        name = request.decode() if isinstance(request, bytes) else str(request)
        out[name] = (int(record["qty"]), int(record["ts"]), str(record["msg"]))
    return out


#: A pre-deduct's codes by number, looked up rather than built (an enum call is the dearer of the two).
_PREDEDUCT = {int(code): code for code in Prededuct}
_SEALED = ("sealed", b"sealed")


def parse_prededuct(purchases: Sequence[Purchase], reply: list[Any]) -> list[PredeductResult]:
    """One result per purchase, from prededuct.lua's flat {code, remaining, detail} reply.

    Only a duplicate's log entry is parsed (it names the message that deducted the token): an accepted
    purchase's entry is the one its own message just wrote, and parsing it cost a purchase 2 µs."""
    results = []
    for i, purchase in enumerate(purchases):
        code, remaining, detail = reply[3 * i : 3 * i + 3]
        result = _PREDEDUCT[int(code)]
        if result is Prededuct.SOLD_OUT and detail in _SEALED:
            result = Prededuct.SEALED
        left = int(remaining)
        results.append(
            PredeductResult(
                result,
                left if left >= 0 else None,
                entry=LogEntry.parse(purchase.token, detail) if result is Prededuct.DUPLICATE else None,
                bought=int(detail) if result is Prededuct.LIMIT_EXCEEDED else None,
            )
        )
    return results


def parse_check(tokens: Sequence[str], reply: list[Any]) -> CheckView:
    state, record, *entries = reply
    return CheckView(
        state=str(state),
        record=TxRecord.parse(record) if record else None,
        entries=parse_entries(tokens, entries),
    )


# --- log entries and message records -----------------------------------------------------------------
def parse_entries(tokens: Sequence[str], raws: Sequence[Any], *, strict: bool = True) -> dict[str, LogEntry | None]:
    """The log entries of `tokens` from their raw values (an HMGET of the log), None where there is none."""
    return {t: LogEntry.parse(t, raw) if raw else None for t, raw in zip(tokens, raws, strict=strict)}


def parse_lookup(
    skus: Sequence[str],
    wanted: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    tickets: Sequence[Any],
    replies: Sequence[Any],
) -> dict[str, LookedUp]:
    """Per SKU, what the consumer reads of it: its meta's `ticket` (none where the meta is gone, a partition a
    reload dropped, whose log is gone with it, or was loaded before loads were numbered), then three reads
    each (its log's HMGET, its records' HMGET, its SKU's meta `added_qty`)."""
    found: dict[str, LookedUp] = {}
    for i, (sku, ticket) in enumerate(zip(skus, tickets, strict=True)):
        tokens, gids = wanted[sku]
        raw_entries, raw_records, added = replies[3 * i : 3 * i + 3]
        found[sku] = LookedUp(
            parse_entries(tokens, raw_entries, strict=False),
            {g: TxRecord.parse(raw) if raw else None for g, raw in zip(gids, raw_records, strict=False)},
            int(added or 0),
            load_number(ticket),
        )
    return found


def located(entry: LogEntry, sku: str, shard: str) -> LogEntry:
    """The entry, naming the partition it was found in (one written back by `adopt` does not say)."""
    return entry if shard == sku or entry.part else entry._replace(part=shard)


def parse_peek(tokens: Sequence[str], users: Sequence[str], reply: Sequence[Any]) -> Peek:
    """A peek from its reads: stock, (per-user limit, standby, end of a seal), the users' counts, the tokens'
    entries, Redis's clock. A sealed SKU's units are not on sale (seal.lua): its stock reads 0."""
    stock, (limit, standby, sealed_until), bought, entries, (seconds, micros) = reply
    if sealed_until is not None and int(seconds) * 1000 + int(micros) // 1000 < int(sealed_until):
        stock, standby = stock and "0", 0
    return Peek(
        stock=int(stock) + int(standby or 0) if stock is not None else None,
        per_user_limit=int(limit or 0),
        entries=parse_entries(tokens, entries),
        bought={u: int(n or 0) for u, n in zip(users, bought, strict=True)},
    )


def parse_seal(reply: Sequence[Any]) -> Seal | None:
    """seal.lua's reply: None when the SKU was not sealed."""
    if not int(reply[0]):
        return None
    return Seal(str(reply[1]), frozenset(reply[2]) if len(reply) > 2 else None)


def sold_out(flag: str | bytes | None) -> bool:
    """The meta field `sold_out` as read."""
    return bool(flag == "1")


# --- a SKU's view ------------------------------------------------------------------------------------
def count(meta: Mapping[str, str], name: str) -> int:
    """A counter of a meta hash (0 when it is not there)."""
    return int(meta.get(name) or 0)


def load_number(raw: Any) -> int | None:
    """A meta's `ticket`, the number of the load it holds (ticket.lua); None for a meta with none, loaded
    before loads were numbered."""
    return int(raw) if raw is not None else None


def queue_snapshot(pipe: Any, shard: str, *, partition: bool = False) -> None:
    """Queue on `pipe` the reads of one snapshot: stock, meta, log size, and the pool and transfers (of a
    SKU) or the refills (of a partition)."""
    keys = SkuKeys.of(shard)
    pipe.get(keys.stock)
    pipe.hgetall(keys.meta)
    pipe.hlen(keys.log)
    if partition:
        pipe.hgetall(keys.refills)
    else:
        pipe.get(keys.pool)
        pipe.hgetall(keys.transfers)


def parse_view(sku: str, stock: str | None, meta: dict[str, str], entries: int) -> StockView:
    if stock is None:
        raise UnknownSku(
            f"unknown SKU {sku!r}: it is not loaded in Redis", hint=f"load it with `flashsale stock set {sku} QTY`"
        )
    return StockView(
        sku=sku,
        stock=int(stock),
        initial=count(meta, "initial"),
        per_user_limit=count(meta, "per_user_limit"),
        sold_out=sold_out(meta.get("sold_out")),
        deducted_qty=count(meta, "deducted_qty"),
        deducted_count=count(meta, "deducted_count"),
        returned_qty=count(meta, "returned_qty"),
        returned_count=count(meta, "returned_count"),
        fenced_count=count(meta, "fenced_count"),
        log_entries=int(entries),
        loaded_ms=count(meta, "loaded_ms"),
        added_qty=count(meta, "added_qty"),
        ticket=load_number(meta.get("ticket")),
    )


def parse_layout(sku: str, meta: Mapping[str, str]) -> Layout | None:
    """The layout from a SKU's meta; None for a SKU that is not partitioned."""
    parts = (meta.get("parts") or "").split()
    if not parts:
        return None
    return Layout(
        sku=sku,
        parts=tuple(parts),
        refill=count(meta, "refill"),
        threshold=count(meta, "threshold"),
        epoch=count(meta, "loaded_ms"),
        per_user_limit=count(meta, "per_user_limit"),
    )


def parse_partition(part: str, stock: str | None, meta: Mapping[str, str], node: str = "") -> PartitionView:
    return PartitionView(
        part=part,
        active=int(stock or 0),
        standby=count(meta, "standby"),
        deducted_qty=count(meta, "deducted_qty"),
        refilled_qty=count(meta, "refilled_qty"),
        drained_qty=count(meta, "drained_qty"),
        switches=count(meta, "switches"),
        node=node,
        closed=meta.get("closed") == "1",
    )


#: Reads of a partitioned SKU's view while transfers keep beginning between its snapshots (RedisStock.view).
VIEW_READS = 5


def partitioned_view(
    layout: Layout,
    meta: Mapping[str, str],
    pool: str | None,
    transfers: Mapping[str, str],
    parts: Sequence[tuple[Sequence[Any], str]],
) -> StockView:
    """A partitioned SKU's view from its own snapshot (meta, pool, transfers) and each partition's, in the
    layout's order with the node it was read on; the total is exact once no move is under way."""
    views = [
        (parse_partition(part, snap[0], snap[1], node), snap[1], snap[2])
        for part, (snap, node) in zip(layout.parts, parts, strict=True)
    ]
    refills = {part: snap[3] for part, (snap, _) in zip(layout.parts, parts, strict=True)}
    return aggregate(layout.sku, meta, pool, views, moving(transfers, refills))


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
        return sum(count(m, name) for _, m, _ in parts)

    return StockView(
        sku=sku,
        stock=remaining,
        initial=count(meta, "initial"),
        per_user_limit=count(meta, "per_user_limit"),
        sold_out=remaining == 0,
        deducted_qty=total("deducted_qty"),
        deducted_count=total("deducted_count"),
        returned_qty=total("returned_qty"),
        returned_count=total("returned_count"),
        fenced_count=total("fenced_count"),
        log_entries=sum(n for _, _, n in parts),
        loaded_ms=count(meta, "loaded_ms"),
        added_qty=count(meta, "added_qty"),
        ticket=load_number(meta.get("ticket")),
        pool=int(pool or 0),
        partitions=views,
        moving=in_transit,
    )


# --- moving stock between the pool and the partitions --------------------------------------------------
def is_stale(reply: Any) -> bool:
    """Did a script that moves stock refuse the caller's layout (STALE, alone or first of a list)?"""
    first = reply[0] if isinstance(reply, list) and reply else reply
    return bool(first == STALE)


def parse_transfers(reply: Sequence[Any]) -> list[Transfer]:
    """transfers_due.lua's flat {id, record} reply."""
    return [Transfer.parse(reply[i], reply[i + 1]) for i in range(0, len(reply), 2)]


def parse_decision(token: str, reply: list[Any]) -> tuple[Decision, LogEntry | None]:
    """decide.lua's reply: the answer, and the order's log entry after it."""
    code, raw = reply
    return Decision(int(code)), LogEntry.parse(token, raw) if raw else None
