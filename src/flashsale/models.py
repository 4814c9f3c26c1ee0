"""The domain's values: purchase requests and results, deduction messages, check resolutions."""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale import constants as c
from flashsale.errors import InvalidInput, MalformedMessage


class PurchaseStatus(enum.StrEnum):
    ACCEPTED = "accepted"  # deducted in Redis; the deduction is on its way to MySQL
    SOLD_OUT = "sold_out"  # not enough stock left for this quantity
    DUPLICATE = "duplicate"  # this token was accepted before; nothing new was deducted
    LIMIT_EXCEEDED = "limit_exceeded"  # the buyer's per-user limit would be passed
    INVALID = "invalid"  # the request itself is wrong (unknown SKU, bad quantity, ...)
    PENDING = "pending"  # outcome unknown right now; the broker's check-back will settle it
    ERROR = "error"  # nothing was deducted; try again (with a new token if the message says so)


class Resolution(enum.Enum):
    """What a transaction check answers for a half message."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    UNKNOWN = "unknown"


def require_id(value: object, name: str, pattern: Any = c.ID_PATTERN) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(
            f"{name} must be 1-64 characters of letters, digits and . _ : - (got {value!r})",
        )
    return value


def parse_qty(value: object) -> int:
    """A purchase quantity: a whole number from 1 to MAX_QTY. Strings of digits are accepted."""
    if isinstance(value, bool):
        raise InvalidInput(f"qty must be a whole number, got {value!r}")
    if isinstance(value, str) and c.DIGITS.fullmatch(value.strip().removeprefix("-")):
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise InvalidInput(f"qty must be a whole number, got {value!r}")
    if value <= 0:
        raise InvalidInput(f"qty must be at least 1, got {value}")
    if value > c.MAX_QTY:
        raise InvalidInput(f"qty must be at most {c.MAX_QTY}, got {value}")
    return value


def parse_count(value: object, name: str) -> int:
    """A stock quantity or limit: a whole number >= 0 (0 means none)."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, str) and c.DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be a whole number >= 0, got {value!r}")
    if value > 10**12:
        raise InvalidInput(f"{name} must be at most 10^12, got {value}")
    return value


@dataclass(frozen=True)
class PurchaseRequest:
    sku: str
    user_id: str
    qty: int
    token: str

    @classmethod
    def build(cls, sku: object, user_id: object, qty: object, token: object) -> PurchaseRequest:
        """Validate raw input; raises InvalidInput naming the first wrong field."""
        return cls(
            sku=require_id(sku, "sku"),
            user_id=require_id(user_id, "user_id"),
            qty=parse_qty(qty),
            token=require_id(token, "token", c.TOKEN_PATTERN),
        )

    @classmethod
    def from_json(cls, payload: object) -> PurchaseRequest:
        if not isinstance(payload, Mapping):
            raise InvalidInput("the body must be a JSON object with sku, user_id, qty and token")
        missing = [k for k in ("sku", "user_id", "qty", "token") if k not in payload]
        if missing:
            raise InvalidInput(f"missing field(s): {', '.join(missing)}")
        return cls.build(payload["sku"], payload["user_id"], payload["qty"], payload["token"])


@dataclass(frozen=True)
class PurchaseResult:
    status: PurchaseStatus
    token: str
    remaining: int | None = None
    message_id: str | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "status": self.status.value,
            "token": self.token,
            "remaining": self.remaining,
            "message_id": self.message_id,
        }
        if self.message:
            data["message"] = self.message
        return data


#: Where a deduction message came from.
SOURCE_PURCHASE = "purchase"
SOURCE_REPLAY = "replay"


@dataclass(frozen=True)
class Deduction:
    """The body of a deduction message (versioned JSON). Ids are strings; qty and ts are integers."""

    token: str
    sku: str
    user_id: str
    qty: int
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    source: str = SOURCE_PURCHASE
    v: int = c.MESSAGE_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, body: bytes) -> Deduction:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedMessage(f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise MalformedMessage("body is not a JSON object")
        version = data.get("v")
        if type(version) is not int or version != c.MESSAGE_VERSION:
            raise MalformedMessage(f"unsupported message version {version!r}")
        missing = [k for k in ("token", "sku", "user_id", "qty", "ts_ms") if k not in data]
        if missing:
            raise MalformedMessage(f"missing field(s): {', '.join(missing)}")
        try:
            request = PurchaseRequest.build(data["sku"], data["user_id"], data["qty"], data["token"])
        except InvalidInput as exc:
            raise MalformedMessage(str(exc)) from None
        ts_ms = data["ts_ms"]
        if not isinstance(ts_ms, int) or isinstance(ts_ms, bool) or ts_ms < 0:
            raise MalformedMessage(f"ts_ms must be a non-negative integer, got {ts_ms!r}")
        source = data.get("source", SOURCE_PURCHASE)
        if source not in (SOURCE_PURCHASE, SOURCE_REPLAY):
            raise MalformedMessage(f"unknown source {source!r}")
        return cls(request.token, request.sku, request.user_id, request.qty, ts_ms, source)


@dataclass(frozen=True)
class Delivery:
    """A message as received from the broker (by the consumer, or by a transaction check)."""

    message_id: str
    topic: str
    key: str | None
    body: bytes
    born_ms: int | None
    attempt: int
    handle: Any = field(default=None, compare=False, repr=False)
