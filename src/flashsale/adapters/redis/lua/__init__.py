"""Redis Lua scripts, one per file, loaded by name from the installed package (with the fragments they include)."""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources

#: A line `-- include: NAME` stands for the fragment NAME.lua: a script reaches Redis as one text, so
#: Lua that several scripts share is pasted in here. A fragment may include others; each is pasted once,
#: where it is first named.
INCLUDE = re.compile(r"^-- include: (\w+)$", re.MULTILINE)


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    return _expanded(name, set())


def _expanded(name: str, pasted: set[str]) -> str:
    def paste(match: re.Match[str]) -> str:
        fragment = match.group(1)
        if fragment in pasted:
            return ""
        pasted.add(fragment)
        return _expanded(fragment, pasted).rstrip("\n")

    return INCLUDE.sub(paste, _read(name))


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
    "user_release",
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
    "ticket",
    "drop",
    "decide",
    "add_stock",
)
