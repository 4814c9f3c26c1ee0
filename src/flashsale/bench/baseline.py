"""`flashsale baseline run`: the purchase as one plain MySQL transaction, behind the producer's own HTTP app.

What a team would build without flashsale, served the way flashsale serves (granian, the same RSGI app,
the same answers), so that `flashsale bench` compares strategies and not HTTP stacks. Each purchase is
a blocking transaction on a worker thread; past the workers, purchases wait their turn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvloop

from flashsale import wiring
from flashsale.adapters.mysql.store import MySQLStore
from flashsale.bench.mysql_baselines import MySQLBaselines
from flashsale.config import Settings
from flashsale.errors import FlashSaleError
from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.records import StockView
from flashsale.service.http_app import HttpApp
from flashsale.service.http_server import HttpServer
from flashsale.service.metrics import Metrics
from flashsale.service.processes import SHUTDOWN_TIMEOUT_S, on_signals

logger = logging.getLogger(__name__)


def run_baseline(settings: Settings, strategy: str, *, workers: int) -> None:
    """The plain-MySQL purchase behind the producer's HTTP app, until SIGTERM."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    metrics = Metrics()
    cfg = settings.producer
    stop = on_signals()
    with wiring.mysql_store(settings, pool_size=workers, pinged=True) as store:
        service = BaselineService(store, strategy, workers, metrics)
        app = HttpApp(service, StoreReader(store), metrics, max_in_flight=cfg.max_in_flight)
        server = HttpServer(app, cfg.http_host, cfg.http_port, loop_in_thread())
        try:
            server.start()
            logger.info("baseline %s listening on http://%s:%d", strategy, cfg.http_host, cfg.http_port)
            stop.wait()
            server.stop(SHUTDOWN_TIMEOUT_S)
        finally:
            service.close()
    logger.info("baseline stopped")


class BaselineService:
    """A Purchaser (see service/http_app.py) whose purchase is one MySQL transaction on a worker thread,
    counted and timed as the producer's are."""

    def __init__(self, store: MySQLStore, strategy: str, workers: int, metrics: Metrics) -> None:
        self._store = store
        self._purchase = MySQLBaselines(store).strategy(strategy)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=strategy)
        self._metrics = metrics

    async def submit(self, request: PurchaseRequest) -> PurchaseResult:
        started = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self._pool, self._attempt, request)
        self._metrics.purchase(result, time.perf_counter() - started)
        return result

    def _attempt(self, request: PurchaseRequest) -> PurchaseResult:
        try:
            return self._purchase(request)
        except FlashSaleError as exc:  # too many connections, a timeout: reported as the buyer sees it
            return PurchaseResult(PurchaseStatus.ERROR, request.token, message=str(exc)[:300])

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class StoreReader:
    """A StockReader over MySQL, for /stock and /readyz."""

    def __init__(self, store: MySQLStore) -> None:
        self._store = store

    async def view(self, sku: str) -> StockView:
        mysql = await asyncio.to_thread(self._store.view, sku)
        return StockView(
            sku=sku,
            stock=mysql.stock,
            initial=mysql.initial,
            per_user_limit=mysql.per_user_limit,
            sold_out=mysql.stock == 0,
            deducted_qty=mysql.deducted_qty,
            deducted_count=mysql.deductions,
            returned_qty=0,
            returned_count=0,
            fenced_count=0,
            log_entries=mysql.deductions,
            loaded_ms=0,
        )

    async def ping(self) -> None:
        await asyncio.to_thread(self._store.ping)


def loop_in_thread() -> asyncio.AbstractEventLoop:
    """An event loop of its own, running on a daemon thread (the baseline has no broker client to lend one)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="http-loop", daemon=True).start()
    return loop
