"""The Python API: purchases from your own code, through the same pipeline as the HTTP ingress.

    with FlashSale() as sale:                       # settings from FLASHSALE_* variables
        result = sale.purchase("phone-x", "u1", 1, token)
        if result.status is PurchaseStatus.ACCEPTED: ...

`purchase` is thread-safe; use one FlashSale per process and call it from as many threads as you like.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from flashsale import constants as c
from flashsale.config import Settings
from flashsale.models import PurchaseResult
from flashsale.pipeline.orders import OrderAnswer
from flashsale.pipeline.restock import RestockAnswer
from flashsale.records import LogEntry


class FlashSale:
    def __init__(self, settings: Settings | None = None) -> None:
        from flashsale.service.engine import PurchaseEngine

        self.settings = settings or Settings.from_env()
        self._engine = PurchaseEngine(self.settings)

    def purchase(self, sku: str, user_id: str, qty: int, token: str) -> PurchaseResult:
        """Half message, Redis pre-deduct, commit or roll back. Never raises for a business outcome."""
        return self._engine.purchase(sku, user_id, qty, token)

    async def purchase_async(self, sku: str, user_id: str, qty: int, token: str) -> PurchaseResult:
        """The same, from your own asyncio code (any loop)."""
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._engine.service.purchase(sku, user_id, qty, token), self._engine.loop)
        )

    def pay(self, sku: str, token: str, payment_id: str) -> OrderAnswer:
        """The payment service's confirmation of an order awaiting payment; the same `payment_id` asked again
        hears the first answer. A payment after the deadline is refused (`already_expired`)."""
        return self._engine.decide(sku, token, "pay", decision_id=payment_id)

    def cancel(self, sku: str, token: str, user_id: str, request_id: str) -> OrderAnswer:
        """The buyer gives an order awaiting payment up: its units go back on sale."""
        return self._engine.decide(sku, token, "cancel", decision_id=request_id, user=user_id)

    def expire(self, sku: str, token: str) -> OrderAnswer:
        """End an order whose deadline has passed (`not_due` before it): its units go back on sale."""
        return self._engine.decide(sku, token, "expire", decision_id=c.EXPIRY_DECISION)

    def order(self, sku: str, token: str) -> LogEntry | None:
        """Where the order of `token` stands (its log entry); None when no purchase of that token stands."""
        return self._engine.run(self._engine.orders.show(sku, token))

    def add_stock(self, sku: str, qty: int, request_id: str) -> RestockAnswer:
        """Add `qty` units to a SKU on sale (a restock), once per `request_id`: asked again with the same id,
        it adds nothing and answers `already_added` with the units the first call added. Raises
        ServiceUnavailable when Redis or the broker cannot say: ask again with the same id."""
        return self._engine.add_stock(sku, qty, request_id=request_id)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> FlashSale:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
