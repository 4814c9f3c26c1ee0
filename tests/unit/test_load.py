"""The load generator's open loop: latency counts from when an attempt was due, not when it could be sent."""

from __future__ import annotations

import asyncio

from aiohttp import web

from flashsale.bench.load import run_load
from flashsale.bench.plot import series


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
