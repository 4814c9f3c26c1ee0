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
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from flashsale.bench.http import Connection, Outcome, TransportError

#: Unclear answers (and attempts with none) a report keeps as examples.
MAX_ERRORS = 10
#: Status given to an attempt that got no HTTP answer (refused, reset, timed out).
TRANSPORT_ERROR = "transport_error"
JSON = {"Content-Type": "application/json"}
#: Called after an accepted purchase, on the buyer's connection, with its SKU, token and user (the buyer's
#: next step: a payment, say); the buyer's next attempt waits for it.
AfterAccepted = Callable[[Connection, str, str, str], Awaitable[None]]


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


@dataclass(repr=False)
class LoadReport:
    attempts: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # CPU the buyers' process spent from the start of the sale to its end (summed when merged)
    accepted: list[tuple[str, str, int]] = field(default_factory=list)  # (sku, token, qty)
    errors: list[str] = field(default_factory=list)  # the first few unclear answers, and attempts with none
    started: float = 0.0
    last_accepted: float = 0.0  # perf_counter of the last accepted answer
    answers: list[Answer] = field(default_factory=list)  # every answer, in the order they came

    def __repr__(self) -> str:
        # Short: asyncio's runner may format the task that returned the report (Python 3.11 does, for its
        # SIGINT handler), and every answer in it took seconds of CPU after a long run.
        return f"LoadReport(attempts={self.attempts}, statuses={dict(self.statuses)}, elapsed_s={self.elapsed_s:.2f})"

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
        merged.cpu_s += r.cpu_s
    merged.answers.sort(key=lambda a: a.at_s)
    return merged


def _status(code: int, data: bytes, report: LoadReport) -> str:
    """The status a purchase's answer gives (`http_<code>` when its body is not JSON)."""
    end = data.find(b'"', 11) if data.startswith(b'{"status":"') else -1
    if end > 0:  # the producer's answers: the status first, read without parsing the rest
        status = data[11:end].decode()
        if status not in ("error", "pending"):
            return status
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:  # not JSON: a proxy's error page, a crashed handler
        answer = None
    said = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(said, str):  # not an answer to a purchase: `{"error": ...}`, a list, a number
        return f"http_{code}"
    if said in ("error", "pending") and len(report.errors) < MAX_ERRORS:
        report.errors.append(f"{said}: {answer.get('message')}")
    return said


@dataclass(frozen=True)
class Share:
    """The buyers b of a crowd with b mod `of` == `index` (one process's share), and when the sale starts."""

    index: int = 0
    of: int = 1
    started: float | None = None  # perf_counter (the same clock in every process); None: now


class _Sale:
    """What every attempt of one run shares: how attempt i reads, and what its answer makes of the report."""

    def __init__(
        self, skus: Sequence[str], run: str, concurrency: int, qty: int, report: LoadReport, tick: Callable[[], None]
    ) -> None:
        self.skus, self.run, self.concurrency, self.qty = skus, run, concurrency, qty
        self.report, self.tick = report, tick
        # Attempt i's body, formatted from parts encoded once: the same JSON orjson would write.
        self._sku_json = [orjson.dumps(sku) for sku in skus]
        self._run_json = orjson.dumps(run)[1:-1]
        self.stopped = False

    def body(self, i: int) -> bytes:
        return b'{"sku":%b,"user_id":"%b-u%d","qty":%d,"token":"%b-%d"}' % (
            self._sku_json[i % len(self.skus)],
            self._run_json,
            i % self.concurrency,
            self.qty,
            self._run_json,
            i,
        )

    def who(self, i: int) -> tuple[str, str, str]:
        """Attempt i's SKU, token and user."""
        return self.skus[i % len(self.skus)], f"{self.run}-{i}", f"{self.run}-u{i % self.concurrency}"

    def answered(self, i: int, outcome: Outcome, due: float) -> str:
        """Attempt i's status, recorded."""
        report = self.report
        if isinstance(outcome, TransportError):
            status = TRANSPORT_ERROR
            if len(report.errors) < MAX_ERRORS:
                report.errors.append(f"{TRANSPORT_ERROR}: {outcome}")
        else:
            status = _status(*outcome, report)
        sku, token, _ = self.who(i) if status == "accepted" else (self.skus[i % len(self.skus)], "", "")
        report.record(sku, token, self.qty, status, due)
        self.tick()
        return status


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
    buyers = [b for b in range(min(concurrency, attempts)) if b % share.of == share.index]
    report = LoadReport(started=share.started if share.started is not None else time.perf_counter())
    sale = _Sale(skus, run_id or uuid.uuid4().hex[:8], concurrency, qty, report, tick)
    idle = [Connection(base_url, timeout_s) for _ in buyers]
    await _until(report.started)
    cpu_before = time.process_time()
    try:
        if rate is None:
            loop = asyncio.get_running_loop()
            closed = [
                _Buyer(sale, conn, range(b, attempts, concurrency), after_accepted, loop)
                for b, conn in zip(buyers, idle, strict=True)
            ]
            for buyer in closed:
                buyer.next()
            try:
                await asyncio.gather(*(buyer.done for buyer in closed))
            finally:
                for buyer in closed:
                    buyer.cancel()
        else:
            plan = [i for i in range(attempts) if i % concurrency % share.of == share.index]
            await _open_loop(sale, idle, plan, rate, after_accepted)
    finally:
        sale.stopped = True
        for conn in idle:
            conn.close()
    report.elapsed_s = time.perf_counter() - report.started
    report.cpu_s = time.process_time() - cpu_before
    return report


