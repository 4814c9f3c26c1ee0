"""A flash sale's crowd: many buyers posting purchases over HTTP (bench/http.py's lean client).

Used by `flashsale bench`, `flashsale demo` and the end-to-end tests. Every attempt carries a fresh
token; attempt i is made by buyer i mod buyers, user `<run>-u<i mod buyers>`, on a keep-alive connection
of its own. Two ways to send them:

- closed loop (default): `buyers` buyers, each making its attempts one after another; the sale goes as
  fast as the answers come back;
- open loop (`rate`): attempt i is due at start + i/rate, whatever happened to the others, and its
  latency counts from that moment, so a slow server cannot hide its queue by slowing the senders (no
  coordinated omission). At most `buyers` are in flight: the rest wait for a connection, on the clock.

A buyer told `accepted` may take a next step before its next attempt (`after_accepted`: the bench's
payments, bench/payers.py), on the same connection; its time is not in the purchase's latency.

`run_load` sends from the calling event loop; `run_crowd` spreads the buyers over processes of their
own (bench/crowd.py), so that the buyers measure the server rather than the one core of their process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from flashsale.bench.http import Connection, TransportError

#: Unclear answers (and attempts with none) a report keeps as examples.
MAX_ERRORS = 10
#: Status given to an attempt that got no HTTP answer (refused, reset, timed out).
TRANSPORT_ERROR = "transport_error"
JSON = {"Content-Type": "application/json"}
#: Called after an accepted purchase, on the buyer's connection, with its SKU, token and user (the buyer's
#: next step: a payment, say); the buyer's next attempt waits for it.
AfterAccepted = Callable[[Connection, str, str, str], Awaitable[None]]
#: One attempt: its index, the connection it goes on, and when it was due (perf_counter).
_One = Callable[[int, Connection, float], Awaitable[None]]


def percentile(values: Sequence[float], q: float) -> float:
    """The value below which a fraction `q` of `values` lies (nearest rank; 0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Answer(NamedTuple):  # a tuple: one is made per answer, and a frozen dataclass costs several times more
    at_s: float  # seconds from the start of the sale to the answer
    status: str
    latency_s: float


@dataclass
class LoadReport:
    attempts: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    accepted: list[tuple[str, str, int]] = field(default_factory=list)  # (sku, token, qty)
    errors: list[str] = field(default_factory=list)  # the first few unclear answers, and attempts with none
    started: float = 0.0
    last_accepted: float = 0.0  # perf_counter of the last accepted answer
    answers: list[Answer] = field(default_factory=list)  # every answer, in the order they came

    @property
    def sellout_s(self) -> float:
        """Seconds from the first attempt to the last accepted answer."""
        return max(0.0, self.last_accepted - self.started) if self.last_accepted else 0.0

    @property
    def accepted_per_s(self) -> float:
        """Accepted purchases per second while stock lasted."""
        accepted = self.statuses.get("accepted", 0)
        return accepted / self.sellout_s if self.sellout_s else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.latencies_s, q)

    @property
    def throughput(self) -> float:
        return self.attempts / self.elapsed_s if self.elapsed_s else 0.0

    def record(self, sku: str, token: str, qty: int, status: str, due: float) -> None:
        now = time.perf_counter()
        self.latencies_s.append(now - due)
        self.answers.append(Answer(now - self.started, status, now - due))
        self.attempts += 1
        self.statuses[status] += 1
        if status == "accepted":
            self.accepted.append((sku, token, qty))
            self.last_accepted = now


def merge(reports: Sequence[LoadReport]) -> LoadReport:
    """One report of the crowds that started together (same `started`), answers in the order they came."""
    merged = LoadReport(started=min((r.started for r in reports), default=0.0))
    for r in reports:
        merged.attempts += r.attempts
        merged.statuses.update(r.statuses)
        merged.latencies_s += r.latencies_s
        merged.accepted += r.accepted
        merged.errors += r.errors[: max(0, MAX_ERRORS - len(merged.errors))]
        merged.last_accepted = max(merged.last_accepted, r.last_accepted)
        merged.answers += r.answers
        merged.elapsed_s = max(merged.elapsed_s, r.started + r.elapsed_s - merged.started)
    merged.answers.sort(key=lambda a: a.at_s)
    return merged


