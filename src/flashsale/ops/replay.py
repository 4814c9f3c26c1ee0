"""Re-publish deductions as ordinary messages on the replay topic; the consumer applies each token once.

Sources: tokens given by the operator, a SKU's Redis log since a time, or the dead-letter table.
Only deductions the Redis log holds as deducted are replayed: the log is the truth of what was sold.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale import constants as c
from flashsale import wiring
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.rocketmq.producer import RocketMQProducer
from flashsale.config import Settings
from flashsale.errors import MalformedMessage
from flashsale.models import SOURCE_REPLAY, SOURCE_RESTOCK, DeductionMessage, Purchase
from flashsale.ops.paging import pages
from flashsale.records import LogEntry

logger = logging.getLogger(__name__)

PAGE = 1000
#: Most deductions one replay message carries.
REPLAY_GROUP = 100
#: Sends in flight at once when publishing a large replay.
SENDERS = 16


@dataclass
class ReplayReport:
    dry_run: bool
    published: int = 0
    already_applied: int = 0
    not_deducted: list[str] = field(default_factory=list)  # tokens with no deduction in Redis: never replayed
    unreplayable: list[str] = field(default_factory=list)  # dead letters that cannot be decoded or applied
    dead_letters_marked: int = 0
    restocks: int = 0  # restocks sent to the consumer again (it applies what each one's record says it added)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _by_shard(entries: Iterable[LogEntry]) -> dict[str, list[LogEntry]]:
    """The entries by the Redis keys they live under (a partition's, or the SKU's), in their order."""
    by_shard: dict[str, list[LogEntry]] = defaultdict(list)
    for entry in entries:
        by_shard[entry.shard].append(entry)
    return by_shard


def replay_messages(entries: Iterable[LogEntry]) -> list[DeductionMessage]:
    """Replay messages for log entries: one per SKU (or partition) and REPLAY_GROUP entries, carrying the
    log's values."""
    return [
        DeductionMessage(
            chunk[0].sku,
            tuple(Purchase(e.token, e.user, e.qty) for e in chunk),
            gid="",
            ts_ms=min(e.ts_ms for e in chunk),
            source=SOURCE_REPLAY,
            part=chunk[0].part or "",
        )
        for logged in _by_shard(entries).values()
        for chunk in pages(iter(logged), REPLAY_GROUP)
    ]


