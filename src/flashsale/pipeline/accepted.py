"""Which purchases of a batch of deduction messages were really deducted: the Redis log decides, never the body.

A half message's body is written before its pre-deduct runs, so it lists every purchase it carries, the
rejected ones too. The pre-deduct names the message in the log entry of each purchase it accepts, and
keeps a record of each purchase's outcome (fs:{sku}:tx). From those the consumer learns what to apply:

- a purchase whose log entry names its message: applied, with the log's user, quantity and time;
- on a replay (no message of its own): a purchase whose token the log holds as deducted;
- a purchase whose token another message deducted: a duplicate, nothing to apply;
- a purchase the record says was accepted but whose token the log does not hold, or one of a committed
  message Redis has no record of at all: a conflict, for reconcile and an operator (Redis lost data);
- anything else: skipped, it was rejected (sold out, limit) and deducted nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flashsale import constants as c
from flashsale.logs import ids
from flashsale.models import (
    SOURCE_DECISION,
    SOURCE_PURCHASE,
    SOURCE_REPLAY,
    SOURCE_RESTOCK,
    Deduction,
    DeductionMessage,
    Delivery,
    Purchase,
)
from flashsale.records import Addition, Conflict, Incoming, LogEntry, LookedUp, Order, Prededuct, TxRecord

logger = logging.getLogger(__name__)

#: Per SKU or partition: what the consumer read of it (RedisStock.lookup).
Found = Mapping[str, LookedUp]


@dataclass(frozen=True)
class Decoded:
    delivery: Delivery
    message: DeductionMessage

    @property
    def replay(self) -> bool:
        return self.message.source == SOURCE_REPLAY or not self.message.gid

    @functools.cached_property
    def shards(self) -> dict[str, list[Purchase]]:
        """The message's purchases by share (DeductionMessage.shards), worked out once for the look-up and
        the plan."""
        return self.message.shards()


@dataclass
class Plan:
    apply: list[Incoming] = field(default_factory=list)
    additions: list[Addition] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    duplicates: int = 0
    skipped: int = 0
    #: SKU -> the load its shares that write were read under (the lowest, if they differ): see
    #: MySQLStore.apply_batch.
    loads: dict[str, int] = field(default_factory=dict)

    @property
    def writes(self) -> int:
        """What the plan writes to MySQL: deductions and orders, restocks, conflicts."""
        return len(self.apply) + len(self.additions) + len(self.conflicts)


def named(entry: LogEntry | None, gid: str) -> LogEntry | None:
    """The entry, when it records a deduction that message `gid` made; None otherwise."""
    if entry is not None and entry.state in c.DEDUCTED_STATES and entry.message_id == gid:
        return entry
    return None


def decided(entry: LogEntry | None, gid: str) -> LogEntry | None:
    """The entry, when message `gid` carries the decision on its order (paid, cancelled or expired)."""
    if entry is not None and entry.state in c.DEDUCTED_STATES and entry.decided_by == gid:
        return entry
    return None


def naming(message: DeductionMessage) -> Callable[[LogEntry | None, str], LogEntry | None]:
    """How the log names what a message did: a purchase's deduction, or a decision on an order."""
    return decided if message.source == SOURCE_DECISION else named


def disagrees(entry: LogEntry, purchase: Purchase, message: DeductionMessage) -> bool:
    """Does the body say another user or quantity than the log? Logged with every id, when it does."""
    if (entry.user, entry.qty) == (purchase.user_id, purchase.qty):
        return False
    logger.warning(
        "message %s carries token %s as user %s qty %d; the log says user %s qty %d",
        message.gid,
        purchase.token,
        purchase.user_id,
        purchase.qty,
        entry.user,
        entry.qty,
        extra=ids(message_id=message.gid, sku=message.sku, token=purchase.token),
    )
    return True


def wanted(decoded: Sequence[Decoded]) -> dict[str, tuple[list[str], list[str]]]:
    """Per SKU (or partition), the tokens whose log entries and the messages whose records the plan needs,
    each once, in the order first met. Gathered in dicts: a batch of full groups carries tens of thousands
    of tokens of one SKU, and a list searched for each of them made a batch quadratic in its size."""
    need: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
    for d in decoded:
        for shard, purchases in d.shards.items():
            tokens, gids = need.setdefault(shard, ({}, {}))
            tokens.update(dict.fromkeys(p.token for p in purchases))
            if not d.replay:
                gids[d.message.gid] = None
    return {shard: (list(tokens), list(gids)) for shard, (tokens, gids) in need.items()}


