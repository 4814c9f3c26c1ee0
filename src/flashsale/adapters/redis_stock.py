"""Stock in Redis: the Lua scripts behind typed methods. The only module that imports redis (with the stack's probe).

Scripts are registered once per client; redis-py runs them with EVALSHA and, after a NOSCRIPT reply
(a restarted or flushed server), loads them again and retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from flashsale import constants as c
from flashsale import lua
from flashsale.adapters.redis_topology import MAP_TTL_S, MISROUTED, UNREACHABLE, replicas, sync_client, sync_node
from flashsale.errors import ServiceUnavailable, StockError, UnknownSku
from flashsale.models import Purchase
from flashsale.records import (
    Adopt,
    CheckView,
    LoadStock,
    LogEntry,
    Prededuct,
    PredeductResult,
    StockReturn,
    StockView,
    TxRecord,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkuKeys:
    stock: str
    log: str
    users: str
    meta: str
    tx: str

    @classmethod
    def of(cls, sku: str) -> SkuKeys:
        return cls(
            stock=c.STOCK_KEY.format(sku=sku),
            log=c.LOG_KEY.format(sku=sku),
            users=c.USERS_KEY.format(sku=sku),
            meta=c.META_KEY.format(sku=sku),
            tx=c.TX_KEY.format(sku=sku),
        )

    def sale(self) -> list[str]:
        """KEYS of the scripts that change stock (return_stock, adopt)."""
        return [self.stock, self.log, self.users, self.meta]

    def all(self) -> list[str]:
        """KEYS of prededuct.lua and load_stock.lua."""
        return [*self.sale(), self.tx]


def prededuct_call(sku: str, gid: str, purchases: Sequence[Purchase]) -> tuple[list[str], list[str]]:
    """KEYS and ARGV of prededuct.lua."""
    args = [gid, sku]
    for p in purchases:
        args += [p.token, p.user_id, str(p.qty)]
    return SkuKeys.of(sku).all(), args


def parse_prededuct(purchases: Sequence[Purchase], reply: list[Any]) -> list[PredeductResult]:
    """One result per purchase, from prededuct.lua's flat {code, remaining, detail} reply."""
    results = []
    for i, purchase in enumerate(purchases):
        code, remaining, detail = reply[3 * i : 3 * i + 3]
        result = Prededuct(int(code))
        logged = result in (Prededuct.ACCEPTED, Prededuct.DUPLICATE)
        results.append(
            PredeductResult(
                result,
                int(remaining) if int(remaining) >= 0 else None,
                entry=LogEntry.parse(purchase.token, detail) if logged else None,
                bought=int(detail) if result is Prededuct.LIMIT_EXCEEDED else None,
            )
        )
    return results


def parse_view(sku: str, stock: str | None, meta: dict[str, str], entries: int) -> StockView:
    if stock is None:
        raise UnknownSku(
            f"unknown SKU {sku!r}: it is not loaded in Redis", hint=f"load it with `flashsale stock set {sku} QTY`"
        )

    def num(name: str) -> int:
        return int(meta.get(name) or 0)

    return StockView(
        sku=sku,
        stock=int(stock),
        initial=num("initial"),
        per_user_limit=num("per_user_limit"),
        sold_out=meta.get("sold_out") == "1",
        deducted_qty=num("deducted_qty"),
        deducted_count=num("deducted_count"),
        returned_qty=num("returned_qty"),
        returned_count=num("returned_count"),
        fenced_count=num("fenced_count"),
        log_entries=int(entries),
        loaded_ms=num("loaded_ms"),
    )


def unavailable(url: str, what: str, exc: Exception, *, reached: bool = True) -> ServiceUnavailable:
    return ServiceUnavailable("Redis", url, f"{what}: {exc or type(exc).__name__}", reached=reached)


def parse_check(tokens: Sequence[str], reply: list[Any]) -> CheckView:
    state, record, *entries = reply
    return CheckView(
        state=str(state),
        record=TxRecord.parse(record) if record else None,
        entries={t: (LogEntry.parse(t, raw) if raw else None) for t, raw in zip(tokens, entries, strict=True)},
    )


