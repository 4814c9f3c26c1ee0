from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from flashsale.errors import ServiceUnavailable, UnknownSku
from flashsale.pipeline.producer import PurchaseService
from flashsale.records import Prededuct, PredeductResult, StockView
from flashsale.service.http_app import MAX_BODY, ROUTES, HttpApp
from flashsale.service.metrics import Metrics
from tests.unit.fakes import FakeBus, FakeStock
from tests.unit.rsgi import Proto, Request, Scope, call

PURCHASE = {"sku": "sku-1", "user_id": "u1", "qty": 1, "token": "tok-1"}


class FakeRedisStock(FakeStock):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.views: list[str] = []

    async def view(self, sku: str) -> StockView:
        self.views.append(sku)
        if sku != "sku-1":
            raise UnknownSku(f"unknown SKU {sku!r}")
        return StockView(sku, 9, 10, 0, False, 1, 1, 0, 0, 0, 1, 0)


def _app(stock: FakeRedisStock | None = None, *, max_in_flight: int = 8, broker: str | None = None) -> HttpApp:
    stock = stock or FakeRedisStock()
    metrics = Metrics()
    service = PurchaseService(stock, FakeBus(), "ns-deductions", observe=metrics.purchase)
    return HttpApp(service, stock, metrics, max_in_flight=max_in_flight, broker_problem=lambda: broker)


def _call(app: HttpApp, *requests: tuple[str, str, Any]) -> list[tuple[int, Any]]:
    """Hand the requests in order to the app; answer (status, JSON or text) of each."""
    return call(
        app,
        *(Request(method, path, data.encode() if isinstance(data, str) else b"") for method, path, data in requests),
    )


def _purchase(app: HttpApp, payload: object) -> tuple[int, Any]:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return _call(app, ("POST", "/purchase", body))[0]


def test_accepted_purchase_answers_200_with_its_message_id() -> None:
    status, body = _purchase(_app(), PURCHASE)
    assert status == 200
    assert body == {"status": "accepted", "token": "tok-1", "remaining": 9, "message_id": "msg-1"}


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]"])
def test_purchase_that_is_not_a_json_object_answers_400(payload: str) -> None:
    status, body = _purchase(_app(), payload)
    assert (status, body["status"]) == (400, "invalid")


def test_purchase_missing_a_field_answers_422_naming_it() -> None:
    status, body = _purchase(_app(), {k: v for k, v in PURCHASE.items() if k != "qty"})
    assert status == 422
    assert body["message"] == "missing field(s): qty"
    assert body["token"] == "tok-1"


def test_purchase_of_an_unknown_sku_answers_404() -> None:
    status, body = _purchase(_app(FakeRedisStock(PredeductResult(Prededuct.UNKNOWN_SKU, None))), PURCHASE)
    assert (status, body["status"]) == (404, "invalid")


def test_purchase_with_an_unknown_outcome_answers_202() -> None:
    stock = FakeRedisStock(error=ServiceUnavailable("Redis", "127.0.0.1:6379", "timeout"))
    status, body = _purchase(_app(stock), PURCHASE)
    assert (status, body["status"], body["message_id"]) == (202, "pending", "msg-1")


def test_purchase_past_max_in_flight_answers_503_without_deducting() -> None:
    stock = FakeRedisStock()
    status, body = _purchase(_app(stock, max_in_flight=0), PURCHASE)
    assert (status, body["status"]) == (503, "error")
    assert stock.calls == []


def test_metrics_count_purchases_by_status() -> None:
    (_, _), (status, text) = _call(_app(), ("POST", "/purchase", json.dumps(PURCHASE)), ("GET", "/metrics", None))
    assert status == 200
    assert 'flashsale_purchases_total{status="accepted"} 1.0' in text


def test_readyz_answers_200_when_redis_and_the_broker_answer() -> None:
    assert _call(_app(), ("GET", "/readyz", None))[0] == (200, {"status": "ready", "redis": "ok", "broker": "ok"})


def test_readyz_answers_503_naming_what_is_down_and_healthz_stays_200() -> None:
    def down() -> None:
        raise ServiceUnavailable("Redis", "127.0.0.1:6379", "refused")

    app = _app(FakeRedisStock(on_ping=down), broker="telemetry stream to 127.0.0.1:8081 is down")
    (status, body), alive = _call(app, ("GET", "/readyz", None), ("GET", "/healthz", None))
    assert (status, body["status"]) == (503, "unavailable")
    assert "refused" in body["redis"] and body["broker"] == "telemetry stream to 127.0.0.1:8081 is down"
    assert alive == (200, {"status": "ok"})


def test_metrics_carry_the_build_and_the_standard_process_series() -> None:
    ((_, text),) = _call(_app(), ("GET", "/metrics", None))
    assert 'flashsale_build_info{version="' in text
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info", "python_gc_"):
        assert series in text


