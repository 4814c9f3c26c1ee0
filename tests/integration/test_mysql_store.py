"""The MySQL side: migrations and the consumer's batch transaction, against the stack's MariaDB."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

from flashsale.adapters.mysql import sql
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.config import Settings
from flashsale.errors import StockError, StockShort, StoreError
from flashsale.models import Deduction, DeductionMessage, Purchase
from flashsale.records import Addition, DeadLetter, Incoming, Order
from tests.oracle import drop_database, mysql_connection


def incoming(sku: str, token: str, qty: int = 1, user: str = "u1") -> Incoming:
    return Incoming(Deduction(token, sku, user, qty), message_id=f"m-{token}", topic="t")


def counts(store: MySQLStore, sku: str) -> tuple[int, int, int]:
    view = store.view(sku)
    return view.stock, view.deductions, view.orders


def test_migrations_are_recorded_and_a_second_run_applies_nothing(mysql_store: MySQLStore) -> None:
    assert mysql_store.migrate() == []
    assert mysql_store.schema_version() == len(sql.migrations())


def test_every_named_query_is_used_by_the_code() -> None:
    import pathlib

    import flashsale

    source = "\n".join(p.read_text() for p in pathlib.Path(flashsale.__file__).parent.rglob("*.py"))
    unused = [name for name in sql.queries() if f'"{name}"' not in source]
    assert unused == []


def test_inventory_stock_can_never_go_negative(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 1)
    with pytest.raises(StoreError), mysql_store.transaction("force") as conn:
        conn.execute(sa.text("UPDATE inventory SET stock = -1 WHERE sku = :sku"), {"sku": sku})
    assert mysql_store.view(sku).stock == 1


def test_a_batch_applies_rows_one_update_per_sku_and_orders(mysql_store: MySQLStore, sku: str) -> None:
    other = sku + "-b"
    mysql_store.load_stock(sku, 10)
    mysql_store.load_stock(other, 10)
    report = mysql_store.apply_batch([incoming(sku, "a", 2), incoming(other, "b", 3), incoming(sku, "c", 1)])
    assert sorted(d.token for d in report.applied) == ["a", "b", "c"]
    assert counts(mysql_store, sku) == (7, 2, 2)
    assert counts(mysql_store, other) == (7, 1, 1)


def test_redelivered_and_repeated_messages_change_nothing(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 10)
    mysql_store.apply_batch([incoming(sku, "a"), incoming(sku, "b")])
    report = mysql_store.apply_batch([incoming(sku, "a"), incoming(sku, "b"), incoming(sku, "b"), incoming(sku, "c")])
    assert [d.token for d in report.applied] == ["c"]
    assert report.duplicates == 3
    assert counts(mysql_store, sku) == (7, 3, 3)


def test_the_same_token_in_two_skus_is_two_deductions(mysql_store: MySQLStore, sku: str) -> None:
    other = sku + "-b"
    mysql_store.load_stock(sku, 5)
    mysql_store.load_stock(other, 5)
    report = mysql_store.apply_batch([incoming(sku, "same"), incoming(other, "same")])
    assert len(report.applied) == 2


def test_a_batch_with_a_token_applied_before_in_another_sku_applies_only_the_new_pair(
    mysql_store: MySQLStore, sku: str
) -> None:
    # The batch's new rows are counted, and read back by (sku, token) only when some existed already.
    other = sku + "-b"
    mysql_store.load_stock(sku, 5)
    mysql_store.load_stock(other, 5)
    mysql_store.apply_batch([incoming(sku, "same")])
    report = mysql_store.apply_batch([incoming(sku, "same"), incoming(other, "same", 2)])
    assert [(d.sku, d.token, d.qty) for d in report.applied] == [(other, "same", 2)]
    assert report.duplicates == 1
    assert counts(mysql_store, sku) == (4, 1, 1)
    assert counts(mysql_store, other) == (3, 1, 1)


def test_a_deduction_mysql_cannot_cover_becomes_a_conflict_not_a_negative_stock(
    mysql_store: MySQLStore, sku: str
) -> None:
    mysql_store.load_stock(sku, 3)
    report = mysql_store.apply_batch([incoming(sku, "a", 2), incoming(sku, "b", 2), incoming(sku, "c", 1)])
    assert [d.token for d in report.applied] == ["a", "c"]
    assert [d.token for d in report.conflicts] == ["b"]
    assert counts(mysql_store, sku) == (0, 2, 2)
    with mysql_store.transaction("read") as conn:
        row = conn.execute(
            sa.text("SELECT qty, mysql_stock, resolved_at FROM conflicts WHERE sku=:s AND token='b'"), {"s": sku}
        ).one()
    assert (row.qty, row.mysql_stock, row.resolved_at) == (2, 3, None)


def test_a_conflict_is_resolved_when_the_deduction_later_applies(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 1)
    assert mysql_store.apply_batch([incoming(sku, "big", 2)]).conflicts
    with mysql_store.transaction("restock") as conn:
        conn.execute(sa.text("UPDATE inventory SET stock = 5 WHERE sku = :s"), {"s": sku})
    assert [d.token for d in mysql_store.apply_batch([incoming(sku, "big", 2)]).applied] == ["big"]
    with mysql_store.transaction("read") as conn:
        resolved = conn.execute(sa.text("SELECT resolved_at FROM conflicts WHERE sku=:s"), {"s": sku}).scalar_one()
    assert resolved is not None


def test_unknown_skus_and_malformed_messages_are_dead_lettered_once(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 5)
    bad = DeadLetter("m-bad", "topic", "k", "body is not JSON", b"{oops")
    for _ in range(2):  # a redelivery must not add a second row
        report = mysql_store.apply_batch([incoming(sku, "ok"), incoming("no-such-sku-" + sku, "x")], [bad])
    assert len(report.dead_letters) == 2
    with mysql_store.transaction("read") as conn:
        rows = conn.execute(
            sa.text("SELECT message_id, reason FROM dead_letters WHERE message_id IN ('m-bad', 'm-x')")
        ).all()
    assert sorted(r.message_id for r in rows) == ["m-bad", "m-x"]
    assert counts(mysql_store, sku) == (4, 1, 1)


def test_load_stock_refuses_a_sku_with_applied_deductions_unless_reset(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 5)
    mysql_store.apply_batch([incoming(sku, "a")])
    with pytest.raises(StockError, match="1 applied"):
        mysql_store.load_stock(sku, 50)
    mysql_store.load_stock(sku, 50, reset=True)
    assert counts(mysql_store, sku) == (50, 0, 0)


def test_a_lost_deduction_row_comes_back_without_taking_the_stock_twice(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 10)
    mysql_store.apply_batch([incoming(sku, "a", 3)])
    with mysql_store.transaction("lose the row") as conn:
        conn.execute(sa.text("DELETE FROM stock_deductions WHERE sku = :s AND token = 'a'"), {"s": sku})
    report = mysql_store.apply_batch([incoming(sku, "a", 3)])
    assert (report.restored, report.applied) == (1, [])
    assert counts(mysql_store, sku) == (7, 1, 1)


def test_a_batch_stores_its_values_as_given_and_closes_only_the_conflicts_of_its_own_tokens(
    mysql_store: MySQLStore, sku: str
) -> None:
    mysql_store.load_stock(sku, 1)
    assert mysql_store.apply_batch([incoming(sku, "big", 2)]).conflicts
    assert mysql_store.apply_batch([incoming(sku, "other", 5)]).conflicts
    with mysql_store.transaction("restock") as conn:
        conn.execute(sa.text("UPDATE inventory SET stock = 10 WHERE sku = :s"), {"s": sku})
    # Quotes, a backslash and the driver's own placeholder signs: bound as values, never read as SQL.
    odd = "q'uo\\te%s%%d"
    report = mysql_store.apply_batch([incoming(sku, "big", 2), incoming(sku, odd, 1, user="u\"%(x)s'")])
    assert sorted(d.token for d in report.applied) == sorted(["big", odd])
    with mysql_store.transaction("read") as conn:
        rows = conn.execute(
            sa.text(
                "SELECT d.token, d.user_id, o.token FROM stock_deductions d JOIN orders o USING (sku, token) "
                "WHERE d.sku = :s ORDER BY d.token"
            ),
            {"s": sku},
        ).all()
        open_conflicts = (
            conn.execute(sa.text("SELECT token FROM conflicts WHERE sku = :s AND resolved_at IS NULL"), {"s": sku})
            .scalars()
            .all()
        )
    assert [tuple(r) for r in rows] == sorted([("big", "u1", "big"), (odd, "u\"%(x)s'", odd)])
    assert open_conflicts == ["other"]
    assert counts(mysql_store, sku) == (7, 2, 2)


def test_a_lost_order_is_put_back_by_a_redelivery(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 10)
    mysql_store.apply_batch([incoming(sku, "a", 3)])
    with mysql_store.transaction("lose the order") as conn:
        conn.execute(sa.text("DELETE FROM orders WHERE sku = :s AND token = 'a'"), {"s": sku})
    assert counts(mysql_store, sku) == (7, 1, 0)
    report = mysql_store.apply_batch([incoming(sku, "a", 3)])
    assert report.duplicates == 1
    assert counts(mysql_store, sku) == (7, 1, 1)


def test_missing_orders_are_created_from_their_deduction_rows(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 10)
    mysql_store.apply_batch([incoming(sku, "a", 1, user="alice"), incoming(sku, "b", 2)])
    with mysql_store.transaction("lose the orders") as conn:
        conn.execute(sa.text("DELETE FROM orders WHERE sku = :s"), {"s": sku})
    assert mysql_store.create_missing_orders(sku) == 2
    assert mysql_store.create_missing_orders(sku) == 0
    with mysql_store.transaction("read") as conn:
        row = conn.execute(sa.text("SELECT user_id, qty FROM orders WHERE sku = :s AND token = 'a'"), {"s": sku}).one()
    assert (row.user_id, row.qty) == ("alice", 1)


def test_tokens_and_skus_that_differ_only_in_case_are_different_purchases(mysql_store: MySQLStore, sku: str) -> None:
    upper = sku.upper()
    mysql_store.load_stock(sku, 10)
    mysql_store.load_stock(upper, 5)
    report = mysql_store.apply_batch([incoming(sku, "Ab1"), incoming(sku, "aB1"), incoming(upper, "Ab1")])
    assert sorted((d.sku, d.token) for d in report.applied) == sorted([(sku, "Ab1"), (sku, "aB1"), (upper, "Ab1")])
    assert report.duplicates == 0
    assert counts(mysql_store, sku) == (8, 2, 2)
    assert counts(mysql_store, upper) == (4, 1, 1)
    with mysql_store.transaction("read") as conn:
        tokens = conn.execute(sa.text("SELECT token FROM orders WHERE sku = :s ORDER BY token"), {"s": sku}).scalars()
        assert list(tokens) == ["Ab1", "aB1"]


def test_a_conflict_the_consumer_refuses_is_recorded_with_its_reason(mysql_store: MySQLStore, sku: str) -> None:
    from flashsale.records import Conflict

    mysql_store.load_stock(sku, 10)
    conflict = Conflict(Deduction("t-lost", sku, "u1", 2), "msg-9", "Redis has no record of message msg-9")
    report = mysql_store.apply_batch([], conflicts=[conflict])
    assert [d.token for d in report.conflicts] == ["t-lost"]
    books = mysql_store.bookkeeping(sku)
    assert (books.conflicts, books.conflict_qty) == (1, 2)
    with mysql_store.transaction("read") as conn:
        row = conn.execute(
            sa.text("SELECT message_id, mysql_stock, reason FROM conflicts WHERE sku = :s"), {"s": sku}
        ).one()
    assert (row.message_id, row.mysql_stock, row.reason) == ("msg-9", 10, "Redis has no record of message msg-9")
    assert counts(mysql_store, sku) == (10, 0, 0)


def test_ping_writes_a_heartbeat_so_a_read_only_server_fails_it(mysql_store: MySQLStore) -> None:
    mysql_store.ping()
    with mysql_store.transaction("read") as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM heartbeats")).scalar_one() >= 1


def _deadlocks(store: MySQLStore) -> int:
    with store.transaction("read deadlock count") as conn:
        return int(conn.execute(sa.text("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")).one()[1])


def test_two_consumers_applying_overlapping_batches_at_once_never_deadlock(mysql_store: MySQLStore, sku: str) -> None:
    import random
    import threading

    skus = [f"{sku}-{i}" for i in range(3)]
    for name in skus:
        mysql_store.load_stock(name, 10_000)
    errors: list[Exception] = []
    deadlocks_before = _deadlocks(mysql_store)

    def consumer(seed: int) -> None:
        rng = random.Random(seed)
        store = MySQLStore(mysql_store.url)
        try:
            for _ in range(40):
                # Shuffled batches over the same SKUs and tokens: without a lock order they would deadlock.
                batch = [incoming(rng.choice(skus), f"t{rng.randrange(300)}") for _ in range(30)]
                rng.shuffle(batch)
                store.apply_batch(batch)
        except Exception as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=consumer, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # The server's own count: a deadlock that a retry somewhere had hidden would still show here.
    assert _deadlocks(mysql_store) == deadlocks_before
    for name in skus:
        stock, deductions, orders = counts(mysql_store, name)
        assert stock + deductions == 10_000 and deductions == orders > 0


def _order(store: MySQLStore, sku: str, token: str) -> tuple[str, int, int]:
    """The order's status, its return rows and the SKU's stock, by plain SQL."""
    with store.transaction("read order") as conn:
        status = conn.execute(
            sa.text("SELECT status FROM orders WHERE sku = :s AND token = :t"), {"s": sku, "t": token}
        ).scalar_one()
        returns = conn.execute(
            sa.text("SELECT COUNT(*) FROM stock_returns WHERE sku = :s AND token = :t"), {"s": sku, "t": token}
        ).scalar_one()
        stock = conn.execute(sa.text("SELECT stock FROM inventory WHERE sku = :s"), {"s": sku}).scalar_one()
    return str(status), int(returns), int(stock)


def _with_order(item: Incoming, state: str, decided_by: str | None = None) -> Incoming:
    return dataclasses.replace(item, order=Order(state, 1_000, 2_000 if decided_by else None, decided_by))


def test_an_order_follows_the_log_once_and_a_return_gives_its_units_back_once(
    mysql_store: MySQLStore, sku: str
) -> None:
    mysql_store.load_stock(sku, 5)
    bought = incoming(sku, "t1", qty=2)
    mysql_store.apply_batch([_with_order(bought, "awaiting")])
    assert _order(mysql_store, sku, "t1") == ("awaiting_payment", 0, 3)
    cancelled = _with_order(bought, "cancelled", "m-cancel")
    for _ in range(2):  # a redelivered decision gives nothing back twice
        mysql_store.apply_batch([cancelled])
        assert _order(mysql_store, sku, "t1") == ("cancelled", 1, 5)
    mysql_store.apply_batch([_with_order(bought, "awaiting")])  # the purchase's message, late: no way back
    assert _order(mysql_store, sku, "t1") == ("cancelled", 1, 5)
    assert mysql_store.view(sku).returned_qty == 2


def test_a_decision_that_arrives_before_its_purchase_applies_both_in_one_go(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 5)
    mysql_store.apply_batch([_with_order(incoming(sku, "t1"), "expired", "m-expire")])
    assert _order(mysql_store, sku, "t1") == ("expired", 1, 5)
    mysql_store.apply_batch([_with_order(incoming(sku, "t2"), "paid", "m-pay")])
    assert _order(mysql_store, sku, "t2") == ("paid", 0, 4)
    view = mysql_store.view(sku)
    assert view.stock + view.deducted_qty - view.returned_qty == view.initial
    assert view.order_states == {"expired": (1, 1), "paid": (1, 1)}


def test_a_unit_given_back_and_sold_again_in_one_batch_goes_to_its_new_buyer(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 1)
    mysql_store.apply_batch([_with_order(incoming(sku, "a"), "awaiting")])
    report = mysql_store.apply_batch(
        [_with_order(incoming(sku, "b", user="u2"), "awaiting"), _with_order(incoming(sku, "a"), "cancelled", "m-c")]
    )
    assert (report.conflicts, report.returned_qty) == ([], 1)
    assert _order(mysql_store, sku, "a") == ("cancelled", 1, 0)
    assert _order(mysql_store, sku, "b")[0] == "awaiting_payment"


def test_a_resale_ahead_of_its_return_waits_for_it_then_applies(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 1)
    mysql_store.apply_batch([_with_order(incoming(sku, "a"), "awaiting")])
    resale = _with_order(incoming(sku, "b", user="u2"), "awaiting")
    with pytest.raises(StockShort) as refused:
        mysql_store.apply_batch([resale])  # the unit it bought is still A's in MySQL
    assert refused.value.retriable and mysql_store.existing_tokens(sku, ["b"]) == set()
    mysql_store.apply_batch([_with_order(incoming(sku, "a"), "expired", "m-x")])
    assert mysql_store.apply_batch([resale]).conflicts == []
    assert _order(mysql_store, sku, "b") == ("awaiting_payment", 0, 0)


def test_a_shortfall_that_outlasts_its_deliveries_is_a_conflict(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 1)
    mysql_store.apply_batch([_with_order(incoming(sku, "a"), "awaiting")])
    late = dataclasses.replace(_with_order(incoming(sku, "b", user="u2"), "awaiting"), attempt=10)
    assert [d.token for d in mysql_store.apply_batch([late]).conflicts] == ["b"]


def test_a_restock_adds_its_units_once_and_a_sale_of_them_ahead_of_it_waits_for_it(
    mysql_store: MySQLStore, sku: str
) -> None:
    mysql_store.load_stock(sku, 1)
    mysql_store.apply_batch([incoming(sku, "a")])
    # Redis added 2 units and sold one of them; its deduction reaches MySQL before the restock does.
    ahead = dataclasses.replace(incoming(sku, "b", user="u2"), added_qty=2)
    with pytest.raises(StockShort) as refused:
        mysql_store.apply_batch([ahead])
    assert refused.value.retriable and mysql_store.existing_tokens(sku, ["b"]) == set()
    restock = Addition(sku, "r1", 2, "m-r1", 1_000)
    for _ in range(2):  # a redelivered restock adds nothing twice
        assert mysql_store.apply_batch([], additions=[restock]).added_qty in (2, 0)
    assert counts(mysql_store, sku) == (2, 1, 1) and mysql_store.view(sku).added_qty == 2
    assert mysql_store.apply_batch([ahead]).conflicts == []
    assert counts(mysql_store, sku) == (1, 2, 2)
    assert mysql_store.additions(sku) == {"r1": (2, 1_000)}


def test_a_shortfall_with_every_restock_applied_is_a_conflict_at_once(mysql_store: MySQLStore, sku: str) -> None:
    mysql_store.load_stock(sku, 1)
    mysql_store.apply_batch([], additions=[Addition(sku, "r1", 1, "m-r1", 1_000)])
    mysql_store.apply_batch([incoming(sku, "a"), incoming(sku, "b", user="u2")])
    # Redis says 1 unit was added, and MySQL has it: nothing is on its way, so no wait.
    late = dataclasses.replace(incoming(sku, "c", user="u3"), added_qty=1)
    assert [d.token for d in mysql_store.apply_batch([late]).conflicts] == ["c"]


def test_a_restock_of_a_sku_mysql_does_not_know_is_dead_lettered(mysql_store: MySQLStore, sku: str) -> None:
    report = mysql_store.apply_batch([], additions=[Addition(sku, "r1", 3, "m-r1", 1_000)])
    assert [(d.message_id, d.key, d.sku) for d in report.dead_letters] == [("m-r1", "r1", sku)]
    assert "unknown sku" in report.dead_letters[0].reason


def test_each_purchase_of_a_message_for_an_unknown_sku_keeps_a_dead_letter_of_its_own(
    mysql_store: MySQLStore, sku: str
) -> None:
    """A message carries a group of purchases. Those of a SKU MySQL does not know are dead-lettered one by
    one, each with a body of its own, under the message's id: each must be kept (once, whatever the
    redeliveries), or `replay dead-letters` would bring back one buyer's order and lose the others'."""
    unknown = "no-such-sku-" + sku
    group = [Incoming(Deduction(t, unknown, "u1", 1), message_id="m-group", topic="t") for t in ("t1", "t2", "t3")]
    for _ in range(2):
        assert len(mysql_store.apply_batch(group).dead_letters) == 3
    with mysql_store.transaction("read") as conn:
        bodies = conn.execute(sa.text("SELECT body FROM dead_letters WHERE message_id = 'm-group'")).scalars().all()
    carried = sorted(p.token for body in bodies for p in DeductionMessage.decode(body).purchases)
    assert carried == ["t1", "t2", "t3"]


def test_an_upgrade_names_the_purchase_of_each_dead_letter_written_before_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, sku: str
) -> None:
    """Before migration 0007 a letter of one purchase was keyed by its message alone. The migration names
    the purchase of those (an unknown SKU's, whose key is the token): a redelivery after the upgrade finds
    its letter rather than adding a second."""
    url = settings.mysql_url.rsplit("/", 1)[0] + "/flashsale_test_upgrade"
    drop_database(url)
    server = mysql_connection(url.rsplit("/", 1)[0] + "/")
    try:
        with server.cursor() as cur:
            cur.execute("CREATE DATABASE flashsale_test_upgrade CHARACTER SET utf8mb4")
    finally:
        server.close()
    store, unknown = MySQLStore(url), "no-such-sku-" + sku
    try:
        every = sql.migrations()
        monkeypatch.setattr(sql, "migrations", lambda: [m for m in every if m.version < 7])
        store.migrate()
        body = DeductionMessage(unknown, (Purchase("t1", "u1", 1),), "m-old").encode()
        with store.transaction("a letter of the version before") as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO dead_letters (message_id, topic, message_key, sku, reason, body)"
                    " VALUES ('m-old', 't', 't1', :sku, :reason, :body)"
                ),
                {"sku": unknown, "reason": f"unknown sku {unknown!r}", "body": body},
            )
        monkeypatch.undo()
        assert store.migrate() == ["0007_dead_letters_per_purchase"]
        store.apply_batch([Incoming(Deduction("t1", unknown, "u1", 1), message_id="m-old", topic="t")])
        with store.transaction("read") as conn:
            named = conn.execute(sa.text("SELECT purchase FROM dead_letters WHERE message_id = 'm-old'")).scalars()
            assert list(named) == ["t1"]
    finally:
        store.close()
        drop_database(url)
