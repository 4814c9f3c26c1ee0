from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from flashsale.config import PaymentSettings, Settings
from flashsale.errors import InvalidInput, ServiceUnavailable
from flashsale.payments import sign, verify
from flashsale.pipeline.orders import ACTIONS, OrderAnswer
from flashsale.pipeline.producer import PurchaseService
from flashsale.records import Decision, LogEntry
from flashsale.service.http_app import MAX_BODY, HttpApp
from flashsale.service.metrics import Metrics
from flashsale.service.orders_http import HTTP_STATUS, NO_ORDERS, NOT_CONFIGURED, OrderDeskLike
from tests.unit.fakes import FakeBus, FakeStock
from tests.unit.rsgi import Request, call

SECRET = "s3cret-shared-with-payments"
DUE_MS = 1_900_000_000_000
AWAITING = LogEntry(
    "tok-1", "deducted", "phone-x", "u1", 2, 1_800_000_000_000, "msg-0", order="awaiting", due_ms=DUE_MS
)
FINAL = LogEntry("tok-9", "deducted", "plain-y", "u1", 1, 1_800_000_000_000, "msg-0")


@dataclass
class FakeDesk:
    """The order desk's rules in miniature: the first decision on an awaiting order wins; a decision id
    asked again hears its first answer; a cancel by another user changes nothing."""

    orders: dict[tuple[str, str], LogEntry] = field(
        default_factory=lambda: {("phone-x", "tok-1"): AWAITING, ("plain-y", "tok-9"): FINAL}
    )
    forced: Decision | None = None
    error: Exception | None = None
    calls: list[tuple[str, ...]] = field(default_factory=list)
    _first: dict[str, OrderAnswer] = field(default_factory=dict)

    async def show(self, sku: str, token: str) -> LogEntry | None:
        self.calls.append(("show", sku, token))
        if self.error:
            raise self.error
        return self.orders.get((sku, token))

    async def decide(self, sku: str, token: str, action: str, *, decision_id: str, user: str = "") -> OrderAnswer:
        self.calls.append((action, sku, token, decision_id, user))
        if self.error:
            raise self.error
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action {action!r}")
        entry = self.orders.get((sku, token))
        if self.forced is not None:
            return OrderAnswer(self.forced, entry)
        if decision_id in self._first:
            return self._first[decision_id]
        if entry is None or entry.order is None:
            return OrderAnswer(Decision.NO_ORDER if entry is None else Decision.FINAL, entry)
        if entry.order != "awaiting":
            return OrderAnswer(Decision[f"ALREADY_{entry.order.upper()}"], entry)
        if action == "cancel" and user != entry.user:
            return OrderAnswer(Decision.NOT_YOURS, entry)
        state = {"pay": "paid", "cancel": "cancelled", "expire": "expired"}[action]
        message_id = f"msg-{len(self._first) + 1}"
        after = entry._replace(order=state, decided_ms=DUE_MS - 1, decided_by=message_id)
        self.orders[(sku, token)] = after
        self._first[decision_id] = OrderAnswer(Decision[state.upper()], after, message_id)
        return self._first[decision_id]

    @property
    def decisions(self) -> list[tuple[str, ...]]:
        return [call for call in self.calls if call[0] != "show"]


def _app(desk: OrderDeskLike | None, secret: str = SECRET) -> HttpApp:
    stock = FakeStock()
    service = PurchaseService(stock, FakeBus(), "ns-deductions")
    return HttpApp(service, stock, Metrics(), max_in_flight=8, orders=desk, payments=PaymentSettings(secret=secret))


def _cancel(token: str = "tok-1", user: str = "u1", request_id: str = "req-1", sku: str = "phone-x") -> Request:
    body = json.dumps({"sku": sku, "user_id": user, "request_id": request_id}).encode()
    return Request("POST", f"/orders/{token}/cancel", body)


def _payment(payment_id: str = "pay-1", *, ts_ms: int | None = None, token: str = "tok-1") -> tuple[str, bytes]:
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    body = {"sku": "phone-x", "token": token, "payment_id": payment_id, "ts_ms": ts}
    return f"/orders/{token}/pay", json.dumps(body).encode()


def _pay(payment_id: str = "pay-1", *, ts_ms: int | None = None, secret: str = SECRET) -> Request:
    path, body = _payment(payment_id, ts_ms=ts_ms)
    return Request("POST", path, body, {"x-flashsale-signature": sign(secret, body)})


# --- GET /orders/{token} -------------------------------------------------------------------------------


def test_an_order_awaiting_payment_shows_its_state_and_deadline() -> None:
    ((status, body),) = call(_app(FakeDesk()), Request("GET", "/orders/tok-1?sku=phone-x"))
    assert status == 200
    assert body == {
        "token": "tok-1",
        "sku": "phone-x",
        "user_id": "u1",
        "qty": 2,
        "state": "awaiting",
        "due_ms": DUE_MS,
        "decided_ms": None,
    }