class Replayer:
    def __init__(self, settings: Settings, stock: RedisStock, store: MySQLStore, *, dry_run: bool) -> None:
        self.settings = settings
        self.stock = stock
        self.store = store
        self.report = ReplayReport(dry_run=dry_run)
        self._clients = ExitStack()
        self._producer: RocketMQProducer | None = None

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *_: object) -> None:
        self._clients.close()

    def _publish(self, entries: list[LogEntry]) -> None:
        """Replay deductions the Redis log holds (callers pass only entries in a deducted state). A dry run
        reports them as the master holds them, and writes nothing."""
        if not self.report.dry_run:
            entries = self._held(entries)
        if not entries:
            return
        messages = replay_messages(entries)
        for message in messages:
            self.report.already_applied += len(self.store.existing_tokens(message.sku, message.tokens))
        if self.report.dry_run:
            self.report.published += len(entries)
            return
        topic = self.settings.replay_topic
        producer = self._started()
        with ThreadPoolExecutor(SENDERS) as pool:
            list(pool.map(lambda m: producer.send(topic, m.tokens[0], m.encode(), c.DEDUCTION_TAG), messages))
        self.report.published += len(entries)
        logger.info("replayed %d deduction(s) in %d message(s) on %s", len(entries), len(messages), topic)

    def _held(self, entries: list[LogEntry]) -> list[LogEntry]:
        """The entries still deducted as a replica holds them (read again by seen.lua, then a WAIT; raises
        NotReplicated when none acknowledged in time). One only the master holds could be undone by a
        failover after the consumer applied it: MySQL would hold a sale Redis does not, and Redis would
        sell the unit again."""
        held: list[LogEntry] = []
        for shard, logged in _by_shard(entries).items():
            now = self.stock.held_entries(shard, [e.token for e in logged])
            for entry in logged:
                found = now[entry.token]
                if found is not None and found.state in c.DEDUCTED_STATES:
                    held.append(entry)
                else:
                    self.report.not_deducted.append(entry.token)
        return held

    def _deducted(self, sku: str, tokens: list[str]) -> list[LogEntry]:
        entries = self.stock.log_entries(sku, tokens)
        return [e for e in entries.values() if e is not None and e.state in c.DEDUCTED_STATES]

    # --- sources ------------------------------------------------------------------------------------
    def tokens(self, tokens: Iterable[str], sku: str | None = None) -> None:
        """Replay the named tokens; without `sku`, each token is looked for in every SKU's log."""
        wanted = list(dict.fromkeys(tokens))
        if sku:
            self.stock.view(sku)  # an unknown SKU is an error, not tokens "not deducted"
        found: list[LogEntry] = []
        for name in [sku] if sku else self.stock.skus():
            found += self._deducted(name, wanted)
        seen = {e.token for e in found}
        self.report.not_deducted += [t for t in wanted if t not in seen]
        self._publish(found)

    def since(self, sku: str, since_ms: int) -> None:
        """Replay every deduction of `sku` logged at or after `since_ms`."""
        self.stock.view(sku)  # an unknown SKU is an error, not an empty replay
        logged = (
            e for e in self.stock.scan_log(sku, page=PAGE) if e.state in c.DEDUCTED_STATES and e.ts_ms >= since_ms
        )
        for page in pages(logged, PAGE):
            self._publish(page)

    def entries(self, entries: Iterable[LogEntry]) -> None:
        for page in pages(entries, PAGE):
            self._publish(page)

    def restocks(self, sku: str, made: dict[str, tuple[int, int, str]]) -> int:
        """Send restocks Redis made (request id -> units, ms, message) to the consumer again: each as its own
        message id, whose record tells the consumer what it added (replay topic, no transaction)."""
        messages = [
            DeductionMessage.restock(sku, request, qty, gid, ts_ms)
            for request, (qty, ts_ms, gid) in sorted(made.items())
        ]
        if messages and not self.report.dry_run:
            producer = self._started()
            for message in messages:
                producer.send(self.settings.replay_topic, message.tokens[0], message.encode(), c.RESTOCK_TAG)
        return len(messages)

    def _started(self) -> RocketMQProducer:
        if self._producer is None:  # started on the first message: a dry run or an empty replay needs no broker
            self._producer = self._clients.enter_context(wiring.producer(self.settings, [self.settings.replay_topic]))
        return self._producer

    def dead_letters(self, sku: str | None = None) -> None:
        """Replay what the Redis log holds for each dead letter's tokens; mark the letters replayed.

        The letter's body only says which tokens to look up: what is replayed comes from the log. A body
        that cannot be decoded, or whose SKU MySQL still does not know, is reported and left in place.
        """
        known = set(self.store.skus())
        after = 0
        while rows := self.store.dead_letters_page(after, PAGE, sku):
            after = rows[-1].id
            found, ids = [], []
            for row in rows:
                try:
                    message = DeductionMessage.decode(row.body, row.message_id)
                except MalformedMessage as exc:
                    self.report.unreplayable.append(f"{row.message_id}: {exc}")
                    continue
                if message.sku not in known:
                    self.report.unreplayable.append(f"{row.message_id}: SKU {message.sku!r} is still unknown to MySQL")
                    continue
                if message.source == SOURCE_RESTOCK:  # its own message again: its record says what it added
                    made = {p.token: (p.qty, message.ts_ms, message.gid) for p in message.purchases}
                    self.report.restocks += self.restocks(message.sku, made)
                    ids.append(row.id)
                    continue
                deducted = self._deducted(message.sku, message.tokens)
                seen = {e.token for e in deducted}
                self.report.not_deducted += [t for t in message.tokens if t not in seen]
                found += deducted
                ids.append(row.id)
            self._publish(found)
            if not self.report.dry_run:
                self.store.mark_replayed(ids)
                self.report.dead_letters_marked += len(ids)


def run(
    settings: Settings, tokens: Sequence[str], *, sku: str | None, since_ms: int | None, dry_run: bool
) -> ReplayReport:
    """Replay the named tokens, or `sku`'s deductions since `since_ms`, or else the dead letters."""
    books = wiring.books(settings, replicated=True)
    with books as (stock, store), Replayer(settings, stock, store, dry_run=dry_run) as replayer:
        if tokens:
            replayer.tokens(tokens, sku)
        elif since_ms is not None and sku:
            replayer.since(sku, since_ms)
        else:
            replayer.dead_letters(sku)
    return replayer.report
