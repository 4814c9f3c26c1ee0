"""`flashsale order show|pay|cancel`: an operator's look at one order, and a decision on it (the CLI's way in).

Each call opens a purchase engine of its own (the producer's clients), so a decision travels exactly as
one over HTTP does: half message, decide.lua, commit or roll back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flashsale.config import Settings
from flashsale.errors import UnknownSku
from flashsale.pipeline.orders import OrderAnswer, describe
from flashsale.service.engine import PurchaseEngine

#: Answers after which the order stands as the request asked: this request decided it, or it did before.
DONE = ("paid", "cancelled", "expired")


@contextmanager
def _engine(settings: Settings) -> Iterator[PurchaseEngine]:
    engine = PurchaseEngine(settings)
    try:
        yield engine
    finally:
        engine.close()


def show(settings: Settings, sku: str, token: str) -> dict[str, Any]:
    with _engine(settings) as engine:
        entry = engine.run(engine.orders.show(sku, token))
    if entry is None:
        raise UnknownSku(
            f"no purchase of token {token!r} stands for {sku}",
            hint="a token is unique within its SKU: check both",
        )
    return describe(entry)


def decide(settings: Settings, sku: str, token: str, action: str, *, decision_id: str, user: str = "") -> OrderAnswer:
    with _engine(settings) as engine:
        return engine.decide(sku, token, action, decision_id=decision_id, user=user)
