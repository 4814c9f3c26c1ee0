"""What a batch costs MariaDB, counted by the server itself: its status counters of the session that applied it.

docs/operations.md and the README promise one guarded UPDATE per SKU per batch (hot-row group commit),
however many deductions the batch carries for that SKU. The totals cannot tell that apart from one
UPDATE per deduction; the server's own counters of the statements it ran can.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from flashsale.adapters.mysql.store import MySQLStore
from flashsale.config import Settings
from flashsale.models import Deduction
from flashsale.records import Incoming

#: The server's counters of one session: UPDATE statements run, and rows an UPDATE wrote (the handler's calls).
COUNTERS = ("Com_update", "Handler_update")


@pytest.fixture
def one_session(settings: Settings) -> Iterator[MySQLStore]:
    """A store whose pool holds one connection: every transaction, the batch's too, runs in the same session."""
    store = MySQLStore(settings.mysql_url, pool_size=1)
    yield store
    store.close()


def _session(store: MySQLStore) -> tuple[int, dict[str, int]]:
    """The session's id and counters, read in that session (SHOW SESSION STATUS counts nothing of these)."""
    with store.transaction("read the session's counters") as conn:
        session = int(conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())
        rows = conn.execute(sa.text("SHOW SESSION STATUS WHERE Variable_name IN ('Com_update', 'Handler_update')"))
        return session, {str(name): int(value) for name, value in rows}


def test_a_batch_runs_one_guarded_update_per_sku_however_many_deductions_it_carries(
    one_session: MySQLStore, sku: str
) -> None:
    skus = [f"{sku}-{i}" for i in range(3)]
    for s in skus:
        one_session.load_stock(s, 100)
    # Five deductions of each SKU, interleaved, as a batch from several queues arrives.
    batch = [
        Incoming(Deduction(f"t{n}-{i}", s, f"u{n}", n + 1), message_id=f"m{n}-{i}", topic="t")
        for n in range(5)
        for i, s in enumerate(skus)
    ]

    session, before = _session(one_session)
    report = one_session.apply_batch(batch)
    again, after = _session(one_session)
    assert again == session, "the batch ran in another session: its counters are not these"
    assert len(report.applied) == 15

    ran = {name: after[name] - before[name] for name in COUNTERS}
    # Each SKU's stock row written once, by one UPDATE; the one other UPDATE per SKU closes its conflicts
    # (none are open, so it writes no row).
    assert ran == {"Com_update": 2 * len(skus), "Handler_update": len(skus)}, ran
    with one_session.transaction("read the stock back") as conn:
        rows = conn.execute(sa.text("SELECT sku, stock FROM inventory WHERE sku IN :skus"), {"skus": tuple(skus)})
        stock = {str(s): int(n) for s, n in rows}
    assert stock == dict.fromkeys(skus, 100 - (1 + 2 + 3 + 4 + 5))
