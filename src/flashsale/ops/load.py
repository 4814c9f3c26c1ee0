"""A flash sale's crowd: many buyers posting purchases over HTTP at once (aiohttp client).

Used by `flashsale bench`, `flashsale demo` and the end-to-end tests. Every attempt carries a fresh
token; buyer b is user `<run>-u<b>` and makes its attempts one after another, so `concurrency` buyers
are in flight at any moment.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

#: Status given to an attempt that got no HTTP answer (refused, reset, timed out).
TRANSPORT_ERROR = "transport_error"


@dataclass
class LoadReport:
    attempts: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    accepted: list[tuple[str, str, int]] = field(default_factory=list)  # (sku, token, qty)
    errors: list[str] = field(default_factory=list)  # the first few attempts that got no HTTP answer
    started: float = 0.0
    last_accepted: float = 0.0  # perf_counter of the last accepted answer

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
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def throughput(self) -> float:
        return self.attempts / self.elapsed_s if self.elapsed_s else 0.0


async def _buyer(
    session: aiohttp.ClientSession,
    url: str,
    user: str,
    plan: Sequence[tuple[str, str, int]],
    report: LoadReport,
    tick: Callable[[], None],
) -> None:
    for sku, token, qty in plan:
        started = time.perf_counter()
        try:
            async with session.post(url, json={"sku": sku, "user_id": user, "qty": qty, "token": token}) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:  # not JSON: a proxy's error page, a crashed handler
                    body = None
                status = str(body.get("status")) if isinstance(body, dict) else f"http_{resp.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            status = TRANSPORT_ERROR
            if len(report.errors) < 10:
                report.errors.append(f"{type(exc).__name__}: {exc}")
        report.latencies_s.append(time.perf_counter() - started)
        report.attempts += 1
        report.statuses[status] += 1
        if status == "accepted":
            report.accepted.append((sku, token, qty))
            report.last_accepted = time.perf_counter()
        tick()


async def run_load(
    base_url: str,
    skus: Sequence[str],
    *,
    attempts: int,
    concurrency: int,
    qty: int = 1,
    run_id: str | None = None,
    timeout_s: float = 30.0,
    tick: Callable[[], None] = lambda: None,
) -> LoadReport:
    run = run_id or uuid.uuid4().hex[:8]
    url = base_url.rstrip("/") + "/purchase"
    plans: list[list[tuple[str, str, int]]] = [[] for _ in range(concurrency)]
    for i in range(attempts):
        plans[i % concurrency].append((skus[i % len(skus)], f"{run}-{i}", qty))
    report = LoadReport(started=time.perf_counter())
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(
            *(_buyer(session, url, f"{run}-u{b}", plan, report, tick) for b, plan in enumerate(plans) if plan)
        )
    report.elapsed_s = time.perf_counter() - report.started
    return report
