"""`flashsale stack up | down | status`: start, stop and inspect the local stack, idempotently."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale.config import Settings
from flashsale.errors import FlashSaleError, InvalidInput, StackError
from flashsale.polling import poll_until
from flashsale.stack import install, procs
from flashsale.stack.layout import StackLayout
from flashsale.stack.services import HOST, SERVICES, BrokerService, Service

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class ServiceState:
    name: str
    address: str
    pid: int | None
    running: bool
    healthy: bool
    note: str
    log: str
    listening: list[str] = field(default_factory=list)
    started: bool = False
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = StackLayout.at(settings.home)
        self.services = [cls(self.layout, settings) for cls in SERVICES]

    def select(self, names: Iterable[str] | None) -> list[Service]:
        wanted = list(names or [])
        known = {s.name: s for s in self.services}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise InvalidInput(f"unknown service {', '.join(unknown)}; choose from {', '.join(known)}")
        return [s for s in self.services if not wanted or s.name in wanted]

    def _record(self, service: Service) -> procs.PidRecord | None:
        record = procs.PidRecord.load(self.layout.pid_file(service.name))
        return record if record and procs.is_alive(record) else None

    # --- up ---------------------------------------------------------------------------------------
    def up(self, names: Iterable[str] | None = None, progress: Progress = logger.info) -> list[ServiceState]:
        services = self.select(names)
        installed = install.ensure_packages()
        if installed:
            progress(f"installed {', '.join(installed)}")
        started: dict[str, float] = {}
        # The broker registers with the name server when it starts: start it once the name server answers.
        first = [s for s in services if not isinstance(s, BrokerService)]
        later = [s for s in services if isinstance(s, BrokerService)]
        for service in first:
            self._start(service, started, progress)
        for service in first:
            self._wait(service, started, progress)
        for service in later:
            self._start(service, started, progress)
            self._wait(service, started, progress)
        return [self._state(s, started=s.name in started, seconds=started.get(s.name)) for s in services]

    def _start(self, service: Service, started: dict[str, float], progress: Progress) -> None:
        if self._record(service):
            return
        busy = [p for p in service.ports if procs.port_open(HOST, p)]
        if busy:
            raise StackError(
                f"{service.name} cannot start: port {', '.join(map(str, busy))} on {HOST} is taken by a process "
                f"this stack did not start",
                hint="stop that process, or choose other ports with the FLASHSALE_*_PORT variables",
            )
        progress(f"starting {service.name} on {service.address}")
        t0 = time.monotonic()
        service.prepare()
        record = procs.spawn(service.command(), log_path=service.log_file, env=service.env())
        record.save(self.layout.pid_file(service.name))
        started[service.name] = t0

    def _wait(self, service: Service, started: dict[str, float], progress: Progress) -> None:
        record = self._record(service)
        if record is None:
            raise self._died(service)
        deadline = time.monotonic() + service.ready_timeout_s

        def alive() -> bool:
            if not procs.is_alive(record):
                raise self._died(service)
            return True

        if service.name in started:
            if not poll_until(lambda: alive() and service.ping(), service.ready_timeout_s):
                raise self._timeout(service, "it never answered")
            service.after_start()
        last = [""]

        def serves() -> str | None:
            alive()
            try:
                return service.probe()  # starting: a write proves it serves (status itself only reads)
            except FlashSaleError as exc:
                last[0] = str(exc)
                return None

        note = poll_until(serves, max(0.0, deadline - time.monotonic()), interval_s=0.5)
        if note is None:
            raise self._timeout(service, last[0])
        if service.name in started:
            started[service.name] = round(time.monotonic() - started[service.name], 2)
            progress(f"{service.name} ready in {started[service.name]} s: {note}")

    def _died(self, service: Service) -> StackError:
        return StackError(
            f"{service.name} exited while starting; its log is {service.log_file} "
            f"(details in {service.detail_log}):\n{_tail(service.log_file)}"
        )

    def _timeout(self, service: Service, last: str) -> StackError:
        return StackError(
            f"{service.name} did not become ready within {service.ready_timeout_s:.0f} s ({last}); "
            f"its log is {service.log_file} (details in {service.detail_log}):\n{_tail(service.log_file)}"
        )

    # --- down -------------------------------------------------------------------------------------
    def down(self, names: Iterable[str] | None = None, progress: Progress = logger.info) -> list[ServiceState]:
        services = self.select(names)
        for service in reversed(services):
            pid_file = self.layout.pid_file(service.name)
            record = procs.PidRecord.load(pid_file)
            if record and procs.is_alive(record):
                progress(f"stopping {service.name} (pid {record.pid})")
                procs.terminate(record, service.stop_grace_s)
            pid_file.unlink(missing_ok=True)
        return [self._state(s) for s in services]

    # --- status -----------------------------------------------------------------------------------
    def status(self, names: Iterable[str] | None = None, *, probe: bool = False) -> list[ServiceState]:
        """Each service's state; reads only, unless `probe` (the broker then sends a message)."""
        return [self._state(s, probe=probe) for s in self.select(names)]

    def _state(
        self, service: Service, *, started: bool = False, seconds: float | None = None, probe: bool = False
    ) -> ServiceState:
        record = self._record(service)
        healthy, note = False, "not running"
        if record:
            try:
                note, healthy = (service.probe() if probe else service.check()), True
            except FlashSaleError as exc:
                note = str(exc)
        return ServiceState(
            name=service.name,
            address=service.address,
            pid=record.pid if record else None,
            running=record is not None,
            healthy=healthy,
            note=note,
            log=str(service.log_file),
            listening=procs.listening_addresses(record.pid) if record else [],
            started=started,
            seconds=seconds,
        )


def _tail(path: Any, lines: int = 20) -> str:
    try:
        text: str = path.read_text(errors="replace")
    except OSError:
        return "(no log yet)"
    return "\n".join(text.strip().splitlines()[-lines:])
