"""`flashsale order show|pay|cancel|expire-due` and `flashsale stock add`: an operator's look at one order, a decision
on it, a restock (the CLI's way in).

Each call opens a purchase engine of its own (the producer's clients), so a decision travels exactly as
one over HTTP does, and a restock as the Python API's: half message, its script, commit or roll back.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from flashsale import constants as c
from flashsale import wiring
from flashsale.config import Settings
from flashsale.errors import InvalidInput, UnknownSku
from flashsale.pipeline.orders import OrderAnswer, describe
from flashsale.pipeline.restock import RestockAnswer
from flashsale.records import Restock
from flashsale.service.engine import opened

#: Answers after which the order stands as the request asked: this request decided it, or it did before.
DONE = ("paid", "cancelled", "expired")
#: Answers that decided nothing, and may decide once asked again.
ASK_AGAIN = ("frozen", "fenced")
#: Answers after which a restock's units stand added: by this request, or by an earlier one of its id.
ADDED = ("added", "already_added")


def show(settings: Settings, sku: str, token: str) -> dict[str, Any]:
    with opened(settings) as engine:
        entry = engine.run(engine.orders.show(sku, token))
    if entry is None:
        raise UnknownSku(
            f"no purchase of token {token!r} stands for {sku}",
            hint="a token is unique within its SKU: check both",
        )
    return describe(entry)


def decide(settings: Settings, sku: str, token: str, action: str, *, decision_id: str, user: str = "") -> OrderAnswer:
    with opened(settings) as engine:
        return engine.decide(sku, token, action, decision_id=decision_id, user=user)


def add_stock(settings: Settings, sku: str, qty: int, *, request_id: str) -> RestockAnswer:
    """A restock; an unknown SKU is an error (frozen and fenced are answers: asked again with the same
    request id, they add the units once)."""
    with opened(settings) as engine:
        answer = engine.add_stock(sku, qty, request_id=request_id)
    if answer.outcome is Restock.UNKNOWN_SKU:
        raise UnknownSku(f"unknown SKU {sku!r}: it is not loaded", hint=f"load it with `flashsale stock set {sku} QTY`")
    if answer.outcome is Restock.OTHER_QTY:
        raise InvalidInput(
            f"request id {request_id!r} added {answer.qty} unit(s) to {sku} already, not {qty}: nothing more was added",
            hint="a restock of another quantity needs a request id of its own",
        )
    return answer


def expire_due(settings: Settings, sku: str) -> dict[str, int]:
    """Expire every order of `sku` still awaiting payment past its deadline (what its timer would have
    done: an order paid or cancelled meanwhile is left as it is); returns the count of each answer."""
    with wiring.redis_stock(settings) as stock:
        stock.view(sku)  # an unknown SKU is an error, not an empty sweep
        now_ms = int(time.time() * 1000)
        due = [e for e in stock.scan_log(sku) if e.order == "awaiting" and e.due_ms is not None and e.due_ms <= now_ms]
    answers: Counter[str] = Counter()
    with opened(settings) as engine:
        for entry in due:
            answer = engine.decide(sku, entry.token, "expire", decision_id=c.EXPIRY_DECISION)
            answers[answer.decision.name.lower()] += 1
    return dict(sorted(answers.items()))
