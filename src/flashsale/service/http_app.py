"""The producer's HTTP ingress: an RSGI application, served by granian on the purchase engine's event loop.

Routes: POST /purchase, GET /stock/{sku}, the order routes under /orders/ (service/orders_http.py),
/healthz, /readyz, /metrics, and /openapi.json, the document of them all (service/openapi.py).

Why RSGI and granian: the HTTP layer is most of a sold-out answer's cost, and granian's Rust server
leaves the Python side only the handler; the purchase path stays on the one loop where the broker
client and Redis live. A purchase is never cut short by its client: it runs in its group's task
(pipeline/grouping.py), and a client that hangs up only loses the answer, which a retry with the same
token gets back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flashsale.config import PaymentSettings
from flashsale.errors import FlashSaleError, InvalidInput, ServiceUnavailable, UnknownSku
from flashsale.models import PurchaseRequest, PurchaseResult, PurchaseStatus, require_id
from flashsale.records import StockView
from flashsale.service import openapi
from flashsale.service.http_body import JSON as _JSON
from flashsale.service.http_body import MAX_BODY, Headers, read_body, wrong_method
from flashsale.service.metrics import Metrics
from flashsale.service.orders_http import OrderDeskLike, OrderRoutes

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
#: Every route served, as (method, path): the OpenAPI document describes these and no others.
ROUTES = (
    ("POST", "/purchase"),
    ("GET", "/stock/{sku}"),
    ("GET", "/orders/{token}"),
    ("POST", "/orders/{token}/cancel"),
    ("POST", "/orders/{token}/pay"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
)
_METRICS = [("content-type", CONTENT_TYPE_LATEST)]
_BAD_JSON = 'the body is not valid JSON; send {"sku","user_id","qty","token"}'

BrokerProblem = Callable[[], "str | None"]


class Purchaser(Protocol):
    async def submit(self, request: PurchaseRequest) -> PurchaseResult: ...


class StockReader(Protocol):
    async def view(self, sku: str) -> StockView: ...

    async def ping(self) -> None: ...


class Admission:
    """Purchases in flight, counted on the event loop thread; past the limit the producer sheds load."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0


class HttpApp:
    """The RSGI application (granian calls `__rsgi__` once per request)."""

    def __init__(
        self,
        service: Purchaser,
        stock: StockReader,
        metrics: Metrics,
        *,
        max_in_flight: int,
        broker_problem: BrokerProblem = lambda: None,
        orders: OrderDeskLike | None = None,
        payments: PaymentSettings | None = None,
    ) -> None:
        """`orders`: the order desk (None: a service that sells without orders, whose order routes answer
        404); `payments`: how a payment's signature is checked (by default none is accepted)."""
        self._service = service
        self._stock = stock
        self._metrics = metrics
        self._broker_problem = broker_problem
        self.admission = Admission(max_in_flight)
        metrics.in_flight.set_function(lambda: self.admission.current)
        self._orders = OrderRoutes(orders, payments or PaymentSettings())
        self._openapi = orjson.dumps(openapi.document())
        self._gets: dict[str, Callable[[], Awaitable[tuple[int, bytes]]]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/openapi.json": self._document,
        }

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        try:
            if scope.path == "/purchase" and scope.method == "POST":  # the hot path, first
                status, body = await self.purchase(await read_body(scope, proto))
                proto.response_bytes(status, _JSON, body)
                return
            if scope.proto != "http":
                return
            status, body, headers = await self._route(scope, proto)
        except Exception:  # a bug: answer it, log it, and keep serving
            logger.exception("%s %s failed", scope.method, scope.path)
            status, body, headers = 500, orjson.dumps({"error": "internal error"}), _JSON
        proto.response_bytes(status, headers, body)

    async def _route(self, scope: Any, proto: Any) -> tuple[int, bytes, Headers]:
        path, method = scope.path, scope.method
        if path == "/purchase":
            if method != "POST":
                return wrong_method("POST", path)
            status, body = await self.purchase(await read_body(scope, proto))
            return status, body, _JSON
        if path.startswith("/orders/"):
            return await self._orders.handle(scope, proto)
        handler = self._gets.get(path)
        if handler is None and path != "/metrics" and not path.startswith("/stock/"):
            return 404, orjson.dumps({"error": f"no route {path}"}), _JSON
        if method != "GET":
            return wrong_method("GET", path)
        if path == "/metrics":
            return 200, generate_latest(self._metrics.registry), _METRICS
        if handler is None:
            return (*await self._view(path.removeprefix("/stock/")), _JSON)
        return (*await handler(), _JSON)

    async def purchase(self, raw: bytes | None) -> tuple[int, bytes]:
        """Status and JSON body of the answer to a POST /purchase body."""
        if raw is None:
            return self._invalid(f"the body is larger than {MAX_BODY} bytes", 413)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._invalid(_BAD_JSON, 400)
        token = payload.get("token") if isinstance(payload, dict) else None
        try:
            if isinstance(payload, dict) and isinstance(payload.get("qty"), str):
                # The CLI's quantities are strings of digits; JSON has numbers, and the document says qty is one.
                raise InvalidInput(f"qty must be a JSON number, got {payload['qty']!r}")
            request = PurchaseRequest.from_json(payload)
        except InvalidInput as exc:
            return self._invalid(str(exc), 422 if isinstance(payload, dict) else 400, token)
        admission = self.admission
        if admission.current >= admission.limit:
            result = PurchaseResult(
                PurchaseStatus.ERROR, request.token, message="the producer is overloaded; nothing was deducted"
            )
            return HTTP_STATUS[result.status], orjson.dumps(result.to_json())
        admission.current += 1
        try:
            result = await self._service.submit(request)
        finally:
            admission.current -= 1
        status = HTTP_STATUS[result.status]
        if result.status is PurchaseStatus.INVALID and result.message.startswith("unknown SKU"):
            status = 404
        return status, orjson.dumps(result.to_json())

    async def _view(self, sku: str) -> tuple[int, bytes]:
        try:
            checked = require_id(sku, "sku")
            view = await self._stock.view(checked)
        except UnknownSku as exc:
            return 404, orjson.dumps({"error": str(exc)})
        except InvalidInput as exc:  # a partition's name among them (sku#0): Redis knows it, but it is no SKU
            return 422, orjson.dumps({"error": str(exc)})
        except FlashSaleError as exc:
            return 503, orjson.dumps({"error": str(exc)})
        return 200, orjson.dumps(asdict(view))

    async def _healthz(self) -> tuple[int, bytes]:
        """Liveness: the process and its event loop answer."""
        return 200, orjson.dumps({"status": "ok"})

    async def _document(self) -> tuple[int, bytes]:
        """The OpenAPI 3.1 document of every route (service/openapi.py)."""
        return 200, self._openapi

    async def _readyz(self) -> tuple[int, bytes]:
        """Readiness: Redis answers and the broker knows this producer (sends and checks reach it)."""
        states: dict[str, str] = {}
        try:
            await self._stock.ping()
            states["redis"] = "ok"
        except ServiceUnavailable as exc:
            states["redis"] = str(exc)
        states["broker"] = self._broker_problem() or "ok"
        ready = all(v == "ok" for v in states.values())
        return (200 if ready else 503), orjson.dumps({"status": "ready" if ready else "unavailable", **states})

    def _invalid(self, reason: str, status: int, token: object = None) -> tuple[int, bytes]:
        self._metrics.invalid()
        body = {
            "status": PurchaseStatus.INVALID.value,
            "token": token if isinstance(token, str) else None,
            "remaining": None,
            "message_id": None,
            "message": reason,
        }
        return status, orjson.dumps(body)