class RedisStock:
    """One Redis node or a Redis Cluster (see redis_topology.py), connected on first use."""

    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 128, wait_ms: int = 0) -> None:
        self.url = url
        #: With replicas, the checker's answer counts once one of them holds what it read or wrote (WAIT).
        self._wait_ms = wait_ms
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._client: redis.Redis | redis.RedisCluster | None = None
        self._scripts: dict[str, Any] = {}
        self._map_read_at = time.monotonic()

    @property
    def client(self) -> redis.Redis | redis.RedisCluster:
        if self._client is None:
            try:
                client = sync_client(self.url, timeout_s=self._timeout_s, max_connections=self._max_connections)
            except UNREACHABLE as exc:
                raise unavailable(self.url, "connect", exc, reached=False) from exc
            self._scripts = {name: client.register_script(lua.source(name)) for name in lua.NAMES}
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
        except redis.ResponseError as exc:
            raise StockError(f"Redis script {script} failed: {exc}") from exc

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except UNREACHABLE as exc:
            raise unavailable(self.url, what, exc) from exc

    def ping(self) -> None:
        self._call("ping", self.client.ping)

    # --- the sale -----------------------------------------------------------------------------------
    def load(self, sku: str, qty: int, *, per_user_limit: int = 0, reset: bool = False) -> None:
        keys = SkuKeys.of(sku)
        raw, detail = self._run("load_stock", keys.all(), [str(qty), str(per_user_limit), "1" if reset else "0"])
        code = LoadStock(int(raw))
        if code is LoadStock.HAS_HISTORY:
            raise StockError(
                f"{sku} already has {detail} deduction(s) on record in Redis",
                hint="pass --reset to discard that history (orders already applied stay in MySQL)",
            )
        if code is not LoadStock.LOADED:
            raise StockError(f"Redis refused to load {sku}: invalid {detail}")
        self._call("register sku", self.client.sadd, c.SKUS_KEY, sku)

    def prededuct(self, sku: str, gid: str, purchases: Sequence[Purchase]) -> list[PredeductResult]:
        keys, args = prededuct_call(sku, gid, purchases)
        return parse_prededuct(purchases, self._run("prededuct", keys, args))

    def check(self, sku: str, gid: str, tokens: Sequence[str], *, born_ms: int, grace_ms: int) -> CheckView:
        """What Redis knows of half message `gid`; fences it first when it never ran and is older than the grace."""
        keys = SkuKeys.of(sku)
        script_keys, args = [keys.tx, keys.log, keys.meta], [gid, str(born_ms), str(grace_ms), *tokens]
        if self._wait_ms and time.monotonic() - self._map_read_at > MAP_TTL_S:
            self._map_read_at = time.monotonic()
            self._stale()
        wanted = replicas(self.client, keys.tx) if self._wait_ms else 0
        if not wanted:
            return parse_check(tokens, self._run("fence", script_keys, args))
        # fence.lua writes whenever it decides, so a WAIT on its connection covers the pre-deduct it read.
        try:
            pipe = sync_node(self.client, keys.tx).pipeline(transaction=False)
            self._scripts["fence"](keys=script_keys, args=args, client=pipe)
            pipe.execute_command("WAIT", wanted, self._wait_ms)  # type: ignore[no-untyped-call]
            reply, acked = pipe.execute()
        except MISROUTED as exc:
            self._stale()
            raise unavailable(self.url, "fence", exc, reached=False) from exc
        except UNREACHABLE as exc:
            self._stale()
            raise unavailable(self.url, "fence", exc) from exc
        view = parse_check(tokens, reply)
        if view.state != c.TX_YOUNG and int(acked) < wanted:
            raise unavailable(self.url, "fence", TimeoutError(f"no replica acknowledged within {self._wait_ms} ms"))
        return view

    def _stale(self) -> None:
        """After a misrouted or unanswered call, read the cluster's map again (a replica may have taken over)."""
        if isinstance(self._client, redis.RedisCluster):
            try:
                self._client.nodes_manager.initialize()
            except redis.RedisError:  # no node answers now: the next call finds out and says so
                pass

    def lookup(
        self, wanted: Mapping[str, tuple[Sequence[str], Sequence[str]]]
    ) -> dict[str, tuple[dict[str, LogEntry | None], dict[str, TxRecord | None]]]:
        """Per SKU, the log entries of some tokens and the records of some messages, in one round trip."""
        skus = [sku for sku, (tokens, gids) in wanted.items() if tokens or gids]
        pipe = self.client.pipeline(transaction=False)
        for sku in skus:
            tokens, gids = wanted[sku]
            keys = SkuKeys.of(sku)
            pipe.hmget(keys.log, list(tokens) or ["-"])
            pipe.hmget(keys.tx, list(gids) or ["-"])
        replies = self._call("read log", pipe.execute)
        found: dict[str, tuple[dict[str, LogEntry | None], dict[str, TxRecord | None]]] = {}
        for i, sku in enumerate(skus):
            tokens, gids = wanted[sku]
            raw_entries, raw_records = replies[2 * i], replies[2 * i + 1]
            found[sku] = (
                {t: LogEntry.parse(t, raw) if raw else None for t, raw in zip(tokens, raw_entries, strict=False)},
                {g: TxRecord.parse(raw) if raw else None for g, raw in zip(gids, raw_records, strict=False)},
            )
        return found

    def return_stock(self, sku: str, token: str) -> tuple[StockReturn, int | None]:
        keys = SkuKeys.of(sku)
        code, remaining, _ = self._run("return_stock", keys.sale(), [token])
        return StockReturn(int(code)), int(remaining) if int(remaining) >= 0 else None

    def adopt(
        self, sku: str, token: str, user: str, qty: int, ts_ms: int, message_id: str, *, deduct: bool
    ) -> tuple[Adopt, str]:
        """Write back a deduction MySQL has and the log lacks; `detail` is the entry's state, or the stock left."""
        keys = SkuKeys.of(sku)
        code, detail = self._run(
            "adopt", keys.sale(), [token, user, str(qty), str(ts_ms), message_id, sku, "deduct" if deduct else "entry"]
        )
        return Adopt(int(code)), str(detail)

    # --- reading ------------------------------------------------------------------------------------
    def log_entry(self, sku: str, token: str) -> LogEntry | None:
        raw = self._call("read log", self.client.hget, SkuKeys.of(sku).log, token)
        return LogEntry.parse(token, raw) if raw is not None else None

    def exists(self, sku: str) -> bool:
        """Is the SKU loaded (has a stock key)?"""
        return bool(self._call("read stock", self.client.exists, SkuKeys.of(sku).stock))

    def history(self, sku: str) -> int:
        """Log entries (deductions and fences) recorded for the SKU."""
        return int(self._call("count log entries", self.client.hlen, SkuKeys.of(sku).log))

    def is_sold_out(self, sku: str) -> bool:
        return bool(self._call("read sold-out flag", self.client.hget, SkuKeys.of(sku).meta, "sold_out") == "1")

    def view(self, sku: str) -> StockView:
        keys = SkuKeys.of(sku)
        pipe = self.client.pipeline(transaction=True)  # one snapshot: no script runs in between
        pipe.get(keys.stock)
        pipe.hgetall(keys.meta)
        pipe.hlen(keys.log)
        stock, meta, entries = self._call("read stock", pipe.execute)
        return parse_view(sku, stock, meta, entries)

    def log_entries(self, sku: str, tokens: list[str]) -> dict[str, LogEntry | None]:
        """The log entries of `tokens` (HMGET), None where there is none."""
        if not tokens:
            return {}
        raws = self._call("read log", self.client.hmget, SkuKeys.of(sku).log, tokens)
        return {t: (LogEntry.parse(t, raw) if raw is not None else None) for t, raw in zip(tokens, raws, strict=True)}

    def skus(self) -> list[str]:
        return sorted(self._call("list skus", self.client.smembers, c.SKUS_KEY))

    def scan_log(self, sku: str, page: int = 1000) -> Iterator[LogEntry]:
        """Every log entry of the SKU, read page by page (HSCAN), never all at once."""
        log_key = SkuKeys.of(sku).log
        cursor = 0
        while True:
            cursor, chunk = self._call("scan log", self.client.hscan, log_key, cursor, None, page)
            for token, raw in chunk.items():
                yield LogEntry.parse(token, raw)
            if cursor == 0:
                return
