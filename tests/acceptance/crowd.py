"""The harshest buyers: each retries every unclear answer (pending, error, no answer) with the same token.

A buyer makes purchases one after another, each with a fresh token, until the sale's time is up; a
purchase whose answer is unclear is asked again with its token until it gets a clear one (accepted,
duplicate, sold out, limit exceeded, invalid) or the give-up time passes. Every answer is recorded
per token, so the oracle can check that each buyer ever told `accepted` or `duplicate` has one order.

A purchase may ask for several units (`max_qty`), and a buyer may double-click (`double_click`): the
purchase is sent twice at once with its token, the second click asking for one unit more, and each
click is retried on its own until it has a clear answer.

The buyers run on a thread of their own; every read of what they heard takes a snapshot under a lock.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp

CLEAR = frozenset({"accepted", "duplicate", "sold_out", "limit_exceeded", "invalid"})
UNCLEAR = frozenset({"pending", "error"})
NO_ANSWER = "no_answer"


@dataclass
class Crowd:
    url: str
    sku: str
    buyers: int = 20
    run_id: str = "crowd"
    #: Pause before asking again after an unclear answer.
    retry_pause_s: float = 0.2
    #: Each purchase asks for 1 to `max_qty` units.
    max_qty: int = 1
    #: Each purchase is sent twice at once with its token (the second asking one unit more).
    double_click: bool = False
    #: A buyer's pause between a purchase's clear answers and their next purchase.
    pause_s: float = 0.0
    _answers: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: token -> the quantities it was sent with, and the buyer who sent it.
    asked: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    users: dict[str, str] = field(default_factory=dict)
    #: perf_counter of each answer, with the token and the answer (for phases of a sale).
    _timeline: list[tuple[float, str, str]] = field(default_factory=list)
    #: token -> its clicks still without a clear answer
    _open: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _lock: threading.Lock = field(default_factory=threading.Lock)
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
    def answers(self) -> dict[str, list[str]]:
        """token -> every answer it got, in order (a snapshot)."""
        with self._lock:
            return {token: list(said) for token, said in self._answers.items()}

    @property
    def final(self) -> dict[str, str]:
        return {token: said[-1] for token, said in self.answers.items()}

    def told(self, statuses: frozenset[str] = frozenset({"accepted", "duplicate"})) -> set[str]:
        """Tokens that were told one of `statuses` at least once."""
        return {token for token, said in self.answers.items() if statuses & set(said)}

    def counts(self) -> Counter[str]:
        return Counter(self.final.values())

    def unclear(self) -> list[str]:
        """Tokens one of whose clicks never got a clear answer."""
        with self._lock:
            return sorted(t for t, pending in self._open.items() if pending)

    def answered_after(self, moment: float, *statuses: str) -> int:
        return self.answered_between(moment, float("inf"), *statuses)

    def answered_between(self, start: float, end: float, *statuses: str) -> int:
        """Answers given between two moments (perf_counter) that were one of `statuses`."""
        with self._lock:
            return sum(1 for at, _, said in self._timeline if start <= at < end and said in statuses)

    def retried_into(self, statuses: frozenset[str] = CLEAR) -> list[str]:
        """Tokens that got an unclear answer (or none), then a clear one when asked again. (Not only a
        token's first answer: a double click's second click waits for the first's answer, so a fault can
        leave only second clicks in flight, after their first clicks were answered.)"""
        unclear = UNCLEAR | {NO_ANSWER}
        return sorted(
            t
            for t, said in self.answers.items()
            if any(s in unclear and statuses & set(said[i + 1 :]) for i, s in enumerate(said))
        )

    async def _run(self, give_up_s: float) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.buyers * 2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._buyer(session, b, give_up_s) for b in range(self.buyers)))
        self.ended_at = time.perf_counter()

    async def _buyer(self, session: aiohttp.ClientSession, b: int, give_up_s: float) -> None:
        rng = random.Random(f"{self.run_id}-{b}")
        user = f"{self.run_id}-u{b}"
        n = 0
        while not self._stop.is_set():
            token = f"{self.run_id}-{b}-{n}"
            n += 1
            qty = rng.randint(1, self.max_qty)
            clicks = [qty, qty + 1] if self.double_click else [qty]
            with self._lock:
                self.users[token] = user
                self.asked[token].update(clicks)
                self._open[token] = len(clicks)
            await asyncio.gather(*(self._click(session, token, user, q, give_up_s) for q in clicks))
            if self.pause_s:
                await asyncio.sleep(self.pause_s)

    async def _click(self, session: aiohttp.ClientSession, token: str, user: str, qty: int, give_up_s: float) -> None:
        """One click, asked again with its token and quantity until its answer is clear."""
        deadline = None
        while True:
            said = await self._ask(session, token, user, qty)
            with self._lock:
                self._answers[token].append(said)
                self._timeline.append((time.perf_counter(), token, said))
                if said in CLEAR:
                    self._open[token] -= 1
            if said in CLEAR:
                return
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + give_up_s
                if time.monotonic() > deadline:
                    return
            await asyncio.sleep(self.retry_pause_s)

    async def _ask(self, session: aiohttp.ClientSession, token: str, user: str, qty: int) -> str:
        body = {"sku": self.sku, "user_id": user, "qty": qty, "token": token}
        try:
            async with session.post(self.url + "/purchase", json=body) as resp:
                data = await resp.json(content_type=None)
                return str(data.get("status")) if isinstance(data, dict) else f"http_{resp.status}"
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return NO_ANSWER
