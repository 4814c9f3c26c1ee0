"""The load generator: latency in both loops, a buyer's attempts and next steps in order, how answers are read."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable

import orjson
import pytest
from aiohttp import web

from flashsale.bench.http import Connection
from flashsale.bench.load import Answer, LoadReport, _status, merge, run_load
from flashsale.bench.plot import series
from flashsale.models import PurchaseResult, PurchaseStatus
from tests.unit.test_bench_http import _read_request, _serve


async def _slow_server(delay_s: float) -> tuple[web.AppRunner, str]:
    async def purchase(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(delay_s)
        return web.json_response({"status": "accepted", "token": body["token"]})

    app = web.Application()
    app.router.add_post("/purchase", purchase)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _run(**options: object) -> tuple[list[float], float]:
    async def go() -> tuple[list[float], float]:
        runner, url = await _slow_server(0.05)
        try:
            report = await run_load(url, ["s"], attempts=20, **options)  # type: ignore[arg-type]
        finally:
            await runner.cleanup()
        return report.latencies_s, report.elapsed_s

    return asyncio.run(go())


def test_an_open_loop_counts_the_queue_a_slow_server_builds_in_the_latency() -> None:
    # One connection, 50 ms per answer, 100 attempts/s due: each waits longer than the one before.
    latencies, elapsed = _run(concurrency=1, rate=100.0)
    assert elapsed >= 20 * 0.05
    assert max(latencies) >= 20 * 0.05 - 19 / 100 - 0.05  # the last one waited for all the others
    assert latencies[-1] > latencies[0] * 5


def test_a_closed_loop_buyer_sends_when_its_answer_came_so_latency_stays_flat() -> None:
    latencies, _ = _run(concurrency=1)
    assert max(latencies) < 0.05 * 3


def test_the_plot_series_bins_answers_and_marks_accepted_per_second() -> None:
    from flashsale.bench.load import Answer, LoadReport

    report = LoadReport()
    report.answers = [Answer(0.1, "accepted", 0.01), Answer(0.2, "sold_out", 0.03), Answer(0.6, "accepted", 0.02)]
    times, rate, p50, p99 = series(report, bin_s=0.5)
    assert times == [0.25, 0.75] and rate == [2.0, 2.0]
    assert p50 == [30.0, 20.0] and p99 == [30.0, 20.0]


async def _raw_server(answer: Callable[[int, bytes, bytes], bytes | None]) -> tuple[asyncio.Server, str, list[str]]:
    """A server that reads requests and writes `answer(n, head, body)` for the n-th (None: cut the
    connection instead); returns it, its URL, and each request's first line and body, in order."""
    seen: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await _read_request(reader)
                seen.append(f"{head.split(b' ')[1].decode()} {body.decode()}")
                reply = answer(len(seen), head, body)
                if reply is None:
                    break
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(reply), reply))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server, url = await _serve(handler)
    return server, url, seen


def test_a_closed_loop_buyer_whose_connection_is_cut_hears_a_transport_error_and_goes_on_on_a_new_one() -> None:
    async def go() -> tuple[LoadReport, list[str]]:
        server, url, seen = await _raw_server(lambda n, _, body: None if n == 3 else b'{"status":"sold_out"}')
        try:
            return await run_load(url, ["s"], attempts=5, concurrency=1, run_id="r"), seen
        finally:
            server.close()

    report, seen = asyncio.run(go())
    assert 0 < report.cpu_s < report.elapsed_s * 2  # the buyers' process's CPU during the sale
    assert report.statuses == {"sold_out": 4, "transport_error": 1}
    assert [line.split('"token":"')[1][:3] for line in seen] == ["r-0", "r-1", "r-2", "r-3", "r-4"]
    assert report.errors == ["transport_error: connection closed before the answer (by the server)"]


def test_buyers_whose_every_connection_is_closed_at_once_hear_transport_errors_and_the_run_ends() -> None:
    # A server at its connection limit, or going away: it accepts and closes, from a thread of its own so
    # that its close can come in before the buyer's first request is sent.
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the test is over
            while True:
                listener.accept()[0].close()

    threading.Thread(target=serve, daemon=True).start()

    async def go() -> LoadReport:  # a 30 s timeout per request: the run must not wait for it
        return await asyncio.wait_for(run_load(url, ["s"], attempts=2000, concurrency=100), 20)

    try:
        report = asyncio.run(go())
    finally:
        listener.close()
    assert report.statuses == {"transport_error": 2000}


def test_a_buyer_takes_its_next_step_after_an_accepted_purchase_before_its_next_attempt_on_its_connection() -> None:
    async def after(conn: Connection, sku: str, token: str, user: str) -> None:
        assert (sku, user) == ("s", "r-u0")
        await conn.request("POST", "/pay", token.encode())

    def answer(n: int, head: bytes, body: bytes) -> bytes:
        if head.startswith(b"POST /pay"):
            return b"{}"
        return b'{"status":"accepted"}' if b'"token":"r-1"' in body else b'{"status":"sold_out"}'

    async def go() -> tuple[LoadReport, list[str]]:
        server, url, seen = await _raw_server(answer)
        try:
            return await run_load(url, ["s"], attempts=3, concurrency=1, run_id="r", after_accepted=after), seen
        finally:
            server.close()

    report, seen = asyncio.run(go())
    assert [line.split(" ")[0] + (" r-1" if line.startswith("/pay") else "") for line in seen] == [
        "/purchase",
        "/purchase",
        "/pay r-1",
        "/purchase",
    ]
    assert seen[2] == "/pay r-1" and report.accepted == [("s", "r-1", 1)]


@pytest.mark.parametrize("status", [s.value for s in PurchaseStatus])
def test_the_status_read_from_an_answers_first_field_is_the_one_parsing_it_gives(status: str) -> None:
    answer = PurchaseResult(PurchaseStatus(status), "t-1", remaining=3, message="why").to_json()
    fast, parsed = LoadReport(), LoadReport()
    assert (
        _status(200, orjson.dumps(answer), fast)
        == _status(200, orjson.dumps(answer, option=orjson.OPT_SORT_KEYS), parsed)
        == status
    )
    assert fast.errors == parsed.errors


def test_an_answer_that_is_not_json_counts_as_its_http_status_and_an_error_keeps_its_message() -> None:
    report = LoadReport()
    assert _status(502, b"<html>bad gateway</html>", report) == "http_502"
    assert _status(500, b'{"error":"internal error"}', report) == "http_500"
    assert _status(503, b'{"status":"error","message":"broker down"}', report) == "error"
    assert report.errors == ["error: broker down"]


def test_reports_of_processes_that_started_together_merge_their_answers_in_order_and_add_their_cpu() -> None:
    first = LoadReport(attempts=1, started=10.0, elapsed_s=2.0, cpu_s=0.5, answers=[Answer(1.5, "accepted", 0.1)])
    second = LoadReport(attempts=2, started=10.0, elapsed_s=3.0, cpu_s=0.25, answers=[Answer(0.5, "sold_out", 0.1)])
    merged = merge([first, second])
    assert (merged.attempts, merged.elapsed_s, merged.cpu_s) == (3, 3.0, 0.75)
    assert [a.at_s for a in merged.answers] == [0.5, 1.5]


def test_a_finished_run_prints_as_a_line_whatever_it_holds() -> None:
    # asyncio's runner formats the task that returned it on Python 3.11: every answer in it took seconds.
    report = LoadReport(answers=[Answer(0.1, "sold_out", 0.01)] * 100_000, attempts=100_000)
    assert len(repr(report)) < 200
