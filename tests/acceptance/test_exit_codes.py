"""Exit code 1, "the command ran and found a problem" (docs/operations.md), from real problems: a server of
the stack that does not answer, and books that drift because MySQL is changed behind the product's back
while `bench` or `demo` sells."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.engine.url import make_url

from flashsale.config import Settings
from flashsale.stack.manager import Stack
from flashsale.stack.mariadb import MariaDBService
from flashsale.stack.settings import StackSettings
from tests.acceptance.servers import frozen
from tests.acceptance.test_cli import run
from tests.oracle import now

pytestmark = pytest.mark.slow


def test_stack_status_exits_1_while_a_service_does_not_answer_and_0_once_it_answers_again(
    settings: Settings, stack_settings: StackSettings
) -> None:
    with frozen(Stack(stack_settings), "redis"):
        started = time.monotonic()
        result = run(settings, "stack", "status", "--json", timeout_s=60)
        took_s = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    # Told after one probe's 2 s timeout, not after the Redis client's retries and back-off (26 s).
    assert took_s < 15, took_s
    services = {s["name"]: s for s in json.loads(result.stdout)["services"]}
    redis = services.pop("redis")
    assert redis["running"] and redis["pid"] and not redis["healthy"] and "does not answer" in redis["note"], redis
    assert all(s["healthy"] for s in services.values()), services
    assert run(settings, "stack", "status", "redis", timeout_s=60).returncode == 0


@contextmanager
def drifting(settings: Settings, stack_settings: StackSettings, skus: str) -> Iterator[None]:
    """While the block runs, every order MySQL takes for a SKU LIKE `skus` also puts a unit back in its
    stock: a trigger, as a stray job or a hand edit would, unseen by the product."""
    mariadb = MariaDBService(Stack(stack_settings).layout, stack_settings)
    db = make_url(settings.mysql_url).database
    mariadb._root_sql(
        f"CREATE OR REPLACE TRIGGER `{db}`.`test_drift` AFTER INSERT ON `{db}`.`orders` FOR EACH ROW "
        f"UPDATE `{db}`.`inventory` SET stock = stock + 1 WHERE sku = NEW.sku AND NEW.sku LIKE '{skus}'"
    )
    try:
        yield
    finally:
        mariadb._root_sql(f"DROP TRIGGER IF EXISTS `{db}`.`test_drift`")


def assert_drifted(settings: Settings, sku: str, stock: int) -> None:
    """The oracle sees the drift too: every unit sold and applied, and MySQL's stock back where it began."""
    books = now(settings, sku)
    assert (books.sold, len(books.mysql_deducted), books.order_count) == (stock, stock, stock)
    assert books.redis_stock == 0 and books.mysql_stock == stock
    assert any(p.startswith("MySQL stock") for p in books.balance()), books.balance()


def test_bench_exits_1_when_the_books_drift_during_its_sale(settings: Settings, stack_settings: StackSettings) -> None:
    with drifting(settings, stack_settings, "bench-%"):
        result = run(
            settings, "bench", "--strategy", "pipeline", "--json", "--stock", "30", "--attempts", "60", "--buyers", "10"
        )
    assert result.returncode == 1, result.stdout + result.stderr
    (sale,) = json.loads(result.stdout)["results"]
    assert sale["accepted"] == 30 and not sale["consistent"], sale
    assert any("MySQL stock" in p for p in sale["problems"]), sale["problems"]
    assert_drifted(settings, sale["skus"][0], 30)


def test_demo_exits_1_when_the_books_drift_during_its_sale(settings: Settings, stack_settings: StackSettings) -> None:
    sku = f"demo-{uuid.uuid4().hex[:10]}"
    with drifting(settings, stack_settings, sku):
        result = run(settings, "demo", "--sku", sku, "--stock", "20", "--attempts", "60", "--buyers", "10")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "accepted 20" in result.stdout and "DRIFT" in result.stdout and "MySQL stock" in result.stdout
    assert_drifted(settings, sku, 20)
