"""The producer's machinery: a RocketMQ producer client, Redis, and the purchase service on the client's loop.

The RocketMQ client runs one asyncio loop per process on a thread of its own. The whole purchase path
(HTTP included) runs on that loop: a purchase awaits the broker and Redis, and never hops between
threads. The broker's transaction checks arrive on the client's check thread and use a plain Redis
client of their own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

from flashsale import wiring
from flashsale.config import Settings
from flashsale.models import PurchaseResult
from flashsale.pipeline.checker import DeductionChecker
from flashsale.pipeline.orders import OrderAnswer, OrderDesk
from flashsale.pipeline.partitions import Scheduler
from flashsale.pipeline.producer import PurchaseService
from flashsale.pipeline.restock import RestockAnswer, Restocker
from flashsale.polling import poll_until
from flashsale.service.metrics import Metrics

T = TypeVar("T")


class PurchaseEngine:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        cfg = settings.producer
        self.settings = settings
        self._clients = ExitStack()
        with self._clients as opening:
            check_stock = opening.enter_context(wiring.redis_stock(settings, replicated=True))
            # Every producer answers checks too: the broker may route a check to any producer of the topic.
            checker = DeductionChecker(check_stock, settings.check_grace_s, observe=metrics.check if metrics else None)
            self.bus = opening.enter_context(
                wiring.producer(
                    settings,
                    [settings.deduction_topic],
                    checker.check,
                    on_resync=metrics.resyncs.inc if metrics else None,
                )
            )
            self._clients = opening.pop_all()  # open: kept until close()
        self.loop = self.bus.loop
        self.stock = wiring.async_redis_stock(settings)
        self.scheduler = Scheduler(self.stock)
        self.service = PurchaseService(
            self.stock,
            self.bus,
            settings.deduction_topic,
            group_size=cfg.group_size,
            group_wait_s=cfg.group_wait_ms / 1000,
            group_hold_s=cfg.group_hold_ms / 1000,
            sold_out_cache_s=cfg.sold_out_cache_s,
            failpoint_names=settings.failpoints,
            observe=metrics.purchase if metrics else None,
            observe_group=metrics.group if metrics else None,
            scheduler=self.scheduler,
        )
        self.orders = OrderDesk(self.stock, self.bus, settings.deduction_topic)
        self.restocks = Restocker(self.stock, self.bus, settings.deduction_topic, failpoint_names=settings.failpoints)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the engine's loop from another thread and wait for its result."""
        if threading.current_thread() is getattr(self.loop, "_thread", None) or _running_loop() is self.loop:
            raise RuntimeError("PurchaseEngine.run() called from its own event loop; await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def purchase(self, sku: object, user_id: object, qty: object, token: object) -> PurchaseResult:
        """The synchronous entry (Python API): safe from any thread but the engine's loop."""
        return self.run(self.service.purchase(sku, user_id, qty, token))

    def decide(self, sku: str, token: str, action: str, *, decision_id: str, user: str = "") -> OrderAnswer:
        """Pay, cancel or expire an order (see pipeline/orders.py): safe from any thread but the engine's loop."""
        return self.run(self.orders.decide(sku, token, action, decision_id=decision_id, user=user))

    def add_stock(self, sku: str, qty: int, *, request_id: str) -> RestockAnswer:
        """A restock (see pipeline/restock.py): safe from any thread but the engine's loop."""
        return self.run(self.restocks.add(sku, qty, request_id=request_id))

    def drain(self, timeout_s: float) -> bool:
        """Wait until every purchase handed in has its answer (its half message settled); False on timeout."""
        return poll_until(lambda: self.run(self._idle()), timeout_s, interval_s=0.05)

    async def _idle(self) -> bool:
        return self.service.idle

    def close(self) -> None:
        self.run(self.scheduler.close())
        self.run(self.stock.close())
        self._clients.close()


@contextmanager
def opened(settings: Settings) -> Iterator[PurchaseEngine]:
    """An engine of its own for one operator's command (the CLI), closed after it."""
    engine = PurchaseEngine(settings)
    try:
        yield engine
    finally:
        engine.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
