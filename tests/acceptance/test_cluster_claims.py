"""Claims of docs/scaling.md about the producer on a Redis Cluster, produced on the tests' own cluster.

- A pre-deduct no replica acknowledges (`WAIT`) is answered `pending`; with REDIS_WAIT_MS=0 the
  producer sends no `WAIT` at all and answers `accepted`.
- A pre-deduct refused by the node its map names (`TRYAGAIN`, `ASK`, `MOVED`: a slot being migrated)
  did not run there: the map is read again and the pre-deduct is sent once more; once the migration
  is done it runs where the slot lives, once. (Redis 7.0 answers `TRYAGAIN` on the migrating node when
  only some of a script's keys have left it, `ASK` when all have, `MOVED` once the slot is the other's.)

Each is counted by the servers themselves: a node's INFO commandstats (calls of WAIT and EVALSHA it
ran, and the EVALSHA it refused before running: a redirection) and INFO errorstats.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from flashsale.adapters.redis.stock_async import AsyncRedisStock
from flashsale.config import Settings
from flashsale.models import Purchase
from flashsale.ops.setup import set_stock
from flashsale.polling import poll_until
from flashsale.records import Prededuct
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Pipeline, post
from tests.acceptance.test_redis_cluster import _sku_per_master
from tests.conftest import cluster_url
from tests.oracle import balanced
from tests.protocol.cluster import Failovers, Node

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settings(settings: Settings, redis_cluster: StackSettings) -> Settings:
    """The session's namespace and database, with Redis on the cluster."""
    return settings.with_overrides(redis_url=cluster_url(redis_cluster))


def _node(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=10)


def _calls(port: int, command: str) -> tuple[int, int]:
    """(calls, rejected_calls) of `command` on one node: run, and refused before running (a redirection)."""
    with _node(port) as node:
        stats = node.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0)), int(stats.get("rejected_calls", 0))


def _errors(port: int, prefix: str) -> int:
    """Error replies of one kind (MOVED, ASK, TRYAGAIN) the node has sent."""
    with _node(port) as node:
        return int(node.info("errorstats").get(f"errorstat_{prefix}", {}).get("count", 0))


def _buy(url: str, sku: str, token: str, qty: int = 2) -> dict[str, Any]:
    status, body = post(url, {"sku": sku, "user_id": "u1", "qty": qty, "token": token})
    return {**body, "http": status}


def _logged(port: int, sku: str, token: str, *, asking: bool = False) -> dict[str, Any] | None:
    """The log entry of `token` on one node, read there with plain commands (ASKING: on a slot it imports)."""
    with _node(port) as node, node.pipeline(transaction=False) as pipe:
        if asking:
            pipe.execute_command("ASKING")
        pipe.hget(f"fs:{{{sku}}}:log", token)
        raw = pipe.execute()[-1]
    return None if raw is None else dict(json.loads(raw))


def _asked_until(
    url: str, sku: str, token: str, unclear: tuple[str, ...] = ("error", "pending")
) -> list[dict[str, Any]]:
    """A buyer asking again with the same token while the answer is unclear (for up to 30 s): every answer."""
    said = [_buy(url, sku, token)]
    deadline = time.monotonic() + 30
    while said[-1]["status"] in unclear and time.monotonic() < deadline:
        time.sleep(0.2)
        said.append(_buy(url, sku, token))
    return said


# --- WAIT ---------------------------------------------------------------------------------------------


def test_a_prededuct_no_replica_acknowledges_is_pending_and_with_redis_wait_ms_0_none_is_awaited(
    pipeline: Pipeline, settings: Settings, redis_cluster: StackSettings
) -> None:
    master, sku = next(iter(_sku_per_master(settings.redis_url).items()))
    set_stock(settings, sku, 10)
    failovers = Failovers(Node("127.0.0.1", redis_cluster.ports.redis))
    _, waiting = pipeline.producer()  # REDIS_WAIT_MS at its default, 500
    _, hasty = pipeline.producer(FLASHSALE_REDIS_WAIT_MS="0")
    failovers.lag(failovers.masters().index(master))  # its replica stops applying the master's writes
    try:
        waits = _calls(master, "wait")[0]
        hasty_told = _buy(hasty, sku, "t-hasty")
        assert (hasty_told["http"], hasty_told["status"]) == (200, "accepted"), hasty_told
        assert _calls(master, "wait")[0] == waits  # no WAIT reached the master: nothing was awaited
        told = _buy(waiting, sku, "t-wait")
        assert (told["http"], told["status"]) == (202, "pending"), told
        assert _calls(master, "wait")[0] >= waits + 1  # it waited, and no replica acknowledged
        entry = _logged(master, sku, "t-wait")
        assert entry is not None and entry["msg"] == told["message_id"]  # the master ran it
    finally:
        failovers.heal()

    pipeline.launch("consumer")
    pipeline.launch("checker")
    pipeline.ready_all()
    # A replica holds the purchase now: the retry hears `duplicate`, with the message that deducted it.
    retries = _asked_until(waiting, sku, "t-wait", ("pending",))
    assert (retries[-1]["status"], retries[-1]["message_id"]) == ("duplicate", told["message_id"]), retries
    books = balanced(settings, sku)
    assert books.problems == [], books.problems
    answers = {"t-hasty": ["accepted"], "t-wait": ["pending", *(r["status"] for r in retries)]}
    assert books.against(answers, {"t-hasty": [2], "t-wait": [2]}, {"t-hasty": "u1", "t-wait": "u1"}) == []