def test_an_order_of_a_sku_without_a_deadline_shows_final() -> None:
    ((status, body),) = call(_app(FakeDesk()), Request("GET", "/orders/tok-9?sku=plain-y"))
    assert (status, body["state"], body["due_ms"]) == (200, "final", None)


def test_no_purchase_of_the_token_answers_404_naming_both() -> None:
    ((status, body),) = call(_app(FakeDesk()), Request("GET", "/orders/tok-1?sku=other"))
    assert status == 404
    assert "tok-1" in body["error"] and "other" in body["error"]


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("/orders/tok-1", "unique only within its SKU"),
        ("/orders/tok-1?sku=", "unique only within its SKU"),
        ("/orders/tok-1?sku=a&sku=b", "give the sku once"),
        ("/orders/tok-1?sku=bad%20sku", "sku must be"),
        ("/orders/bad%7Btoken%7D?sku=phone-x", "token must be"),
    ],
)
def test_a_missing_or_malformed_sku_or_token_answers_422_unasked(target: str, said: str) -> None:
    desk = FakeDesk()
    ((status, body),) = call(_app(desk), Request("GET", target))
    assert status == 422 and said in body["error"]
    assert desk.calls == []


def test_a_token_is_read_as_the_server_decoded_it_never_decoded_again() -> None:
    # granian hands the path percent-decoded: a client that sent tok%252D1 asked for "tok%2D1", not tok-1.
    desk = FakeDesk()
    ((status, body),) = call(_app(desk), Request("GET", "/orders/tok%2D1?sku=phone-x"))
    assert status == 422 and "'tok%2D1'" in body["error"]
    assert desk.calls == []


def test_redis_down_while_showing_answers_503() -> None:
    desk = FakeDesk(error=ServiceUnavailable("Redis", "127.0.0.1:1", "refused"))
    ((status, body),) = call(_app(desk), Request("GET", "/orders/tok-1?sku=phone-x"))
    assert status == 503 and "ask again" in body["error"]


def test_wrong_methods_and_unknown_order_paths_get_clear_errors() -> None:
    answers = call(
        _app(FakeDesk()),
        Request("POST", "/orders/tok-1?sku=phone-x"),
        Request("GET", "/orders/tok-1/cancel"),
        Request("PUT", "/orders/tok-1/pay"),
        Request("POST", "/orders/tok-1/refund"),
    )
    assert [status for status, _ in answers] == [405, 405, 405, 404]
    assert "GET /orders/{token}?sku=SKU" in answers[0][1]["error"]
    assert "POST /orders/{token}/cancel" in answers[1][1]["error"]
    assert all(set(body) == {"error"} for _, body in answers)


# --- POST /orders/{token}/cancel ----------------------------------------------------------------------


def test_the_buyer_cancels_and_a_retry_with_the_same_request_id_hears_the_same_answer() -> None:
    desk = FakeDesk()
    first, again, other = call(_app(desk), _cancel(), _cancel(), _cancel(request_id="req-2"))
    assert first == (200, {"decision": "cancelled", "token": "tok-1", "state": "cancelled", "message_id": "msg-1"})
    assert again == first
    assert other == (200, {"decision": "already_cancelled", "token": "tok-1", "state": "cancelled", "message_id": None})
    assert desk.decisions[0] == ("cancel", "phone-x", "tok-1", "req-1", "u1")


def test_a_cancel_by_another_user_answers_403_and_changes_nothing() -> None:
    desk = FakeDesk()
    (status, body), (_, shown) = call(_app(desk), _cancel(user="u2"), Request("GET", "/orders/tok-1?sku=phone-x"))
    assert (status, body["decision"], body["state"]) == (403, "not_yours", "awaiting")
    assert "only its buyer" in body["error"]
    assert shown["state"] == "awaiting"


@pytest.mark.parametrize("decision", list(Decision))
def test_every_decision_has_its_http_status(decision: Decision) -> None:
    ((status, body),) = call(_app(FakeDesk(forced=decision)), _cancel())
    assert status == HTTP_STATUS[decision]
    assert body["decision"] == decision.name.lower()
    assert ("error" in body) == (status != 200)


def test_the_status_table_covers_every_decision_as_specified() -> None:
    expected = {d: 200 for d in Decision if d.name.removeprefix("ALREADY_") in ("PAID", "CANCELLED", "EXPIRED")}
    expected |= {Decision.NOT_YOURS: 403, Decision.NO_ORDER: 404, Decision.FINAL: 409, Decision.NOT_DUE: 409}
    expected |= {Decision.FROZEN: 503, Decision.INVALID_ACTION: 422, Decision.FENCED: 503}
    assert expected == HTTP_STATUS


