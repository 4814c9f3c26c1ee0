from __future__ import annotations

import re

import pytest

from flashsale.adapters.redis import lua


@pytest.mark.parametrize("name", lua.NAMES)
def test_every_script_loads_by_name(name: str) -> None:
    assert "redis.call" in lua.source(name)


@pytest.mark.parametrize("name", lua.NAMES)
def test_every_script_header_documents_each_key_and_argument_it_uses(name: str) -> None:
    text = lua.source(name)
    header = "\n".join(line for line in text.splitlines() if line.startswith("--"))
    code = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    assert "-- KEYS[1]" in header
    assert "-- ARGV[1]" in header or ("-- ARGV none" in header and "ARGV" not in code)
    for used in set(re.findall(r"(?:KEYS|ARGV)\[\d+\]", code)):
        assert f"-- {used} " in header, f"{name}.lua uses {used} without documenting it"


@pytest.mark.parametrize("name", ["load_stock", "load_pool"])
def test_a_script_that_includes_a_fragment_gets_its_text(name: str) -> None:
    text = lua.source(name)
    assert "local function decided_records(tx_key)" in text
    assert "decided_records(" in text.split("local function put_back", 1)[1]  # defined, then called
    assert not lua.INCLUDE.search(text)


def test_an_unknown_script_name_does_not_load() -> None:
    with pytest.raises(FileNotFoundError):
        lua.source("no_such_script")


@pytest.mark.parametrize("name", ["decide", "return_stock"])
def test_the_scripts_that_give_units_back_share_one_fragment(name: str) -> None:
    text = lua.source(name)
    assert text.count("local function give_back(") == 1 and "give_back(stock_key, users_key, meta_key, entry)" in text
    assert not lua.INCLUDE.search(text)


@pytest.mark.parametrize("name", ["ticket", "load_stock", "freeze", "prededuct"])
def test_the_clock_is_read_by_one_fragment_pasted_once_even_through_another(name: str) -> None:
    """ticket and load_stock include it through held, and load_stock twice (itself too)."""
    text = lua.source(name)
    definition = "local function clock_ms()"
    assert text.count(definition) == 1 and not lua.INCLUDE.search(text)
    assert text.index(definition) < text.replace(definition, "", 1).index("clock_ms()")  # defined, then called


def test_no_script_reads_the_clock_but_through_the_fragment() -> None:
    for name in lua.NAMES:
        text = lua.source(name)
        assert text.count("redis.call('TIME')") == text.count("local function clock_ms()"), name
