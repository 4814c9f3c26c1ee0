"""The OpenAPI 3.1 document of the producer's HTTP API, served at GET /openapi.json.

Built from the tables the code answers by (statuses, decisions, order states, id patterns, quantity
bounds), so the document follows them; tests/unit/test_openapi.py checks its structure, that it
describes exactly the routes the app serves, and the app's answers against its schemas.
"""

from __future__ import annotations

import re
from typing import Any

from flashsale import __version__
from flashsale import constants as c
from flashsale.models import PurchaseStatus
from flashsale.payments import SIGNATURE_HEADER
from flashsale.records import Decision
from flashsale.service.http_body import MAX_BODY
from flashsale.service.orders_http import HTTP_STATUS as DECISION_STATUS
from flashsale.service.orders_http import ORDER_STATES

Schema = dict[str, Any]

_DESCRIPTION = """\
Sell a hot item's stock to a flood of buyers: POST /purchase deducts in Redis inside a RocketMQ
transactional message; the deduction reaches MySQL through a consumer. A SKU loaded with a payment
deadline sells orders that await payment: GET /orders/{token} shows one, its buyer may cancel it, and
the payment service confirms its payment with a signed POST /orders/{token}/pay.

Every answer is JSON but /metrics. Every error names what was wrong and what to do: {"error": "..."}
(a purchase answers its own shape, with status `invalid` or `error`). A wrong method answers 405,
naming the method to use in `Allow` too, and an unknown path 404, both {"error": "..."}.
"""


def _pattern(pattern: re.Pattern[str]) -> str:
    """A Python pattern applied with fullmatch, anchored for JSON Schema (which searches)."""
    return f"^{pattern.pattern}$"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    out = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        out["enum"] = [*schema["enum"], None]
    return out


def _answer(properties: dict[str, Schema], *, optional: tuple[str, ...] = ()) -> Schema:
    """An answer's schema: every property listed (and required unless optional), nothing else."""
    required = [name for name in properties if name not in optional]
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


def _request(properties: dict[str, Schema]) -> Schema:
    """A request body's schema: every property required (fields the code does not read are ignored)."""
    return {"type": "object", "required": list(properties), "properties": properties}


_SKU: Schema = {"type": "string", "pattern": _pattern(c.ID_PATTERN), "description": "a SKU, as loaded by `stock set`"}
_USER: Schema = {"type": "string", "pattern": _pattern(c.ID_PATTERN), "description": "the buyer"}
_TOKEN: Schema = {
    "type": "string",
    "pattern": _pattern(c.TOKEN_PATTERN),
    "description": "the purchase's idempotency token (a client-side UUID or ULID); unique within its SKU",
}
_ID: Schema = {"type": "string", "pattern": _pattern(c.TOKEN_PATTERN)}
_QTY: Schema = {"type": "integer", "minimum": 1, "maximum": c.MAX_QTY}
_COUNT: Schema = {"type": "integer", "minimum": 0}
#: JSON parsers read integers past 64 bits as floats (orjson among them): a time in ms stays within int64.
_MS: Schema = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1, "description": "milliseconds since the epoch"}
_STATE: Schema = {"type": "string", "enum": list(ORDER_STATES)}


def _purchase_schemas() -> dict[str, Schema]:
    return {
        "PurchaseRequest": _request({"sku": _SKU, "user_id": _USER, "qty": _QTY, "token": _TOKEN}),
        "PurchaseAnswer": _answer(
            {
                "status": {"type": "string", "enum": [s.value for s in PurchaseStatus]},
                "token": _nullable({"type": "string"}),
                "remaining": _nullable(_COUNT),
                "message_id": _nullable({"type": "string", "description": "the deduction's message"}),
                "message": {"type": "string", "description": "why, for invalid, pending and error"},
            },
            optional=("message",),
        ),
    }


def _stock_schemas() -> dict[str, Schema]:
    counts = "stock initial per_user_limit deducted_qty deducted_count returned_qty returned_count".split()
    counts += ["fenced_count", "log_entries", "loaded_ms", "moving", "added_qty"]
    part_counts = ("active", "standby", "deducted_qty", "refilled_qty", "drained_qty", "switches")
    return {
        "StockView": _answer(
            {
                "sku": _SKU,
                "sold_out": {"type": "boolean"},
                **dict.fromkeys(counts, _COUNT),
                "pool": _nullable({**_COUNT, "description": "a partitioned SKU: the units not in a partition"}),
                "ticket": _nullable(
                    {
                        **_COUNT,
                        "description": "the load Redis holds, numbered by `stock set` (0: none; null: before numbers)",
                    }
                ),
                "partitions": {"type": "array", "items": _ref("Partition")},
            }
        ),
        "Partition": _answer(
            {
                "part": {"type": "string", "pattern": _pattern(c.PART_PATTERN)},
                **dict.fromkeys(part_counts, _COUNT),
                "node": {"type": "string"},
                "closed": {"type": "boolean"},
            }
        ),
    }


