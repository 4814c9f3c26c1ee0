"""The harshest buyers: each retries every unclear answer (pending, error, no answer) with the same token.

A buyer makes purchases one after another, each with a fresh token, until the sale's time is up; a
purchase whose answer is unclear is asked again with its token until it gets a clear one (accepted,
duplicate, sold out, limit exceeded, invalid) or the give-up time passes. Every answer is recorded
per token, so the oracle can check that each buyer ever told `accepted` or `duplicate` has one order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp

CLEAR = frozenset({"accepted", "duplicate", "sold_out", "limit_exceeded", "invalid"})
NO_ANSWER = "no_answer"


@dataclass
class Crowd:
    url: str
    sku: str
    buyers: int = 20
    run_id: str = "crowd"
    #: Pause before asking again after an unclear answer.
    retry_pause_s: float = 0.2
    answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: perf_counter of each answer, with the token and the answer (for phases of a sale).
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    ended_at: float = 0.0

    def start(self, *, give_up_s: float = 180.0) -> Crowd:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(give_up_s)), daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 240.0) -> None:
        """No new purchases; wait until every purchase in hand has a clear answer (or was given up)."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "buyers still waiting for answers"

    @property
    def final(self) -> dict[str, str]:
        return {token: said[-1] for token, said in self.answers.items()}

    def counts(self) -> Counter[str]:
        return Counter(self.final.values())

    def unclear(self) -> list[str]:
        return sorted(t for t, a in self.final.items() if a not in CLEAR)

    def answered_after(self, moment: float, status: str) -> int:
        return sum(1 for at, _, said in self.timeline if at >= moment and said == status)

    async def _run(self, give_up_s: float) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.buyers)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._buyer(session, b, give_up_s) for b in range(self.buyers)))
        self.ended_at = time.perf_counter()

    async def _buyer(self, session: aiohttp.ClientSession, b: int, give_up_s: float) -> None:
        n = 0
        while not self._stop.is_set():
            token = f"{self.run_id}-{b}-{n}"
            n += 1
            deadline = None
            while True:
                said = await self._ask(session, token, f"{self.run_id}-u{b}")
                self.answers[token].append(said)
                self.timeline.append((time.perf_counter(), token, said))
                if said in CLEAR:
                    break
                if self._stop.is_set():
                    deadline = deadline or time.monotonic() + give_up_s
                    if time.monotonic() > deadline:
                        break
                await asyncio.sleep(self.retry_pause_s)

    async def _ask(self, session: aiohttp.ClientSession, token: str, user: str) -> str:
        body = {"sku": self.sku, "user_id": user, "qty": 1, "token": token}
        try:
            async with session.post(self.url + "/purchase", json=body) as resp:
                data = await resp.json(content_type=None)
                return str(data.get("status")) if isinstance(data, dict) else f"http_{resp.status}"
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return NO_ANSWER
