"""flashsale: flash-sale stock deduction with Redis Lua pre-deduct, RocketMQ transactional messages and MySQL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["FlashSale", "PurchaseResult", "PurchaseStatus", "__version__"]

if TYPE_CHECKING:
    from flashsale.api import FlashSale
    from flashsale.models import PurchaseResult, PurchaseStatus


def __getattr__(name: str) -> Any:
    # Lazy: `import flashsale` stays cheap for the CLI; the client libraries load on first use.
    if name == "FlashSale":
        from flashsale.api import FlashSale

        return FlashSale
    if name in ("PurchaseResult", "PurchaseStatus"):
        from flashsale import models

        return getattr(models, name)
    raise AttributeError(f"module 'flashsale' has no attribute {name!r}")
