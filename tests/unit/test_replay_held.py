"""What replay publishes: only deductions a replica holds as deducted (the replay reads them again first)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from flashsale import constants as c
from flashsale.config import Settings
from flashsale.errors import NotReplicated
from flashsale.ops.replay import Replayer
from flashsale.records import LogEntry


def _entry(token: str, part: str | None = None) -> LogEntry:
    return LogEntry(token, c.STATE_DEDUCTED, "sku", "u-" + token, 1, 1_700_000_000_000, part=part)


class _Stock:
    """Answers held_entries from `held`, shard by shard; raises for a shard in `lagging`."""

    def __init__(self, held: dict[str, LogEntry], lagging: Sequence[str] = ()) -> None:
        self.held = held
        self.lagging = lagging
        self.asked: list[tuple[str, list[str]]] = []

    def held_entries(self, shard: str, tokens: Sequence[str]) -> dict[str, LogEntry | None]:
        self.asked.append((shard, list(tokens)))
        if shard in self.lagging:
            raise NotReplicated(f"no replica acknowledged the read of {shard}")
        return {t: self.held.get(t) for t in tokens}


class _Store:
    def existing_tokens(self, sku: str, tokens: Sequence[str]) -> list[str]:
        return []


class _Replayer(Replayer):
    """Publishes nothing: counts what it would send."""

    def _started(self) -> Any:
        return SimpleNamespace(send=lambda *args: None)


def _replayer(stock: _Stock) -> Replayer:
    settings = cast(Settings, SimpleNamespace(replay_topic="t-replays"))
    return _Replayer(settings, cast(Any, stock), cast(Any, _Store()), dry_run=False)


def test_replay_publishes_only_what_a_replica_holds_as_deducted_read_once_per_shard() -> None:
    logged = [_entry("t1", "sku#0"), _entry("t2", "sku#0"), _entry("t3", "sku#1"), _entry("t4", "sku#1")]
    stock = _Stock(
        {
            "t1": logged[0],
            "t2": logged[1]._replace(state=c.STATE_FENCED),  # not what the master said a moment ago
            "t4": logged[3],  # t3: no replica holds it (gone in a failover)
        }
    )
    replayer = _replayer(stock)
    replayer.entries(logged)
    assert (replayer.report.published, replayer.report.not_deducted) == (2, ["t2", "t3"])
    assert stock.asked == [("sku#0", ["t1", "t2"]), ("sku#1", ["t3", "t4"])]


def test_a_replay_no_replica_acknowledges_is_refused_with_nothing_published() -> None:
    stock = _Stock({"t1": _entry("t1")}, lagging=["sku"])
    replayer = _replayer(stock)
    with pytest.raises(NotReplicated):
        replayer.entries([_entry("t1")])
    assert replayer.report.published == 0


def test_a_dry_run_replay_reads_the_master_and_writes_nothing() -> None:
    stock = _Stock({}, lagging=["sku"])
    replayer = Replayer(cast(Settings, None), cast(Any, stock), cast(Any, _Store()), dry_run=True)
    replayer.entries([_entry("t1")])
    assert (replayer.report.published, stock.asked) == (1, [])