def test_cancelling_an_order_of_a_sku_without_a_deadline_answers_409_final() -> None:
    ((status, body),) = call(_app(FakeDesk()), _cancel(token="tok-9", sku="plain-y"))
    assert (status, body["decision"], body["state"]) == (409, "final", "final")


def test_cancelling_a_token_without_a_purchase_answers_404_no_order() -> None:
    ((status, body),) = call(_app(FakeDesk()), _cancel(token="tok-2"))
    assert (status, body["decision"], body["state"]) == (404, "no_order", None)


@pytest.mark.parametrize(
    ("body", "status", "said"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"sku": "phone-x"}', 422, "missing field(s): user_id, request_id"),
        (b'{"sku": "phone-x", "user_id": "u 1", "request_id": "r"}', 422, "user_id must be"),
        (b'{"sku": "phone-x", "user_id": "u1", "request_id": 7}', 422, "request_id must be"),
        (b"x" * (MAX_BODY + 1), 413, "larger than"),
    ],
)
def test_a_bad_cancel_body_is_refused_unasked(body: bytes, status: int, said: str) -> None:
    desk = FakeDesk()
    ((answered, answer),) = call(_app(desk), Request("POST", "/orders/tok-1/cancel", body))
    assert answered == status and said in answer["error"]
    assert desk.calls == []


def test_an_unavailable_desk_answers_503_and_a_retry_with_the_same_request_id_decides_once() -> None:
    desk = FakeDesk(error=ServiceUnavailable("RocketMQ", "127.0.0.1:1", "down", reached=False))
    app = _app(desk)
    ((status, body),) = call(app, _cancel())
    assert status == 503 and "retry with the same request_id" in body["error"]
    desk.error = None
    first, again = call(app, _cancel(), _cancel())
    assert first[1]["decision"] == again[1]["decision"] == "cancelled"
    assert first[1]["message_id"] == again[1]["message_id"]


def test_the_desk_refusing_its_input_answers_422() -> None:
    desk = FakeDesk(error=InvalidInput("decision id must be 1-64 characters"))
    ((status, body),) = call(_app(desk), _cancel())
    assert status == 422 and "decision id" in body["error"]


# --- POST /orders/{token}/pay -------------------------------------------------------------------------


def test_a_signed_payment_pays_and_its_retry_hears_the_same_answer() -> None:
    desk = FakeDesk()
    first, again, other = call(_app(desk), _pay(), _pay(), _pay("pay-2"))
    assert first == (200, {"decision": "paid", "token": "tok-1", "state": "paid", "message_id": "msg-1"})
    assert again == first
    assert other[1]["decision"] == "already_paid"
    assert desk.decisions[0] == ("pay", "phone-x", "tok-1", "pay-1", "")


def test_a_payment_within_the_allowed_age_either_way_is_taken() -> None:
    now = int(time.time() * 1000)
    answers = call(_app(FakeDesk()), _pay("pay-1", ts_ms=now - 200_000), _pay("pay-2", ts_ms=now + 200_000))
    assert [body["decision"] for _, body in answers] == ["paid", "already_paid"]


def _refused(request: Request, *, secret: str = SECRET) -> tuple[int, str]:
    desk = FakeDesk()
    ((status, body),) = call(_app(desk, secret), request)
    assert desk.calls == []  # refused before the desk is asked anything
    assert set(body) == {"error"}
    return status, body["error"]


def test_a_forged_signature_is_refused_with_401() -> None:
    status, said = _refused(_pay(secret="guessed"))
    assert status == 401 and "does not match the body" in said


def test_a_payment_without_a_signature_is_refused_with_401() -> None:
    path, body = _payment()
    status, said = _refused(Request("POST", path, body))
    assert status == 401 and "missing X-Flashsale-Signature" in said


@pytest.mark.parametrize("header", ["", "sha256=", "sha256=zz", "md5=00", "garbage"])
def test_a_malformed_signature_is_refused_with_401(header: str) -> None:
    path, body = _payment()
    assert _refused(Request("POST", path, body, {"x-flashsale-signature": header}))[0] == 401


def test_a_signature_over_another_body_is_refused() -> None:
    path, body = _payment("pay-1")
    _, other = _payment("pay-2")
    status, said = _refused(Request("POST", path, body, {"x-flashsale-signature": sign(SECRET, other)}))
    assert status == 401 and "does not match" in said


def test_a_confirmation_signed_for_one_order_pays_no_other() -> None:
    """The signature covers the body alone: the body names the order it pays, and the same signed bytes
    sent to another order's URL pay nothing there (one payment settled every order of the SKU)."""
    _, body = _payment(token="tok-1")
    signed = {"x-flashsale-signature": sign(SECRET, body)}
    status, said = _refused(Request("POST", "/orders/tok-2/pay", body, signed))
    assert status == 403 and "'tok-1', not 'tok-2'" in said and "nothing was decided" in said
    _, unnamed = _payment()
    unnamed = json.dumps({k: v for k, v in json.loads(unnamed).items() if k != "token"}).encode()
    status, said = _refused(
        Request("POST", "/orders/tok-1/pay", unnamed, {"x-flashsale-signature": sign(SECRET, unnamed)})
    )
    assert status == 422 and "missing field(s): token" in said


