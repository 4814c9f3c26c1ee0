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


#: Strings that would break a statement built by pasting them in, or that a careless escape would change:
#: quotes, backslashes, the driver's placeholder and the statement's field, NUL, control characters,
#: characters of 2 to 4 bytes in UTF-8.
AWKWARD = [
    "it's",
    "o''clock",
    'say "hi"',
    "back\\slash\\",
    "100%",
    "%s%%",
    "{rows}",
    "x'); DROP TABLE orders; --",
    "nul\x00byte",
    "line\nbreak\r\ttab\x1a",
    "naïve-é",
    "订单",
    "🙂🛒",
    "",
]


def test_a_batch_writes_every_string_exactly_as_given_whatever_it_holds(one_session: MySQLStore, sku: str) -> None:
    # The batch's rows are rendered into one statement (store._values): read back with raw SQL, every
    # field must be the string the deduction carried, byte for byte, in the deductions and in the orders.
    awkward_sku = f"{sku}-'\\%🙂"
    for s in (sku, awkward_sku):
        one_session.load_stock(s, 100)
    batch = [
        Incoming(Deduction(f"t{i}-{text}", s, f"u-{text}", 1, 1_700_000_000_000 + i), message_id=f"m-{text}", topic="t")
        for i, text in enumerate(AWKWARD)
        for s in (sku, awkward_sku)
    ]
    report = one_session.apply_batch(batch)
    assert len(report.applied) == len(batch)
    want = {(i.deduction.sku, i.deduction.token, i.deduction.user_id, i.message_id) for i in batch}
    with one_session.transaction("read the rows back") as conn:
        skus = {"skus": (sku, awkward_sku)}
        rows = conn.execute(
            sa.text("SELECT sku, token, user_id, message_id, created_ms FROM stock_deductions WHERE sku IN :skus"), skus
        ).all()
        orders = conn.execute(sa.text("SELECT sku, token, user_id FROM orders WHERE sku IN :skus"), skus).all()
    assert {(r.sku, r.token, r.user_id, r.message_id) for r in rows} == want
    assert {int(r.created_ms) for r in rows} == {i.deduction.ts_ms for i in batch}
    assert {tuple(r) for r in orders} == {(s, t, u) for s, t, u, _ in want}
