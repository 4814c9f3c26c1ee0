"""The domain's values: purchase requests and results, deduction messages, check resolutions."""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

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


def purchase_fields(user_id: object, qty: object, token: object) -> tuple[str, int, str]:
    """A purchase's user, quantity and token from raw input, checked in that order; raises InvalidInput
    naming the first wrong one."""
    return require_id(user_id, "user_id"), parse_qty(qty), require_id(token, "token", c.TOKEN_PATTERN)


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


def parse_count(value: object, name: str, maximum: int = c.MAX_STOCK) -> int:
    """A stock quantity or limit: a whole number from 0 (none) to `maximum`."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, str) and c.DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be a whole number >= 0, got {value!r}")
    if value > maximum:
        raise InvalidInput(f"{name} must be at most {maximum:,}, got {value:,}")
    return value


_ID = c.ID_PATTERN.fullmatch
_TOKEN = c.TOKEN_PATTERN.fullmatch


class Buyer(Protocol):
    """Who asks for a token: what a read ahead of the pre-deduct looks up (a PurchaseRequest or a Purchase)."""

    @property
    def token(self) -> str: ...

    @property
    def user_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PurchaseRequest:
    sku: str
    user_id: str
    qty: int
    token: str

    @classmethod
    def build(cls, sku: object, user_id: object, qty: object, token: object) -> PurchaseRequest:
        """Validate raw input; raises InvalidInput naming the first wrong field."""
        sku = require_id(sku, "sku")
        return cls(sku, *purchase_fields(user_id, qty, token))

    @classmethod
    def from_json(cls, payload: object) -> PurchaseRequest:
        if type(payload) is dict:
            get = payload.get
            sku, user_id, qty, token = get("sku"), get("user_id"), get("qty"), get("token")
            # A well-formed body in one test, no call per field (this is every sold-out answer's path); it
            # accepts a subset of what `build` accepts, and anything else goes there to be named.
            if (
                type(qty) is int
                and 0 < qty <= c.MAX_QTY
                and type(sku) is str
                and type(user_id) is str
                and type(token) is str
                and _ID(sku)
                and _ID(user_id)
                and _TOKEN(token)
            ):
                return cls(sku, user_id, qty, token)
        if type(payload) is not dict and not isinstance(payload, Mapping):  # the exact type first: no ABC check
            raise InvalidInput("the body must be a JSON object with sku, user_id, qty and token")
        try:
            sku, user_id, qty, token = payload["sku"], payload["user_id"], payload["qty"], payload["token"]
        except KeyError:
            missing = [k for k in ("sku", "user_id", "qty", "token") if k not in payload]
            raise InvalidInput(f"missing field(s): {', '.join(missing)}") from None
        return cls.build(sku, user_id, qty, token)


@dataclass(frozen=True, slots=True)
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
#: A message carrying an order's payment, cancellation or expiry (decide.lua): one purchase, the order's.
SOURCE_DECISION = "decision"
#: A message carrying a restock (add_stock.lua): one purchase, whose token is the request id and whose
#: quantity is the units added (its user is RESTOCK_USER: nobody buys them).
SOURCE_RESTOCK = "restock"
RESTOCK_USER = "restock"


@dataclass(frozen=True)
class Deduction:
    """One deduction: a purchase the Redis pre-deduct accepted, the unit MySQL applies. Ids are strings."""

    token: str
    sku: str
    user_id: str
    qty: int
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    source: str = SOURCE_PURCHASE


@dataclass(frozen=True, slots=True)
class Purchase:
    """One purchase inside a deduction message; `part` names the partition (sku#n) that sells it, when
    it is not the message's own."""

    token: str
    user_id: str
    qty: int
    part: str = ""


@dataclass(frozen=True)
class DeductionMessage:
    """The body of a deduction message (versioned JSON): purchases of one SKU, carried by one message.

    On the deduction topic `gid` is the id of the half message itself: the pre-deduct names it in every
    log entry it writes, which is how the checker and the consumer learn which purchases it accepted.
    Replays carry no gid: the consumer applies what the Redis log holds for each token. For a
    partitioned SKU, `part` names the partition (sku#n) whose keys hold the log of every purchase; or
    each purchase names its own, when one message carries a group spread over several partitions.
    """

    sku: str
    purchases: tuple[Purchase, ...]
    gid: str = ""
    ts_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    source: str = SOURCE_PURCHASE
    part: str = ""

    @property
    def tokens(self) -> list[str]:
        return [p.token for p in self.purchases]

    def shard_of(self, purchase: Purchase) -> str:
        """The Redis keys of a purchase's pre-deduct: its partition's, or its SKU's."""
        return purchase.part or self.part or self.sku

    def shards(self) -> dict[str, list[Purchase]]:
        """The purchases by the keys of their pre-deduct, in the message's order within each: each
        partition's pre-deduct ran on its own list, and its record's codes follow that order."""
        by_shard: dict[str, list[Purchase]] = {}
        for p in self.purchases:
            by_shard.setdefault(self.shard_of(p), []).append(p)
        return by_shard

    @classmethod
    def restock(cls, sku: str, request_id: str, qty: int, gid: str, ts_ms: int) -> DeductionMessage:
        """The body of a restock's message: one purchase, the request's, for RESTOCK_USER."""
        return cls(sku, (Purchase(request_id, RESTOCK_USER, qty),), gid, ts_ms, SOURCE_RESTOCK)

    def encode(self) -> bytes:
        spread = any(p.part for p in self.purchases)
        body: dict[str, Any] = {
            "v": c.MESSAGE_VERSION if spread else c.MESSAGE_VERSION_ONE_SHARD,
            "sku": self.sku,
            "gid": self.gid,
            "ts_ms": self.ts_ms,
            "source": self.source,
            "purchases": [_purchase_json(p) for p in self.purchases],
        }
        if self.part:
            body["part"] = self.part
        return orjson.dumps(body)  # every field is ASCII (ids, tokens, numbers): the bytes json.dumps made

    @classmethod
    def decode(cls, body: bytes, message_id: str | None = None) -> DeductionMessage:
        """Any body at all: a valid message, or MalformedMessage saying what is wrong. Never another error.

        `message_id` stands in for the gid of a version-1 body (one purchase, sent before groups existed).
        """
        try:
            return cls._decode(body, message_id)
        except MalformedMessage:
            raise
        except Exception as exc:  # noqa: BLE001 - huge integers, deep nesting, odd types: all malformed
            raise MalformedMessage(f"body cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None

    @classmethod
    def _decode(cls, body: bytes, message_id: str | None) -> DeductionMessage:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = _json_read_slowly(body)
        if not isinstance(data, dict):
            raise MalformedMessage("body is not a JSON object")
        version = data.get("v")
        if type(version) is not int or not 1 <= version <= c.MESSAGE_VERSION:
            raise MalformedMessage(f"unsupported message version {_shown(version)}")
        if version == 1:
            _require(data, ("token", "sku", "user_id", "qty", "ts_ms"))
            items = [{"token": data["token"], "user_id": data["user_id"], "qty": data["qty"]}]
            gid = message_id or ""
        else:
            _require(data, ("sku", "gid", "purchases", "ts_ms"))
            items, gid = data["purchases"], data["gid"]
            if not isinstance(items, list) or not 1 <= len(items) <= c.MAX_GROUP:
                raise MalformedMessage(f"purchases must be a list of 1 to {c.MAX_GROUP} purchases")
        try:
            sku = require_id(data["sku"], "sku")
            gid = require_id(gid, "gid", c.TOKEN_PATTERN) if gid != "" else ""
        except InvalidInput as exc:
            raise MalformedMessage(str(exc)) from None
        purchases = []
        for item in items:
            if not isinstance(item, dict):
                raise MalformedMessage("each purchase must be a JSON object")
            _require(item, ("token", "user_id", "qty"))
            try:  # the body's SKU is checked once, above: a purchase request would check it again
                user_id, qty, token = purchase_fields(item["user_id"], item["qty"], item["token"])
            except InvalidInput as exc:
                raise MalformedMessage(str(exc)) from None
            own = _part_of(sku, item.get("part", "")) if version >= 3 else ""
            purchases.append(Purchase(token, user_id, qty, own))
        ts_ms = data["ts_ms"]
        if not isinstance(ts_ms, int) or isinstance(ts_ms, bool) or not 0 <= ts_ms < 10**15:
            raise MalformedMessage(f"ts_ms must be a non-negative integer, got {_shown(ts_ms)}")
        source = data.get("source", SOURCE_PURCHASE)
        if source not in (SOURCE_PURCHASE, SOURCE_REPLAY, SOURCE_DECISION, SOURCE_RESTOCK):
            raise MalformedMessage(f"unknown source {_shown(source)}")
        return cls(sku, tuple(purchases), gid, ts_ms, source, _part_of(sku, data.get("part", "")))


def _json_read_slowly(body: bytes) -> Any:
    """A body orjson refused, read as the json module reads it: it takes what orjson does not (a byte-order
    mark, UTF-16, NaN, an unknown field's number past a double's range), so no body is refused that was
    read before orjson; what it refuses too is not JSON."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"body is not JSON: {exc}") from None


def _purchase_json(p: Purchase) -> dict[str, Any]:
    item: dict[str, Any] = {"token": p.token, "user_id": p.user_id, "qty": p.qty}
    if p.part:
        item["part"] = p.part
    return item


def _part_of(sku: str, part: object) -> str:
    """A partition named in a body: '' (none), or a partition of `sku`; MalformedMessage otherwise."""
    if part != "" and (
        not isinstance(part, str) or not c.PART_PATTERN.fullmatch(part) or not part.startswith(sku + c.PART_SEP)
    ):
        raise MalformedMessage(f"part must name a partition of {sku} ({sku}{c.PART_SEP}N), got {_shown(part)}")
    return str(part)


def _shown(value: object) -> str:
    """A value for an error message: its repr, cut short (a body may hold megabytes, or 5,000-digit numbers)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= 40 else text[:37] + "..."


def _require(data: Mapping[str, Any], names: tuple[str, ...]) -> None:
    missing = [k for k in names if k not in data]
    if missing:
        raise MalformedMessage(f"missing field(s): {', '.join(missing)}")


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


@dataclass(frozen=True)
class Deadline:
    """The body of a timer message: orders of one SKU that must be paid by `due_ms` (Redis's clock)."""

    sku: str
    tokens: tuple[str, ...]
    due_ms: int

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "sku": self.sku, "due_ms": self.due_ms, "tokens": list(self.tokens)}).encode()

    @classmethod
    def decode(cls, body: bytes) -> Deadline:
        """A valid deadline, or MalformedMessage saying what is wrong."""
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or data.get("v") != 1:
                raise MalformedMessage("not a version-1 deadline")
            tokens = data["tokens"]
            if not isinstance(tokens, list) or not 1 <= len(tokens) <= c.MAX_GROUP:
                raise MalformedMessage(f"tokens must be a list of 1 to {c.MAX_GROUP} tokens")
            due_ms = data["due_ms"]
            if not isinstance(due_ms, int) or isinstance(due_ms, bool) or not 0 <= due_ms < 10**15:
                raise MalformedMessage(f"due_ms must be a non-negative integer, got {_shown(due_ms)}")
            sku = require_id(data["sku"], "sku")
            return cls(sku, tuple(require_id(t, "token", c.TOKEN_PATTERN) for t in tokens), due_ms)
        except MalformedMessage:
            raise
        except (InvalidInput, KeyError, ValueError, TypeError, RecursionError) as exc:
            raise MalformedMessage(f"deadline cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None
