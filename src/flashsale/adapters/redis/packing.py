"""Async connections whose commands hiredis packs in C.

redis-py packs an async connection's commands in Python (its sync connections use hiredis already):
a group's read of 256 tokens and buyers, or its pre-deduct's arguments, cost the producer 1 to 2 µs a
purchase there, a tenth of a sold-out answer. hiredis's packer writes the same bytes.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError


class _HiredisPacked:
    def pack_command(self, *args: Any) -> list[bytes]:
        # A command name with a space in it ("CLUSTER SLOTS") goes as separate words, as redis-py sends it.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        args = tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # a bool or None among the arguments: redis-py's own error for them
            raise DataError(f"Invalid input: {exc}") from exc


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def packed(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (plain, TLS or Unix socket) with hiredis's packer: one class for each."""
    if connection_class not in _PACKED:
        _PACKED[connection_class] = type(f"Packed{connection_class.__name__}", (_HiredisPacked, connection_class), {})
    return _PACKED[connection_class]
