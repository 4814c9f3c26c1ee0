"""The payment service's signature on a confirmation (POST /orders/{token}/pay).

The payment service and the producers share a secret (FLASHSALE_PAYMENT_SECRET). A confirmation's body
is JSON, {"sku", "token", "payment_id", "ts_ms"}, and its header `X-Flashsale-Signature` carries
`sha256=<hex>`, the HMAC-SHA256 of the exact body bytes under that secret. The body names the order it
pays (`token`, the one of the URL's path): the signature covers the body alone, and a confirmation of one
order sent to another's URL is refused.

    body = {"sku": "phone-x", "token": token, "payment_id": "pay-81", "ts_ms": int(time.time() * 1000)}
    raw = json.dumps(body).encode()
    headers = {SIGNATURE_HEADER: sign(secret, raw)}

The producer recomputes the HMAC over the bytes it received, so the body must be sent as signed (no
re-serialising in between), and refuses a body whose ts_ms is too far from its clock
(FLASHSALE_PAYMENT_MAX_AGE_S): an old confirmation replayed later is refused, and one replayed within
the window is the same payment id, which hears the first answer.
"""

from __future__ import annotations

import hashlib
import hmac

#: The header a signed confirmation carries (HTTP header names are case-insensitive).
SIGNATURE_HEADER = "X-Flashsale-Signature"
#: What the header's value starts with: the one algorithm accepted.
SCHEME = "sha256="


def sign(secret: str, body: bytes) -> str:
    """The `X-Flashsale-Signature` value for `body`: `sha256=` and the hex HMAC-SHA256 under `secret`."""
    return SCHEME + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` is the signature of `body` under `secret` (compared in constant time)."""
    if not secret or header is None:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().lower().encode())
