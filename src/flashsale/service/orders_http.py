"""The order routes of the producer's HTTP app: where an order awaiting payment stands, a buyer's cancel,
and the payment service's signed confirmation.

    GET  /orders/{token}?sku=SKU      where the order of `token` stands
    POST /orders/{token}/cancel       {"sku", "user_id", "request_id"}: its buyer gives it up
    POST /orders/{token}/pay          {"sku", "payment_id", "ts_ms"}, signed (flashsale/payments.py)

Each decision is the order desk's (pipeline/orders.py); this module only reads requests and words the
answers. A token is unique within its SKU only, so every route names the SKU. A retry with the same
request id (or payment id) hears the first answer, so a client that got no answer, or a 503, asks again
with it. A payment whose signature or time is wrong is refused before the desk is asked anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson

from flashsale import constants as c
from flashsale.config import PaymentSettings
from flashsale.errors import FlashSaleError, InvalidInput
from flashsale.models import require_id
from flashsale.payments import SIGNATURE_HEADER, verify
from flashsale.pipeline.orders import FINAL, OrderAnswer, describe
from flashsale.records import Decision, LogEntry
from flashsale.service.http_body import JSON, MAX_BODY, Headers, read_body, wrong_method

Answer = tuple[int, bytes]

#: HTTP status per decision: decided now or before is 200; the rest say what a client should do.
HTTP_STATUS = {
    Decision.PAID: 200,
    Decision.CANCELLED: 200,
    Decision.EXPIRED: 200,
    Decision.ALREADY_PAID: 200,
    Decision.ALREADY_CANCELLED: 200,
    Decision.ALREADY_EXPIRED: 200,
    Decision.NOT_YOURS: 403,
    Decision.NO_ORDER: 404,
    Decision.FINAL: 409,
    Decision.NOT_DUE: 409,
    Decision.FROZEN: 503,
    Decision.INVALID_ACTION: 422,
    Decision.FENCED: 503,
}
#: What a client should know of a decision answered with an error status ({id} names its retry id).
_REASONS = {
    Decision.NOT_YOURS: "the order is another user's: only its buyer may cancel it; nothing changed",
    Decision.NO_ORDER: "no purchase of this token stands for this sku: check both; nothing changed",
    Decision.FINAL: "this sku takes no payments: its orders were final on acceptance; nothing changed",
    Decision.NOT_DUE: "the order's payment deadline has not passed yet; nothing changed",
    Decision.FROZEN: "the sku is being loaded again; nothing changed: ask again in a moment with the same {id}",
    Decision.INVALID_ACTION: "the desk does not know this action; nothing changed",
    Decision.FENCED: "the decision was rolled back before it ran; nothing changed: ask again with the same {id}",
}
#: Where an order stands: awaiting payment, decided, or final on acceptance (a SKU without a deadline).
ORDER_STATES = ("awaiting", "paid", "cancelled", "expired", FINAL)
NO_ORDERS = "this service sells without orders: order routes are served by the flashsale producer"
NOT_CONFIGURED = f"payments are not configured: set {c.ENV_PREFIX}PAYMENT_SECRET"
_SKU_REQUIRED = "the sku is required: a token is unique only within its SKU; ask GET /orders/{token}?sku=SKU"
#: A header the server cannot read as text (not ASCII) reaches the app as no header at all.
_UNSIGNED = f"missing {SIGNATURE_HEADER} (or not ASCII): sign the body (sha256=<hex HMAC>); nothing was decided"
_CANCEL_FIELDS = ("sku", "user_id", "request_id")
_PAY_FIELDS = ("sku", "token", "payment_id", "ts_ms")


class OrderDeskLike(Protocol):
    """What the routes need of the order desk (pipeline/orders.py OrderDesk)."""

    async def show(self, sku: str, token: str) -> LogEntry | None: ...

    async def decide(self, sku: str, token: str, action: str, *, decision_id: str, user: str = "") -> OrderAnswer: ...


class Refused(Exception):
    """A request answered with an error before (or instead of) a decision."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def state_of(entry: LogEntry | None) -> str | None:
    """The order state an entry shows (see pipeline/orders.py describe)."""
    return None if entry is None else (entry.order or FINAL)


def error(status: int, reason: str) -> Answer:
    return status, orjson.dumps({"error": reason})


