from __future__ import annotations

import pytest

from flashsale.adapters.mysql import sql


def test_queries_parse_every_named_block_into_a_non_empty_statement() -> None:
    queries = sql.queries()
    assert {"ping", "insert_deductions", "deduct_stock", "insert_dead_letter", "schema_version"} <= queries.keys()
    for name, text in queries.items():
        assert text, name
        assert "-- name:" not in text, name
    assert sql.query("ping") == "SELECT 1"


def test_query_of_an_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError):
        sql.query("no_such_query")


def test_split_statements_drops_comments_and_splits_at_line_ending_semicolons() -> None:
    text = (
        "-- a header comment\n"
        "CREATE TABLE a (\n"
        "    -- an inline comment line\n"
        "    id INT\n"
        ");\n"
        "\n"
        "  -- indented comment\n"
        "INSERT INTO a VALUES (1);   \n"
        "SELECT ';' FROM a\n"
    )
    assert sql.split_statements(text) == (
        "CREATE TABLE a (\n    id INT\n)",
        "INSERT INTO a VALUES (1)",
        "SELECT ';' FROM a",
    )


def test_split_statements_of_only_comments_is_empty() -> None:
    assert sql.split_statements("-- nothing\n\n-- here\n") == ()


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    migrations = sql.migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "initial"


def test_every_migration_statement_creates_alters_or_backfills_a_table() -> None:
    statements = [s for m in sql.migrations() for s in m.statements]
    assert statements
    assert all(s.upper().startswith(("CREATE TABLE", "ALTER TABLE", "UPDATE ")) for s in statements)
    created = {s.split()[5] for s in statements if s.upper().startswith("CREATE TABLE")}
    assert {"inventory", "stock_deductions", "orders", "dead_letters", "conflicts", "heartbeats"} <= created


def test_every_table_with_ids_is_converted_to_a_binary_collation() -> None:
    altered = [s for m in sql.migrations() for s in m.statements if s.upper().startswith("ALTER TABLE")]
    converted = {s.split()[2] for s in altered if "COLLATE utf8mb4_bin" in s}
    assert converted == {"inventory", "stock_deductions", "orders", "dead_letters", "conflicts"}
