"""Buyers of a SKU sold with a payment deadline, over HTTP: they buy, then pay, pay late, cancel or never pay.

Each buyer buys one unit at a time under a fresh token, asking again with the same token after an
unclear answer (pending, error, no answer), as tests/acceptance/crowd.py does. Once told `accepted` (or
`duplicate`), the order gets a fate, drawn per token:

- `pay`: the payment service confirms within the first half of the deadline (signed, a payment id of its
  own, re-signed and sent again with that id after a 503 or no answer); some confirmations are sent
  twice at once. A buyer whose payment is `paid` holds a unit and stops buying.
- `late`: the confirmation is sent just after the deadline (read from GET /orders): it must hear
  `already_expired`.
- `cancel`: the buyer cancels within the first third of the deadline.
- `never`: the buyer waits, reading the order, until it no longer awaits payment.

Every buyer who was refused, or whose order ended without a payment, buys again under a new token until
told to stop. After `pay_all()`, every new order is paid in time, so a sale that gives units back ends.
Everything a buyer sent and heard is recorded per token, with the wall-clock time (ms) of each decision
sent: the time Redis judges deadlines by, on this same host.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from flashsale.payments import SIGNATURE_HEADER, sign

HOLDS = frozenset({"accepted", "duplicate"})
CLEAR = HOLDS | {"sold_out", "limit_exceeded", "invalid"}
NO_ANSWER = "no_answer"
#: Decisions after which the order stands as it will (anything else is asked again with the same id).
DECIDED = frozenset(
    {"paid", "cancelled", "expired", "already_paid", "already_cancelled", "already_expired", "not_yours", "no_order"}
)
#: The order state each decision answer says the order ended in.
ENDED_AS = {
    "paid": "paid",
    "already_paid": "paid",
    "cancelled": "cancelled",
    "already_cancelled": "cancelled",
    "expired": "expired",
    "already_expired": "expired",
}
FATES = ("pay", "late", "cancel", "never")


@dataclass
class Order:
    """One token of one buyer: what was sent and heard."""

    token: str
    user: str
    purchase: list[str] = field(default_factory=list)
    fate: str = ""
    #: (wall-clock ms when sent, answer) of every pay or cancel request, in the order they were answered
    decisions: list[tuple[int, str]] = field(default_factory=list)
    #: order states read with GET /orders/{token}
    seen: list[str] = field(default_factory=list)

    @property
    def held(self) -> bool:
        return bool(HOLDS & set(self.purchase))

    def ended_as(self) -> str | None:
        """The state the buyer's last clear word on this order says it is in (None: nothing clear)."""
        heard = [ENDED_AS[a] for _, a in self.decisions if a in ENDED_AS]
        heard += [s for s in self.seen if s != "awaiting"]
        if heard:
            return heard[-1]
        return "awaiting" if self.held else None


