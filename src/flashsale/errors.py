"""The error tree. Every error flashsale raises on purpose is a FlashSaleError.

`retriable` says whether trying again later can succeed (a server down, a timeout) or not (bad input,
a malformed message). The consumer's only decision on a failed batch is this flag.
"""

from __future__ import annotations

from collections.abc import Sequence


class FlashSaleError(Exception):
    """Something went wrong in flashsale."""

    retriable = False

    def __init__(self, message: str | None = None, *, hint: str | None = None) -> None:
        self.message = message or (self.__doc__ or "flashsale error").strip()
        self.hint = hint
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class ConfigError(FlashSaleError):
    """A setting is missing or malformed."""


class InvalidInput(FlashSaleError):
    """An argument given by a user or a client is not acceptable."""


class UnknownSku(InvalidInput):
    """The SKU is not loaded."""


class ServiceUnavailable(FlashSaleError):
    """A server (Redis, MySQL, RocketMQ) cannot be reached or did not answer in time.

    `reached` is False when the request certainly never got to the server (connection refused, no free
    connection in the pool): a write it carried did not happen. True means it may have.
    """

    retriable = True

    def __init__(
        self, service: str, address: str, detail: str, *, hint: str | None = None, reached: bool = True
    ) -> None:
        self.service = service
        self.address = address
        self.reached = reached
        super().__init__(
            f"{service} at {address} is unavailable: {detail.rstrip('. ')}",
            hint=hint or "is the stack running? try `flashsale stack status`",
        )


class StockError(FlashSaleError):
    """Redis refused or failed a stock operation."""


class StaleLayout(StockError):
    """A partitioned SKU was loaded again: a step placed by the old layout was refused, nothing written."""


class NotReplicated(StockError):
    """A Redis master took a write that no replica acknowledged in time: a failover now would lose it."""

    retriable = True


class StoreError(FlashSaleError):
    """The database refused or failed a statement."""

    def __init__(self, message: str | None = None, *, retriable: bool = True, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retriable = retriable


class LoadUnderWay(StoreError):
    """MySQL holds a later load of some SKUs than the one Redis was read under for a batch: a `stock set`
    wrote MySQL and has not loaded Redis yet (or stopped between the two). What was read of the old load
    must not land on the new one: those SKUs' messages wait for the load (retriable); after it, the old
    load's messages are retired and skipped."""

    def __init__(self, skus: Sequence[str]) -> None:
        super().__init__(
            f"MySQL holds a later load of {', '.join(skus)} than Redis does",
            retriable=True,
            hint="a `stock set` is under way, or stopped between MySQL and Redis: run it again",
        )
        self.skus = frozenset(skus)


class StockShort(StoreError):
    """MySQL holds fewer units of a SKU than a batch takes while units given back or added are still on
    their way there: that SKU's messages wait for them (retriable). Not an outage: the messages that carry
    those units, and the other SKUs' messages, must go on being applied meanwhile."""

    def __init__(self, sku: str, stock: int) -> None:
        super().__init__(f"MySQL stock {stock} of {sku} is short while units given back or added are on their way")
        self.skus = frozenset((sku,))


class MalformedMessage(FlashSaleError):
    """A message on the deduction topic cannot be decoded; it goes to dead_letters."""


class BusError(FlashSaleError):
    """The message broker refused or failed a request."""

    retriable = True


class StackError(FlashSaleError):
    """The local stack could not be installed, started or stopped."""
