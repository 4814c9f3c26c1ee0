"""Partitioned stock on the real Redis Cluster: one hot SKU spread over partitions on three masters.

Judged with the oracle (tests/oracle.py), which reads the partitions, the pool and the transfers under
way with plain Redis commands, and MySQL with plain SQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pymysql
import pytest
import redis
import redis.asyncio as aredis
from sqlalchemy.engine.url import make_url

from flashsale import constants as c
from flashsale import failpoints
from flashsale.adapters.redis.keys import SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.config import Settings
from flashsale.models import DeductionMessage, Delivery, Purchase, Resolution
from flashsale.ops.setup import set_stock
from flashsale.pipeline import accepted
from flashsale.pipeline.checker import DeductionChecker
from flashsale.pipeline.partitions import Scheduler
from flashsale.polling import poll_until
from flashsale.records import Layout, Prededuct
from flashsale.stack.settings import StackSettings
from tests.acceptance.crowd import Crowd
from tests.acceptance.harness import Pipeline, post
from tests.acceptance.test_crashes import buy
from tests.acceptance.test_operations import flashsale, reconcile_json
from tests.acceptance.test_order_lifecycle import sell_out_give_back_and_sell_again
from tests.acceptance.test_redis_cluster import kill_master
from tests.conftest import cluster_url
from tests.oracle import Books, balanced, misplaced, now, partition_order, redis_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(settings: Settings, redis_cluster: StackSettings) -> Settings:
    """The session's namespace and database, with Redis on the cluster."""
    return settings.with_overrides(redis_url=cluster_url(redis_cluster))


def _layout(url: str, sku: str) -> tuple[list[str], dict[str, int], int]:
    """The partitions (raw meta), the master port of each, and the pool, read with plain redis-py."""
    client = redis_client(url)
    assert isinstance(client, redis.RedisCluster)
    try:
        parts = client.hget(f"fs:{{{sku}}}:meta", "parts").split()
        ports = {p: client.get_node_from_key(f"fs:{{{p}}}:stock").port for p in parts}
        return parts, ports, int(client.get(f"fs:{{{sku}}}:pool"))
    finally:
        client.close()


def _layout_of(settings: Settings, sku: str) -> Layout:
    sync = RedisStock(settings.redis_url)
    try:
        layout = sync.layout(sku)
    finally:
        sync.close()
    assert layout is not None
    return layout


def _sold_on(url: str, sku: str, token: str) -> str | None:
    """The partition whose log holds the token, read with plain redis-py; None when none does."""
    client = redis_client(url)
    try:
        parts = client.hget(f"fs:{{{sku}}}:meta", "parts").split()
        found = [p for p in parts if client.hget(f"fs:{{{p}}}:log", token) is not None]
    finally:
        client.close()
    assert len(found) <= 1, f"{token} is in the logs of {found}"
    return found[0] if found else None


def _half_messages(settings: Settings) -> int:
    """Half messages the broker has ever taken (its system topic of half messages has one queue)."""
    return rocketmq_admin.max_offset(f"{c.DEFAULT_HOST}:{settings.ports.broker}", "RMQ_SYS_TRANS_HALF_TOPIC", 0)


@dataclass
class _Told:
    """Every answer each token got, the quantities it was sent with and its buyer: what the oracle's
    `against` judges the orders by, in both directions."""

    answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    asked: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    users: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def heard(self, token: str, user: str, qty: int, status: str) -> None:
        with self.lock:
            self.answers[token].append(status)
            self.asked[token].add(qty)
            self.users[token] = user

    def against(self, books: Books, limit: int = 0) -> list[str]:
        return books.against(self.answers, self.asked, self.users, limit)


def _buy(
    url: str, sku: str, qty: int, token: str | None = None, user: str | None = None, told: _Told | None = None
) -> str:
    token = token or uuid.uuid4().hex
    user = user or f"u-{token}"
    for _ in range(50):  # an unclear answer is asked again with the same token
        _, body = post(url, {"sku": sku, "user_id": user, "qty": qty, "token": token})
        if told is not None:
            told.heard(token, user, qty, str(body.get("status")))
        if body.get("status") not in ("pending", "error"):
            return str(body["status"])
        time.sleep(0.2)
    raise AssertionError(f"no clear answer for {token}")


