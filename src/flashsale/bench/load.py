"""A flash sale's crowd: many buyers posting purchases over HTTP (aiohttp client).

Used by `flashsale bench`, `flashsale demo` and the end-to-end tests. Every attempt carries a fresh
token; attempt i is made by user `<run>-u<i mod buyers>`. Two ways to send them:

- closed loop (default): `buyers` buyers, each making its attempts one after another; the sale goes as
  fast as the answers come back;
- open loop (`rate`): attempt i is due at start + i/rate, whatever happened to the others, and its
  latency counts from that moment, so a slow server cannot hide its queue by slowing the senders (no
  coordinated omission). At most `buyers` are in flight: the rest wait for a connection, on the clock.

A buyer told `accepted` may take a next step before its next attempt (`after_accepted`: the bench's
payments, bench/payers.py), on the same connections; its time is not in the purchase's latency.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

#: Status given to an attempt that got no HTTP answer (refused, reset, timed out).
TRANSPORT_ERROR = "transport_error"
#: Called after an accepted purchase, on the buyer's session, with its SKU, token and user (the buyer's
#: next step: a payment, say); the buyer's next attempt waits for it.
AfterAccepted = Callable[[aiohttp.ClientSession, str, str, str], Awaitable[None]]


def percentile(values: Sequence[float], q: float) -> float:
    """The value below which a fraction `q` of `values` lies (nearest rank; 0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Answer:
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


async def _attempt(
    session: aiohttp.ClientSession, url: str, user: str, sku: str, token: str, qty: int, report: LoadReport
) -> str:
    try:
        async with session.post(url, json={"sku": sku, "user_id": user, "qty": qty, "token": token}) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:  # not JSON: a proxy's error page, a crashed handler
                body = None
            status = str(body.get("status")) if isinstance(body, dict) else f"http_{resp.status}"
            if status in ("error", "pending") and len(report.errors) < 10 and isinstance(body, dict):
                report.errors.append(f"{status}: {body.get('message')}")
            return status
    except (TimeoutError, aiohttp.ClientError) as exc:
        if len(report.errors) < 10:
            report.errors.append(f"{type(exc).__name__}: {exc}")
        return TRANSPORT_ERROR


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
) -> LoadReport:
    """`concurrency` buyers; with `rate`, open loop at that many attempts per second (see the module docstring)."""
    run = run_id or uuid.uuid4().hex[:8]
    url = base_url.rstrip("/") + "/purchase"
    plan = [(skus[i % len(skus)], f"{run}-{i}", f"{run}-u{i % concurrency}") for i in range(attempts)]
    report = LoadReport(started=time.perf_counter())
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def one(i: int, session: aiohttp.ClientSession, due: float) -> None:
        sku, token, user = plan[i]
        status = await _attempt(session, url, user, sku, token, qty, report)
        report.record(sku, token, qty, status, due)
        tick()
        if after_accepted is not None and status == "accepted":
            await after_accepted(session, sku, token, user)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if rate is None:

            async def buyer(b: int) -> None:
                for i in range(b, attempts, concurrency):
                    await one(i, session, time.perf_counter())

            await asyncio.gather(*(buyer(b) for b in range(min(concurrency, attempts))))
        else:
            pending = []
            for i in range(attempts):
                due = report.started + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(one(i, session, due)))
            await asyncio.gather(*pending)
    report.elapsed_s = time.perf_counter() - report.started
    return report
