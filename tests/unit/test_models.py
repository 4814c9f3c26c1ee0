from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashsale import constants as c
from flashsale.errors import InvalidInput, MalformedMessage
from flashsale.models import (
    SOURCE_REPLAY,
    DeductionMessage,
    Purchase,
    PurchaseRequest,
    PurchaseResult,
    PurchaseStatus,
    parse_count,
    parse_qty,
)

GOOD = {"sku": "sku-1", "user_id": "user:42", "qty": 2, "token": "0f1e2d3c-aaaa"}


def test_purchase_request_from_json_keeps_good_input() -> None:
    request = PurchaseRequest.from_json(GOOD)
    assert request == PurchaseRequest(sku="sku-1", user_id="user:42", qty=2, token="0f1e2d3c-aaaa")


@pytest.mark.parametrize("sku", ["sku{1}", "a b", "x" * 65, "", "-leading-dash", 7, None])
def test_purchase_request_refuses_a_bad_sku(sku: object) -> None:
    with pytest.raises(InvalidInput, match="sku must be"):
        PurchaseRequest.build(sku, "user", 1, "token")


def test_purchase_request_accepts_a_sku_of_64_characters() -> None:
    assert PurchaseRequest.build("x" * 64, "user", 1, "token").sku == "x" * 64


@pytest.mark.parametrize("qty", [0, -1, 1.5, "abc", True, c.MAX_QTY + 1, None, "1.5", [1]])
def test_purchase_request_refuses_a_bad_qty(qty: object) -> None:
    with pytest.raises(InvalidInput, match="qty"):
        PurchaseRequest.build("sku", "user", qty, "token")


@pytest.mark.parametrize(("raw", "qty"), [("7", 7), (" 7 ", 7), (3.0, 3), (c.MAX_QTY, c.MAX_QTY)])
def test_purchase_request_converts_whole_numbers(raw: object, qty: int) -> None:
    assert PurchaseRequest.build("sku", "user", raw, "token").qty == qty


@pytest.mark.parametrize("raw", ["--5", "²"])
def test_parse_qty_reports_odd_digit_strings_as_invalid_input(raw: str) -> None:
    with pytest.raises(InvalidInput):
        parse_qty(raw)


def test_purchase_request_refuses_a_sku_with_a_trailing_newline() -> None:
    with pytest.raises(InvalidInput):
        PurchaseRequest.build("sku\n", "user", 1, "token")


@pytest.mark.parametrize("field", ["sku", "user_id", "qty", "token"])
def test_purchase_request_names_a_missing_field(field: str) -> None:
    payload = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(InvalidInput, match=f"missing field\\(s\\): {field}"):
        PurchaseRequest.from_json(payload)


@pytest.mark.parametrize("payload", [[GOOD], "sku", 3, None])
def test_purchase_request_refuses_json_that_is_not_an_object(payload: object) -> None:
    with pytest.raises(InvalidInput, match="JSON object"):
        PurchaseRequest.from_json(payload)


def _read_as_build_reads_it(payload: dict[str, object]) -> None:
    """from_json reads a well-formed body in one test of its own: it must accept nothing build refuses,
    and give what build gives for anything it accepts."""
    try:
        expected = PurchaseRequest.build(payload["sku"], payload["user_id"], payload["qty"], payload["token"])
    except InvalidInput as exc:
        with pytest.raises(InvalidInput) as refused:
            PurchaseRequest.from_json(payload)
        assert str(refused.value) == str(exc)
        return
    request = PurchaseRequest.from_json(payload)
    assert (request, type(request.qty)) == (expected, int)


_ODD = [0, -1, 1, c.MAX_QTY, c.MAX_QTY + 1, True, False, None, 1.0, 2.5, "7", " 7 ", "", "x" * 64, "x" * 65]
_ODD += ["a@b", "a:b.c_d-e", "sku\n", "-x", [1], {"a": 1}]


@pytest.mark.parametrize("field", ["sku", "user_id", "qty", "token"])
@pytest.mark.parametrize("value", _ODD)
def test_a_json_body_with_one_odd_field_is_read_as_build_reads_it(field: str, value: object) -> None:
    _read_as_build_reads_it({**GOOD, field: value})


_ID_OR_NOT = st.from_regex(c.ID_PATTERN, fullmatch=True) | st.text(max_size=70)


@given(
    st.fixed_dictionaries(
        {"sku": _ID_OR_NOT, "user_id": _ID_OR_NOT, "qty": st.integers(-2, c.MAX_QTY + 2), "token": _ID_OR_NOT}
    )
)
def test_any_json_body_is_read_as_build_reads_it(payload: dict[str, object]) -> None:
    _read_as_build_reads_it(payload)


@pytest.mark.parametrize(("raw", "count"), [(None, 0), (0, 0), (5, 5), ("12", 12), (10**12, 10**12)])
def test_parse_count_accepts_whole_numbers_from_zero(raw: object, count: int) -> None:
    assert parse_count(raw, "quantity") == count