def test_stock_set_spreads_partitions_over_the_masters_and_keeps_the_rest_in_the_pool(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    result = flashsale(pipeline, "stock", "set", sku, "1000", "--partitions", "3", FLASHSALE_PARTITION_REFILL="100")
    assert result.returncode == 0, result.stderr
    assert "in 3 partitions" in result.stdout
    parts, ports, pool = _layout(settings.redis_url, sku)
    assert len(parts) == 3 and all(p.startswith(f"{sku}#") for p in parts)
    assert len(set(ports.values())) == 3  # one partition on each master
    assert pool == 700
    assert now(settings, sku).redis_stock == 1000

    shown = flashsale(pipeline, "stock", "show", sku, "--json")
    assert shown.returncode == 0, shown.stderr
    redis_side = json.loads(shown.stdout)["redis"]
    assert (redis_side["stock"], redis_side["pool"]) == (1000, 700)
    assert [(p["part"], p["active"], p["standby"]) for p in redis_side["partitions"]] == [(p, 100, 0) for p in parts]


def test_a_partitioned_sale_sells_every_unit_once_to_buyers_who_retry(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 600, partitions=3)
    url = pipeline.start_all()
    crowd = Crowd(url, sku, buyers=24, run_id=f"p{os.getpid()}").start()
    deadline = time.monotonic() + 90
    while now(settings, sku).sold < 600 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)  # buyers now hear sold_out
    crowd.stop()

    assert crowd.unclear() == []
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert books.against(crowd.answers, crowd.asked, crowd.users) == [] and books.oversold() == 0
    # Every unit sold: nothing was stranded in a partition or the pool.
    assert books.sold == len(crowd.told()) == 600 and books.redis_stock == 0
    # Each partition sold some of it, from refills out of the pool and switches between sub-domains.
    client = redis_client(settings.redis_url)
    try:
        for part in _layout(settings.redis_url, sku)[0]:
            meta = client.hgetall(f"fs:{{{part}}}:meta")
            assert int(meta["deducted_qty"]) > 0 and int(meta["refilled_qty"]) > 0
            assert int(meta["switches"]) > 0
    finally:
        client.close()
    # A retry of a token that bought gets `duplicate`, from the partition that sold it.
    bought = next(t for t, said in crowd.answers.items() if said[-1] == "accepted")
    assert _buy(url, sku, 1, bought) == "duplicate"
    # Every token that bought was sold where its order sends it: its first partition, or past closed ones.
    assert misplaced(settings.redis_url, sku, crowd.told()) == []

    code, report = reconcile_json(pipeline, sku)
    assert code == 0, report
    assert report["skus"][0]["consistent"] and report["skus"][0]["redis_stock"] == 0


