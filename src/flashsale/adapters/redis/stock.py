"""Stock in Redis, the synchronous client: the Lua scripts behind typed methods (the producer's hot path,
on an asyncio loop, is stock_async.py).

Scripts are registered once per client; redis-py runs them with EVALSHA and, after a NOSCRIPT reply
(a restarted or flushed server), loads them again and retries. Keys are named in keys.py, calls built
and replies read in codec.py.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from flashsale import constants as c
from flashsale.adapters.redis import lua
from flashsale.adapters.redis.codec import (
    VIEW_READS,
    add_stock_call,
    decide_call,
    load_number,
    located,
    parse_additions,
    parse_check,
    parse_decision,
    parse_layout,
    parse_lookup,
    parse_prededuct,
    parse_restock,
    parse_view,
    partitioned_view,
    prededuct_call,
    queue_snapshot,
    sold_out,
)
from flashsale.adapters.redis.freeze import Freeze, Renewal, Target, lapsed, taken
from flashsale.adapters.redis.keys import SKUS_KEY, SkuKeys, all_holds_keys, holds_key, parent, place
from flashsale.adapters.redis.topology import (
    MAP_TTL_S,
    MISROUTED,
    UNREACHABLE,
    Replicas,
    masters,
    sync_client,
    sync_node,
    unavailable,
)
from flashsale.errors import NotReplicated, StockError
from flashsale.models import Purchase
from flashsale.records import (
    Adopt,
    CheckView,
    Decision,
    DeductionRow,
    Layout,
    LoadStock,
    LogEntry,
    LookedUp,
    PredeductResult,
    RestockResult,
    StockReturn,
    StockView,
)

logger = logging.getLogger(__name__)

#: Longest a reload keeps a SKU frozen if the process loading it dies midway (see RedisStock.frozen).
FREEZE_S = 30.0
#: Tries of a repair's write into a sealed SKU's log, each once the seal it found has ended: the first
#: bars new seals (adopt.lua), so the second finds none unless a reload dropped that bar meanwhile.
ADOPT_TRIES = 3
#: A write-back's count on its buyer (user_hold.lua): a limit no count reaches, and the attempt it is named by.
REPAIR_LIMIT, REPAIR_ATTEMPT = str(10**15), "repair"


class RedisStock:
    """One Redis node or a Redis Cluster (see topology.py), connected on first use."""

    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 128, wait_ms: int = 0) -> None:
        self.url = url
        #: With replicas, the checker's answer counts once one of them holds what it read or wrote (WAIT).
        self._wait_ms = wait_ms
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._client: redis.Redis | redis.RedisCluster | None = None
        self._scripts: dict[str, Any] = {}
        #: The freeze of each SKU this process holds (see `frozen`).
        self._freezes: dict[str, Freeze] = {}
        self._map_read_at = time.monotonic()
        self._replicas = Replicas()

    @property
    def client(self) -> redis.Redis | redis.RedisCluster:
        if self._client is None:
            try:
                client = sync_client(self.url, timeout_s=self._timeout_s, max_connections=self._max_connections)
            except UNREACHABLE as exc:
                raise unavailable(self.url, "connect", exc, reached=False) from exc
            self._scripts = {name: client.register_script(lua.source(name)) for name in lua.NAMES}
            self._replicas.read(client)
            self._client = client
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        _connected = self.client  # the scripts are registered on the client made at first use
        try:
            return self._scripts[script](keys=keys, args=args)
        except UNREACHABLE as exc:
            raise unavailable(self.url, script, exc) from exc
        except MISROUTED as exc:  # a cluster failing over: the script did not run
            self._stale()
            raise unavailable(self.url, script, exc, reached=False) from exc
        except redis.ResponseError as exc:
            raise StockError(f"Redis script {script} failed: {exc}") from exc

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """`fn`'s answer. A cluster failing over (a slot moving, no master for it yet: MISROUTED) is Redis
        not serving, as a server that does not answer is: the caller waits and asks again. Taken for any
        other error, it made the consumer dead-letter a batch of good purchases one message at a time."""
        try:
            return fn(*args)
        except UNREACHABLE as exc:
            raise unavailable(self.url, what, exc) from exc
        except MISROUTED as exc:
            self._stale()
            raise unavailable(self.url, what, exc) from exc

    def ping(self) -> None:
        """Raises ServiceUnavailable while Redis does not serve (a cluster still forming answers without
        serving its slots)."""
        try:
            self._call("ping", lambda: self.client.ping())
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise unavailable(self.url, "ping", exc) from exc

    # --- the sale -----------------------------------------------------------------------------------
    def load(self, sku: str, qty: int, *, per_user_limit: int = 0, reset: bool = False, pay_within_ms: int = 0) -> None:
        """Load a SKU on one key; with `pay_within_ms`, each accepted purchase awaits payment that long."""
        old = self._refuse_history(sku, reset)
        # What the old load had goes first, while its layout still names it: the SKU's own load below
        # rewrites that layout, so a load cut short after it (a crash, NotReplicated) and run again would
        # read no layout and leave the old partitions, their deductions still found by a lookup.
        self._drop(sku, old.parts if old else (), pool=True)
        self._load_one(sku, [str(qty), str(per_user_limit), "1", "", "", str(pay_within_ms)])
        self._call("register sku", self.client.sadd, SKUS_KEY, sku)
        self._drop_holds(old)

    def load_partitioned(
        self,
        sku: str,
        qty: int,
        *,
        partitions: int,
        refill: int,
        threshold: int,
        per_user_limit: int = 0,
        reset: bool = False,
        pay_within_ms: int = 0,
    ) -> Layout:
        """Spread `qty` over `partitions` partitions on different masters: each starts with up to one
        refill in its active sub-domain, the rest waits in the SKU's pool. The partitions are loaded
        before the layout that names them, so no producer sees a half-loaded SKU. With `pay_within_ms`,
        each partition's accepted purchases await payment that long (each partition keeps the deadline:
        its pre-deduct writes it into the entry)."""
        old = self._refuse_history(sku, reset)
        names, master_of_slot = masters(self.client)
        parts = place(sku, partitions, names, master_of_slot)
        share = min(refill, qty // partitions)
        # Each load has an epoch of its own, later than the one before: it names the holds' keys, and
        # every partition keeps it to refuse purchases placed by another load's layout.
        epoch = max(int(time.time() * 1000), old.epoch + 1 if old else 0)
        # The old load's leftovers go first, while its layout still names them (see `load`).
        self._drop(sku, [p for p in (old.parts if old else ()) if p not in parts], pool=False)
        self._load_parts(parts, old, [str(share), "0", "1", str(threshold), str(epoch), str(pay_within_ms)])
        keys = SkuKeys.of(sku)
        epoch = self._script_held(
            keys.meta,
            "load_pool",
            keys.load_pool(),
            [
                str(qty),
                str(qty - share * partitions),
                " ".join(parts),
                str(refill),
                str(threshold),
                str(per_user_limit),
                str(epoch),
                self._fence(sku),
                self._number(sku),
            ],
        )
        if int(epoch) < 0:
            raise lapsed(sku)
        self._call("register sku", self.client.sadd, SKUS_KEY, sku)
        self._drop_holds(old)
        return Layout(sku, tuple(parts), refill, threshold, int(epoch), per_user_limit)

    def _load_parts(self, parts: Sequence[str], old: Layout | None, args: list[str]) -> None:
        for part in parts:
            if part not in (old.parts if old else ()):
                self._claim(part)
            self._load_one(part, args)
            self._call("clear refills", self.client.delete, SkuKeys.of(part).refills)

    @contextmanager
    def frozen(self, sku: str, *, for_s: float = FREEZE_S) -> Iterator[Freeze]:
        """While the block runs, every pre-deduct of the SKU (on each of its partitions) is refused as
        placed by another load: nothing deducted, the buyer asks again. A reload reads the sale's history
        inside it, so that no purchase lands between that read and the load. The freeze is renewed while
        the block runs, and ends with it, or by itself `for_s` after the last renewal if this process
        dies. The loads run inside write only while it holds (see freeze.py)."""
        freeze = Freeze(sku, self._freeze_targets(sku), round(for_s * 1000), self._freeze_held, self._freeze_run)
        first = freeze.targets  # thawed too, should the layout read again name others
        try:
            freeze.take()
            # Another load may have laid the SKU out anew between the read of its shards and the take: take
            # the new ones too. It cannot again: the SKU's own meta is frozen by now.
            for _ in range(3):
                if (shards := self._freeze_targets(sku)) == freeze.targets:
                    break
                freeze.targets = shards
                freeze.take()
            else:
                raise taken(sku, freeze.ms)
            freeze.sealed_until = self._sealed_until(freeze.targets)
            self._freezes[sku] = freeze
            with Renewal(freeze.renew, every_s=for_s / 3):
                yield freeze
        finally:
            self._freezes.pop(sku, None)
            freeze.thaw(list(dict.fromkeys([*first, *freeze.targets, *freeze.claimed, *self._freeze_targets(sku)])))

    def _sealed_until(self, targets: Sequence[Target]) -> str:
        """When the last seal a producer may trust ends (seal.lua): no seal begins or grows on a frozen SKU.
        Read on every meta frozen, the SKU's and its partitions': a load carries the seal into each meta it
        writes, so the one before may have left it in its partitions alone."""
        found = [self._call("read the seal", self.client.hget, target[1], "sealed_until") for target in targets]
        latest = max((int(v) for v in found if v), default=0)
        return str(latest) if latest else ""

    def ticket(self, sku: str, above: int) -> int:
        """The number of the load of `sku` this process runs under `frozen`, above `above` (the one MySQL
        holds) and above every number given before (ticket.lua). Raises when the load no longer holds the
        freeze: it must write nothing."""
        keys = SkuKeys.of(sku)
        args = [self._fence(sku), str(above)]
        number = int(self._script_held(keys.meta, "ticket", [keys.meta, keys.loading, keys.ticket], args))
        if number == 0:
            raise lapsed(sku)
        self._freezes[sku].number = number  # every meta the load writes keeps it (load_stock.lua)
        return number

    def _freeze_targets(self, sku: str) -> list[Target]:
        """The freeze's target on each shard of the SKU (its stock must exist), and on a partitioned SKU's
        own keys (its pool must exist): restocks into the pool wait for the load too. The SKU's own comes
        last."""
        shards = self.shards(sku)
        targets = [_target(shard) for shard in shards]
        if shards != (sku,):
            keys = SkuKeys.of(sku)
            targets.append((keys.pool, keys.meta, keys.loading))
        return targets

    def _freeze_held(self, target: Target, ms: int, token: str, mode: str) -> int:
        return int(self._script_held(target[1], "freeze", list(target), [str(ms), token, mode]))

    def _freeze_run(self, target: Target, ms: int, token: str, mode: str) -> int:
        return int(self._run("freeze", list(target), [str(ms), token, mode]))

    def _fence(self, shard: str) -> str:
        """The token of the freeze the load of `shard` runs under ('' outside `frozen`)."""
        freeze = self._freezes.get(parent(shard))
        return freeze.token if freeze else ""

    def _number(self, shard: str) -> str:
        """The number of the load of `shard` (`ticket`; '0' for a load that took none)."""
        freeze = self._freezes.get(parent(shard))
        return str(freeze.number if freeze else 0)

    def _claim(self, part: str) -> None:
        """Freeze a partition no layout names yet, before it is loaded (a load cut short may have left it)."""
        freeze = self._freezes.get(parent(part))
        if freeze is not None:
            freeze.claim(_target(part))

    def _refuse_history(self, sku: str, reset: bool) -> Layout | None:
        """The SKU's current layout, after refusing to load over a sale on record without `reset`."""
        old = self.layout(sku)
        logged = self._logged(sku, old)
        if logged and not reset:
            raise StockError(
                f"{sku} already has {logged} deduction(s) on record in Redis",
                hint="pass --reset to discard that history (orders already applied stay in MySQL)",
            )
        return old

    def _load_one(self, shard: str, args: list[str]) -> None:
        keys = SkuKeys.of(shard)
        freeze = self._freezes.get(parent(shard))
        args = [*args, self._fence(shard), self._number(shard), freeze.sealed_until if freeze else ""]
        raw, detail = self._script_held(keys.meta, "load_stock", keys.load(), args)
        if LoadStock(int(raw)) is LoadStock.LAPSED:
            raise lapsed(parent(shard))
        if LoadStock(int(raw)) is not LoadStock.LOADED:
            raise StockError(f"Redis refused to load {shard}: invalid {detail}")

    def _drop(self, sku: str, parts: Sequence[str], *, pool: bool) -> None:
        """Delete partitions no longer in the SKU's layout (and the pool of a SKU no longer partitioned)."""
        for part in parts:
            keys = SkuKeys.of(part)
            self._drop_keys(part, [k for k in keys.every() if k != keys.tx], retire=keys.tx)
        if pool:
            keys = SkuKeys.of(sku)
            self._drop_keys(sku, [keys.pool, keys.transfers, keys.done])

    def _drop_keys(self, shard: str, keys: list[str], *, retire: str = "") -> None:
        """Delete `keys` of `shard`, and retire the message records `retire` (drop.lua)."""
        meta = SkuKeys.of(shard).meta
        if not int(self._script_held(meta, "drop", [meta, retire or meta, *keys], [self._fence(shard)])):
            raise lapsed(parent(shard))

    def _drop_holds(self, old: Layout | None) -> None:
        """The per-user holds of the SKU's previous load (one key per shard: each on its own slot)."""
        for key in all_holds_keys(old) if old else []:
            self._delete_held("drop holds", [key])

    def _delete_held(self, what: str, keys: list[str]) -> None:
        """Delete keys of one slot, as `_held` writes."""
        self._held(keys[0], what, lambda r: r.delete(*keys))

    def _script_held(self, key: str, script: str, keys: list[str], args: list[str]) -> Any:
        _connected = self.client  # the scripts are registered on the client made at first use
        return self._held(key, script, lambda r: self._scripts[script](keys=keys, args=args, client=r))

    def _held(self, key: str, what: str, write: Callable[[Any], Any]) -> Any:
        """The reply of `write`, a write on `key`'s slot that a failover must not undo (a load's). Where
        that master has replicas, a WAIT follows on the same connection (replication is one ordered
        stream, so it proves every earlier write there too); none acknowledging in time raises
        NotReplicated: the master holds the write, a failover now would bring back what it replaced."""
        wanted = self._replicas.of(self.client, key) if self._wait_ms else 0
        try:
            if not wanted:
                return write(self.client)
            try:
                reply, acked = self._then_wait(key, wanted, write)
            except MISROUTED:  # the slot moved (a failover): nothing ran; once more on its master now
                self._stale()
                reply, acked = self._then_wait(key, wanted, write)
        except (*UNREACHABLE, *MISROUTED) as exc:
            self._stale()
            raise unavailable(self.url, what, exc) from exc
        except redis.ResponseError as exc:
            raise StockError(f"Redis {what} failed: {exc}") from exc
        if int(acked) < wanted:
            raise NotReplicated(
                f"Redis took the {what} of {key}, but no replica acknowledged it within {self._wait_ms} ms",
                hint="a failover now would undo it: check the replicas (INFO replication), then run it again",
            )
        return reply

    def layout(self, sku: str) -> Layout | None:
        """How the SKU is partitioned; None when it is not (or not loaded)."""
        return parse_layout(sku, self._call("read layout", self.client.hgetall, SkuKeys.of(sku).meta))

    def shards(self, sku: str) -> tuple[str, ...]:
        """Where the SKU's log lives: its partitions, or the SKU itself."""
        layout = self.layout(sku)
        return layout.parts if layout else (sku,)

    def prededuct(self, sku: str, gid: str, purchases: Sequence[Purchase], epoch: int = 0) -> list[PredeductResult]:
        keys, args = prededuct_call(sku, gid, purchases, epoch)
        return parse_prededuct(purchases, self._run("prededuct", keys, args))

    def check(self, sku: str, gid: str, tokens: Sequence[str], *, grace_ms: int) -> CheckView:
        """What Redis knows of half message `gid`; fences it first when it never ran and was first asked
        about longer than the grace ago (on Redis's clock)."""
        keys = SkuKeys.of(sku)
        script_keys, args = [keys.tx, keys.log, keys.meta, keys.checks], [gid, str(grace_ms), *tokens]
        if self._wait_ms and time.monotonic() - self._map_read_at > MAP_TTL_S:
            self._map_read_at = time.monotonic()
            self._stale()
        wanted = self._replicas.of(self.client, keys.tx) if self._wait_ms else 0
        if not wanted:
            return parse_check(tokens, self._run("fence", script_keys, args))
        # fence.lua writes whenever it decides, so a WAIT on its connection covers the pre-deduct it read.
        try:
            fence = self._scripts["fence"]
            reply, acked = self._then_wait(keys.tx, wanted, lambda r: fence(keys=script_keys, args=args, client=r))
        except MISROUTED as exc:
            self._stale()
            raise unavailable(self.url, "fence", exc, reached=False) from exc
        except UNREACHABLE as exc:
            self._stale()
            raise unavailable(self.url, "fence", exc) from exc
        except redis.ResponseError as exc:
            raise StockError(f"Redis script fence failed: {exc}") from exc
        view = parse_check(tokens, reply)
        if view.state != c.TX_YOUNG and int(acked) < wanted:
            raise unavailable(self.url, "fence", TimeoutError(f"no replica acknowledged within {self._wait_ms} ms"))
        return view

    def _then_wait(self, key: str, wanted: int, write: Callable[[Any], Any]) -> tuple[Any, Any]:
        """`write`'s reply and the replicas that acknowledged it: one pipeline on `key`'s node, as WAIT needs.
        A WAIT refused after the write ran (cut short by a failover, or sent to a master turned replica
        meanwhile) raises as an unanswered call does: the write's outcome is unknown."""
        pipe = sync_node(self.client, key).pipeline(transaction=False)
        write(pipe)
        pipe.execute_command("WAIT", wanted, self._wait_ms)  # type: ignore[no-untyped-call]
        reply, acked = pipe.execute(raise_on_error=False)
        if isinstance(reply, Exception):
            raise reply  # the write's own error: it wrote nothing
        if isinstance(acked, Exception):
            raise redis.ConnectionError(f"WAIT after the write refused: {acked}") from acked
        return reply, acked

    def _stale(self) -> None:
        """After a misrouted or unanswered call, read the cluster's map again (a replica may have taken over)."""
        if isinstance(self._client, redis.RedisCluster):
            try:
                self._client.nodes_manager.initialize()
            except (redis.RedisError, redis.exceptions.RedisClusterException):
                # No node answers now, or the slots are not all served yet (a failover): the next call finds
                # out and says so; raised here, it would hide the error the caller is about to report.
                return
            self._replicas.read(self._client)

    def lookup(self, wanted: Mapping[str, tuple[Sequence[str], Sequence[str]]]) -> dict[str, LookedUp]:
        """Per SKU (or partition), the log entries of some tokens, the records of some messages, the units
        restocks added to it, and the number of the load they belong to, in two round trips.

        The load numbers are read first, in a round trip of their own: a pipeline is no transaction (and a
        cluster's nodes answer their parts in any order), so a reload can land between any two of its reads.
        Read after the log, the new load's number could stand beside an entry of the old sale, and the
        old deduction be applied to the new load in MySQL. Read before, a reload in between leaves the old
        number beside whatever was read, and MySQL, which holds the new one, refuses the batch
        (LoadUnderWay) until it is read again."""
        skus = [sku for sku, (tokens, gids) in wanted.items() if tokens or gids]
        first = self.client.pipeline(transaction=False)
        for sku in skus:
            first.hget(SkuKeys.of(sku).meta, "ticket")
        tickets = self._call("read load numbers", first.execute)
        pipe = self.client.pipeline(transaction=False)
        for sku in skus:
            tokens, gids = wanted[sku]
            keys = SkuKeys.of(sku)
            pipe.hmget(keys.log, list(tokens) or ["-"])
            pipe.hmget(keys.tx, list(gids) or ["-"])
            pipe.hget(SkuKeys.of(parent(sku)).meta, "added_qty")  # a partition's restocks are its SKU's
        return parse_lookup(skus, wanted, tickets, self._call("read log", pipe.execute))

    def return_stock(self, sku: str, token: str) -> tuple[StockReturn, int | None]:
        entry = self.log_entry(sku, token)
        keys = SkuKeys.of(entry.shard if entry else sku)
        code, remaining, _ = self._run("return_stock", keys.sale(), [token])
        return StockReturn(int(code)), int(remaining) if int(remaining) >= 0 else None

    def decide(
        self, shard: str, token: str, action: str, *, decision_id: str, message_id: str, user: str = ""
    ) -> tuple[Decision, LogEntry | None]:
        """Pay, cancel or expire the order of `token` (decide.lua) on the keys of `shard`, its partition (or
        its SKU); returns the answer and the entry after it."""
        keys, args = decide_call(shard, token, action, decision_id=decision_id, message_id=message_id, user=user)
        reply = self._run("decide", keys, args)
        return parse_decision(token, reply)

    def add_stock(self, sku: str, qty: int, *, request_id: str, message_id: str) -> RestockResult:
        """Add `qty` units to the SKU's stock once per `request_id` (add_stock.lua)."""
        keys, args = add_stock_call(sku, qty, request_id=request_id, message_id=message_id)
        return parse_restock(self._run("add_stock", keys, args))

    def adopt(self, sku: str, row: DeductionRow, *, deduct: bool) -> tuple[Adopt, str]:
        """Write back a deduction MySQL has and the log lacks, with its order as MySQL has it; `detail` is
        the entry's state, or the stock left.

        A partitioned SKU writes it to the token's first partition, which every attempt of the token
        looks at (records.Layout.order); a deduction taken again there, and more than the partition holds,
        has the units it lacks moved from the SKU's pool first (_refill), as a buyer's purchase would. A
        sealed SKU's is written once the seal ends: this waits for that (no seal begins or grows meanwhile,
        see adopt.lua), and answers SEALED only when a seal still runs after ADOPT_TRIES tries. It writes
        only into the load the row was read under (`row.load`), else answers RELOADED."""
        args = [row.token, row.user_id, str(row.qty), str(row.created_ms), row.message_id, sku]
        args += ["deduct" if deduct else "entry", row.order or "", str(row.due_ms or ""), str(row.decided_ms or "")]
        args.append(str(row.load))
        for tries_left in reversed(range(ADOPT_TRIES)):
            # (read again after a wait: a reload meanwhile may have changed it)
            meta = self._call("read layout", self.client.hgetall, SkuKeys.of(sku).meta)
            layout = parse_layout(sku, meta)
            # Never on another load than the row's (adopt.lua refuses the write): the buyer's count there is theirs.
            if layout is not None and layout.per_user_limit and load_number(meta.get("ticket")) in (None, row.load):
                self._count_on_buyer(layout, row)
            shard = next(layout.order(row.token)) if layout else sku
            keys = SkuKeys.of(shard)
            # With replicas (`reconcile --repair`), once one holds it: a failover must not undo the stock it took.
            code, detail = self._script_held(keys.meta, "adopt", keys.sale(), args)
            answer = Adopt(int(code))
            if answer is Adopt.NO_STOCK and layout and self._refill(layout, shard, row.qty - int(detail)):
                code, detail = self._script_held(keys.meta, "adopt", keys.sale(), args)
                answer = Adopt(int(code))
            if answer is not Adopt.SEALED or not tries_left:
                break
            time.sleep(int(detail) / 1000 + 0.01)
        return answer, str(detail)

    def _refill(self, layout: Layout, part: str, want: int) -> int:
        """Units moved from the SKU's pool to `part`'s standby sub-domain, as a producer's scheduler moves
        them: three steps under one transfer id, each run again counting nothing twice, one left halfway
        completed by the schedulers' sweep. 0 when the pool has none, the partition is closed (it sells
        nothing more), or either is of another load than `layout`'s (nothing moves)."""
        part_keys, sku_keys = SkuKeys.of(part), SkuKeys.of(layout.sku)
        if want <= 0 or self._call("read partition", self.client.hget, part_keys.meta, "closed") == "1":
            return 0
        transfer_id, epoch = uuid.uuid4().hex, str(layout.epoch)
        reply = self._script_held(
            sku_keys.meta, "pool_take", sku_keys.pool_take(), [transfer_id, part, str(want), epoch]
        )
        taken = int(reply[0])
        if taken <= 0:
            return 0
        self._script_held(part_keys.meta, "refill_apply", part_keys.partition_move(), [transfer_id, str(taken), epoch])
        self._script_held(sku_keys.meta, "refill_end", sku_keys.refill_end(), [transfer_id, epoch])
        return taken

    def _count_on_buyer(self, layout: Layout, row: DeductionRow) -> None:
        """A partitioned SKU counts a buyer's units on a key apart from the partitions (user_hold.lua), on
        another node maybe, which a loss may have emptied with or without the entry: the write-back counts the
        token on its buyer, whatever the buyer holds (MySQL applied it). user_hold.lua counts a token once,
        so a count that survived, or one asked again, adds nothing. Counted first: a write-back refused then
        leaves the count ahead of the orders, never behind. A partitioned SKU's count is never given back
        (a cancelled or expired order's included: user_hold.lua), so a returned order counts too."""
        key = holds_key(layout, row.user_id)
        args = [REPAIR_LIMIT, row.token, row.user_id, str(row.qty), REPAIR_ATTEMPT]
        self._script_held(key, "user_hold", [key], args)

    # --- reading ------------------------------------------------------------------------------------
    def log_entry(self, sku: str, token: str) -> LogEntry | None:
        return self.log_entries(sku, [token])[token]

    def exists(self, sku: str) -> bool:
        """Is the SKU loaded (has a stock key, or a pool)?"""
        keys = SkuKeys.of(sku)
        return bool(self._call("read stock", self.client.exists, keys.stock, keys.pool))

    def history(self, sku: str) -> int:
        """Log entries (deductions and fences) recorded for the SKU, in every partition it has."""
        return self._logged(sku, self.layout(sku))

    def _logged(self, sku: str, layout: Layout | None) -> int:
        shards = {sku, *(layout.parts if layout else ())}
        return sum(int(self._call("count log entries", self.client.hlen, SkuKeys.of(s).log)) for s in shards)

    def additions(self, sku: str) -> dict[str, tuple[int, int, str]]:
        """The restocks of the SKU's load: request id -> (units, when (ms, Redis's clock), their message)."""
        raw = self._call("read restocks", self.client.hgetall, SkuKeys.of(sku).added)
        return parse_additions(raw)

    def is_sold_out(self, sku: str) -> bool:
        return sold_out(self._call("read sold-out flag", self.client.hget, SkuKeys.of(sku).meta, "sold_out"))

    def view(self, sku: str) -> StockView:
        """The SKU's stock and counters. A partitioned SKU's are read in snapshots, its own (pool, transfers)
        then each partition's: a transfer that began in between (meta `moves`) would count its units twice,
        or not at all (a refill's in the pool read and the partition's, a drain's in neither), so the view is
        read again then, VIEW_READS times at most."""
        for _ in range(VIEW_READS):
            stock, meta, entries, pool, transfers = self._snapshot("read stock", sku)
            layout = parse_layout(sku, meta)
            if layout is None:
                return parse_view(sku, stock, meta, entries)
            # Each partition is read in one snapshot of its own.
            parts = [
                (self._snapshot("read partition", part, partition=True), self._node_name(SkuKeys.of(part).stock))
                for part in layout.parts
            ]
            view = partitioned_view(layout, meta, pool, transfers, parts)
            if self._call("read stock", self.client.hget, SkuKeys.of(sku).meta, "moves") == meta.get("moves"):
                break
        return view

    def _snapshot(self, what: str, shard: str, *, partition: bool = False) -> list[Any]:
        pipe = self.client.pipeline(transaction=True)  # one snapshot: no script runs in between
        queue_snapshot(pipe, shard, partition=partition)
        return list(self._call(what, pipe.execute))

    def _node_name(self, key: str) -> str:
        if isinstance(self.client, redis.RedisCluster):
            return str(self.client.get_node_from_key(key).name)  # type: ignore[no-untyped-call]
        return ""

    def held_entries(self, shard: str, tokens: Sequence[str]) -> dict[str, LogEntry | None]:
        """The log entries of `tokens` on `shard` (a SKU, or one partition), read by seen.lua so that a
        replica is known to hold them: with replicas, a WAIT follows (NotReplicated: none in time)."""
        keys = SkuKeys.of(shard)
        raws = self._script_held(keys.log, "seen", [keys.log, keys.meta], list(tokens))
        sku = parent(shard)
        return {
            t: located(LogEntry.parse(t, raw), sku, shard) if raw else None for t, raw in zip(tokens, raws, strict=True)
        }

    def log_entries(self, sku: str, tokens: list[str]) -> dict[str, LogEntry | None]:
        """The log entries of `tokens` (HMGET; in each partition of a partitioned SKU), None where there is none."""
        found: dict[str, LogEntry | None] = dict.fromkeys(tokens)
        if not tokens:
            return found
        shards = self.shards(sku)
        pipe = self.client.pipeline(transaction=False)  # every partition in one round trip per node
        for shard in shards:
            pipe.hmget(SkuKeys.of(shard).log, tokens)
        for shard, raws in zip(shards, self._call("read log", pipe.execute), strict=True):
            for t, raw in zip(tokens, raws, strict=True):
                if raw is not None and found[t] is None:
                    found[t] = located(LogEntry.parse(t, raw), sku, shard)
        return found

    def skus(self) -> list[str]:
        return sorted(self._call("list skus", self.client.smembers, SKUS_KEY))

    def scan_log(self, sku: str, page: int = 1000) -> Iterator[LogEntry]:
        """Every log entry of the SKU (in each of its partitions), read page by page (HSCAN), never all at once."""
        for shard in self.shards(sku):
            log_key = SkuKeys.of(shard).log
            cursor = 0
            while True:
                cursor, chunk = self._call("scan log", self.client.hscan, log_key, cursor, None, page)
                for token, raw in chunk.items():
                    yield located(LogEntry.parse(token, raw), sku, shard)
                if cursor == 0:
                    break


def _target(shard: str) -> Target:
    """The freeze's target on a SKU on one key, or on one partition: its stock must exist."""
    keys = SkuKeys.of(shard)
    return keys.stock, keys.meta, keys.loading