# --- a slot on the move -------------------------------------------------------------------------------


@dataclass
class Resharding:
    """One slot moved from the master on `src` to the one on `dst`, step by step, as redis-cli does it."""

    slot: int
    src: int
    dst: int
    masters: list[int]
    opened: bool = False
    finished: bool = False

    @staticmethod
    def _id(port: int) -> str:
        with _node(port) as node:
            return str(node.execute_command("CLUSTER", "MYID"))

    def open(self) -> None:
        """The slot migrating on src, importing on dst: src still serves the keys it has."""
        with _node(self.dst) as dst, _node(self.src) as src:
            dst.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", self._id(self.src))
            src.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self._id(self.dst))
        self.opened = True

    def left(self, port: int | None = None) -> list[str]:
        with _node(port or self.src) as node:
            return [str(k) for k in node.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1000)]

    def move(self, keys: list[str], src: int | None = None, dst: int | None = None) -> None:
        src, dst = src or self.src, dst or self.dst
        if keys:
            with _node(src) as node:
                node.execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)

    def finish(self) -> None:
        """dst serves the slot: told to the importing node first, then to every other master."""
        self._assign(self.dst)
        self.finished = True

    def _assign(self, owner: int) -> None:
        owner_id = self._id(owner)
        for port in [owner, *(p for p in self.masters if p != owner)]:
            with _node(port) as node:
                node.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", owner_id)

    def undo(self, nodes: list[int]) -> None:
        """Every key of the slot back on src, which serves it again, from whatever step was reached."""
        if self.finished:
            back = Resharding(self.slot, self.dst, self.src, self.masters)
            back.open()
            back.move(back.left())
            back.finish()
        elif self.opened:  # src still serves the slot: what moved comes back from dst, which still imports it
            with _node(self.src) as src:
                src.execute_command("CLUSTER", "SETSLOT", self.slot, "STABLE")
            self.move(self.left(self.dst), src=self.dst, dst=self.src)
            self._assign(self.src)
        assert poll_until(lambda: routed(nodes, self.slot) == {self.src}, 30), routed(nodes, self.slot)


def routed(nodes: list[int], slot: int) -> set[int | None]:
    """The master each node of the cluster routes `slot` to (one element once they all agree)."""
    found: set[int | None] = set()
    for port in nodes:
        with _node(port) as node:
            ranges = node.execute_command("CLUSTER", "SLOTS")
        found.add(next((int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1])), None))
    return found


def _refused_twice(url: str, sku: str, port: int, reply: str) -> str:
    """Buy t-move while the node its map names refuses its keys: sent, refused, sent once more, refused."""
    calls, rejected = _calls(port, "evalsha")
    replies = _errors(port, reply)
    told = _buy(url, sku, "t-move")
    assert (told["http"], told["status"]) == (503, "error"), told  # certainly not run: nothing deducted
    assert _calls(port, "evalsha") == (calls, rejected + 2)
    assert _errors(port, reply) >= replies + 2
    return str(told["status"])