@dataclass
class LifecycleCrowd:
    url: str
    sku: str
    secret: str
    deadline_ms: int
    buyers: int = 300
    run_id: str = "life"
    #: share of accepted orders of each fate (pay takes what the others leave)
    late: float = 0.1
    cancel: float = 0.1
    never: float = 0.3
    #: share of payments sent twice at once, with one payment id
    double_pay: float = 0.2
    #: pause before asking again after an unclear answer, and before buying again after a refusal
    retry_pause_s: float = 0.2
    refused_pause_s: float = 0.4
    #: once stopped, how long an unclear request is still asked again
    give_up_s: float = 120.0
    orders: dict[str, Order] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _pay_all: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    #: pay and cancel requests sent and not answered yet
    _deciding: int = 0

    def start(self) -> LifecycleCrowd:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def pay_all(self) -> None:
        """From now on every new order is paid in time."""
        self._pay_all.set()

    def stop(self, timeout_s: float = 180.0) -> None:
        """No new purchases; wait for every buyer to finish the story of the order in hand."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "buyers still waiting for answers"

    def snapshot(self) -> dict[str, Order]:
        with self._lock:
            return {
                t: Order(o.token, o.user, list(o.purchase), o.fate, list(o.decisions), list(o.seen))
                for t, o in self.orders.items()
            }

    def deciding(self) -> int:
        """Pay and cancel requests in flight right now."""
        with self._lock:
            return self._deciding

    def fates(self) -> Counter[str]:
        return Counter(o.fate for o in self.snapshot().values() if o.fate)

    def answers(self) -> dict[str, list[str]]:
        """token -> every answer its purchase got (the shape tests/oracle.py judges)."""
        return {t: o.purchase for t, o in self.snapshot().items()}

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.buyers * 2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._buyer(session, b) for b in range(self.buyers)))

    async def _buyer(self, session: aiohttp.ClientSession, b: int) -> None:
        rng = random.Random(f"{self.run_id}-{b}")
        user = f"{self.run_id}-u{b}"
        n = 0
        while not self._stop.is_set():
            order = Order(f"{self.run_id}-{b}-{n}", user)
            n += 1
            with self._lock:
                self.orders[order.token] = order
            await self._buy(session, order)
            if not order.held:
                await asyncio.sleep(self.refused_pause_s * (0.5 + rng.random()))
                continue
            order.fate = "pay" if self._pay_all.is_set() else self._draw(rng)
            if await self._settle(session, order, rng):
                return

    def _draw(self, rng: random.Random) -> str:
        roll = rng.random()
        for fate, share in (("late", self.late), ("cancel", self.cancel), ("never", self.never)):
            if roll < share:
                return fate
            roll -= share
        return "pay"

    async def _settle(self, session: aiohttp.ClientSession, order: Order, rng: random.Random) -> bool:
        """Carry out the order's fate; True when the buyer now holds a paid unit."""
        if order.fate == "pay":
            await asyncio.sleep(rng.uniform(0.05, 0.4) * self.deadline_ms / 1000)
            times = 2 if rng.random() < self.double_pay else 1
            said = await asyncio.gather(*(self._pay(session, order) for _ in range(times)))
            return "paid" in said
        if order.fate == "cancel":
            await asyncio.sleep(rng.uniform(0.05, 0.3) * self.deadline_ms / 1000)
            await self._decide(session, order, "cancel", {"user_id": order.user, "request_id": f"c-{order.token}"})
            return False
        due_ms = await self._due_ms(session, order)
        if order.fate == "late":
            await asyncio.sleep(max(0.0, due_ms / 1000 - time.time()) + rng.uniform(0.05, 0.4))
            await self._pay(session, order)
            return False
        await asyncio.sleep(max(0.0, due_ms / 1000 - time.time()))
        while await self._state(session, order) in ("awaiting", NO_ANSWER):
            if time.time() > due_ms / 1000 + self.give_up_s:
                break
            await asyncio.sleep(0.25)
        return False

    async def _buy(self, session: aiohttp.ClientSession, order: Order) -> None:
        body = {"sku": self.sku, "user_id": order.user, "qty": 1, "token": order.token}
        deadline = None
        while True:
            said = await self._ask(session, "POST", "/purchase", json.dumps(body).encode(), "status")
            with self._lock:
                order.purchase.append(said)
            if said in CLEAR or (deadline is not None and time.monotonic() > deadline):
                return
            if self._stop.is_set() and deadline is None:
                deadline = time.monotonic() + self.give_up_s
            await asyncio.sleep(self.retry_pause_s)

    async def _pay(self, session: aiohttp.ClientSession, order: Order) -> str:
        return await self._decide(session, order, "pay", {"token": order.token, "payment_id": f"p-{order.token}"})

    async def _decide(self, session: aiohttp.ClientSession, order: Order, action: str, fields: dict[str, str]) -> str:
        """A pay or cancel, asked again with the same id until it is decided (or given up)."""
        started = time.monotonic()
        while True:
            payload = {"sku": self.sku, **fields}
            headers = {}
            if action == "pay":  # signed afresh each time: a confirmation's time must be recent
                payload["ts_ms"] = int(time.time() * 1000)  # type: ignore[assignment]
            raw = json.dumps(payload).encode()
            if action == "pay":
                headers[SIGNATURE_HEADER] = sign(self.secret, raw)
            sent_ms = int(time.time() * 1000)
            with self._lock:
                self._deciding += 1
            said = await self._ask(session, "POST", f"/orders/{order.token}/{action}", raw, "decision", headers)
            with self._lock:
                self._deciding -= 1
                order.decisions.append((sent_ms, said))
            if said in DECIDED or time.monotonic() - started > self.give_up_s:
                return said
            await asyncio.sleep(self.retry_pause_s)

    async def _due_ms(self, session: aiohttp.ClientSession, order: Order) -> int:
        while True:
            data = await self._get(session, order)
            if data is not None and "due_ms" in data:
                return int(data["due_ms"])
            await asyncio.sleep(self.retry_pause_s)

    async def _state(self, session: aiohttp.ClientSession, order: Order) -> str:
        data = await self._get(session, order)
        state = str(data["state"]) if data is not None and "state" in data else NO_ANSWER
        with self._lock:
            order.seen.append(state)
        return state

    async def _get(self, session: aiohttp.ClientSession, order: Order) -> dict[str, Any] | None:
        try:
            async with session.get(f"{self.url}/orders/{order.token}", params={"sku": self.sku}) as resp:
                data = await resp.json(content_type=None)
                return data if resp.status == 200 and isinstance(data, dict) else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    async def _ask(
        self, session: aiohttp.ClientSession, method: str, path: str, raw: bytes, key: str, headers: Any = None
    ) -> str:
        """The answer's `key` field, or `http_<status>` when it has none, or `no_answer`."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        try:
            async with session.request(method, self.url + path, data=raw, headers=headers) as resp:
                data = await resp.json(content_type=None)
                if isinstance(data, dict) and data.get(key):
                    return str(data[key])
                return f"http_{resp.status}"
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return NO_ANSWER
