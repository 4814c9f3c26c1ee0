"""The freeze a reload holds on a SKU, as a `stock set` in another process takes it: it dies, it stalls,
it meets another load. Books are read back with raw Redis commands."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from subprocess import PIPE

import pytest

from flashsale.adapters.redis.keys import SkuKeys, all_holds_keys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.config import Settings
from flashsale.errors import NotReplicated, StockError
from flashsale.models import Purchase
from flashsale.ops.setup import set_stock
from flashsale.records import Layout, Prededuct
from tests.conftest import session_env
from tests.oracle import mysql_connection, read_books

#: Long enough that a renewal (every third of it) late by a second still holds the freeze, short for the tests that
#: wait it out.
LEASE_S = 1.5

#: A loader in a process of its own: freezes the SKU, says so, waits for a line, then reloads it.
LOADER = textwrap.dedent(
    """
    import sys
    from flashsale.adapters.redis.stock import RedisStock
    from flashsale.errors import StockError

    url, sku, lease_s, parts = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    stock = RedisStock(url)
    try:
        with stock.frozen(sku, for_s=lease_s):
            print("frozen", flush=True)
            sys.stdin.readline()
            if parts == 1:
                stock.load(sku, 7, reset=True)
            else:
                stock.load_partitioned(sku, 9, partitions=parts, refill=3, threshold=0, reset=True)
    except StockError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
    """
)


@contextmanager
def loader(stock: RedisStock, sku: str, parts: int = 1) -> Iterator[subprocess.Popen[str]]:
    args = [sys.executable, "-c", LOADER, stock.url, sku, str(LEASE_S), str(parts)]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "frozen"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def buy(stock: RedisStock, shard: str, token: str, epoch: int = 0) -> Prededuct:
    return stock.prededuct(shard, "m-" + token, [Purchase(token, "u-" + token, 1)], epoch)[0].code


def test_a_loader_killed_while_the_sku_is_frozen_stops_the_sale_only_until_the_freeze_runs_out(
    redis_stock: RedisStock, sku: str
) -> None:
    redis_stock.load(sku, 5)
    with loader(redis_stock, sku) as proc:
        assert buy(redis_stock, sku, "t1") is Prededuct.STALE_LAYOUT
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    time.sleep(LEASE_S + 0.2)
    assert buy(redis_stock, sku, "t2") is Prededuct.ACCEPTED


def test_a_loader_that_stalled_past_its_freeze_writes_nothing_and_the_purchase_that_landed_stands(
    redis_stock: RedisStock, sku: str
) -> None:
    """A `stock set --reset` stopped (a pause, a swap storm) longer than its freeze lasts: once it goes
    on, it must not discard what was sold meanwhile."""
    redis_stock.load(sku, 5)
    with loader(redis_stock, sku) as proc:
        proc.send_signal(signal.SIGSTOP)  # its renewals stop too
        time.sleep(LEASE_S + 0.3)
        assert buy(redis_stock, sku, "t1") is Prededuct.ACCEPTED
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate("go\n", timeout=20)
        assert proc.returncode == 3 and "outlived its freeze" in err
    keys = SkuKeys.of(sku)
    assert redis_stock.client.get(keys.stock) == "4"
    assert redis_stock.client.hexists(keys.log, "t1")


def test_a_partitioned_loader_that_stalled_past_its_freeze_drops_no_partition_and_loads_nothing(
    redis_stock: RedisStock, sku: str
) -> None:
    layout = redis_stock.load_partitioned(sku, 9, partitions=3, refill=3, threshold=0)
    before = {part: redis_stock.client.get(SkuKeys.of(part).stock) for part in layout.parts}
    with loader(redis_stock, sku, parts=2) as proc:  # fewer partitions: the load drops one first
        proc.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_S + 0.3)
        assert buy(redis_stock, layout.parts[2], "t1", layout.epoch) is Prededuct.ACCEPTED
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate("go\n", timeout=20)
        assert proc.returncode == 3 and "outlived its freeze" in err
    assert redis_stock.layout(sku) == layout
    after = {part: redis_stock.client.get(SkuKeys.of(part).stock) for part in layout.parts}
    assert after == {**before, layout.parts[2]: str(int(before[layout.parts[2]]) - 1)}
    assert redis_stock.client.hexists(SkuKeys.of(layout.parts[2]).log, "t1")


def test_a_second_load_of_a_frozen_sku_is_refused_before_it_writes(redis_stock: RedisStock, sku: str) -> None:
    redis_stock.load(sku, 5)
    with loader(redis_stock, sku):
        with pytest.raises(StockError, match="another `stock set` is loading"), redis_stock.frozen(sku):
            pass
        # Refused, it thawed nothing of the first load's freeze.
        assert buy(redis_stock, sku, "t1") is Prededuct.STALE_LAYOUT


def test_a_first_load_of_a_new_sku_holds_a_lease_that_a_second_first_load_is_refused_by(
    redis_stock: RedisStock, sku: str
) -> None:
    keys = SkuKeys.of(sku)
    with loader(redis_stock, sku) as proc:  # the SKU has no key yet: nothing to freeze but its first load
        assert redis_stock.client.exists(keys.stock, keys.meta) == 0
        with pytest.raises(StockError, match="another `stock set` is loading"), redis_stock.frozen(sku):
            pass
        _, err = proc.communicate("go\n", timeout=20)
        assert proc.returncode == 0, err
    assert redis_stock.client.get(keys.stock) == "7"
    assert redis_stock.client.exists(keys.loading) == 0  # thawed with the load
    # Loaded, the SKU is frozen by its meta again, as any reload.
    with redis_stock.frozen(sku):
        assert redis_stock.client.exists(keys.loading) == 0
        assert buy(redis_stock, sku, "t1") is Prededuct.STALE_LAYOUT


def test_a_first_load_that_died_holds_the_sku_only_until_its_lease_runs_out(redis_stock: RedisStock, sku: str) -> None:
    with loader(redis_stock, sku) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        with pytest.raises(StockError, match="another `stock set` is loading"), redis_stock.frozen(sku):
            pass
    time.sleep(LEASE_S + 0.2)
    with redis_stock.frozen(sku, for_s=LEASE_S):
        redis_stock.load(sku, 3)
    assert redis_stock.client.get(SkuKeys.of(sku).stock) == "3"


def test_a_first_load_that_stalled_past_its_lease_touches_nothing_once_another_began(
    redis_stock: RedisStock, sku: str
) -> None:
    keys = SkuKeys.of(sku)
    with loader(redis_stock, sku) as proc:
        proc.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_S + 0.3)
        with redis_stock.frozen(sku, for_s=10) as other:  # the lease ran out: another first load begins
            assert redis_stock.client.get(keys.loading) == other.token
            proc.send_signal(signal.SIGCONT)
            _, err = proc.communicate("go\n", timeout=20)
            assert proc.returncode == 3 and "outlived its freeze" in err
            assert redis_stock.client.exists(keys.stock, keys.meta) == 0
            redis_stock.load(sku, 4)
    assert redis_stock.client.get(keys.stock) == "4"


def test_setting_the_stock_of_a_new_sku_while_its_first_load_runs_is_refused_before_mysql(
    settings: Settings, redis_stock: RedisStock, sku: str
) -> None:
    """Two `stock set` of a SKU never loaded, at once: each wrote MySQL, and the one whose Redis load came
    second was refused, leaving MySQL with one's quantity and Redis with the other's."""
    with loader(redis_stock, sku) as proc:
        with pytest.raises(StockError, match="another `stock set` is loading"):
            set_stock(settings, sku, 20)
        proc.communicate("go\n", timeout=20)
    assert inventory(settings, sku) == (-1, -1)  # no row: the refused command wrote nothing


#: A `stock set` in a process of its own, with a short freeze, that says so and waits for a line where it
#: is told: `before-mysql`, between its last look at Redis (its number taken) and its MySQL transaction;
#: `in-mysql`, inside that transaction, right after its check of the number MySQL holds.
STALLED_STOCK_SET = textwrap.dedent(
    """
    import sys
    from sqlalchemy.engine import Connection
    from flashsale.adapters.mysql.statements import query
    from flashsale.adapters.mysql.store import MySQLStore
    from flashsale.adapters.redis.stock import RedisStock
    from flashsale.config import Settings
    from flashsale.errors import StockError
    from flashsale.ops.setup import set_stock

    sku, qty, lease_s, where = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    frozen, load_stock, execute = RedisStock.frozen, MySQLStore.load_stock, Connection.execute
    RedisStock.frozen = lambda self, sku, for_s=0: frozen(self, sku, for_s=lease_s)

    def stall():
        print("stalled", flush=True)
        sys.stdin.readline()

    def stalled_load(self, *args, **kwargs):
        stall()
        load_stock(self, *args, **kwargs)

    def stalled_execute(self, statement, *args, **kwargs):
        result = execute(self, statement, *args, **kwargs)
        if str(statement) == str(query("lock_load_tickets", "skus")):
            stall()
        return result

    if where == "before-mysql":
        MySQLStore.load_stock = stalled_load
    else:
        Connection.execute = stalled_execute
    try:
        set_stock(Settings.from_env(), sku, qty, reset=True, force=True)
    except StockError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("loaded", [True, False], ids=["reload", "first-load"])