def test_stock_answers_the_view_of_a_loaded_sku_and_404_otherwise() -> None:
    (status, body), (missing, _) = _call(_app(), ("GET", "/stock/sku-1", None), ("GET", "/stock/other", None))
    assert (status, body["stock"], body["initial"]) == (200, 9, 10)
    assert missing == 404


def test_a_body_larger_than_the_limit_is_refused_unread() -> None:
    status, body = _purchase(_app(), "x" * (MAX_BODY + 1))
    assert (status, body["status"]) == (413, "invalid")


def test_unknown_paths_and_methods_get_clear_errors() -> None:
    (missing, _), (wrong, body) = _call(_app(), ("GET", "/nope", None), ("GET", "/purchase", None))
    assert missing == 404 and wrong == 405 and "POST /purchase" in body["error"]


def _answer_with_headers(app: HttpApp, method: str, path: str) -> tuple[int, dict[str, str], Any]:
    proto = Proto(b"{}")
    asyncio.run(app.__rsgi__(Scope(method, path, {"content-length": "2"}), proto))
    assert proto.answer is not None
    status, headers, body = proto.answer
    return status, dict(headers), json.loads(body)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_a_wrong_method_answers_405_naming_the_method_to_use_in_allow_too(method: str, path: str) -> None:
    # RFC 9110: a 405 carries Allow. OPTIONS and TRACE are what a client or a scanner tries first.
    from tests.unit.test_http_orders import FakeDesk
    from tests.unit.test_http_orders import _app as orders_app

    target = path.replace("{sku}", "sku-1").replace("{token}", "tok-1")
    for wrong in sorted({"GET", "POST", "PUT", "DELETE", "OPTIONS", "TRACE"} - {method}):
        status, headers, body = _answer_with_headers(orders_app(FakeDesk()), wrong, target)
        assert (status, headers.get("allow"), headers["content-type"]) == (405, method, "application/json")
        assert body["error"].startswith(f"use {method} "), body


def test_a_path_served_by_no_route_answers_404_whatever_the_method() -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, headers, body = _answer_with_headers(_app(), method, "/nope")
        assert (status, "allow" in headers, body) == (404, False, {"error": "no route /nope"})


@pytest.mark.parametrize("qty", ["2", " 2", ""])
def test_a_quantity_sent_as_a_json_string_answers_422_naming_it(qty: str) -> None:
    status, body = _purchase(_app(), {**PURCHASE, "qty": qty})
    assert (status, body["status"], body["token"]) == (422, "invalid", "tok-1")
    assert body["message"] == f"qty must be a JSON number, got {qty!r}"


def test_a_quantity_written_as_a_whole_float_is_a_whole_number() -> None:
    # JSON Schema's integer, which the document gives qty, holds 2.0 too.
    status, body = _purchase(_app(), {**PURCHASE, "qty": 2.0})
    assert (status, body["status"]) == (200, "accepted")


@pytest.mark.parametrize("sku", ["sku-1#0", "a{b}", "sku 1", ""])
def test_stock_of_a_malformed_sku_answers_422_and_reads_nothing(sku: str) -> None:
    # sku-1#0 is the name of a partition of sku-1: Redis holds its keys, but it is no SKU to show.
    stock = FakeRedisStock()
    ((status, body),) = _call(_app(stock), ("GET", f"/stock/{sku}", None))
    assert status == 422 and body["error"].startswith("sku must be 1-64 characters")
    assert stock.views == []


def test_invalid_requests_are_counted_in_the_metrics() -> None:
    (_, _), (_, text) = _call(_app(), ("POST", "/purchase", "{not json"), ("GET", "/metrics", None))
    assert 'flashsale_purchases_total{status="invalid"} 1.0' in text


def test_the_validating_bare_server_reads_and_counts_a_purchase_as_the_producer_does() -> None:
    """`make wrk`'s second ceiling is only a ceiling if it does the producer's work on each request: the
    same validation (a bad body refused as the producer refuses it), an answer with the buyer's own token,
    and the purchase counted."""
    from tests.benchmarks.bare_server import validating_app

    app = validating_app()
    (status, body), (refused, why), (_, metrics) = _call(
        app,
        ("POST", "/purchase", json.dumps(PURCHASE)),
        ("POST", "/purchase", json.dumps({**PURCHASE, "qty": 0})),
        ("GET", "/metrics", None),
    )
    assert (status, body["status"], body["token"], body["remaining"]) == (200, "sold_out", "tok-1", 0)
    assert (refused, why["status"]) == (422, "invalid") and "qty" in why["message"]
    assert 'flashsale_purchases_total{status="sold_out"} 1.0' in metrics
    assert 'flashsale_purchases_total{status="invalid"} 1.0' in metrics
