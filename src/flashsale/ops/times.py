"""Reading a point in time from an operator: ISO 8601, or a duration ago."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from flashsale.errors import InvalidInput

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now: datetime | None = None, what: str = "time") -> datetime:
    """'2026-11-23T10:00', '2026-11-23 10:00:00+01:00' (local time when no zone), or '15m' / '2h' ago."""
    now = now or datetime.now(UTC)
    value = text.strip()
    match = _DURATION.match(value)
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{what}: {text!r} is not a time",
            hint="use ISO 8601 (2026-11-23T10:00 or 2026-11-23T10:00:00+00:00) or a duration ago (90s, 15m, 2h, 1d)",
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a time without a zone is the operator's local time
    return moment


def parse_duration_ms(text: str, *, what: str = "duration") -> int:
    """'90s', '15m', '2h', '1d' or '500ms' as milliseconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise InvalidInput(f"{what}: {text!r} is not a duration", hint="e.g. 90s, 15m, 2h, 1d or 500ms")
    return round(float(match[1]) * _UNITS[match[2]] * 1000)


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)
