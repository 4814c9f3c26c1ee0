"""What every route of the producer's HTTP app shares: reading a request body within a bound, and the
answer to a method the route does not take."""

from __future__ import annotations

from typing import Any

import orjson

#: Largest request body read; a purchase is under 300 bytes.
MAX_BODY = 64 * 1024
Headers = list[tuple[str, str]]
JSON: Headers = [("content-type", "application/json")]


async def read_body(scope: Any, proto: Any) -> bytes | None:
    """The request body, or None when it is larger than MAX_BODY (it is then not read)."""
    length = scope.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        return None
    body: bytes = await proto()
    return body if len(body) <= MAX_BODY else None


def wrong_method(allowed: str, route: str) -> tuple[int, bytes, Headers]:
    """405, naming the method to use in its reason and in `Allow`, which RFC 9110 requires of a 405."""
    return 405, orjson.dumps({"error": f"use {allowed} {route}"}), [*JSON, ("allow", allowed)]