class OrderRoutes:
    """Answers every request under /orders/ (the app hands them over as they come)."""

    def __init__(
        self, desk: OrderDeskLike | None, payments: PaymentSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self._desk = desk
        self._secret = payments.secret
        self._max_age_ms = int(payments.max_age_s * 1000)
        self._clock = clock

    async def handle(self, scope: Any, proto: Any) -> tuple[int, bytes, Headers]:
        if self._desk is None:
            return (*error(404, NO_ORDERS), JSON)
        # The server hands the path percent-decoded: decoding it again would read t%2530 as t0.
        token, _, action = scope.path.removeprefix("/orders/").partition("/")
        if action not in ("", "cancel", "pay"):
            return (*error(404, f"no route {scope.path}: use /orders/{{token}}, /cancel or /pay"), JSON)
        allowed = "POST" if action else "GET"
        if scope.method != allowed:
            return wrong_method(allowed, f"/orders/{{token}}/{action}" if action else "/orders/{token}?sku=SKU")
        try:
            return (*await self._answer(self._desk, scope, proto, token, action), JSON)
        except Refused as exc:
            return (*error(exc.status, exc.reason), JSON)

    async def _answer(self, desk: OrderDeskLike, scope: Any, proto: Any, token: str, action: str) -> Answer:
        if not action:
            return await self._show(desk, token, scope.query_string)
        raw = await read_body(scope, proto)
        if action == "cancel":
            return await self._cancel(desk, token, raw)
        return await self._pay(desk, token, raw, scope.headers.get(SIGNATURE_HEADER.lower()))

    async def _show(self, desk: OrderDeskLike, token: str, query: str) -> Answer:
        skus = parse_qs(query, keep_blank_values=True).get("sku", [])
        if len(skus) != 1 or not skus[0]:
            raise Refused(422, _SKU_REQUIRED if not any(skus) else "give the sku once: ?sku=SKU")
        sku = _checked(skus[0], "sku")
        _checked(token, "token", c.TOKEN_PATTERN)
        try:
            entry = await desk.show(sku, token)
        except FlashSaleError as exc:
            raise Refused(503, f"{exc.message}; ask again in a moment") from exc
        if entry is None:
            raise Refused(404, f"no purchase of token {token!r} stands for sku {sku!r}: check both")
        return 200, orjson.dumps(describe(entry))

    async def _cancel(self, desk: OrderDeskLike, token: str, raw: bytes | None) -> Answer:
        payload = _fields(_size_checked(raw), _CANCEL_FIELDS)
        sku, user = _checked(payload["sku"], "sku"), _checked(payload["user_id"], "user_id")
        request_id = _checked(payload["request_id"], "request_id", c.TOKEN_PATTERN)
        _checked(token, "token", c.TOKEN_PATTERN)
        return await _decide(desk, sku, token, "cancel", request_id, "request_id", user)

    async def _pay(self, desk: OrderDeskLike, token: str, raw: bytes | None, signature: str | None) -> Answer:
        if not self._secret:
            raise Refused(503, NOT_CONFIGURED)
        body = _size_checked(raw)
        if signature is None:
            raise Refused(401, _UNSIGNED)
        if not verify(self._secret, body, signature):
            raise Refused(
                401, f"{SIGNATURE_HEADER} does not match the body: sign the exact bytes sent; nothing was decided"
            )
        payload = _fields(body, _PAY_FIELDS)
        self._check_fresh(payload["ts_ms"])
        sku = _checked(payload["sku"], "sku")
        payment_id = _checked(payload["payment_id"], "payment_id", c.TOKEN_PATTERN)
        _checked(token, "token", c.TOKEN_PATTERN)
        if payload["token"] != token:
            # The signature vouches for the body alone: a confirmation of one order, sent to another's URL,
            # must not pay that one too.
            raise Refused(
                403, f"the signed body is the payment of order {payload['token']!r}, not {token!r}; nothing was decided"
            )
        return await _decide(desk, sku, token, "pay", payment_id, "payment_id")

    def _check_fresh(self, ts_ms: object) -> None:
        """Refuse a confirmation signed too long ago (a replay) or too far ahead, on this producer's clock."""
        if isinstance(ts_ms, float) and ts_ms.is_integer():
            ts_ms = int(ts_ms)  # a whole number written 1.7e12 or 1700000000000.0 is still one (JSON Schema's integer)
        if isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
            raise Refused(422, f"ts_ms must be the time of signing in milliseconds since the epoch, got {ts_ms!r}")
        off_s = abs(int(self._clock() * 1000) - ts_ms) / 1000
        if off_s * 1000 > self._max_age_ms:
            raise Refused(
                401,
                f"stale confirmation: ts_ms is {off_s:.0f} s from the producer's clock, more than "
                f"{c.ENV_PREFIX}PAYMENT_MAX_AGE_S={self._max_age_ms / 1000:g}; sign it again with a fresh ts_ms "
                "and the same payment_id; nothing was decided",
            )


async def _decide(
    desk: OrderDeskLike, sku: str, token: str, action: str, decision_id: str, id_name: str, user: str = ""
) -> Answer:
    try:
        answer = await desk.decide(sku, token, action, decision_id=decision_id, user=user)
    except InvalidInput as exc:
        raise Refused(422, str(exc)) from exc
    except FlashSaleError as exc:  # ServiceUnavailable above all: the decision may or may not have run
        raise Refused(503, f"{exc.message}; retry with the same {id_name}: it hears the first answer") from exc
    status = HTTP_STATUS[answer.decision]
    body: dict[str, Any] = {
        "decision": answer.decision.name.lower(),
        "token": token,
        "state": state_of(answer.entry),
        "message_id": answer.message_id,
    }
    if status != 200:
        body["error"] = _REASONS[answer.decision].format(id=id_name)
    return status, orjson.dumps(body)


def _size_checked(raw: bytes | None) -> bytes:
    if raw is None:
        raise Refused(413, f"the body is larger than {MAX_BODY} bytes")
    return raw


def _fields(raw: bytes, names: tuple[str, ...]) -> dict[str, Any]:
    """The body as a JSON object holding `names` (400 when it is not JSON, 422 when one is missing)."""
    shape = "{" + ", ".join(f'"{n}"' for n in names) + "}"
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Refused(400, f"the body is not valid JSON; send {shape}") from None
    if not isinstance(payload, dict):
        raise Refused(400, f"the body must be a JSON object: {shape}")
    missing = [n for n in names if n not in payload]
    if missing:
        raise Refused(422, f"missing field(s): {', '.join(missing)}; send {shape}")
    return payload


def _checked(value: object, name: str, pattern: Any = c.ID_PATTERN) -> str:
    try:
        return require_id(value, name, pattern)
    except InvalidInput as exc:
        raise Refused(422, str(exc)) from exc