def plan(decoded: Sequence[Decoded], found: Found) -> Plan:
    """What to apply of each message, one share (the purchases of one partition, or of the SKU) at a
    time: each share's pre-deduct wrote its own log entries and its own record."""
    result = Plan()
    for d in decoded:
        for shard, purchases in d.shards.items():
            entries, records, added, ticket = found[shard]
            size, writes = len(result.apply), result.writes
            if d.replay:
                _plan_replay(d, purchases, entries, result)
            elif d.message.source == SOURCE_DECISION:
                _plan_decision(d, purchases, entries, result)
            elif d.message.source == SOURCE_RESTOCK:
                _plan_restock(d, records.get(d.message.gid), result)
            else:
                _plan_share(d, purchases, entries, records.get(d.message.gid), result)
            if added:  # MySQL may be short of units a restock on its way adds: see the store
                result.apply[size:] = [dataclasses.replace(i, added_qty=added) for i in result.apply[size:]]
            if result.writes > writes and ticket is not None:
                # The lowest load a share that writes was read under: MySQL must hold none later when the
                # plan is applied (MySQLStore.apply_batch).
                result.loads[d.message.sku] = min(result.loads.get(d.message.sku, ticket), ticket)
    return result


def _plan_restock(d: Decoded, record: TxRecord | None, result: Plan) -> None:
    """A restock applies the units its record says it added (none: it was rolled back, or fenced)."""
    if record is None or record.added <= 0:
        if record is None:
            logger.error(
                "restock message %s was committed but Redis has no record of it",
                d.message.gid,
                extra=ids(message_id=d.message.gid, sku=d.message.sku),
            )
        result.skipped += 1
        return
    request = d.message.purchases[0].token
    result.additions.append(Addition(d.message.sku, request, record.added, d.message.gid, record.ts_ms))


def _plan_replay(
    d: Decoded, purchases: Sequence[Purchase], entries: Mapping[str, LogEntry | None], result: Plan
) -> None:
    for purchase in purchases:
        entry = entries.get(purchase.token)
        if entry is not None and entry.state in c.DEDUCTED_STATES:
            result.apply.append(_incoming(d, entry))
        else:
            result.skipped += 1


def _plan_decision(
    d: Decoded, purchases: Sequence[Purchase], entries: Mapping[str, LogEntry | None], result: Plan
) -> None:
    """A decision applies its order's entry (the deduction too, if its own message is still on its way)."""
    for purchase in purchases:
        entry = decided(entries.get(purchase.token), d.message.gid)
        if entry is not None:
            result.apply.append(_incoming(d, entry))
        else:
            result.skipped += 1


def _plan_share(
    d: Decoded,
    purchases: Sequence[Purchase],
    entries: Mapping[str, LogEntry | None],
    record: TxRecord | None,
    result: Plan,
) -> None:
    message = d.message
    if record is not None and record.replaced_ms:
        # Its load was replaced: an entry of it read still (the log read before the reload emptied it) is of
        # the old sale, and must not be applied to the new one.
        if record.accepted:
            logger.warning(
                "message %s had %d purchase(s) of %s accepted on a load replaced since (a reset discarded them): "
                "skipped",
                message.gid,
                record.accepted,
                message.sku,
                extra=ids(message_id=message.gid, sku=message.sku),
            )
        result.skipped += len(purchases)
        return
    logged = [entries.get(p.token) for p in purchases]
    ours = [named(e, message.gid) for e in logged]
    for i, (purchase, entry) in enumerate(zip(purchases, ours, strict=True)):
        if entry is not None:
            disagrees(entry, purchase, message)  # the log's values are applied either way
            result.apply.append(_incoming(d, entry))
        elif (seen := logged[i]) is not None and seen.state in c.DEDUCTED_STATES:
            result.duplicates += 1
        elif _lost(record, i, any(ours)):
            reason = (
                f"message {message.gid} was committed but Redis has no record of its pre-deduct"
                if record is None
                else f"message {message.gid} accepted it, but the Redis log has no deduction by that message"
            )
            result.conflicts.append(Conflict(_deduction(message, purchase), message.gid, reason))
        else:
            result.skipped += 1


def _lost(record: TxRecord | None, index: int, any_named: bool) -> bool:
    """Was purchase `index` of its share accepted, yet its log entry is gone?"""
    if record is None:
        # A committed message always has a record on each of its shares (the producer commits only
        # when every share ran; the checker, once each ran or is fenced). Without one, only a share
        # none of whose purchases the log names is certainly a loss (the others may be rejections).
        return not any_named
    return record.state == c.TX_RAN and index < len(record.codes) and record.codes[index] is Prededuct.ACCEPTED


def _incoming(d: Decoded, entry: LogEntry) -> Incoming:
    # The deduction a decision brings along (its purchase's message not applied yet) is a purchase's.
    source = SOURCE_PURCHASE if d.message.source == SOURCE_DECISION else d.message.source
    deduction = Deduction(entry.token, d.message.sku, entry.user, entry.qty, entry.ts_ms, source)
    message_id = entry.message_id or d.delivery.message_id
    return Incoming(deduction, message_id, d.delivery.topic, Order.of(entry), d.delivery.attempt)


def _deduction(message: DeductionMessage, purchase: Purchase) -> Deduction:
    return Deduction(purchase.token, message.sku, purchase.user_id, purchase.qty, message.ts_ms, message.source)
