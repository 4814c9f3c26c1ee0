"""The bench's buyers spread over processes: one sale, every attempt once, each buyer in one process."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator

import pytest
from aiohttp import web

from flashsale.bench.crowd import Crowd, run_crowd
from flashsale.bench.payers import Payers


class _Server:
    """A producer's stand-in in a thread of the test: every third purchase accepted, every payment paid."""

    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()
        self.peers: dict[str, set[object]] = defaultdict(set)  # user -> the connections it bought on
        self.paid: list[str] = []
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()

    async def _purchase(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokens[body["token"]] += 1
        self.peers[body["user_id"]].add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        status = "accepted" if int(body["token"].rsplit("-", 1)[1]) % 3 == 0 else "sold_out"
        return web.json_response({"status": status, "token": body["token"]})

    async def _pay(self, request: web.Request) -> web.Response:
        self.paid.append(request.match_info["token"])
        return web.json_response({"decision": "paid"})

    def serve(self) -> None:
        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/purchase", self._purchase)
            app.router.add_post("/orders/{token}/pay", self._pay)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
            self._ready.set()
            return runner

        runner = self._loop.run_until_complete(start())
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.fixture
def server() -> Iterator[_Server]:
    served = _Server()
    thread = threading.Thread(target=served.serve, daemon=True)
    thread.start()
    assert served._ready.wait(10)
    yield served
    served.stop()
    thread.join(10)


def test_two_processes_make_every_attempt_once_and_keep_each_buyer_on_one_connection(server: _Server) -> None:
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    crowd = Crowd(server.url, ("a", "b"), attempts=300, concurrency=10, run_id="r", payers=Payers("s", 0.5))
    report = run_crowd(crowd, processes=2, tick=tick)

    assert report.attempts == ticks == 300 and report.statuses == {"accepted": 100, "sold_out": 200}
    assert server.tokens == {f"r-{i}": 1 for i in range(300)}
    assert set(server.peers) == {f"r-u{b}" for b in range(10)}
    assert all(len(peers) == 1 for peers in server.peers.values())  # each buyer bought on one connection
    assert {sku for sku, _, _ in report.accepted} == {"a", "b"}
    assert [a.at_s for a in report.answers] == sorted(a.at_s for a in report.answers)
    assert report.elapsed_s >= max(a.at_s for a in report.answers)
    # Each process left its own half of its accepted buyers unpaid, and paid the others.
    payments = crowd.payers.report  # type: ignore[union-attr]
    assert payments.unpaid == 50 and payments.decisions == {"paid": 50} and len(server.paid) == 50


def test_an_open_loop_crowd_keeps_one_clock_across_processes(server: _Server) -> None:
    report = run_crowd(Crowd(server.url, ("a",), attempts=100, concurrency=4, rate=200.0, run_id="o"), processes=2)
    assert report.attempts == 100 and len(server.tokens) == 100
    assert report.elapsed_s >= 99 / 200  # the last attempt was due 0.495 s after the start, in either process
    assert max(report.latencies_s) < 0.45  # counted from when each was due, not from the start
    assert min(report.latencies_s) >= 0  # none sent before it was due (a loop's timers may fire early)


def test_a_crowd_with_no_server_answers_every_attempt_with_a_transport_error() -> None:
    report = run_crowd(Crowd("http://127.0.0.1:9", ("a",), attempts=6, concurrency=3), processes=2)
    assert report.statuses == {"transport_error": 6}
    assert report.errors and "cannot connect to 127.0.0.1:9" in report.errors[0]