def _status(code: int, data: bytes, report: LoadReport) -> str:
    """The status a purchase's answer gives (`http_<code>` when its body is not JSON)."""
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:  # not JSON: a proxy's error page, a crashed handler
        answer = None
    if not isinstance(answer, dict):
        return f"http_{code}"
    status = str(answer.get("status"))
    if status in ("error", "pending") and len(report.errors) < MAX_ERRORS:
        report.errors.append(f"{status}: {answer.get('message')}")
    return status


@dataclass(frozen=True)
class Share:
    """The buyers b of a crowd with b mod `of` == `index` (one process's share), and when the sale starts."""

    index: int = 0
    of: int = 1
    started: float | None = None  # perf_counter (the same clock in every process); None: now


async def run_load(
    base_url: str,
    skus: Sequence[str],
    *,
    attempts: int,
    concurrency: int,
    rate: float | None = None,
    qty: int = 1,
    run_id: str | None = None,
    timeout_s: float = 30.0,
    tick: Callable[[], None] = lambda: None,
    after_accepted: AfterAccepted | None = None,
    share: Share = Share(),
) -> LoadReport:
    """`concurrency` buyers; with `rate`, open loop at that many attempts per second (see the module
    docstring). With `share`, only that share of the buyers, and their attempts."""
    run = run_id or uuid.uuid4().hex[:8]
    buyers = [b for b in range(min(concurrency, attempts)) if b % share.of == share.index]
    report = LoadReport(started=share.started if share.started is not None else time.perf_counter())
    idle = [Connection(base_url, timeout_s) for _ in buyers]

    async def one(i: int, conn: Connection, due: float) -> None:
        sku, token, user = skus[i % len(skus)], f"{run}-{i}", f"{run}-u{i % concurrency}"
        body = orjson.dumps({"sku": sku, "user_id": user, "qty": qty, "token": token})
        try:
            status = _status(*await conn.request("POST", "/purchase", body, JSON), report)
        except TransportError as exc:
            status = TRANSPORT_ERROR
            if len(report.errors) < MAX_ERRORS:
                report.errors.append(f"{TRANSPORT_ERROR}: {exc}")
        report.record(sku, token, qty, status, due)
        tick()
        if after_accepted is not None and status == "accepted":
            await after_accepted(conn, sku, token, user)

    await _until(report.started)
    try:
        if rate is None:
            pairs = zip(buyers, idle, strict=True)
            await asyncio.gather(*(_buyer(one, b, conn, attempts, concurrency) for b, conn in pairs))
        else:
            plan = [i for i in range(attempts) if i % concurrency % share.of == share.index]
            await _open_loop(one, idle, plan, report.started, rate)
    finally:
        for conn in idle:
            conn.close()
    report.elapsed_s = time.perf_counter() - report.started
    return report


async def _until(moment: float) -> None:
    """Sleep until perf_counter() reaches `moment`: a loop's timer may fire up to a millisecond early
    (uvloop's are in whole milliseconds), and an attempt sent before it was due would show a negative
    latency."""
    while (left := moment - time.perf_counter()) > 0:
        await asyncio.sleep(left)


async def _buyer(one: _One, b: int, conn: Connection, attempts: int, concurrency: int) -> None:
    """Buyer b's attempts (b, b + concurrency, ...), each sent when the one before it was answered."""
    for i in range(b, attempts, concurrency):
        await one(i, conn, time.perf_counter())


async def _open_loop(
    one: _One,
    connections: list[Connection],
    plan: list[int],
    started: float,
    rate: float,
) -> None:
    """Attempt i due at `started` + i/`rate`, on the first idle connection (waiting for one, on the clock)."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in connections:
        idle.put_nowait(conn)

    async def send(i: int, due: float) -> None:
        conn = await idle.get()
        try:
            await one(i, conn, due)
        finally:
            idle.put_nowait(conn)

    pending = []
    for i in plan:
        due = started + i / rate
        await _until(due)
        pending.append(asyncio.create_task(send(i, due)))
    await asyncio.gather(*pending)
