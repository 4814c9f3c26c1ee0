"""A watchdog that brings RocketMQ clients back after a proxy restart, in the same process, within seconds.

A restarted proxy has forgotten every client: consumers are refused ("settings is null", code 40015)
and transaction checks no longer reach producers, because both hang on the client's telemetry stream,
which the client itself reopens only every 300 s (see rocketmq_internals.py). The watchdog looks at each
watched client's streams twice a second and, once the channel is connected, reopens a stream that ended
(or sends the settings again where an adapter reports a refusal that means lost settings).

While the broker is away it opens nothing: a stream opened then waits, pending, and starts when the
channel connects, next to the one the reconnect itself calls for. The proxy writes a client's checks to
the stream whose settings it handled last, in no fixed order across streams, and to none once a write to
a cancelled one failed: a checker was seen to get no check for minutes that way. So there is one stream,
opened once the channel is up, and the settings are written on it again every few seconds, each time
setting it once more as the one the proxy writes to.

It never touches messages: what was received and not acked stays unacked, and comes back from the
broker when its invisible time ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flashsale.adapters.rocketmq import internals

logger = logging.getLogger(__name__)

#: How often the streams are looked at.
INTERVAL_S = 0.5
#: Least time between two resyncs of one client: a new stream needs a moment to open.
MIN_GAP_S = 2.0
#: How often the settings are written again on a connected stream, and how soon after a resync.
SETTINGS_EVERY_S = 10.0
SETTINGS_AFTER_RESYNC_S = 3.0


@dataclass
class _Watched:
    client: Any
    name: str
    poked: bool = False
    last_resync: float = 0.0
    #: Its endpoints whose channel was not connected at the last look.
    away: list[Any] = field(default_factory=list)
    #: When the settings are next written again on its streams (monotonic); never for a consumer, whose
    #: settings the proxy takes for its group's subscription (one client per topic, one group).
    next_settings: float = float("inf")


class StreamWatchdog:
    def __init__(
        self,
        *,
        interval_s: float = INTERVAL_S,
        min_gap_s: float = MIN_GAP_S,
        on_resync: Callable[[], None] = lambda: None,
    ) -> None:
        self.on_resync = on_resync
        self._interval_s = interval_s
        self._min_gap_s = min_gap_s
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.resyncs = 0

    def watch(self, client: Any, name: str, *, resend_settings: bool = False) -> None:
        """Look after `client`'s streams; with `resend_settings` (a producer, which checks reach), write its
        settings again every SETTINGS_EVERY_S."""
        with self._lock:
            now = time.monotonic()
            every = now + SETTINGS_EVERY_S if resend_settings else float("inf")
            self._watched[id(client)] = _Watched(client, name, last_resync=now, next_settings=every)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rocketmq-watchdog", daemon=True)
                self._thread.start()

    def forget(self, client: Any) -> None:
        with self._lock:
            self._watched.pop(id(client), None)

    def poke(self, client: Any) -> None:
        """An adapter saw a reply that means the proxy lost this client's settings: resync soon."""
        with self._lock:
            watched = self._watched.get(id(client))
            if watched is not None:
                watched.poked = True

    def problems(self) -> list[str]:
        """Why a watched client cannot use the broker right now (streams down), or []."""
        with self._lock:
            watched = list(self._watched.values())
        found = []
        for each in watched:
            # Ended, or waiting for a channel that is not connected: a stream the watchdog reopened while
            # the broker was away has not ended, and the broker knows nothing of it yet.
            down = internals.dead_streams(each.client)
            down += [e for e in internals.unconnected(each.client) if e not in down]
            if down:
                found.append(f"{each.name}: telemetry stream to {', '.join(map(str, down))} is down")
        return found

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            with self._lock:
                watched = list(self._watched.values())
            for each in watched:
                try:
                    self._look_at(each)
                except Exception:  # the watchdog must outlive any one failure
                    logger.exception("could not check the telemetry streams of %s", each.name)

    def _look_at(self, each: _Watched) -> None:
        away = internals.unconnected(each.client)
        if away:
            internals.connect(each.client, away)  # no stream opened toward them (see the module's docstring)
        # Back: the proxy there may be a new one, which knows nothing of this client.
        due = [e for e in each.away if e not in away]
        each.away = away
        up = [e for e in internals.all_endpoints(each.client) if e not in away]
        dead = [e for e in internals.dead_streams(each.client) if e not in away]
        due += [e for e in (up if each.poked else dead) if e not in due]
        now = time.monotonic()
        if due and now - each.last_resync >= self._min_gap_s:
            self._resync(each, due, bool(dead), now)
        elif up and not dead and now >= each.next_settings:
            each.next_settings = now + SETTINGS_EVERY_S
            internals.resend_settings(each.client, up)

    def _resync(self, each: _Watched, endpoints: list[Any], ended: bool, now: float) -> None:
        each.poked = False
        each.last_resync = now
        each.next_settings = min(each.next_settings, now + SETTINGS_AFTER_RESYNC_S)
        count = internals.resync(each.client, endpoints)
        self.resyncs += 1
        self.on_resync()
        logger.warning(
            "%s: %s; reopened %d telemetry stream(s) and re-sent its settings",
            each.name,
            "the broker's telemetry stream ended" if ended else "the broker no longer knows its settings",
            count,
        )