def test_the_last_units_sell_even_when_no_single_partition_holds_enough(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    # 10 units, 3 partitions of 3 each and 1 in the pool: a purchase of 4 fits no partition alone.
    set_stock(settings.with_overrides(partition_refill=3), sku, 10, partitions=3)
    url = pipeline.start_all()
    first, told = uuid.uuid4().hex, _Told()
    assert _buy(url, sku, 4, first, told=told) == "accepted"
    assert _buy(url, sku, 6, told=told) == "accepted"  # every remaining unit, gathered from all the partitions
    assert _buy(url, sku, 1, told=told) == "sold_out"
    time.sleep(0.2)  # the producer's registry of the partitions (50 ms) now says sold out
    fresh = uuid.uuid4().hex
    sent = _half_messages(settings)
    assert _buy(url, sku, 1, fresh, told=told) == "sold_out"
    assert _buy(url, sku, 4, first, told=told) == "duplicate"  # a token seen before still gets its original answer
    # Both answers came from a read of the logs: no half message, no pre-deduct, nothing written.
    assert _half_messages(settings) == sent
    assert _sold_on(settings.redis_url, sku, fresh) is None
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert told.against(books) == []
    assert books.sold == 10 and books.redis_stock == 0 and books.oversold() == 0


def test_an_exhausted_partition_closes_and_its_tokens_sell_on_the_others(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    set_stock(settings.with_overrides(partition_refill=10), sku, 30, partitions=3)  # 10 each, the pool empty
    layout = _layout_of(settings, sku)
    # 14 buyers whose token starts at each partition, the anchor's last: the buyers of each other
    # partition find it empty, while the anchor still holds units (so the SKU is not sold out yet).
    url = pipeline.start_all()
    said: dict[str, str] = {}
    told = _Told()
    with ThreadPoolExecutor(8) as pool:
        for part in (*layout.parts[1:], layout.anchor):
            mine = (uuid.uuid4().hex for _ in iter(int, 1))
            first = (t for t in mine if partition_order(layout.parts, t)[0] == part)
            tokens = [t for t, _ in zip(first, range(14), strict=False)]
            said.update(zip(tokens, pool.map(lambda t: _buy(url, sku, 1, t, told=told), tokens), strict=True))
        tokens = list(said)
        again = dict(zip(tokens, pool.map(lambda t: _buy(url, sku, 1, t, told=told), tokens), strict=True))
    assert sorted(Counter(said.values()).items()) == [("accepted", 30), ("sold_out", 12)]
    assert all(again[t] == ("duplicate" if said[t] == "accepted" else "sold_out") for t in tokens)
    client = redis_client(settings.redis_url)
    try:
        closed = {p for p in layout.parts if client.hget(f"fs:{{{p}}}:meta", "closed") == "1"}
    finally:
        client.close()
    # The two partitions that are not the anchor closed when they ran dry; the anchor never does.
    assert closed == set(layout.parts[1:])
    shown = flashsale(pipeline, "stock", "show", sku, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [p["closed"] for p in json.loads(shown.stdout)["redis"]["partitions"]] == [False, True, True]
    table = flashsale(pipeline, "stock", "show", sku, COLUMNS="200")
    assert table.returncode == 0 and table.stdout.count(" closed") == 2 and table.stdout.count(" open") == 1
    assert misplaced(settings.redis_url, sku, [t for t in tokens if said[t] == "accepted"]) == []
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert told.against(books) == []
    assert books.sold == 30 and books.redis_stock == 0 and books.oversold() == 0


def _spread_group(layout: Layout) -> list[str]:
    """Three tokens that start at three different partitions: one group of them is one message over all."""
    tokens: list[str] = []
    while len(tokens) < 3:
        token = uuid.uuid4().hex
        if partition_order(layout.parts, token)[0] == layout.parts[len(tokens)]:
            tokens.append(token)
    return tokens


def _die_with(pipeline: Pipeline, failpoint: str, sku: str, tokens: list[str]) -> None:
    """A producer that dies at `failpoint` while it sells one group of `tokens` (it waits 300 ms for them)."""
    doomed, url = pipeline.producer(failpoints=failpoint, FLASHSALE_GROUP_WAIT_MS="300")
    with ThreadPoolExecutor(len(tokens)) as pool:
        list(pool.map(lambda t: buy(url, sku, t, user=f"u-{t}"), tokens))
    assert doomed.wait_exit(10) != 0


def _records(url: str, layout: Layout, gid: str) -> dict[str, str | None]:
    """Each partition's record of message `gid` (its state), read with plain redis-py."""
    client = redis_client(url)
    try:
        raw = {p: client.hget(f"fs:{{{p}}}:tx", gid) for p in layout.parts}
    finally:
        client.close()
    return {p: json.loads(r)["state"] if r else None for p, r in raw.items()}


@pytest.mark.parametrize(
    ("failpoint", "resolution", "state", "retried"),
    [
        # Every share ran: the checker commits, and a retry of each token hears `duplicate`.
        (failpoints.AFTER_PREDEDUCT, "commit", c.TX_RAN, "duplicate"),
        # None ran: the checker fences every share and rolls back; the buyers, asking again, buy anew.
        (failpoints.AFTER_HALF_MESSAGE, "rollback", c.TX_FENCED, "accepted"),
    ],
    ids=["after-pre-deducts", "after-half-message"],
)
def test_a_producer_killed_amid_a_spread_groups_transaction_is_settled_by_the_checker_on_every_share(
    pipeline: Pipeline, settings: Settings, sku: str, failpoint: str, resolution: str, state: str, retried: str
) -> None:
    set_stock(settings, sku, 30, partitions=3)
    layout = _layout_of(settings, sku)
    tokens = _spread_group(layout)
    pipeline.consumer()
    checker = pipeline.checker()
    _die_with(pipeline, failpoint, sku, tokens)
    checker.wait_log(f" -> {resolution}", timeout_s=60)
    gid = re.search(rf"check message (\S+) key \S+ -> {resolution}", checker.text())
    assert gid is not None
    # One message over the three partitions: each share of it settled the same way.
    assert _records(settings.redis_url, layout, gid[1]) == dict.fromkeys(layout.parts, state)
    _, healthy = pipeline.producer()
    told = _Told()
    assert [_buy(healthy, sku, 1, t, f"u-{t}", told) for t in tokens] == [retried] * 3
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert told.against(books) == []
    assert books.order_count == 3 and books.redis_stock == 27


def test_a_spread_message_whose_share_never_ran_is_committed_for_the_share_that_did_once_it_is_fenced(
    settings: Settings, sku: str
) -> None:
    set_stock(settings, sku, 30, partitions=3)
    layout = _layout_of(settings, sku)
    tokens = _spread_group(layout)
    purchases = tuple(Purchase(t, f"u-{t}", 1, p) for t, p in zip(tokens, layout.parts, strict=True))
    body = DeductionMessage(sku, purchases, "m-spread").encode()
    delivery = Delivery("m-spread", settings.deduction_topic, tokens[0], body, int(time.time() * 1000), 1)
    stock = RedisStock(settings.redis_url)
    try:
        # Only the first share ran (its producer died, or the others' masters never got theirs).
        assert stock.prededuct(layout.parts[0], "m-spread", [purchases[0]], layout.epoch)[0].code is Prededuct.ACCEPTED
        assert DeductionChecker(stock, grace_s=60).check(delivery) is Resolution.UNKNOWN  # the others may still run
        assert _records(settings.redis_url, layout, "m-spread")[layout.parts[1]] is None
        assert DeductionChecker(stock, grace_s=0).check(delivery) is Resolution.COMMIT
        assert _records(settings.redis_url, layout, "m-spread") == {
            layout.parts[0]: c.TX_RAN,
            layout.parts[1]: c.TX_FENCED,
            layout.parts[2]: c.TX_FENCED,
        }
        # A share arriving late deducts nothing; what the consumer applies is the share that ran.
        late = stock.prededuct(layout.parts[1], "m-spread", [purchases[1]], layout.epoch)
        assert [r.code for r in late] == [Prededuct.FENCED]
        decoded = [accepted.Decoded(delivery, DeductionMessage.decode(body))]
        todo = accepted.plan(decoded, stock.lookup(accepted.wanted(decoded)))
        assert [i.deduction.token for i in todo.apply] == [tokens[0]] and todo.conflicts == []
        assert todo.skipped == 2
    finally:
        stock.close()


def test_a_refill_or_drain_cut_short_is_completed_once(settings: Settings, sku: str) -> None:
    set_stock(settings.with_overrides(partition_refill=5), sku, 100, partitions=3)
    layout = _layout_of(settings, sku)
    first, second = layout.parts[0], layout.parts[1]

    async def scenario() -> None:
        stock = AsyncRedisStock(settings.redis_url)
        try:
            # A refiller takes 7 units from the pool for `first` and dies before giving them.
            assert await stock.take(layout, "t-out", first, 7) == 7
            # Another expects a drain of `second`, drains 2 units, and dies before the pool receives them.
            await stock.expect(layout, "t-in", second, 2)
            assert await stock.drain(layout, second, "t-in", 2) == 2
            assert now(settings, sku).redis_stock == 100  # the oracle counts both as under way
            scheduler = Scheduler(stock)
            for _ in range(2):  # the sweep, run twice, completes each transfer once
                await scheduler._sweep(layout, 0)
            await stock.give(layout, first, "t-out", 7)  # the first refiller's late step 2: a no-op
            assert await stock.take(layout, "t-out", first, 7) == 7  # and its step 1 again: nothing taken
            assert await stock.drain(layout, second, "t-in", 2) == 2  # the drain, run again, drains nothing more
            await stock.receive(layout, "t-in", 2)  # and its end again: nothing received twice
            await scheduler.close()
        finally:
            await stock.close()

    asyncio.run(scenario())
    client = redis_client(settings.redis_url)
    try:
        assert client.hgetall(f"fs:{{{sku}}}:transfers") == {}
        assert int(client.get(f"fs:{{{sku}}}:pool")) == 100 - 15 - 7 + 2
        assert int(client.hget(f"fs:{{{first}}}:meta", "standby")) == 7
        assert int(client.get(f"fs:{{{second}}}:stock")) == 5 - 2
    finally:
        client.close()
    assert now(settings, sku).redis_stock == 100


def test_a_registry_read_while_the_last_unit_moves_between_partitions_never_says_sold_out(
    settings: Settings, sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One unit, moved over and over from one partition to the pool and on to the next, the way a pull does
    # (drain, then refill): it is always somewhere, so no read of the registry may find the SKU sold out.
    # The reader is paused between sending its read of the pool and those of the partitions, as a process
    # on a loaded box is: the unit can leave a partition not read yet for the pool already read.
    set_stock(settings, sku, 1, partitions=3)  # less than a unit per partition: the one unit is in the pool
    layout = _layout_of(settings, sku)
    moves, reads = 300, 0

    async def scenario() -> None:
        nonlocal reads
        stock, looker = AsyncRedisStock(settings.redis_url), AsyncRedisStock(settings.redis_url)
        done = asyncio.Event()
        route = looker._router.client
        partition_keys = {key for part in layout.parts for key in SkuKeys.of(part).all()}

        async def paused(key: str) -> aredis.Redis:
            if key in partition_keys:
                await asyncio.sleep(0.003)
            return await route(key)

        monkeypatch.setattr(looker._router, "client", paused)

        async def mover() -> None:
            assert await stock.take(layout, "first", layout.anchor, 1) == 1
            await stock.give(layout, layout.anchor, "first", 1)
            await stock.end_refill(layout, "first")
            for n in range(moves):
                src, dst = layout.parts[n % 3], layout.parts[(n + 1) % 3]  # drain, then refill
                await stock.expect(layout, f"in-{n}", src, 1)
                assert await stock.drain(layout, src, f"in-{n}", 1) == 1
                await stock.receive(layout, f"in-{n}", 1)
                assert await stock.take(layout, f"out-{n}", dst, 1) == 1
                await stock.give(layout, dst, f"out-{n}", 1)
                await stock.end_refill(layout, f"out-{n}")
            done.set()

        async def reader() -> None:
            nonlocal reads
            while not done.is_set():
                registry = await looker.registry(layout)
                assert not registry.sold_out, registry
                reads += 1

        try:
            await asyncio.gather(mover(), *(reader() for _ in range(4)))
        finally:
            await stock.close()
            await looker.close()

    asyncio.run(scenario())
    assert reads > moves / 3  # the reads really ran alongside the moves
    assert now(settings, sku).redis_stock == 1


def test_concurrent_pulls_at_the_end_of_a_sale_never_oversell(pipeline: Pipeline, settings: Settings, sku: str) -> None:
    set_stock(settings.with_overrides(partition_refill=2), sku, 40, partitions=3)
    url = pipeline.start_all()
    told = _Told()
    with ThreadPoolExecutor(16) as pool:
        said = list(pool.map(lambda q: _buy(url, sku, q, told=told), [1, 2, 3] * 16))
    sold = sum(q for q, s in zip([1, 2, 3] * 16, said, strict=True) if s == "accepted")
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert told.against(books) == []
    assert books.oversold() == 0 and books.sold == sold
    # 96 units were asked for 40: all but what fits no purchase still coming sold.
    assert books.sold >= 38 and "sold_out" in said


def _bought_by_user(settings: Settings, sku: str) -> dict[str, int]:
    """Units ordered per user, by plain SQL."""
    url = make_url(settings.mysql_url)
    conn = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password, database=url.database
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT user_id, SUM(qty) FROM orders WHERE sku = %s GROUP BY user_id", (sku,))
            return {user: int(qty) for user, qty in cur.fetchall()}
    finally:
        conn.close()


def test_the_per_user_limit_holds_across_partitions(pipeline: Pipeline, settings: Settings, sku: str) -> None:
    set_stock(settings, sku, 300, per_user_limit=2, partitions=3)
    pipeline.launch("checker")
    pipeline.launch("consumer")
    _, url = pipeline.producer(FLASHSALE_GROUP_SIZE="1")  # a partition picked for every purchase
    wanted = [(f"user-{u}", f"{sku}-{u}-{n}") for u in range(10) for n in range(5)]
    told = _Told()
    with ThreadPoolExecutor(25) as pool:
        said = dict(zip(wanted, pool.map(lambda w: _buy(url, sku, 1, w[1], w[0], told), wanted), strict=True))
        # Every token retried: a bought one is `duplicate` and takes nothing more from its buyer's limit.
        again = dict(zip(wanted, pool.map(lambda w: _buy(url, sku, 1, w[1], w[0], told), wanted), strict=True))
    assert sorted(set(said.values())) == ["accepted", "limit_exceeded"]
    assert all(again[w] == ("duplicate" if said[w] == "accepted" else "limit_exceeded") for w in wanted)
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    assert told.against(books, 2) == []
    assert _bought_by_user(settings, sku) == {f"user-{u}": 2 for u in range(10)}
    parts_of = {w: _sold_on(settings.redis_url, sku, w[1]) for w in wanted if said[w] == "accepted"}
    # The tokens went to every partition, and some buyer's to more than one: the limit spans them.
    assert len(set(parts_of.values())) == 3
    assert any(len({part for (user, _), part in parts_of.items() if user == f"user-{u}"}) > 1 for u in range(10))


def test_orders_given_back_on_partitions_over_three_masters_sell_again_once_the_sku_was_sold_out(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    sell_out_give_back_and_sell_again(pipeline, settings, sku)
    _, ports, _ = _layout(settings.redis_url, sku)
    assert len(set(ports.values())) == 3  # each partition's orders were decided on its own master


@pytest.mark.parametrize("takeover", [True, False], ids=["replica-takes-over", "master-restarts"])
def test_the_master_of_a_partitioned_skus_pool_killed_mid_sale_loses_and_oversells_nothing(
    pipeline: Pipeline, settings: Settings, redis_cluster: StackSettings, sku: str, takeover: bool
) -> None:
    # Small refills, so that transfers between the pool and the partitions are under way at the kill;
    # a per-user limit, so that holds are taken on every master too.
    set_stock(settings.with_overrides(partition_refill=10), sku, 400, per_user_limit=100, partitions=3)
    client = redis_client(settings.redis_url)
    assert isinstance(client, redis.RedisCluster)
    try:
        victim_port = client.get_node_from_key(f"fs:{{{sku}}}:pool").port  # the pool, the layout, transfers
    finally:
        client.close()
    url = pipeline.start_all()
    # Buyers who pause between purchases make the stock last several seconds: the kill comes mid-sale.
    crowd = Crowd(url, sku, buyers=8, run_id=f"k{os.getpid()}", pause_s=0.05).start()
    assert poll_until(lambda: crowd.counts()["accepted"] >= 30, 30)

    kill_master(redis_cluster, victim_port, takeover=takeover)
    deadline = time.monotonic() + 120
    while now(settings, sku).sold < 400 and time.monotonic() < deadline:
        time.sleep(0.5)
    crowd.stop()

    assert crowd.unclear() == []
    books = balanced(settings, sku, 120)
    assert books.problems == [], books.problems
    assert books.against(crowd.answers, crowd.asked, crowd.users, 100) == [] and books.oversold() == 0
    # Every unit sold: nothing was lost in a transfer cut by the kill, nor stranded.
    assert books.sold == 400 and books.redis_stock == 0
    assert max(_bought_by_user(settings, sku).values()) <= 100
