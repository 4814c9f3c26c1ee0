"""The RocketMQ clients' channels try a server that went away again every 2 s at most, however long it
has been away (gRPC's own back-off grows to 120 s): a restarted broker is found within seconds.

A real gRPC channel, made the way the client makes its channels, against a listener that takes each
connection and closes it at once: every attempt fails, and the listener sees when each was made.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time

from rocketmq.v5.client.connection import rpc_channel

from flashsale.adapters.rocketmq import internals

#: gRPC spreads each wait by up to 20% either way.
LONGEST_GAP_S = 2.0 * 1.2 + 0.1
#: Long enough for gRPC's own back-off to pass 2 s three times over (1, 1.6, 2.6, 4.1, 6.6 s, ...).
WATCH_S = 16.0


def _attempts(stop: threading.Event) -> tuple[int, list[float]]:
    """A port whose listener closes every connection at once, and the times of the connections it took."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    seen: list[float] = []

    def take() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                seen.append(time.monotonic())
                conn.close()

    threading.Thread(target=take, daemon=True).start()
    return listener.getsockname()[1], seen


async def _keep_connecting(port: int) -> None:
    internals.config(f"127.0.0.1:{port}", 3)  # what every client is built with
    channel = rpc_channel.aio.insecure_channel(f"127.0.0.1:{port}", [])
    try:
        started = time.monotonic()
        while time.monotonic() - started < WATCH_S:
            channel.get_state(try_to_connect=True)
            await asyncio.sleep(0.5)
    finally:
        await channel.close()


def test_a_client_channel_tries_a_server_that_went_away_again_every_two_seconds_at_most() -> None:
    stop = threading.Event()
    port, seen = _attempts(stop)
    try:
        asyncio.run(_keep_connecting(port))
    finally:
        stop.set()
    gaps = [round(later - earlier, 2) for earlier, later in itertools.pairwise(seen)]
    assert len(gaps) >= WATCH_S / LONGEST_GAP_S - 1, gaps
    assert max(gaps) <= LONGEST_GAP_S, gaps
