"""The OpenAPI document: valid OpenAPI 3.1 in structure, exactly the routes the app serves, and the app's
answers valid against its schemas (a small JSON Schema check: the keywords the document uses)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from typing import Any

import orjson
import pytest

from flashsale.models import PurchaseStatus
from flashsale.payments import sign
from flashsale.records import Decision, PartitionView, StockView
from flashsale.service import openapi
from flashsale.service.http_app import HTTP_STATUS as PURCHASE_STATUS
from flashsale.service.http_app import ROUTES
from flashsale.service.orders_http import HTTP_STATUS as DECISION_STATUS
from tests.unit.rsgi import Request, call
from tests.unit.test_http_orders import SECRET, FakeDesk, _app

DOC = openapi.document()
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
KEYWORDS = {"$ref", "type", "enum", "const", "required", "properties", "additionalProperties", "items", "pattern"}
KEYWORDS |= {"minimum", "maximum", "oneOf", "description"}


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), path, op) for path, item in DOC["paths"].items() for m, op in item.items() if m in METHODS]


def _resolve(ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = DOC
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _problems(schema: dict[str, Any], value: Any, at: str = "$") -> list[str]:
    """What in `value` the schema does not allow (the keywords the document uses; KEYWORDS checks that)."""
    if "$ref" in schema:
        return _problems(_resolve(schema["$ref"]), value, at)
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not _problems(s, value, at)]
        return [] if len(matching) == 1 else [f"{at}: matches {len(matching)} of oneOf"]
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    kind = "null" if value is None else names[type(value)]
    if kinds and kind not in kinds and not (kind == "integer" and "number" in kinds):
        return [f"{at}: {kind} is not {kinds}"]
    found = []
    if ("enum" in schema and value not in schema["enum"]) or ("const" in schema and value != schema["const"]):
        found.append(f"{at}: {value!r} is not allowed")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        found.append(f"{at}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, int) and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        found.append(f"{at}: {value} is out of bounds")
    if isinstance(value, list):
        found += [p for i, v in enumerate(value) for p in _problems(schema.get("items", {}), v, f"{at}[{i}]")]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [f"{at}: {name} is missing" for name in schema.get("required", []) if name not in value]
        if schema.get("additionalProperties") is False:
            found += [f"{at}: {name} is not in the schema" for name in value if name not in properties]
        found += [p for n, v in value.items() if n in properties for p in _problems(properties[n], v, f"{at}.{n}")]
    return found


def test_the_document_is_openapi_3_1_in_structure() -> None:
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["title"] and DOC["info"]["version"]
    ids = [op["operationId"] for _, _, op in _operations()]
    assert len(ids) == len(set(ids))
    for method, path, op in _operations():
        assert path.startswith("/") and op["responses"], (method, path)
        assert all(re.fullmatch(r"[1-5][0-9][0-9]", code) for code in op["responses"]), (method, path)
        assert all(r["description"] for r in op["responses"].values()), (method, path)
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"{(\w+)}", path)), (method, path)
        assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")
        for scheme in (name for need in op.get("security", []) for name in need):
            assert scheme in DOC["components"]["securitySchemes"]
    for ref in _refs(DOC):
        assert _resolve(ref) is not None
    json.dumps(DOC)  # plain JSON values only


def test_the_schemas_use_only_the_keywords_checked_here_and_their_patterns_compile() -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                assert key in KEYWORDS, key
                if key == "properties":
                    [walk(v) for v in value.values()]
                elif key in ("items", "additionalProperties") and isinstance(value, dict):
                    walk(value)
                elif key == "oneOf":
                    [walk(v) for v in value]
                elif key == "pattern":
                    re.compile(value)

    for schema in DOC["components"]["schemas"].values():
        walk(schema)


def test_the_document_has_every_route_the_app_serves_and_no_other() -> None:
    assert {(method, path) for method, path, _ in _operations()} == set(ROUTES)


def test_every_documented_route_is_served() -> None:
    app = _app(FakeDesk())
    for method, path in ROUTES:
        target = path.replace("{sku}", "phone-x").replace("{token}", "tok-1")
        ((status, body),) = call(app, Request(method, target, b"{}"))
        assert not (status == 404 and "no route" in str(body)) and status != 405, (method, path, status, body)


def test_the_status_and_decision_tables_are_documented() -> None:
    purchase = DOC["paths"]["/purchase"]["post"]["responses"]
    assert {str(s) for s in PURCHASE_STATUS.values()} <= set(purchase)
    schemas = DOC["components"]["schemas"]
    assert schemas["PurchaseAnswer"]["properties"]["status"]["enum"] == [s.value for s in PurchaseStatus]
    assert schemas["DecisionAnswer"]["properties"]["decision"]["enum"] == [d.name.lower() for d in Decision]
    for route in ("/orders/{token}/cancel", "/orders/{token}/pay"):
        responses = DOC["paths"][route]["post"]["responses"]
        for decision, status in DECISION_STATUS.items():
            assert decision.name.lower() in responses[str(status)]["description"]
    assert "401" in DOC["paths"]["/orders/{token}/pay"]["post"]["responses"]


def _documented(method: str, path: str, status: int, body: Any) -> list[str]:
    """What in an answer the document does not allow for its route and status."""
    operation = DOC["paths"][path][method.lower()]
    response = operation["responses"].get(str(status))
    if response is None:
        return [f"{method} {path}: {status} is not documented"]
    return _problems(response["content"]["application/json"]["schema"], body)


def _signed(payment_id: str, ts_ms: int | None = None) -> Request:
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    body = json.dumps({"sku": "phone-x", "token": "tok-1", "payment_id": payment_id, "ts_ms": ts}).encode()
    return Request("POST", "/orders/tok-1/pay", body, {"x-flashsale-signature": sign(SECRET, body)})


_PURCHASE = json.dumps({"sku": "sku-1", "user_id": "u1", "qty": 1, "token": "tok-1"}).encode()
_CANCEL = json.dumps({"sku": "phone-x", "user_id": "u1", "request_id": "req-1"}).encode()
EXCHANGES = [
    ("/purchase", Request("POST", "/purchase", _PURCHASE)),
    ("/purchase", Request("POST", "/purchase", b"{not json")),
    ("/purchase", Request("POST", "/purchase", b'{"sku": "sku-1"}')),
    ("/orders/{token}", Request("GET", "/orders/tok-1?sku=phone-x")),
    ("/orders/{token}", Request("GET", "/orders/tok-9?sku=plain-y")),
    ("/orders/{token}", Request("GET", "/orders/tok-2?sku=phone-x")),
    ("/orders/{token}", Request("GET", "/orders/tok-1")),
    ("/orders/{token}/cancel", Request("POST", "/orders/tok-1/cancel", _CANCEL.replace(b"u1", b"u2"))),
    ("/orders/{token}/cancel", Request("POST", "/orders/tok-1/cancel", _CANCEL)),
    ("/orders/{token}/cancel", Request("POST", "/orders/tok-2/cancel", _CANCEL)),
    ("/orders/{token}/cancel", Request("POST", "/orders/tok-1/cancel", b"[]")),
    ("/orders/{token}/pay", _signed("pay-1")),
    ("/orders/{token}/pay", _signed("pay-2", ts_ms=1)),
    ("/orders/{token}/pay", Request("POST", "/orders/tok-1/pay", b"{}")),
    ("/stock/{sku}", Request("GET", "/stock/phone-x#0")),
    ("/healthz", Request("GET", "/healthz")),
    ("/readyz", Request("GET", "/readyz")),
]


@pytest.mark.parametrize(("path", "request_"), EXCHANGES)
def test_the_apps_answers_match_the_document(path: str, request_: Request) -> None:
    ((status, body),) = call(_app(FakeDesk()), request_)
    assert _documented(request_.method, path, status, body) == []


@pytest.mark.parametrize("decision", list(Decision))
def test_every_decisions_answer_matches_the_document(decision: Decision) -> None:
    ((status, body),) = call(_app(FakeDesk(forced=decision)), _signed("pay-1"))
    assert _documented("POST", "/orders/{token}/pay", status, body) == []


def test_the_app_serves_the_document() -> None:
    ((status, body),) = call(_app(None), Request("GET", "/openapi.json"))
    assert status == 200 and body == json.loads(json.dumps(DOC))


def test_the_validator_here_catches_what_it_should() -> None:
    order = {"token": "t", "sku": "s", "user_id": "u", "qty": 1, "state": "awaiting", "due_ms": None, "decided_ms": 1}
    schema = {"$ref": "#/components/schemas/Order"}
    assert _problems(schema, order) == []
    assert _problems(schema, {**order, "state": "lost"}) and _problems(schema, {**order, "qty": 0})
    assert _problems(schema, {**order, "extra": 1}) and _problems(schema, {**order, "sku": "a b"})
    assert _problems(schema, {k: v for k, v in order.items() if k != "due_ms"})


def test_a_stock_view_matches_the_document() -> None:
    part = PartitionView("hot-1#0", 40, 10, 50, 100, 0, 1, "127.0.0.1:7000")
    view = StockView("hot-1", 0, 100, 2, False, 50, 50, 0, 0, 0, 50, 1, pool=0, partitions=(part,), moving=0)
    assert _documented("GET", "/stock/{sku}", 200, json.loads(orjson.dumps(asdict(view)))) == []


def test_a_signing_time_the_json_parser_cannot_hold_as_an_integer_is_outside_the_document() -> None:
    # orjson reads an integer past 64 bits as a float, which the producer refuses (422): the document
    # must not promise it, and a time before the epoch is no signing time either.
    pay = {"$ref": "#/components/schemas/PayRequest"}
    now = {"sku": "phone-x", "token": "tok-1", "payment_id": "pay-1", "ts_ms": int(time.time() * 1000)}
    assert _problems(pay, now) == []
    assert _problems(pay, {**now, "ts_ms": 2**64}) and _problems(pay, {**now, "ts_ms": -1})
    assert isinstance(orjson.loads(str(2**64)), float)
    assert _problems(pay, {**now, "ts_ms": 2**63 - 1}) == [] and isinstance(orjson.loads(str(2**63 - 1)), int)
