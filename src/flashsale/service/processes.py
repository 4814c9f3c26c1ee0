"""The three long-running processes: where adapters and pipeline are put together, and signals are handled.

The first SIGTERM or Ctrl-C stops a process gracefully (the purchases or the batch in hand are
finished); a second one stops it at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType

import uvloop

from flashsale import constants as c
from flashsale import wiring
from flashsale.config import Settings
from flashsale.errors import InvalidInput
from flashsale.pipeline.checker import DeductionChecker
from flashsale.pipeline.consumer import DeductionConsumer
from flashsale.pipeline.expiry import Expirer
from flashsale.service.engine import PurchaseEngine
from flashsale.service.http_app import HttpApp
from flashsale.service.http_server import HttpServer
from flashsale.service.metrics import Metrics
from flashsale.service.status import Readiness, StatusServer

logger = logging.getLogger(__name__)

#: Seconds the producer waits for in-flight purchases after SIGTERM.
SHUTDOWN_TIMEOUT_S = 30.0
#: Exit code of a process stopped by a second signal, unfinished.
EXIT_INTERRUPTED = 130


def on_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT; a second one ends the process at once."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)  # first: a second signal may arrive while this one is being logged
        name = signal.Signals(signum).name
        if len(received) > 1:
            logger.warning("received %s again; stopping now, without finishing", name)
            for each in logging.getLogger("flashsale").handlers:
                each.flush()
            os._exit(EXIT_INTERRUPTED)
        logger.info("received %s; stopping gracefully (send it again to stop at once)", name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@contextmanager
def _status(metrics: Metrics, readiness: Readiness, host: str, port: int | None) -> Iterator[None]:
    """/metrics, /healthz and /readyz on host:port while the block runs (nothing without a port)."""
    if not port:
        yield
        return
    try:
        server = StatusServer(metrics, readiness, host, port).start()
    except OSError as exc:
        raise InvalidInput(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="choose another --metrics-port"
        ) from exc
    try:
        yield
    finally:
        server.stop()


def run_producer(settings: Settings) -> None:
    # Before the first RocketMQ client: it creates the process's one event loop, where every purchase
    # runs. uvloop's cross-thread wake-ups are what granian pays per request.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    metrics = Metrics()
    cfg = settings.producer
    engine = PurchaseEngine(settings, metrics)
    app = HttpApp(
        engine.service,
        engine.stock,
        metrics,
        max_in_flight=cfg.max_in_flight,
        broker_problem=engine.bus.problem,
        orders=engine.orders,
        payments=cfg.payments,
    )
    if not cfg.payments.secret:
        logger.info("payments are refused (503) until FLASHSALE_PAYMENT_SECRET is set")
    server = HttpServer(app, cfg.http_host, cfg.http_port, engine.loop)
    stop = on_signals()
    try:
        server.start()
        # Everything built so far lives as long as the process: keep the collector from walking it on
        # every young collection, and let those come less often (measured: about +20% sold-out answers/s).
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        logger.info(
            "producer listening on http://%s:%d (topic %s)", cfg.http_host, cfg.http_port, settings.deduction_topic
        )
        stop.wait()
        # Stop accepting, then let every purchase in flight finish: each half message is settled.
        server.stop(SHUTDOWN_TIMEOUT_S)
        engine.drain(SHUTDOWN_TIMEOUT_S)
    finally:
        engine.close()
    logger.info("producer stopped")


def run_checker(settings: Settings, *, metrics_port: int | None = None) -> None:
    metrics = Metrics()
    stop = on_signals()
    with ExitStack() as clients:
        stock = clients.enter_context(wiring.redis_stock(settings, replicated=True))
        checker = DeductionChecker(stock, settings.check_grace_s, observe=metrics.check)
        bus = clients.enter_context(
            wiring.producer(settings, [settings.deduction_topic], checker.check, on_resync=metrics.resyncs.inc)
        )
        readiness = Readiness({"broker": bus.problem, "redis": lambda: stock.ping()})
        clients.enter_context(_status(metrics, readiness, settings.metrics_host, metrics_port))
        logger.info(
            "checker answering transaction checks for %s (grace %.1f s)",
            settings.deduction_topic,
            settings.check_grace_s,
        )
        stop.wait()
    logger.info("checker stopped")


def run_consumer(settings: Settings, *, metrics_port: int | None = None) -> None:
    metrics = Metrics()
    cfg = settings.consumer
    with ExitStack() as clients:
        store = clients.enter_context(wiring.mysql_store(settings, pinged=True))
        log = clients.enter_context(wiring.redis_stock(settings, pinged=True))
        receiver = clients.enter_context(wiring.deduction_receiver(settings, on_resync=metrics.resyncs.inc))
        deadlines = clients.enter_context(wiring.deadline_sender(settings))
        consumer = DeductionConsumer(
            receiver,
            store,
            log,
            batch_size=cfg.batch_size,
            max_backoff_s=cfg.max_backoff_s,
            failpoint_names=settings.failpoints,
            observe=metrics.batch,
            deadlines=deadlines,
        )
        _stop_on_signals(consumer)
        # Ready means MySQL takes a write (a heartbeat row): a read-only MySQL pauses the consumer.
        readiness = Readiness({"broker": receiver.problem, "mysql": lambda: store.ping(), "redis": lambda: log.ping()})
        clients.enter_context(_status(metrics, readiness, settings.metrics_host, metrics_port))
        logger.info(
            "consumer of group %s applying %s and %s to %s",
            settings.consumer_group,
            settings.deduction_topic,
            settings.replay_topic,
            store.address,
        )
        consumer.run()
    # Only now: the messages received and not started are handed back and the clients closed.
    logger.info("consumer stopped")


def _stop_on_signals(consumer: DeductionConsumer) -> None:
    """The first signal asks the consumer to stop after the batch in hand."""
    _stop_when(on_signals(), consumer.stop)


def _stop_when(stop: threading.Event, then: Callable[[], None]) -> None:
    def stop_when_asked() -> None:
        stop.wait()
        then()

    threading.Thread(target=stop_when_asked, daemon=True, name="stop-watcher").start()


def run_expirer(settings: Settings, *, metrics_port: int | None = None) -> None:
    """Expire the orders still unpaid when their deadline fires, until SIGTERM."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    metrics = Metrics()
    stop = on_signals()
    engine = PurchaseEngine(settings, metrics)
    try:
        with ExitStack() as clients:
            receiver = clients.enter_context(wiring.deadline_receiver(settings, on_resync=metrics.resyncs.inc))
            expirer = Expirer(
                receiver,
                lambda sku, token: engine.orders.decide(sku, token, "expire", decision_id=c.EXPIRY_DECISION),
                engine.run,
            )
            _stop_when(stop, expirer.stop)
            readiness = Readiness({"broker": receiver.problem, "redis": lambda: engine.run(engine.stock.ping())})
            clients.enter_context(_status(metrics, readiness, settings.metrics_host, metrics_port))
            logger.info("expirer of group %s firing deadlines of %s", settings.expiry_group, settings.deadline_topic)
            expirer.run()
    finally:
        engine.close()
    logger.info("expirer stopped")
