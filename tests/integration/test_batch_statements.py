"""What a batch costs MariaDB, counted by the server itself: its status counters of the session that applied it.

docs/operations.md and the README promise one guarded UPDATE per SKU per batch (hot-row group commit),
however many deductions the batch carries for that SKU. The totals cannot tell that apart from one
UPDATE per deduction; the server's own counters of the statements it ran can.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from flashsale.adapters.mysql import store as store_module
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.config import Settings
from flashsale.models import Deduction
from flashsale.records import Incoming

#: The server's counters of one session: UPDATE statements run (of one table, and of several joined), and
#: rows an UPDATE wrote (the handler's calls).
COUNTERS = ("Com_update", "Com_update_multi", "Handler_update")


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
        rows = conn.execute(sa.text("SHOW SESSION STATUS WHERE Variable_name IN :names"), {"names": COUNTERS})
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
    # Each SKU's stock row written once, by one UPDATE; the one other UPDATE per SKU (joined with the
    # batch's rows) closes its conflicts (none are open, so it writes no row).
    assert ran == {"Com_update": len(skus), "Com_update_multi": len(skus), "Handler_update": len(skus)}, ran
    with one_session.transaction("read the stock back") as conn:
        rows = conn.execute(sa.text("SELECT sku, stock FROM inventory WHERE sku IN :skus"), {"skus": tuple(skus)})
        stock = {str(s): int(n) for s, n in rows}
    assert stock == dict.fromkeys(skus, 100 - (1 + 2 + 3 + 4 + 5))


def test_a_batch_longer_than_one_insert_is_sent_in_statements_of_at_most_rows_per_insert(
    one_session: MySQLStore, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A statement of every row of a huge batch would pass the server's max_allowed_packet.
    monkeypatch.setattr(store_module, "ROWS_PER_INSERT", 3)
    one_session.load_stock(sku, 10)
    one_session.apply_batch([Incoming(Deduction("t0", sku, "u", 1), message_id="m", topic="t")])
    batch = [Incoming(Deduction(f"t{i}", sku, "u", 1), message_id="m", topic="t") for i in range(8)]
    with one_session.transaction("count") as conn:
        before = int(conn.execute(sa.text("SHOW SESSION STATUS LIKE 'Com_insert'")).one()[1])
    report = one_session.apply_batch(batch)
    with one_session.transaction("count") as conn:
        after = int(conn.execute(sa.text("SHOW SESSION STATUS LIKE 'Com_insert'")).one()[1])
    assert after - before == 3  # 8 rows, 3 at a time (the orders come from an INSERT ... SELECT)
    assert (len(report.applied), report.duplicates) == (7, 1)
    view = one_session.view(sku)
    assert (view.stock, view.deductions, view.orders) == (2, 8, 8)