def test_a_prededuct_a_migrating_slot_refuses_is_sent_once_more_and_runs_where_the_slot_lives(
    pipeline: Pipeline, settings: Settings, redis_cluster: StackSettings
) -> None:
    (a, sku), (b, _), (_, other) = sorted(_sku_per_master(settings.redis_url).items())
    nodes = [redis_cluster.ports.redis + i for i in range(redis_cluster.topology.redis_nodes)]
    for s in (sku, other):
        set_stock(settings, s, 10)
    _, url = pipeline.producer()
    told: dict[str, list[str]] = {"t-warm": [_buy(url, sku, "t-warm")["status"]]}
    assert told["t-warm"] == ["accepted"]
    with _node(a) as node:
        slot = int(node.execute_command("CLUSTER", "KEYSLOT", sku))
    move = Resharding(slot, a, b, _masters(nodes))
    try:
        move.open()
        # The record of messages moved, the script's other keys not: the read ahead is answered, the script not.
        move.move([f"fs:{{{sku}}}:tx"])
        told["t-move"] = [_refused_twice(url, sku, a, "TRYAGAIN")]
        move.move(move.left())  # every key moved, the slot still migrating
        told["t-move"].append(_refused_twice(url, sku, a, "ASK"))
        assert _logged(b, sku, "t-move", asking=True) is None  # neither attempt deducted anything

        # The producer reads the map again now (it was told the map is stale): the slot is still a's.
        told["t-other"] = [_buy(url, other, "t-other")["status"]]
        moved, ran = _errors(a, "MOVED"), _calls(b, "evalsha")[0]
        move.finish()
        said = _asked_until(url, sku, "t-move")
        told["t-move"] += [str(s["status"]) for s in said]
        assert said[-1]["status"] == "accepted", said
        assert _errors(a, "MOVED") > moved  # its map named a, which sent it on
        assert _calls(b, "evalsha")[0] > ran  # and it ran where the slot lives
        entry = _logged(b, sku, "t-move")
        assert entry is not None and entry["msg"] == said[-1]["message_id"]
    finally:
        move.undo(nodes)

    pipeline.launch("consumer")
    pipeline.launch("checker")
    pipeline.ready_all()
    for s, tokens in ((sku, ["t-warm", "t-move"]), (other, ["t-other"])):
        books = balanced(settings, s)
        assert books.problems == [], books.problems
        answers = {t: told[t] for t in tokens}
        assert books.against(answers, {t: [2] for t in tokens}, dict.fromkeys(tokens, "u1")) == []
    assert told["t-other"] == ["accepted"]


def _masters(nodes: list[int]) -> list[int]:
    masters = []
    for port in nodes:
        with _node(port) as node:
            if node.info("replication")["role"] == "master":
                masters.append(port)
    return masters


def test_a_prededuct_a_stale_map_sends_to_the_old_master_is_moved_and_sent_once_more_where_the_slot_lives(
    settings: Settings, redis_cluster: StackSettings
) -> None:
    """The pre-deduct itself meets MOVED. In the producer its read ahead of the same slot meets it first and
    has the map read again (the test above); here the producer's Redis adapter runs the pre-deduct alone."""
    (a, sku), (b, _), _ = sorted(_sku_per_master(settings.redis_url).items())
    nodes = [redis_cluster.ports.redis + i for i in range(redis_cluster.topology.redis_nodes)]
    set_stock(settings, sku, 10)
    with _node(a) as node:
        slot = int(node.execute_command("CLUSTER", "KEYSLOT", sku))
    move = Resharding(slot, a, b, _masters(nodes))
    stock = AsyncRedisStock(settings.redis_url, timeout_s=1.0, wait_ms=500)

    async def moved_after_the_map_was_read() -> tuple[list[Prededuct], tuple[int, int], int]:
        try:
            warm = await stock.prededuct(sku, "m-warm", [Purchase("t-warm", "u1", 1)])  # the map is read: a
            assert [r.code for r in warm] == [Prededuct.ACCEPTED]
            move.open()
            move.move(move.left())
            move.finish()  # within the 5 s the map is trusted: it still names a
            on_a, on_b = _calls(a, "evalsha"), _calls(b, "evalsha")[0]
            done = await stock.prededuct(sku, "m-move", [Purchase("t-move", "u1", 2)])
            return [r.code for r in done], on_a, on_b
        finally:
            await stock.close()

    try:
        codes, (a_calls, a_refused), b_calls = asyncio.run(moved_after_the_map_was_read())
        assert codes == [Prededuct.ACCEPTED]
        assert _calls(a, "evalsha") == (a_calls, a_refused + 1)  # sent to a, refused there (MOVED), not run
        assert _calls(b, "evalsha")[0] > b_calls  # sent once more, to b, where it ran
        entry = _logged(b, sku, "t-move")
        assert entry is not None and (entry["msg"], entry["qty"]) == ("m-move", 2)
        with _node(b) as node:
            assert node.get(f"fs:{{{sku}}}:stock") == "7"  # deducted once: 10 - 1 - 2
    finally:
        move.undo(nodes)
