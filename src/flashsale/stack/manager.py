"""`flashsale stack up | down | status`: start, stop and inspect the local stack, idempotently."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from flashsale.errors import FlashSaleError, InvalidInput, StackError
from flashsale.net import port_open
from flashsale.polling import poll_until
from flashsale.stack import install, procs, redis_nodes
from flashsale.stack.layout import StackLayout
from flashsale.stack.redis_nodes import RedisNode
from flashsale.stack.service import HOST, Service, family
from flashsale.stack.settings import StackSettings
from flashsale.stack.topology import services

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
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.layout = StackLayout.at(settings.home)
        self.services = services(self.layout, settings)

    def select(self, names: Iterable[str] | None) -> list[Service]:
        """The services named (`redis` names every node of a cluster, `broker` every broker group and the
        proxy); none named means all."""
        wanted = set(names or [])

        def named(service: Service) -> bool:
            return service.name in wanted or family(service.name) in wanted

        choices = list(dict.fromkeys(family(s.name) for s in self.services))
        unknown = sorted(n for n in wanted if n not in choices and not any(s.name == n for s in self.services))
        if unknown:
            raise InvalidInput(f"unknown service {', '.join(unknown)}; choose from {', '.join(choices)}")
        return [s for s in self.services if not wanted or named(s)]

    def _strangers(self) -> list[str]:
        """Services recorded as running in this home that the configured topology does not have."""
        ours = {s.name for s in self.services}
        found = []
        for pid_file in sorted(self.layout.pid_file("x").parent.glob("*.json")):
            record = procs.PidRecord.load(pid_file)
            if pid_file.stem not in ours and record and procs.is_alive(record):
                found.append(pid_file.stem)
        return found

    def _record(self, service: Service) -> procs.PidRecord | None:
        record = procs.PidRecord.load(self.layout.pid_file(service.name))
        return record if record and procs.is_alive(record) else None

    def pids(self, families: Iterable[str]) -> dict[str, int]:
        """The PID of each running service of these families, by service name."""
        wanted = set(families)
        running = ((s.name, self._record(s)) for s in self.services if family(s.name) in wanted)
        return {name: record.pid for name, record in running if record}

    # --- up ---------------------------------------------------------------------------------------
    def up(self, names: Iterable[str] | None = None, progress: Progress = logger.info) -> list[ServiceState]:
        services = self.select(names)
        strangers = self._strangers()
        if strangers:
            raise StackError(
                f"{', '.join(strangers)} of another topology run in {self.layout.home}",
                hint="stop them with `flashsale stack down` (it stops every service it finds running), then start "
                "again",
            )
        installed = install.ensure_packages()
        if installed:
            progress(f"installed {', '.join(installed)}")
        started: dict[str, float] = {}
        # Brokers register with the name server when they start, and the proxy needs them: one at a time.
        first = [s for s in services if not s.after_namesrv]
        later = [s for s in services if s.after_namesrv]
        for service in first:
            self._start(service, started, progress)
        for service in first:
            self._answer(service, started)
        self._form_redis_cluster(services, progress)
        for service in first:
            self._wait(service, started, progress)
        for service in later:
            self._start(service, started, progress)
            self._answer(service, started)
            self._wait(service, started, progress)
        if "namesrv" in started:
            # A name server just started knows no broker, so it hands out no route, until each broker
            # registers again (every 10 s, broker.conf): the stack is up once those already running have.
            for service in self.services:
                if service.after_namesrv and service not in later and self._record(service):
                    self._wait(service, started, progress, write=False)
        return [self._state(s, started=s.name in started, seconds=started.get(s.name)) for s in services]

    def _start(self, service: Service, started: dict[str, float], progress: Progress) -> None:
        if self._record(service):
            return
        busy = [p for p in service.ports if port_open(HOST, p)]
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

    def _alive(self, service: Service) -> Callable[[], bool]:
        record = self._record(service)
        if record is None:
            raise self._died(service)

        def alive() -> bool:
            if not procs.is_alive(record):
                raise self._died(service)
            return True

        return alive

    def _answer(self, service: Service, started: dict[str, float]) -> None:
        """A service just started answers at all, then gets its one-time set-up."""
        if service.name not in started:
            return
        alive = self._alive(service)
        if not poll_until(lambda: alive() and service.ping(), service.ready_timeout_s):
            raise self._timeout(service, "it never answered")
        service.after_start()

    def _form_redis_cluster(self, selected: list[Service], progress: Progress) -> None:
        members = [s for s in self.services if isinstance(s, RedisNode)]
        if not self.settings.topology.redis_cluster or not any(s in selected for s in members):
            return
        for node in members:
            self._alive(node)()  # a cluster is formed of all its nodes, or not at all
        if redis_nodes.form_cluster(members, self.settings.topology.redis_replicas):
            topology = self.settings.topology
            progress(
                f"created a Redis Cluster of {topology.redis_masters} masters, {topology.redis_replicas} "
                "replica(s) each"
            )

    def _wait(self, service: Service, started: dict[str, float], progress: Progress, *, write: bool = True) -> None:
        alive = self._alive(service)
        deadline = time.monotonic() + service.ready_timeout_s
        last = [""]

        def serves() -> str | None:
            alive()
            try:
                # Starting: a write proves it serves (status itself only reads).
                return service.probe() if write else service.check()
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
        """Stop the services named (none: all, and any service of another topology found running)."""
        services = self.select(names)
        strangers = self._strangers()
        if names:  # only the named services, and those of another topology of a family named
            strangers = [n for n in strangers if family(n) in names]
        stems = [*strangers, *(s.name for s in services)]
        stopping = []
        for name in reversed(stems):
            record = procs.PidRecord.load(self.layout.pid_file(name))
            if record and procs.is_alive(record):
                progress(f"stopping {name} (pid {record.pid})")
                stopping.append((record, _grace(services, name)))
        procs.terminate_all(stopping)
        for name in stems:
            self.layout.pid_file(name).unlink(missing_ok=True)
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


def _grace(services: list[Service], name: str) -> float:
    """Seconds to wait for `name` after SIGTERM (a service of another topology: the longest)."""
    return next((s.stop_grace_s for s in services if s.name == name), max(s.stop_grace_s for s in services))


def _tail(path: Any, lines: int = 20) -> str:
    try:
        text: str = path.read_text(errors="replace")
    except OSError:
        return "(no log yet)"
    return "\n".join(text.strip().splitlines()[-lines:])