def _order_schemas() -> dict[str, Schema]:
    return {
        "Order": _answer(
            {
                "token": _TOKEN,
                "sku": _SKU,
                "user_id": _USER,
                "qty": _QTY,
                "state": {**_STATE, "description": "final: the SKU takes no payments (final on acceptance)"},
                "due_ms": _nullable({**_MS, "description": "the payment deadline, on Redis's clock"}),
                "decided_ms": _nullable({**_MS, "description": "when it was paid, cancelled or expired"}),
            }
        ),
        "CancelRequest": _request(
            {"sku": _SKU, "user_id": _USER, "request_id": {**_ID, "description": "the same on a retry"}}
        ),
        "PayRequest": _request(
            {
                "sku": _SKU,
                "token": {
                    **_TOKEN,
                    "description": "the order it pays: the path's token (the signature covers the body)",
                },
                "payment_id": {**_ID, "description": "the payment service's id of the payment; the same on a retry"},
                "ts_ms": {**_MS, "description": "when it was signed; refused past FLASHSALE_PAYMENT_MAX_AGE_S"},
            }
        ),
        "DecisionAnswer": _answer(
            {
                "decision": {"type": "string", "enum": [d.name.lower() for d in Decision]},
                "token": _TOKEN,
                "state": _nullable({**_STATE, "description": "where the order stands now (null: no order)"}),
                "message_id": _nullable({"type": "string", "description": "the message carrying it to MySQL"}),
                "error": {"type": "string", "description": "what to do, when the status is not 200"},
            },
            optional=("error",),
        ),
    }


def _other_schemas() -> dict[str, Schema]:
    return {
        "Error": _answer({"error": {"type": "string", "description": "what was wrong and what to do"}}),
        "Health": _answer({"status": {"type": "string", "const": "ok"}}),
        "Readiness": _answer(
            {
                "status": {"type": "string", "enum": ["ready", "unavailable"]},
                "redis": {"type": "string", "description": "ok, or why not"},
                "broker": {"type": "string", "description": "ok, or why not"},
            }
        ),
    }


def _json(description: str, *schemas: str) -> Schema:
    schema = _ref(schemas[0]) if len(schemas) == 1 else {"oneOf": [_ref(s) for s in schemas]}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: str) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


_TOKEN_PARAM: Schema = {"name": "token", "in": "path", "required": True, "schema": _TOKEN}


def _purchase_path() -> Schema:
    answer = "PurchaseAnswer"
    return {
        "post": {
            "operationId": "purchase",
            "tags": ["purchase"],
            "summary": "Buy qty units of a SKU; the same token asked again hears the first answer",
            "requestBody": _body("PurchaseRequest"),
            "responses": {
                "200": _json("accepted, sold_out, duplicate or limit_exceeded", answer),
                "202": _json("pending: the outcome is settled by the broker's check; ask again with the token", answer),
                "400": _json("invalid: the body is not a JSON object", answer),
                "404": _json("invalid: unknown SKU", answer),
                "413": _json(f"invalid: the body is larger than {MAX_BODY} bytes", answer),
                "422": _json("invalid: a field is missing or wrong (message names it)", answer),
                "503": _json("error: nothing was deducted (overloaded, or a server down); try again", answer),
            },
        }
    }


def _stock_path() -> Schema:
    return {
        "get": {
            "operationId": "stock",
            "tags": ["purchase"],
            "summary": "A SKU's stock and counts in Redis",
            "parameters": [{"name": "sku", "in": "path", "required": True, "schema": _SKU}],
            "responses": {
                "200": _json("the SKU's stock", "StockView"),
                "404": _json("the SKU is not loaded", "Error"),
                "422": _json("the sku is malformed (a partition's name, sku#0, is no SKU)", "Error"),
                "503": _json("Redis cannot say now", "Error"),
            },
        }
    }


