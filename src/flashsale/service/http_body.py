"""Reading a request body within a bound, for every route of the producer's HTTP app that takes one."""

from __future__ import annotations

from typing import Any

#: Largest request body read; a purchase is under 300 bytes.
MAX_BODY = 64 * 1024


async def read_body(scope: Any, proto: Any) -> bytes | None:
    """The request body, or None when it is larger than MAX_BODY (it is then not read)."""
    length = scope.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        return None
    body: bytes = await proto()
    return body if len(body) <= MAX_BODY else None
