"""The bench's lean HTTP client against raw servers: what it reads, and how it fails."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from flashsale.bench import http
from flashsale.bench.http import Connection, TransportError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head, await reader.readexactly(length)


def _run(handler: Handler, client: Callable[[str], Awaitable[object]]) -> object:
    async def go() -> object:
        server, url = await _serve(handler)
        try:
            return await client(url)
        finally:
            server.close()

    return asyncio.run(go())


def test_answers_come_back_in_order_on_one_kept_alive_connection_whatever_their_framing() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for n in range(3):
            head, body = await _read_request(reader)
            assert head.startswith(b"POST /buy HTTP/1.1\r\n") and b"\r\nx-sign: abc\r\n" in head
            if n == 1:  # chunked, in two writes, the second one later
                writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n" + body[:4] + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"%x\r\n" % (len(body) - 4) + body[4:] + b"\r\n0\r\n\r\n")
            else:  # a header name in capitals, the body in its own write
                writer.write(b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: %d\r\n\r\n" % len(body))
                await writer.drain()
                writer.write(body)
        await writer.drain()
        writer.close()

    async def client(url: str) -> object:
        conn = Connection(url)
        try:
            return [await conn.request("POST", "/buy", b"body-%d" % n, {"x-sign": "abc"}) for n in range(3)]
        finally:
            conn.close()

    assert _run(handler, client) == [(200, b"body-0"), (201, b"body-1"), (200, b"body-2")]
    assert connections == 1


def test_a_server_that_closes_after_its_answer_gets_the_next_request_on_a_new_connection() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def client(url: str) -> object:
        conn = Connection(url)
        try:
            return [await conn.request("POST", "/", b"x") for _ in range(3)]
        finally:
            conn.close()

    assert _run(handler, client) == [(200, b"ok")] * 3
    assert connections == 3


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        (b"", "connection closed before the answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "connection closed before the answer"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n", "unreadable answer"),
    ],
)
def test_a_cut_or_garbled_answer_is_a_transport_error_and_the_next_request_reconnects(reply: bytes, says: str) -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        await _read_request(reader)
        writer.write(reply if served == 1 else b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        if served == 1:
            writer.close()
        else:
            await reader.read()

    async def client(url: str) -> object:
        conn = Connection(url)
        try:
            with pytest.raises(TransportError, match=says):
                await conn.request("POST", "/", b"x")
            return await conn.request("POST", "/", b"x")
        finally:
            conn.close()

    assert _run(handler, client) == (200, b"ok")


def test_an_answer_that_never_comes_times_out_and_a_refused_connection_says_where(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http, "WATCH_EVERY_S", 0.05)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    async def client(url: str) -> object:
        conn = Connection(url, timeout_s=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransportError, match=r"no answer within 0\.2 s"):
            await conn.request("POST", "/", b"x")
        return loop.time() - started

    waited = _run(handler, client)
    assert 0.2 <= waited < 1.0  # type: ignore[operator]

    async def refused() -> None:
        server, url = await _serve(handler)
        server.close()
        await server.wait_closed()
        with pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1:{url.rsplit(':', 1)[1]}"):
            await Connection(url).request("POST", "/", b"x")

    asyncio.run(refused())


async def _closing_server() -> tuple[asyncio.Server, str]:
    """A server that closes every connection as soon as it is made (one at its limit, or going away)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await _serve(handler)


def test_a_request_sent_on_a_connection_the_server_already_closed_hears_a_transport_error_at_once() -> None:
    async def client() -> object:
        server, url = await _closing_server()
        conn = Connection(url)  # a 30 s timeout: the error must not wait for it
        try:
            await conn.open()
            await asyncio.sleep(0.1)  # the server's close has come in
            heard: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            conn.send(conn.head("POST", "/"), b"x", heard.set_result)
            return await asyncio.wait_for(heard, 2)
        finally:
            conn.close()
            server.close()

    heard = asyncio.run(client())
    assert isinstance(heard, TransportError) and "closed before the request was sent" in str(heard)


def test_a_request_under_way_when_its_connection_is_closed_hears_a_transport_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    async def client(url: str) -> object:
        conn = Connection(url)
        asking = asyncio.create_task(conn.request("POST", "/", b"x"))
        await asyncio.sleep(0.05)
        conn.close()
        with pytest.raises(TransportError, match=r"closed before the answer \(by this client\)"):
            await asyncio.wait_for(asking, 2)
        return True

    assert _run(handler, client) is True