def _show_path() -> Schema:
    return {
        "get": {
            "operationId": "showOrder",
            "tags": ["orders"],
            "summary": "Where the order of a token stands",
            "parameters": [
                _TOKEN_PARAM,
                {"name": "sku", "in": "query", "required": True, "schema": _SKU, "description": "tokens are per SKU"},
            ],
            "responses": {
                "200": _json("the order", "Order"),
                "404": _json("no purchase of that token stands, or the service sells without orders", "Error"),
                "422": _json("the sku is missing, or the sku or token is malformed", "Error"),
                "503": _json("Redis cannot say now; ask again", "Error"),
            },
        }
    }


def _decision_responses(errors: dict[str, str]) -> dict[str, Schema]:
    """Per status: the decisions answered with it, and the route's own errors."""
    by_status: dict[int, list[str]] = {}
    for decision, status in DECISION_STATUS.items():
        by_status.setdefault(status, []).append(decision.name.lower())
    responses: dict[str, Schema] = {}
    for status in sorted({*by_status, *map(int, errors)}):
        said = [f"decision {', '.join(by_status[status])}"] if status in by_status else []
        said += [errors[str(status)]] if str(status) in errors else []
        schemas = (["DecisionAnswer"] if status in by_status else []) + (["Error"] if str(status) in errors else [])
        responses[str(status)] = _json("; or ".join(said), *schemas)
    return responses


_ORDER_ERRORS = {
    "400": "the body is not a JSON object",
    "404": "the service sells without orders",
    "413": "the body is too large",
    "422": "a field is missing or malformed",
    "503": "Redis or the broker cannot say now: retry with the same id, it hears the first answer",
}


def _cancel_path() -> Schema:
    return {
        "post": {
            "operationId": "cancelOrder",
            "tags": ["orders"],
            "summary": "The buyer gives an order awaiting payment up: its units go back on sale",
            "parameters": [_TOKEN_PARAM],
            "requestBody": _body("CancelRequest"),
            "responses": _decision_responses(_ORDER_ERRORS),
        }
    }


def _pay_path() -> Schema:
    errors = {
        **_ORDER_ERRORS,
        "401": f"{SIGNATURE_HEADER} missing or not the body's, or ts_ms too far from the producer's clock",
        "403": "the signed body's token is not the path's: it is the payment of another order",
        "503": f"{_ORDER_ERRORS['503']}; or payments are not configured (FLASHSALE_PAYMENT_SECRET)",
    }
    return {
        "post": {
            "operationId": "payOrder",
            "tags": ["orders"],
            "summary": "The payment service confirms an order's payment (signed); after the deadline it expires",
            "parameters": [_TOKEN_PARAM],
            "security": [{"paymentSignature": []}],
            "requestBody": _body("PayRequest"),
            "responses": _decision_responses(errors),
        }
    }


def _probe(operation_id: str, summary: str, responses: dict[str, Schema]) -> Schema:
    return {"get": {"operationId": operation_id, "tags": ["operations"], "summary": summary, "responses": responses}}


def _probe_paths() -> dict[str, Schema]:
    return {
        "/healthz": _probe("healthz", "Liveness: the process answers", {"200": _json("alive", "Health")}),
        "/readyz": _probe(
            "readyz",
            "Readiness: Redis answers and the broker knows this producer",
            {"200": _json("ready", "Readiness"), "503": _json("not ready; each server says why", "Readiness")},
        ),
        "/metrics": _probe(
            "metrics",
            "Prometheus metrics",
            {"200": {"description": "the text exposition format", "content": {"text/plain": {"schema": {}}}}},
        ),
        "/openapi.json": _probe(
            "openapi",
            "This document",
            {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}},
        ),
    }


def document() -> dict[str, Any]:
    """The whole document, as plain JSON values."""
    signature = (
        "`sha256=` and the hex HMAC-SHA256 of the exact body bytes under FLASHSALE_PAYMENT_SECRET "
        "(flashsale.payments.sign)"
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "flashsale producer", "version": __version__, "description": _DESCRIPTION},
        "tags": [{"name": "purchase"}, {"name": "orders"}, {"name": "operations"}],
        "paths": {
            "/purchase": _purchase_path(),
            "/stock/{sku}": _stock_path(),
            "/orders/{token}": _show_path(),
            "/orders/{token}/cancel": _cancel_path(),
            "/orders/{token}/pay": _pay_path(),
            **_probe_paths(),
        },
        "components": {
            "schemas": {**_purchase_schemas(), **_stock_schemas(), **_order_schemas(), **_other_schemas()},
            "securitySchemes": {
                "paymentSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": SIGNATURE_HEADER,
                    "description": signature,
                }
            },
        },
    }