@pytest.mark.parametrize("where", ["before-mysql", "in-mysql"])
def test_a_stock_set_that_stalled_at_its_mysql_write_cannot_overwrite_the_load_after_it(
    settings: Settings, redis_stock: RedisStock, sku: str, loaded: bool, where: str
) -> None:
    """The stall falls after the load's last look at Redis, before its MySQL transaction or inside it
    after the check of MySQL's number; another load runs meanwhile, once the first's freeze ran out. The
    first must not leave its quantity (nor, with --reset, discard the orders since) under the second's in
    Redis. Stalled inside its transaction, it holds the row: the second waits for it, then writes over it."""
    if loaded:
        set_stock(settings, sku, 5)
    args = [sys.executable, "-c", STALLED_STOCK_SET, sku, "7", str(LEASE_S), where]
    env = session_env(settings)
    with subprocess.Popen(args, env=env, stdin=PIPE, stdout=PIPE, stderr=PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "stalled"
            proc.send_signal(signal.SIGSTOP)  # its renewals stop too
            time.sleep(LEASE_S + 0.3)
            with ThreadPoolExecutor(1) as pool:
                second = pool.submit(set_stock, settings, sku, 3, reset=True)
                time.sleep(0.5)  # under way: frozen, and at its MySQL write
                proc.send_signal(signal.SIGCONT)
                _, err = proc.communicate("go\n", timeout=30)
                second.result(timeout=60)
        finally:
            proc.kill()
    assert inventory(settings, sku) == (3, 3)
    assert redis_stock.client.get(SkuKeys.of(sku).stock) == "3"
    assert proc.returncode == 3 and ("another load of" in err or "outlived its freeze" in err), err


def inventory(settings: Settings, sku: str) -> tuple[int, int]:
    """MySQL's initial stock and stock of the SKU, read with raw SQL (-1, -1: no inventory row)."""
    books = read_books(settings.redis_url, settings.mysql_url, sku)
    return books.mysql_initial, books.mysql_stock


def load_ticket(settings: Settings, sku: str, set_to: int | None = None) -> int:
    """The number of the load MySQL holds, read (or first set) with raw SQL."""
    conn = mysql_connection(settings.mysql_url)
    try:
        with conn.cursor() as cur:
            if set_to is not None:
                cur.execute("UPDATE inventory SET load_ticket = %s WHERE sku = %s", (set_to, sku))
                conn.commit()
            cur.execute("SELECT load_ticket FROM inventory WHERE sku = %s", (sku,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_a_redis_that_lost_the_load_numbers_numbers_the_next_load_above_mysqls(
    settings: Settings, redis_stock: RedisStock, sku: str
) -> None:
    set_stock(settings, sku, 5)
    ahead = load_ticket(settings, sku, set_to=load_ticket(settings, sku) + 10**9)  # far above Redis's clock
    redis_stock.client.delete(SkuKeys.of(sku).ticket)  # a flushed Redis, or one restored from an old backup
    set_stock(settings, sku, 4, reset=True)
    assert inventory(settings, sku) == (4, 4)
    assert load_ticket(settings, sku) == ahead + 1 == int(redis_stock.client.get(SkuKeys.of(sku).ticket))


def test_the_numbering_script_refuses_a_token_that_does_not_hold_the_freeze_and_numbers_upward(
    redis_stock: RedisStock, sku: str
) -> None:
    keys = SkuKeys.of(sku)
    number = [keys.meta, keys.loading, keys.ticket]
    given = []
    for loaded in (False, True):  # the first-load lease, then the meta's freeze
        with redis_stock.frozen(sku) as freeze:
            assert redis_stock._scripts["ticket"](keys=number, args=["another-load", "0"]) == 0
            assert redis_stock._scripts["ticket"](keys=number, args=["", "0"]) == 0
            given.append(redis_stock._scripts["ticket"](keys=number, args=[freeze.token, "0"]))
            given.append(redis_stock._scripts["ticket"](keys=number, args=[freeze.token, "0"]))
            if not loaded:
                redis_stock.load(sku, 5)
    assert given == sorted(set(given)) and given[0] >= int(redis_stock.client.time()[0]) * 1000 - 60_000
    with redis_stock.frozen(sku) as freeze:
        assert redis_stock._scripts["ticket"](keys=number, args=[freeze.token, str(given[-1] + 10**9)]) == (
            given[-1] + 10**9 + 1
        )


@pytest.mark.parametrize("script", ["load_stock", "load_pool", "drop"])
def test_each_loading_script_refuses_a_token_that_does_not_hold_the_freeze(
    redis_stock: RedisStock, sku: str, script: str
) -> None:
    redis_stock.load(sku, 5)
    keys = SkuKeys.of(sku)
    calls = {
        "load_stock": (keys.load(), ["7", "0", "1", "", "", "0"]),
        "load_pool": (keys.load_pool(), ["7", "7", "", "3", "0", "0", "9"]),
        "drop": ([keys.meta, keys.meta, keys.stock, keys.log], []),
    }
    script_keys, args = calls[script]
    with redis_stock.frozen(sku) as freeze:
        refused = redis_stock._scripts[script](keys=script_keys, args=[*args, "another-load"])
        assert refused in ([4, "freeze"], -1, 0)
        assert redis_stock.client.get(keys.stock) == "5"
        assert int(redis_stock.client.hget(keys.meta, "frozen_until")) > 0
        assert redis_stock._scripts[script](keys=script_keys, args=[*args, freeze.token]) not in ([4, "freeze"], -1, 0)


@pytest.mark.parametrize("script", ["load_stock", "load_pool"])
def test_each_first_loading_script_refuses_a_token_that_does_not_hold_the_first_load_lease(
    redis_stock: RedisStock, sku: str, script: str
) -> None:
    keys = SkuKeys.of(sku)
    calls = {
        "load_stock": (keys.load(), ["7", "0", "1", "", "", "0"]),
        "load_pool": (keys.load_pool(), ["7", "7", "", "3", "0", "0", "9"]),
    }
    script_keys, args = calls[script]
    with redis_stock.frozen(sku) as freeze:  # a SKU never loaded: the lease of its first load
        assert redis_stock.client.get(keys.loading) == freeze.token
        refused = redis_stock._scripts[script](keys=script_keys, args=[*args, "another-load"])
        assert refused in ([4, "freeze"], -1)
        assert redis_stock.client.exists(keys.stock, keys.meta, keys.pool) == 0
        assert redis_stock._scripts[script](keys=script_keys, args=[*args, freeze.token]) not in ([4, "freeze"], -1)


def test_a_partitioned_load_cut_short_runs_again_over_the_partitions_it_left(
    redis_stock: RedisStock, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its partitions loaded, no layout naming them yet (no replica acknowledged the last write): the run
    again takes them over, since no purchase can have landed on a partition no layout names."""
    redis_stock.load(sku, 5)
    write = redis_stock._script_held

    def cut_short(key: str, script: str, keys: list[str], args: list[str]) -> object:
        if script == "load_pool":
            raise NotReplicated("no replica acknowledged it")
        return write(key, script, keys, args)

    with monkeypatch.context() as patch, redis_stock.frozen(sku):
        patch.setattr(redis_stock, "_script_held", cut_short)
        with pytest.raises(NotReplicated):
            redis_stock.load_partitioned(sku, 9, partitions=3, refill=3, threshold=0, reset=True)
    assert redis_stock.layout(sku) is None  # the layout is still the one-key sale's
    with redis_stock.frozen(sku):
        layout = redis_stock.load_partitioned(sku, 9, partitions=3, refill=3, threshold=0, reset=True)
    assert buy(redis_stock, layout.parts[0], "t1", layout.epoch) is Prededuct.ACCEPTED


def test_a_one_key_load_cut_short_after_it_dropped_the_pool_runs_again(
    redis_stock: RedisStock, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From partitions back to one key: the old partitions and the pool are gone, the SKU's own meta still
    names them when the load is cut short. The run again must still freeze that meta and load."""
    redis_stock.load_partitioned(sku, 9, partitions=3, refill=3, threshold=0)
    load_one = redis_stock._load_one

    def cut_short(shard: str, args: list[str]) -> None:
        raise NotReplicated("no replica acknowledged it")

    with monkeypatch.context() as patch, redis_stock.frozen(sku):
        patch.setattr(redis_stock, "_load_one", cut_short)
        with pytest.raises(NotReplicated):
            redis_stock.load(sku, 4, reset=True)
    assert redis_stock.client.exists(SkuKeys.of(sku).pool) == 0 and redis_stock.layout(sku) is not None
    assert redis_stock._load_one == load_one
    with redis_stock.frozen(sku):
        redis_stock.load(sku, 4, reset=True)
    assert redis_stock.layout(sku) is None and buy(redis_stock, sku, "t1") is Prededuct.ACCEPTED


def test_a_partitioned_loader_that_stalled_past_its_freeze_leaves_the_buyers_holds_alone(
    redis_stock: RedisStock, sku: str
) -> None:
    """The holds keep the per-user limit of a partitioned SKU: a refused load must not drop them."""
    layout = redis_stock.load_partitioned(sku, 9, partitions=3, refill=3, threshold=0, per_user_limit=1)
    holds = all_holds_keys(layout)[0]
    redis_stock.client.hset(holds, "u1", 1)  # a buyer at the limit
    with loader(redis_stock, sku, parts=3) as proc:  # the same partitions: nothing to drop first
        proc.send_signal(signal.SIGSTOP)
        time.sleep(LEASE_S + 0.3)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate("go\n", timeout=20)
        assert proc.returncode == 3 and "outlived its freeze" in err
    assert redis_stock.client.hget(holds, "u1") == "1"


def test_a_freeze_taken_on_a_layout_another_load_just_replaced_freezes_the_new_one(
    redis_stock: RedisStock, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = _replaced_under_the_take(redis_stock, sku, 2, 3, monkeypatch)
    assert set(new.parts) - set(old.parts)  # a partition the stale read does not name
    with redis_stock.frozen(sku):
        for part in new.parts:
            assert buy(redis_stock, part, f"t-{part}", new.epoch) is Prededuct.STALE_LAYOUT


def test_a_freeze_taken_on_a_layout_another_load_just_replaced_leaves_no_lease_on_the_partition_it_dropped(
    redis_stock: RedisStock, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = _replaced_under_the_take(redis_stock, sku, 3, 2, monkeypatch)
    (gone,) = set(old.parts) - set(new.parts)
    with redis_stock.frozen(sku):
        pass
    # The stale take leased the dropped partition (it has no key left); the thaw covered it too, or a
    # load claiming that name within the lease would be refused.
    assert redis_stock.client.exists(SkuKeys.of(gone).loading) == 0


def _replaced_under_the_take(
    stock: RedisStock, sku: str, before: int, after: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Layout, Layout]:
    """A layout of `before` partitions, read by the next freeze, then replaced by another load of `after`
    partitions before that freeze is taken: the freeze's first read finds the old one."""
    old = stock.load_partitioned(sku, 9, partitions=before, refill=3, threshold=0)
    stale = stock._freeze_targets(sku)
    new = stock.load_partitioned(sku, 9, partitions=after, refill=3, threshold=0, reset=True)
    read = stock._freeze_targets
    reads = iter([stale])
    monkeypatch.setattr(stock, "_freeze_targets", lambda s: next(reads, None) or read(s))
    return old, new
