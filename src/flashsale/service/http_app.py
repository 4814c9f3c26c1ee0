"""The producer's HTTP ingress (aiohttp), served on the purchase engine's event loop."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import asdict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flashsale.adapters.redis_stock_async import AsyncRedisStock
from flashsale.errors import FlashSaleError, InvalidInput, ServiceUnavailable, UnknownSku
from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus
from flashsale.pipeline.producer import PurchaseService
from flashsale.service.metrics import Metrics

logger = logging.getLogger(__name__)

#: HTTP status per purchase status: business outcomes are 200; the rest say what a client should do.
HTTP_STATUS = {
    PurchaseStatus.ACCEPTED: 200,
    PurchaseStatus.SOLD_OUT: 200,
    PurchaseStatus.DUPLICATE: 200,
    PurchaseStatus.LIMIT_EXCEEDED: 200,
    PurchaseStatus.INVALID: 422,
    PurchaseStatus.PENDING: 202,
    PurchaseStatus.ERROR: 503,
}

_SERVICE = web.AppKey("service", PurchaseService)
_STOCK = web.AppKey("stock", AsyncRedisStock)
_METRICS = web.AppKey("metrics", Metrics)
BrokerProblem = Callable[[], "str | None"]
_BROKER: web.AppKey[BrokerProblem] = web.AppKey("broker")


class Admission:
    """Purchases in flight, counted on the event loop thread; past the limit the producer sheds load."""

    def __init__(self, limit: int, metrics_: Metrics) -> None:
        self.limit = limit
        self.current = 0
        self._gauge = metrics_.in_flight

    def enter(self) -> bool:
        if self.current >= self.limit:
            return False
        self.current += 1
        self._gauge.inc()
        return True

    def leave(self) -> None:
        self.current -= 1
        self._gauge.dec()


_ADMISSION = web.AppKey("admission", Admission)


def _answer(result: PurchaseResult, status: int | None = None) -> web.Response:
    return web.json_response(result.to_json(), status=status or HTTP_STATUS[result.status])


def _invalid(reason: str, status: int, token: object = None) -> web.Response:
    body = {
        "status": PurchaseStatus.INVALID.value,
        "token": token if isinstance(token, str) else None,
        "remaining": None,
        "message_id": None,
        "message": reason,
    }
    return web.json_response(body, status=status)


async def purchase(request: web.Request) -> web.Response:
    app = request.app
    try:
        payload = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _invalid('the body is not valid JSON; send {"sku","user_id","qty","token"}', 400)
    token = payload.get("token") if isinstance(payload, dict) else None
    try:
        purchase_request = PurchaseRequest.from_json(payload)
    except InvalidInput as exc:
        return _invalid(str(exc), 422 if isinstance(payload, dict) else 400, token)
    admission = app[_ADMISSION]
    if not admission.enter():
        return _answer(
            PurchaseResult(
                PurchaseStatus.ERROR,
                purchase_request.token,
                message="the producer is overloaded; nothing was deducted, retry shortly",
            )
        )
    try:
        # Shielded: a client that hangs up does not leave its purchase half done (committed or rolled back).
        result = await asyncio.shield(
            app[_SERVICE].purchase(
                purchase_request.sku, purchase_request.user_id, purchase_request.qty, purchase_request.token
            )
        )
    finally:
        admission.leave()
    if result.status is PurchaseStatus.INVALID and result.message.startswith("unknown SKU"):
        return _answer(result, 404)
    return _answer(result)


async def stock(request: web.Request) -> web.Response:
    sku = request.match_info["sku"]
    try:
        view = await request.app[_STOCK].view(sku)
    except UnknownSku as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except FlashSaleError as exc:
        return web.json_response({"error": str(exc)}, status=503)
    return web.json_response(asdict(view))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and its event loop answer."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers and the broker knows this producer (sends and checks reach it)."""
    states: dict[str, str] = {}
    try:
        await request.app[_STOCK].ping()
        states["redis"] = "ok"
    except ServiceUnavailable as exc:
        states["redis"] = str(exc)
    states["broker"] = request.app[_BROKER]() or "ok"
    ready = all(v == "ok" for v in states.values())
    return web.json_response({"status": "ready" if ready else "unavailable", **states}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    service: PurchaseService,
    stock_: AsyncRedisStock,
    metrics_: Metrics,
    *,
    max_in_flight: int,
    broker_problem: Callable[[], str | None] = lambda: None,
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[_SERVICE] = service
    app[_STOCK] = stock_
    app[_METRICS] = metrics_
    app[_BROKER] = broker_problem
    app[_ADMISSION] = Admission(max_in_flight, metrics_)
    app.router.add_post("/purchase", purchase)
    app.router.add_get("/stock/{sku}", stock)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