@pytest.mark.parametrize("raw", [-1, "-1", 1.0, True, "abc", 10**12 + 1])
def test_parse_count_refuses_and_names_the_value(raw: object) -> None:
    with pytest.raises(InvalidInput, match=r"^quantity must be"):
        parse_count(raw, "quantity")


def test_deduction_message_survives_an_encode_decode_round_trip() -> None:
    purchases = (Purchase("tok-1", "user-1", 3), Purchase("tok-2", "user-2", 1))
    message = DeductionMessage("sku-1", purchases, "gid-1", ts_ms=1_700_000_000_000, source=SOURCE_REPLAY)
    assert DeductionMessage.decode(message.encode()) == message


def test_deduction_message_encodes_a_versioned_json_object() -> None:
    data = json.loads(DeductionMessage("s", (Purchase("t", "u", 1),), "g", ts_ms=5).encode())
    assert data == {
        "v": 2,
        "sku": "s",
        "gid": "g",
        "ts_ms": 5,
        "source": "purchase",
        "purchases": [{"token": "t", "user_id": "u", "qty": 1}],
    }


def test_a_version_1_body_decodes_as_a_group_of_one_named_by_its_message_id() -> None:
    body = json.dumps({"token": "t", "sku": "s", "user_id": "u", "qty": 2, "ts_ms": 5, "v": 1}).encode()
    message = DeductionMessage.decode(body, "msg-7")
    assert (message.sku, message.gid, message.purchases) == ("s", "msg-7", (Purchase("t", "u", 2),))


def _body(**changes: object) -> bytes:
    data: dict[str, object] = {
        "v": 2,
        "sku": "s",
        "gid": "g",
        "ts_ms": 5,
        "purchases": [{"token": "t", "user_id": "u", "qty": 1}],
    }
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def _one(**changes: object) -> list[dict[str, object]]:
    purchase: dict[str, object] = {"token": "t", "user_id": "u", "qty": 1}
    purchase.update(changes)
    return [{k: v for k, v in purchase.items() if v is not ...}]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_body(v=4), "unsupported message version 4"),
        (_body(v=...), "unsupported message version None"),
        (_body(purchases=...), "missing field\\(s\\): purchases"),
        (_body(ts_ms=...), "missing field\\(s\\): ts_ms"),
        (_body(ts_ms="5"), "ts_ms must be"),
        (_body(ts_ms=-1), "ts_ms must be"),
        (_body(ts_ms=True), "ts_ms must be"),
        (_body(source="elsewhere"), "unknown source 'elsewhere'"),
        (_body(sku="a b"), "sku must be"),
        (_body(gid="a b"), "gid must be"),
        (_body(purchases=[]), "purchases must be a list of 1 to"),
        (_body(purchases=[{"token": "t"}] * 2000), "purchases must be a list of 1 to"),
        (_body(purchases=["t"]), "each purchase must be a JSON object"),
        (_body(purchases=_one(qty=0)), "qty must be at least 1"),
        (_body(purchases=_one(qty=...)), "missing field\\(s\\): qty"),
        (_body(purchases=_one(token=7)), "token must be"),
        (_body(purchases=_one(token="t" * 65)), "token must be"),
        (_body(purchases=_one(token="a@b")), "token must be"),  # an id, but not a token
        (_body(purchases=_one(user_id="a b")), "user_id must be"),
        (_body(purchases=_one(user_id="a b", qty=0)), "user_id must be"),  # the first wrong field is named
        (_body(purchases=_one(qty="9" * 5000)), "qty must be"),
        (
            b'{"v": 2, "sku": "s", "gid": "g", "ts_ms": 1, "purchases": [{"token": "t", "user_id": "u", "qty": '
            + b"9" * 5000
            + b"}]}",
            "cannot be decoded: ValueError",
        ),
        (_body(purchases=_one(qty=10**20)), "qty must be at most"),  # past 64 bits: orjson reads a float
        (_body(ts_ms=10**20), "ts_ms must be"),
        (b"[" * 100_000, "cannot be decoded: RecursionError"),
    ],
)
def test_deduction_message_decode_refuses_a_malformed_body_with_its_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        DeductionMessage.decode(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbf" + _body(),  # a UTF-8 byte-order mark
        _body().decode().encode("utf-16"),
        _body()[:-1] + b', "note": NaN, "big": 1e400}',  # fields of no meaning here, numbers orjson refuses
    ],
)
def test_a_body_orjson_refuses_but_json_reads_is_still_a_message(body: bytes) -> None:
    assert DeductionMessage.decode(body) == DeductionMessage.decode(_body())


def test_purchase_result_to_json_leaves_out_an_empty_message() -> None:
    result = PurchaseResult(PurchaseStatus.ACCEPTED, "tok", remaining=4, message_id="m1")
    assert result.to_json() == {"status": "accepted", "token": "tok", "remaining": 4, "message_id": "m1"}


def test_purchase_result_to_json_carries_a_message() -> None:
    result = PurchaseResult(PurchaseStatus.SOLD_OUT, "tok", 0, message="sku is sold out")
    assert result.to_json()["message"] == "sku is sold out"
    assert result.to_json()["status"] == "sold_out"