async def _until(moment: float) -> None:
    """Sleep until perf_counter() reaches `moment`: a loop's timer may fire up to a millisecond early
    (uvloop's are in whole milliseconds), and an attempt sent before it was due would show a negative
    latency."""
    while (left := moment - time.perf_counter()) > 0:
        await asyncio.sleep(left)


class _Buyer:
    """One buyer of the closed loop: its attempts one after another on its connection, each sent from the
    callback that recorded the answer before it (no task or future per attempt: the bench's CPU per
    request is the server's loss on a shared machine). Its `done` future ends when its attempts do."""

    def __init__(
        self,
        sale: _Sale,
        conn: Connection,
        attempts: range,
        after_accepted: AfterAccepted | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._sale, self._conn, self._attempts = sale, conn, iter(attempts)
        self._after_accepted, self._loop = after_accepted, loop
        self._i, self._due = 0, 0.0
        self._head = conn.head("POST", "/purchase", JSON)
        self.done: asyncio.Future[None] = loop.create_future()
        self._tasks: set[asyncio.Task[None]] = set()  # held, or a task may be collected before it ran

    def next(self) -> None:
        """Send the next attempt, or end."""
        i = next(self._attempts, None)
        if i is None or self._sale.stopped:
            if not self.done.done():
                self.done.set_result(None)
            return
        self._i, self._due = i, time.perf_counter()
        if self._conn.is_open:
            self._conn.send(self._head, self._sale.body(i), self._answered)
        else:
            self._spawn(self._reopened())

    def cancel(self) -> None:
        """Stop what this buyer was waiting for (the sale is over, or failed)."""
        for task in list(self._tasks):
            task.cancel()

    async def _reopened(self) -> None:
        try:
            await self._conn.open()
        except TransportError as exc:
            self._answered(exc)
            return
        if self._sale.stopped:
            self._conn.close()
            return
        self._conn.send(self._head, self._sale.body(self._i), self._answered)

    def _answered(self, outcome: Outcome) -> None:
        if self._sale.stopped:  # the run is over: its connections were closed under their last requests
            return
        try:
            status = self._sale.answered(self._i, outcome, self._due)
            if self._after_accepted is not None and status == "accepted":
                sku, token, user = self._sale.who(self._i)
                self._spawn(self._after(self._after_accepted(self._conn, sku, token, user)))
            else:
                self.next()
        except BaseException as exc:  # noqa: BLE001 (a bug here would leave the buyer waiting for ever)
            if not self.done.done():
                self.done.set_exception(exc)

    async def _after(self, step: Awaitable[None]) -> None:
        await step
        self.next()

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self.done.done():
            self.done.set_exception(task.exception())  # type: ignore[arg-type]


async def _open_loop(
    sale: _Sale, connections: list[Connection], plan: list[int], rate: float, after_accepted: AfterAccepted | None
) -> None:
    """Attempt i due at the sale's start + i/`rate`, on the first idle connection (waiting for one, on the clock)."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for conn in connections:
        idle.put_nowait(conn)

    async def send(i: int, due: float) -> None:
        conn = await idle.get()
        try:
            try:
                outcome: Outcome = await conn.request("POST", "/purchase", sale.body(i), JSON)
            except TransportError as exc:
                outcome = exc
            if sale.answered(i, outcome, due) == "accepted" and after_accepted is not None:
                await after_accepted(conn, *sale.who(i))
        finally:
            idle.put_nowait(conn)

    pending = []
    try:
        for i in plan:
            due = sale.report.started + i / rate
            await _until(due)
            pending.append(asyncio.create_task(send(i, due)))
        await asyncio.gather(*pending)
    finally:  # one failed: the others stop too, before their connections are closed
        for task in pending:
            task.cancel()
