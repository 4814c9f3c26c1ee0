"""hiredis's packer on the async connections writes the bytes redis-py's own packer writes."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from flashsale.adapters.redis.packing import packed

COMMANDS = [
    ("EVALSHA", "0" * 40, 3, "{sku}:stock", "{sku}:log", "{sku}:users", "tok-1", "u1", 2, "tok-2", "u2", 1),
    ("HMGET", "{sku}:log", *[f"token-{i:04d}" for i in range(600)]),  # past redis-py's 6,000-byte chunks
    ("SET", "k", "é ü ✓", "PX", 10**12),
    ("SET", b"k", b"\x00\xff binary", "EX", 1.5),
    ("HSET", "k", "f", bytearray(b"ba"), "g", memoryview(b"mv")),
    ("CLUSTER SLOTS",),  # a command name of two words goes as two
    (b"CONFIG GET", "maxmemory"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_the_same_bytes_as_redis_py(args: tuple[object, ...]) -> None:
    ours, theirs = packed(Connection)(), Connection()
    assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
    assert b"".join(ours.pack_commands([args, ("PING",)])) == b"".join(theirs.pack_commands([args, ("PING",)]))


@pytest.mark.parametrize("value", [True, None])
def test_a_value_redis_cannot_take_is_refused_as_redis_py_refuses_it(value: object) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        packed(Connection)().pack_command("SET", "k", value)


def test_every_kind_of_connection_keeps_its_own_class() -> None:
    for kind in (Connection, SSLConnection, UnixDomainSocketConnection):
        assert issubclass(packed(kind), kind) and packed(kind) is packed(kind)
