"""The producer's hot path in Redis, on an asyncio loop: peek, pre-deduct, sold-out flag, stock view.

Same keys, scripts and replies as RedisStock (stock.py): both name keys with keys.py, and build calls
and read replies with codec.py. Only the I/O model differs, and one thing is added: a pre-deduct that
fails says whether it may have run. The connection is taken from the pool before the script is sent, so
"refused" and "no free connection" are told apart from a timeout after sending: only the latter leaves
the outcome unknown. Because the script is idempotent per message id, a failure after sending is tried
once more on a fresh connection, which turns most unknowns into an answer, and so is a cluster node's
"not my slot" (MOVED), which says the script did not run there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis
from redis.exceptions import BusyLoadingError, NoScriptError

from flashsale import constants as c
from flashsale.adapters.redis import lua
from flashsale.adapters.redis.codec import (
    VIEW_READS,
    add_stock_call,
    decide_call,
    is_stale,
    located,
    parse_decision,
    parse_entries,
    parse_layout,
    parse_peek,
    parse_prededuct,
    parse_restock,
    parse_seal,
    parse_transfers,
    parse_view,
    partitioned_view,
    prededuct_call,
    queue_snapshot,
    sold_out,
)
from flashsale.adapters.redis.keys import SKUS_KEY, SkuKeys, holds_key, parent
from flashsale.adapters.redis.topology import MISROUTED, UNREACHABLE, AsyncRouter, unavailable
from flashsale.errors import StaleLayout, StockError
from flashsale.models import Buyer, Purchase
from flashsale.records import (
    Decision,
    Layout,
    LogEntry,
    Peek,
    PredeductResult,
    Registry,
    RestockResult,
    Seal,
    StockView,
    Transfer,
)


class _Failed(Exception):
    """The pre-deduct failed to reach Redis; `reached` says whether the script may have run, `again`
    whether asking once more may well succeed (a misrouted call, or one whose outcome is unknown)."""

    def __init__(self, cause: Exception, *, reached: bool, again: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.reached = reached
        self.again = again or reached


class AsyncRedisStock:
    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 64, wait_ms: int = 0) -> None:
        self.url = url
        #: With replicas, a pre-deduct counts once one of them holds it (WAIT), within this many ms.
        self._wait_ms = wait_ms
        # Blocking pools: a burst waits for a free connection instead of failing with "too many".
        self._router = AsyncRouter(url, timeout_s=timeout_s, max_connections=max_connections)

    async def close(self) -> None:
        await self._router.close()

    async def prededuct(
        self, sku: str, gid: str, purchases: Sequence[Purchase], epoch: int = 0
    ) -> list[PredeductResult]:
        keys, args = prededuct_call(sku, gid, purchases, epoch)
        return parse_prededuct(purchases, await self.script("prededuct", keys, args))

    async def decide(
        self, shard: str, token: str, action: str, *, decision_id: str, message_id: str, user: str = ""
    ) -> tuple[Decision, LogEntry | None]:
        """Pay, cancel or expire the order of `token` (decide.lua) on the keys of `shard`, its partition (or
        its SKU); counts once a replica holds it."""
        keys, args = decide_call(shard, token, action, decision_id=decision_id, message_id=message_id, user=user)
        reply = await self.script("decide", keys, args)
        return parse_decision(token, reply)

    async def add_stock(self, sku: str, qty: int, *, request_id: str, message_id: str) -> RestockResult:
        """Add `qty` units to the SKU's stock once per `request_id` (add_stock.lua); counts once a replica
        holds it."""
        keys, args = add_stock_call(sku, qty, request_id=request_id, message_id=message_id)
        return parse_restock(await self.script("add_stock", keys, args))

    async def script(self, name: str, keys: list[str], args: list[str]) -> Any:
        """Run an idempotent script; its reply counts once a replica holds what it wrote (with replicas).

        Raises ServiceUnavailable, with `reached` False when the script certainly did not run.
        """
        try:
            return await self._counted(name, keys, args)
        except _Failed as first:
            if not first.again:
                raise unavailable(self.url, f"{name} (not sent)", first.cause, reached=False) from first.cause
            try:  # the script may have run: ask again; a run that happened answers the same, changing nothing
                return await self._counted(name, keys, args)
            except _Failed as second:
                reached = first.reached or second.reached
                what = name if reached else f"{name} (not run)"
                raise unavailable(self.url, what, first.cause, reached=reached) from second.cause
            except StockError as second:
                # The run asked again refused (a write refused: NOREPLICAS, OOM, READONLY), but the first
                # may have run: its outcome is still unknown, not that of a script that never ran.
                if not first.reached:
                    raise
                raise unavailable(self.url, name, first.cause, reached=True) from second

    async def _counted(self, name: str, keys: list[str], args: list[str]) -> Any:
        reply, acked, wanted = await self._send(name, keys, args)
        if acked < wanted:
            # The master has it, no replica yet: a failover now would lose it. For a pre-deduct, the
            # checker commits it once a replica holds it, or rolls it back if the master that ran it is gone.
            raise _Failed(redis.TimeoutError(f"no replica acknowledged within {self._wait_ms} ms"), reached=True)
        return reply

    async def _send(self, name: str, keys: list[str], args: list[str]) -> tuple[Any, int, int]:
        """The script's reply, and how many replicas acknowledged it of how many were asked for."""
        try:
            pool = await self._router.pool(keys[0])
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except UNREACHABLE as exc:
            self._router.stale()
            raise _Failed(exc, reached=False) from exc
        try:
            reply = await self._run(conn, name, keys, args)
            wanted = self._router.replicas(keys[0]) if self._wait_ms else 0
            acked = await self._wait(conn, wanted) if wanted else 0
        finally:
            await pool.release(conn)
        return reply, acked, wanted

    async def _run(self, conn: Any, name: str, keys: list[str], args: list[str]) -> Any:
        """The script's reply on `conn`; an error says whether the script may have run."""
        try:
            try:
                return await self._evalsha(conn, name, keys, args)
            except NoScriptError:  # a restarted or flushed server: load the script, then run it
                await conn.send_command("SCRIPT", "LOAD", lua.source(name))
                await conn.read_response()
                return await self._evalsha(conn, name, keys, args)
        except BusyLoadingError as exc:  # a restarted server still reading its data refuses every command
            raise _Failed(exc, reached=False) from exc
        except MISROUTED as exc:  # this node does not serve the slot (now): the script did not run
            self._router.stale()
            raise _Failed(exc, reached=False, again=True) from exc
        except UNREACHABLE as exc:
            await conn.disconnect()
            self._router.stale()
            raise _Failed(exc, reached=True) from exc
        except redis.ResponseError as exc:  # the script's own error: it decides everything before its first write
            raise StockError(f"Redis script {name} failed: {exc}") from exc

    async def _wait(self, conn: Any, wanted: int) -> int:
        """The replicas that acknowledged what the script just run on `conn` wrote (WAIT, on its connection).

        Any failure here comes after the script ran: cut short by a failover (UNBLOCKED), refused by a
        master turned replica meanwhile (its data loading, or its master down), or unanswered. What the
        script wrote may not survive: its outcome is unknown, never `not run`."""
        try:
            await conn.send_command("WAIT", wanted, self._wait_ms)
            return int(await conn.read_response())
        except redis.RedisError as exc:
            if isinstance(exc, UNREACHABLE):
                await conn.disconnect()
            self._router.stale()
            raise _Failed(exc, reached=True) from exc

    @staticmethod
    async def _evalsha(conn: Any, name: str, keys: list[str], args: list[str]) -> Any:
        await conn.send_command("EVALSHA", lua.sha1(name), len(keys), *keys, *args)
        return await conn.read_response()

    async def peek(self, sku: str, purchases: Sequence[Buyer]) -> Peek:
        """Stock, limit, and the buyers' counts and the purchases' log entries, in one round trip (a hint:
        the pre-deduct decides). A pipeline is no transaction: a pre-deduct may land between two reads. So
        the log is read after the stock and the counts: a token that took a unit or a count read here is
        in the entries read after them, and its retry hears `duplicate`, never `sold_out` or
        `limit_exceeded`."""
        keys = SkuKeys.of(sku)
        tokens = [p.token for p in purchases]
        users = list(dict.fromkeys(p.user_id for p in purchases))
        commands = [
            ("GET", keys.stock),
            ("HMGET", keys.meta, "per_user_limit", "standby", "sealed_until"),
            ("HMGET", keys.users, *users),
            ("HMGET", keys.log, *tokens),
            ("TIME",),
        ]
        async with self._reading("peek"):
            wire = await self._router.wire(keys.stock)
            if wire is not None:
                reply = await wire.call(*commands)
            else:
                async with (await self._router.client(keys.stock)).pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    reply = await pipe.execute()
        return parse_peek(tokens, users, reply)

    async def seal(self, sku: str, trust_ms: int, known_since: str) -> Seal | None:
        """Seal a sold-out SKU (seal.lua) for `trust_ms` and a margin; counts once a replica holds it. Not
        where there are replicas and this client waits for none: a failover could lose a seal trusted."""
        keys = SkuKeys.of(sku)
        async with self._reading("seal"):
            await self._router.pool(keys.stock)
        if self._router.replicas(keys.stock) and not self._wait_ms:
            return None
        args = [str(trust_ms), known_since, str(c.SEAL_MAX_TOKENS)]
        return parse_seal(await self.script("seal", [keys.stock, keys.log, keys.meta], args))

    async def is_sold_out(self, sku: str) -> bool:
        meta = SkuKeys.of(sku).meta
        async with self._reading("read sold-out flag"):
            flag = await (await self._router.client(meta)).hget(meta, "sold_out")
        return sold_out(flag)

    async def view(self, sku: str) -> StockView:
        """A partitioned SKU's is read again while a transfer began as its partitions were read (see
        RedisStock.view)."""
        async with self._reading("read stock"):
            for _ in range(VIEW_READS):
                stock, meta, entries, pool, transfers = await self._snapshot(sku)
                layout = parse_layout(sku, meta)
                if layout is None:
                    return parse_view(sku, stock, meta, entries)
                parts = await asyncio.gather(*(self._snapshot(p, partition=True) for p in layout.parts))
                view = partitioned_view(layout, meta, pool, transfers, [(snap, "") for snap in parts])
                key = SkuKeys.of(sku).meta
                if await (await self._router.client(key)).hget(key, "moves") == meta.get("moves"):
                    break
        return view

    async def _snapshot(self, shard: str, *, partition: bool = False) -> list[Any]:
        """Stock, meta, log size, and the pool and transfers (of a SKU) or the refills (of a partition)."""
        key = SkuKeys.of(shard).stock
        async with (await self._router.client(key)).pipeline(transaction=True) as pipe:
            queue_snapshot(pipe, shard, partition=partition)
            return list(await pipe.execute())

    # --- partitioned SKUs (docs/scaling.md) ---------------------------------------------------------
    async def layout(self, sku: str) -> Layout | None:
        meta = SkuKeys.of(sku).meta
        async with self._reading("read layout"):
            found: dict[str, str] = await (await self._router.client(meta)).hgetall(meta)  # type: ignore[assignment]
        return parse_layout(sku, found)

    async def registry(self, layout: Layout) -> Registry:
        """The pool, each partition's two sub-domains and which are closed, each read on its own node, all
        at once."""

        async def part(name: str) -> tuple[int, int, bool]:
            keys = SkuKeys.of(name)
            async with (await self._router.client(keys.stock)).pipeline(transaction=True) as pipe:
                pipe.get(keys.stock)
                pipe.hmget(keys.meta, ["standby", "closed"])
                stock, (standby, closed) = await pipe.execute()
            return int(stock or 0), int(standby or 0), closed == "1"

        async def pool() -> tuple[int, int, int]:
            keys = SkuKeys.of(layout.sku)
            async with (await self._router.client(keys.pool)).pipeline(transaction=True) as pipe:
                pipe.get(keys.pool)
                pipe.hlen(keys.transfers)
                pipe.hget(keys.meta, "moves")
                units, moves, begun = await pipe.execute()
            return int(units or 0), int(moves), int(begun or 0)

        def assemble(units: int, moves: int, parts: Sequence[tuple[int, int, bool]]) -> Registry:
            named = dict(zip(layout.parts, parts, strict=True))
            closed = frozenset(name for name, (_, _, shut) in named.items() if shut)
            return Registry(units, {name: (a, s) for name, (a, s, _) in named.items()}, moves, closed)

        async with self._reading("read partitions"):
            (units, moves, begun), parts = await asyncio.gather(
                pool(), asyncio.gather(*(part(p) for p in layout.parts))
            )
            found = assemble(units, moves, parts)
            if found.sold_out:
                # Read side by side, units on their way can slip between the reads: a refill seen in none
                # (the pool read after it, the partition before), or a drain (the other way round). Sold
                # out stands only if the partitions, then the pool, read after that first pool read, hold
                # nothing either, and no transfer began in between (one that did counts as under way).
                parts = await asyncio.gather(*(part(p) for p in layout.parts))
                units, moves, again = await pool()
                found = assemble(units, max(moves, int(again != begun)), parts)
        return found

    async def entries(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, LogEntry | None]]:
        """Per partition (or SKU), the log entries of some tokens, each naming the partition it was read
        in: every partition read at once."""

        async def one(shard: str, tokens: Sequence[str]) -> dict[str, LogEntry | None]:
            key = SkuKeys.of(shard).log
            raws: list[str | None] = await (await self._router.client(key)).hmget(key, list(tokens))  # type: ignore[assignment]
            return {t: located(e, parent(shard), shard) if e else None for t, e in parse_entries(tokens, raws).items()}

        async with self._reading("read log"):
            found = await asyncio.gather(*(one(shard, tokens) for shard, tokens in wanted.items()))
        return dict(zip(wanted, found, strict=True))

    async def close_partition(self, layout: Layout, part: str) -> bool:
        """Close an empty partition of this load for good (close.lua); False when it still holds units.
        Raises StaleLayout for a partition of another load (or none)."""
        keys = SkuKeys.of(part)
        closed = int(await self.script("close", [keys.stock, keys.meta], [str(layout.epoch)]))
        if closed < 0:
            raise StaleLayout(f"{part} is not a partition of load {layout.epoch} of {layout.sku}")
        return closed == 1

    async def scripts(self, name: str, calls: list[tuple[list[str], list[str]]]) -> list[Any]:
        """Many calls of one idempotent script (each on its own slot): per node, one pipeline and one WAIT,
        all nodes at once. A node whose pipeline fails has its calls run one by one, as `script` does."""
        by_pool: dict[int, tuple[Any, list[int]]] = {}
        try:
            for i, (keys, _) in enumerate(calls):
                pool = await self._router.pool(keys[0])
                by_pool.setdefault(id(pool), (pool, []))[1].append(i)
        except (*UNREACHABLE, *MISROUTED) as exc:
            self._router.stale()
            raise unavailable(self.url, f"{name} (not sent)", exc, reached=False) from exc
        replies: list[Any] = [None] * len(calls)

        async def node(pool: Any, idxs: list[int]) -> None:
            done = await self._pipelined(pool, name, [calls[i] for i in idxs])
            for i, reply in zip(idxs, done or [None] * len(idxs), strict=True):
                replies[i] = reply if done is not None else await self.script(name, *calls[i])

        await asyncio.gather(*(node(pool, idxs) for pool, idxs in by_pool.values()))
        return replies

    async def _pipelined(self, pool: Any, name: str, calls: list[tuple[list[str], list[str]]]) -> list[Any] | None:
        """The replies of calls on one node, over one connection; None when anything went wrong (not
        loaded, refused, misrouted, no replica in time): the caller then runs them one by one."""
        first = calls[0][0][0]
        wanted = self._router.replicas(first) if self._wait_ms else 0
        commands: list[tuple[Any, ...]] = [("EVALSHA", lua.sha1(name), len(k), *k, *a) for k, a in calls]
        if wanted:  # one WAIT covers every write sent on this connection before it
            commands.append(("WAIT", wanted, self._wait_ms))
        try:
            conn = await pool.get_connection()
        except (*UNREACHABLE, *MISROUTED):
            return None
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies = [await conn.read_response() for _ in commands]
        except (redis.RedisError, OSError):
            await conn.disconnect()  # replies may be left unread on it
            return None
        finally:
            await pool.release(conn)
        if wanted and int(replies[-1]) < wanted:
            return None
        return replies[: len(calls)]

    async def hold(self, layout: Layout, purchases: Sequence[Purchase], attempts: Sequence[str]) -> list[int | None]:
        """Per purchase: None when held within the per-user limit (and its attempt, named beside it, on
        record), else the units its user holds already."""
        by_key = _by_holds_key(layout, purchases)
        calls = []
        for key, idxs in by_key.items():
            args = [str(layout.per_user_limit)]
            for i in idxs:
                args += [purchases[i].token, purchases[i].user_id, str(purchases[i].qty), attempts[i]]
            calls.append(([key], args))
        held: list[int | None] = [None] * len(purchases)
        for idxs, reply in zip(by_key.values(), await self.scripts("user_hold", calls), strict=True):
            for n, i in enumerate(idxs):
                held[i] = None if int(reply[2 * n]) == 1 else int(reply[2 * n + 1])
        return held

    async def release(self, layout: Layout, purchases: Sequence[Purchase], attempts: Sequence[str]) -> int:
        """The attempts named beside these purchases were told `sold_out`: they leave their holds' records,
        and a hold no attempt is left on is freed. The units freed."""
        calls = []
        for key, idxs in _by_holds_key(layout, purchases).items():
            args = []
            for i in idxs:
                args += [purchases[i].token, purchases[i].user_id, attempts[i]]
            calls.append(([key], args))
        return sum(int(reply) for reply in await self.scripts("user_release", calls))

    # Every step that moves stock carries the layout's epoch; each answers STALE (-2) for another load.
    async def take(self, layout: Layout, transfer_id: str, part: str, want: int) -> int:
        """Refill step 1: units taken from the pool for `part` (0: the pool is empty)."""
        keys = SkuKeys.of(layout.sku)
        taken, _ = await self._moving(
            "pool_take", keys.pool_take(), [transfer_id, part, str(want), str(layout.epoch)], layout
        )
        return max(0, int(taken))

    async def give(self, layout: Layout, part: str, transfer_id: str, qty: int) -> None:
        """Refill step 2: the units reach the partition's standby sub-domain (once per transfer)."""
        keys = SkuKeys.of(part)
        await self._moving("refill_apply", keys.partition_move(), [transfer_id, str(qty), str(layout.epoch)], layout)

    async def end_refill(self, layout: Layout, transfer_id: str) -> None:
        """Refill step 3: the transfer is complete, and stays known as such for the life of the load."""
        keys = SkuKeys.of(layout.sku)
        await self._moving("refill_end", keys.refill_end(), [transfer_id, str(layout.epoch)], layout)

    async def expect(self, layout: Layout, transfer_id: str, part: str, want: int) -> None:
        """Drain step 1: the transfer is on record before any unit moves."""
        keys = SkuKeys.of(layout.sku)
        await self._moving(
            "pool_expect",
            [keys.transfers, keys.meta, keys.done],
            [transfer_id, part, str(want), str(layout.epoch)],
            layout,
        )

    async def drain(self, layout: Layout, part: str, transfer_id: str, want: int) -> int:
        """Drain step 2: units taken out of the partition (once per transfer)."""
        keys = SkuKeys.of(part)
        return int(
            await self._moving("drain", keys.partition_move(), [transfer_id, str(want), str(layout.epoch)], layout)
        )

    async def receive(self, layout: Layout, transfer_id: str, qty: int) -> None:
        """Drain step 3: the units reach the pool, and the transfer is complete (once)."""
        keys = SkuKeys.of(layout.sku)
        await self._moving(
            "pool_receive",
            [keys.pool, keys.transfers, keys.done, keys.meta],
            [transfer_id, str(qty), str(layout.epoch)],
            layout,
        )

    async def due(self, layout: Layout, age_ms: int) -> list[Transfer]:
        """The transfers under way older than `age_ms` on Redis's clock, once a replica holds their records."""
        keys = SkuKeys.of(layout.sku)
        reply = await self._moving(
            "transfers_due", [keys.transfers, keys.meta], [str(age_ms), str(layout.epoch)], layout
        )
        return parse_transfers(reply)

    async def _moving(self, name: str, keys: list[str], args: list[str], layout: Layout) -> Any:
        reply = await self.script(name, keys, args)
        if is_stale(reply):
            raise StaleLayout(f"{name} refused epoch {layout.epoch} of {layout.sku}: it was loaded again")
        return reply

    async def confirm(self, found: Mapping[str, Mapping[str, LogEntry]]) -> dict[str, dict[str, LogEntry | None]]:
        """The entries `found` holds, as a replica holds them: per SKU or partition with replicas, read again
        by seen.lua with one WAIT per node (raises ServiceUnavailable when none acknowledged in time);
        where there are none, `found` itself, with no call."""
        held: dict[str, dict[str, LogEntry | None]] = {}
        proved: list[str] = []
        for shard, entries in found.items():
            if self._wait_ms and self._router.replicas(SkuKeys.of(shard).log):
                proved.append(shard)
            else:
                held[shard] = dict(entries)
        if not proved:
            return held
        tokens = {shard: list(found[shard]) for shard in proved}
        calls = [([SkuKeys.of(s).log, SkuKeys.of(s).meta], tokens[s]) for s in proved]
        for shard, reply in zip(proved, await self.scripts("seen", calls), strict=True):
            held[shard] = parse_entries(tokens[shard], reply)
        return held

    async def ping(self) -> None:
        async with self._reading("ping"):
            await (await self._router.client(SKUS_KEY)).ping()

    @asynccontextmanager
    async def _reading(self, what: str) -> AsyncIterator[None]:
        """A read that fails unanswered or misrouted: the map is read again next time, the caller hears why."""
        try:
            yield
        except (*UNREACHABLE, *MISROUTED) as exc:
            self._router.stale()
            raise unavailable(self.url, what, exc) from exc


def _by_holds_key(layout: Layout, purchases: Sequence[Purchase]) -> dict[str, list[int]]:
    """The purchases' positions, by the holds key of their user."""
    by_key: dict[str, list[int]] = {}
    for i, p in enumerate(purchases):
        by_key.setdefault(holds_key(layout, p.user_id), []).append(i)
    return by_key
