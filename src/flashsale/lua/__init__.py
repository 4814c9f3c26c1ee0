"""Redis Lua scripts, one per file, loaded by name from the installed package."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources


@cache
def source(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


@cache
def sha1(name: str) -> str:
    """The name EVALSHA knows the script by."""
    return hashlib.sha1(source(name).encode("utf-8")).hexdigest()


NAMES = (
    "prededuct",
    "fence",
    "return_stock",
    "load_stock",
    "adopt",
    "close",
    "user_hold",
    "load_pool",
    "pool_take",
    "pool_expect",
    "refill_apply",
    "drain",
    "pool_receive",
    "refill_end",
    "transfers_due",
    "seen",
    "freeze",
)
