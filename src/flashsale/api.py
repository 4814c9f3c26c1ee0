"""The Python API: purchases from your own code, through the same pipeline as the HTTP ingress.

    with FlashSale() as sale:                       # settings from FLASHSALE_* variables
        result = sale.purchase("phone-x", "u1", 1, token)
        if result.status is PurchaseStatus.ACCEPTED: ...

`purchase` is thread-safe; use one FlashSale per process and call it from as many threads as you like.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from flashsale.config import Settings
from flashsale.models import PurchaseResult


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

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> FlashSale:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
