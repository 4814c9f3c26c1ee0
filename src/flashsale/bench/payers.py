"""The payment service of a bench sale: it confirms the orders of the buyers who pay, over HTTP, signed.

A fraction `unpaid` of the accepted buyers never pays, spread evenly over the sale: the k-th accepted
purchase (in the order the answers came) goes unpaid when floor((k+1)·unpaid) > floor(k·unpaid), so of
n accepted purchases exactly floor(n·unpaid) are left to expire (counted in each of the buyers'
processes, bench/crowd.py: so with p processes, up to p - 1 fewer in all). The others are paid at once, as the
payment service would confirm them: POST /orders/{token}/pay with the body signed by the shared secret
(flashsale/payments.py), on the buyer's connection. An answer that says nothing was decided
(503, no answer) is asked again with the same payment id, which can only hear the first answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction

import orjson

from flashsale.bench.http import Connection, TransportError
from flashsale.bench.load import MAX_ERRORS, TRANSPORT_ERROR, percentile
from flashsale.payments import SIGNATURE_HEADER, sign

#: Times a payment is asked when nothing was decided (503, no answer), and the pause in between.
PAY_TRIES = 5
RETRY_PAUSE_S = 0.2


@dataclass
class PaymentReport:
    unpaid: int = 0  # accepted buyers who never paid
    decisions: Counter[str] = field(default_factory=Counter)  # answers to the payments, by decision
    latencies_s: list[float] = field(default_factory=list)  # from the first try to the answer
    errors: list[str] = field(default_factory=list)  # the first few payments that got no decision

    def percentile_ms(self, q: float) -> float:
        return round(percentile(self.latencies_s, q) * 1000, 2)


class Payers:
    """Called by the load generator after each accepted purchase (run_load's `after_accepted`)."""

    def __init__(self, secret: str, unpaid: float) -> None:
        self._secret = secret
        # Exact, so that 0.3 of 10 accepted is 3 unpaid and not 2 for a float's rounding.
        self._unpaid = Fraction(str(unpaid))
        self._accepted = 0
        self.report = PaymentReport()

    def pays(self) -> bool:
        """Whether the next accepted buyer pays (see the module docstring)."""
        k = self._accepted
        self._accepted += 1
        return int((k + 1) * self._unpaid) == int(k * self._unpaid)

    async def __call__(self, conn: Connection, sku: str, token: str, user: str) -> None:
        if not self.pays():
            self.report.unpaid += 1
            return
        started = time.perf_counter()
        decision, detail = await self._pay(conn, sku, token)
        self.report.latencies_s.append(time.perf_counter() - started)
        self.report.decisions[decision] += 1
        if detail and len(self.report.errors) < MAX_ERRORS:
            self.report.errors.append(f"payment of {token}: {detail}")

    async def _pay(self, conn: Connection, sku: str, token: str) -> tuple[str, str | None]:
        """The decision the payment heard (or why there was none), and what went wrong if it was not 200."""
        payment_id = f"pay-{token}"
        outcome: tuple[str, str | None] = (TRANSPORT_ERROR, None)
        for attempt in range(PAY_TRIES):
            if attempt:
                await asyncio.sleep(RETRY_PAUSE_S)
            # Signed afresh each time: a confirmation is refused once its ts_ms is too old.
            body = orjson.dumps(
                {"sku": sku, "token": token, "payment_id": payment_id, "ts_ms": int(time.time() * 1000)}
            )
            headers = {SIGNATURE_HEADER: sign(self._secret, body), "Content-Type": "application/json"}
            try:
                status, data = await conn.request("POST", f"/orders/{token}/pay", body, headers)
                reply = orjson.loads(data)
            except (TransportError, orjson.JSONDecodeError) as exc:
                outcome = (TRANSPORT_ERROR, f"{type(exc).__name__}: {exc}")
                continue
            decision = reply.get("decision") if isinstance(reply, dict) else None
            outcome = (str(decision or f"http_{status}"), None if status == 200 else f"{status} {reply}")
            if status != 503:
                break
        return outcome
