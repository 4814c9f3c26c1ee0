"""Re-publish deductions as ordinary messages on the replay topic; the consumer applies each token once.

Sources: tokens given by the operator, a SKU's Redis log since a time, or the dead-letter table.
Only deductions the Redis log holds as deducted are replayed: the log is the truth of what was sold.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale import constants as c
from flashsale.adapters.mysql_store import MySQLStore
from flashsale.adapters.redis_stock import RedisStock
from flashsale.adapters.rocketmq_client import RocketMQProducer
from flashsale.config import Settings
from flashsale.errors import MalformedMessage
from flashsale.models import SOURCE_REPLAY, Deduction, Resolution
from flashsale.ops.paging import pages
from flashsale.records import LogEntry

logger = logging.getLogger(__name__)

PAGE = 1000
#: Sends in flight at once when publishing a large replay.
SENDERS = 16
_DEDUCTED = {c.STATE_DEDUCTED, c.STATE_RETURNED}


@dataclass
class ReplayReport:
    dry_run: bool
    published: int = 0
    already_applied: int = 0
    not_deducted: list[str] = field(default_factory=list)  # tokens with no deduction in Redis: never replayed
    unreplayable: list[str] = field(default_factory=list)  # dead letters that cannot be decoded or applied
    dead_letters_marked: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def deduction_of(entry: LogEntry) -> Deduction:
    return Deduction(entry.token, entry.sku, entry.user, entry.qty, entry.ts_ms, source=SOURCE_REPLAY)


class Replayer:
    def __init__(self, settings: Settings, stock: RedisStock, store: MySQLStore, *, dry_run: bool) -> None:
        self.settings = settings
        self.stock = stock
        self.store = store
        self.report = ReplayReport(dry_run=dry_run)
        self._producer: RocketMQProducer | None = None

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *_: object) -> None:
        if self._producer:
            self._producer.shutdown()

    def _publish(self, deductions: list[Deduction]) -> None:
        if not deductions:
            return
        by_sku: dict[str, list[str]] = defaultdict(list)
        for d in deductions:
            by_sku[d.sku].append(d.token)
        for sku, tokens in by_sku.items():
            self.report.already_applied += len(self.store.existing_tokens(sku, tokens))
        if self.report.dry_run:
            self.report.published += len(deductions)
            return
        if self._producer is None:
            topic = self.settings.replay_topic
            self._producer = RocketMQProducer(self.settings.rocketmq_endpoint, [topic], lambda _: Resolution.UNKNOWN)
            self._producer.start()
        producer, topic = self._producer, self.settings.replay_topic
        with ThreadPoolExecutor(SENDERS) as pool:
            ids = list(pool.map(lambda d: producer.send(topic, d.token, d.encode(), c.DEDUCTION_TAG), deductions))
        self.report.published += len(ids)
        logger.info("replayed %d deduction(s) on %s", len(ids), topic)

    # --- sources ------------------------------------------------------------------------------------
    def tokens(self, tokens: Iterable[str], sku: str | None = None) -> None:
        """Replay the named tokens; without `sku`, each token is looked for in every SKU's log."""
        wanted = list(dict.fromkeys(tokens))
        skus = [sku] if sku else self.stock.skus()
        found: dict[str, LogEntry] = {}
        for name in skus:
            missing = [t for t in wanted if t not in found]
            for token, entry in self.stock.log_entries(name, missing).items():
                if entry is not None and entry.state in _DEDUCTED:
                    found[token] = entry
        self.report.not_deducted += [t for t in wanted if t not in found]
        self._publish([deduction_of(found[t]) for t in wanted if t in found])

    def since(self, sku: str, since_ms: int) -> None:
        """Replay every deduction of `sku` logged at or after `since_ms`."""
        self.stock.view(sku)  # an unknown SKU is an error, not an empty replay
        logged = (e for e in self.stock.scan_log(sku, page=PAGE) if e.state in _DEDUCTED and e.ts_ms >= since_ms)
        for page in pages(logged, PAGE):
            self._publish([deduction_of(e) for e in page])

    def entries(self, entries: Iterable[LogEntry]) -> None:
        for page in pages(entries, PAGE):
            self._publish([deduction_of(e) for e in page])

    def dead_letters(self) -> None:
        """Replay dead-lettered deductions that decode and whose SKU MySQL now knows; mark them replayed."""
        known = set(self.store.skus())
        after = 0
        while rows := self.store.dead_letters_page(after, PAGE):
            after = rows[-1].id
            batch, ids = [], []
            for row in rows:
                try:
                    d = Deduction.decode(bytes(row.body))
                except MalformedMessage as exc:
                    self.report.unreplayable.append(f"{row.message_id}: {exc}")
                    continue
                if d.sku not in known:
                    self.report.unreplayable.append(f"{row.message_id}: SKU {d.sku!r} is still unknown to MySQL")
                    continue
                batch.append(Deduction(d.token, d.sku, d.user_id, d.qty, d.ts_ms, source=SOURCE_REPLAY))
                ids.append(row.id)
            self._publish(batch)
            if not self.report.dry_run:
                self.store.mark_replayed(ids)
                self.report.dead_letters_marked += len(ids)