def test_a_replayed_stale_payment_is_refused_with_401_saying_why() -> None:
    status, said = _refused(_pay(ts_ms=int(time.time() * 1000) - 301_000))
    assert status == 401
    assert "stale" in said and "FLASHSALE_PAYMENT_MAX_AGE_S=300" in said and "nothing was decided" in said


def test_a_payment_dated_too_far_ahead_is_refused_too() -> None:
    assert _refused(_pay(ts_ms=int(time.time() * 1000) + 301_000))[0] == 401


@pytest.mark.parametrize("ts", ["1700000000000", 1.7e12 + 0.5, True, None])
def test_a_payment_whose_time_is_not_whole_milliseconds_answers_422(ts: Any) -> None:
    path = "/orders/tok-1/pay"
    body = json.dumps({"sku": "phone-x", "token": "tok-1", "payment_id": "pay-1", "ts_ms": ts}).encode()
    assert _refused(Request("POST", path, body, {"x-flashsale-signature": sign(SECRET, body)}))[0] == 422


def test_a_payment_whose_time_is_a_whole_number_written_with_a_fraction_is_taken() -> None:
    # JSON Schema's integer, which the document gives ts_ms, holds 1796000000000.0 and 1.796e12 too.
    path = "/orders/tok-1/pay"
    ts = float(int(time.time() * 1000))
    body = json.dumps({"sku": "phone-x", "token": "tok-1", "payment_id": "pay-1", "ts_ms": ts}).encode()
    ((status, answer),) = call(
        _app(FakeDesk()), Request("POST", path, body, {"x-flashsale-signature": sign(SECRET, body)})
    )
    assert (status, answer["decision"]) == (200, "paid")


def test_payments_are_refused_with_503_until_a_secret_is_set() -> None:
    assert _refused(_pay(), secret="") == (503, NOT_CONFIGURED)
    assert "FLASHSALE_PAYMENT_SECRET" in NOT_CONFIGURED


def test_a_signed_body_that_is_not_json_answers_400() -> None:
    body = b"{not json"
    path = "/orders/tok-1/pay"
    assert _refused(Request("POST", path, body, {"x-flashsale-signature": sign(SECRET, body)}))[0] == 400


def test_an_unavailable_desk_asks_for_a_retry_with_the_same_payment_id() -> None:
    desk = FakeDesk(error=ServiceUnavailable("Redis", "127.0.0.1:1", "timeout"))
    ((status, body),) = call(_app(desk), _pay())
    assert status == 503 and "retry with the same payment_id" in body["error"]


def test_a_payment_after_the_order_expired_answers_already_expired() -> None:
    desk = FakeDesk()
    desk.orders[("phone-x", "tok-1")] = AWAITING._replace(order="expired", decided_ms=DUE_MS)
    ((status, body),) = call(_app(desk), _pay())
    assert (status, body["decision"], body["state"]) == (200, "already_expired", "expired")


# --- without a desk, the signature, the settings ---------------------------------------------------------


def test_a_service_without_orders_answers_404_on_every_order_route() -> None:
    app = _app(None)
    answers = call(app, Request("GET", "/orders/tok-1?sku=phone-x"), _cancel(), _pay())
    assert answers == [(404, {"error": NO_ORDERS})] * 3
    assert call(app, Request("GET", "/healthz"))[0][0] == 200


def test_sign_is_the_hex_hmac_sha256_of_the_body() -> None:
    # printf '%s' '{"a":1}' | openssl dgst -sha256 -hmac key
    assert sign("key", b'{"a":1}') == "sha256=" + "88a67f24bbcdaed0e6c997404bb79a743baf44c6bab2f4c27328e3009d22e342"


def test_verify_takes_the_signature_in_either_case_and_nothing_without_a_secret() -> None:
    header = sign(SECRET, b"{}")
    assert verify(SECRET, b"{}", header.upper().replace("SHA256=", "sha256="))
    assert not verify("", b"{}", sign("", b"{}"))
    assert not verify(SECRET, b"{}", None)


def test_payment_settings_come_from_their_variables() -> None:
    payments = Settings.from_env(
        {"FLASHSALE_PAYMENT_SECRET": "k", "FLASHSALE_PAYMENT_MAX_AGE_S": "60"}
    ).producer.payments
    assert (payments.secret, payments.max_age_s) == ("k", 60.0)
    assert Settings.from_env({}).producer.payments == PaymentSettings(secret="", max_age_s=300.0)
