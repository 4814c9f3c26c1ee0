"""What every server of the local stack is to the launcher: started natively on 127.0.0.1, its state under
FLASHSALE_HOME, its health checked."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from flashsale import constants as c
from flashsale.net import port_open
from flashsale.stack.layout import StackLayout
from flashsale.stack.settings import StackSettings

HOST = c.DEFAULT_HOST


def family(name: str) -> str:
    """The name `stack` commands know a service by: `redis` for every Redis node, `broker` for every broker
    group and their proxy."""
    kind = name.split("-")[0]
    return "broker" if kind == "proxy" else kind


class Service(ABC):
    name: str
    #: Seconds `up` waits for the service to become healthy.
    ready_timeout_s: ClassVar[float] = 60.0
    #: Seconds `down` waits after SIGTERM before SIGKILL.
    stop_grace_s: ClassVar[float] = 20.0
    #: Started once the name server answers, one after another in the topology's order.
    after_namesrv: ClassVar[bool] = False

    def __init__(self, layout: StackLayout, settings: StackSettings) -> None:
        self.layout = layout
        self.settings = settings
        self.dir = layout.service_dir(self.name)

    @property
    @abstractmethod
    def port(self) -> int: ...

    @property
    def ports(self) -> tuple[int, ...]:
        """Every port the service binds: all must be free before it starts."""
        return (self.port,)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.layout.log_file(self.name)

    @property
    def detail_log(self) -> Path:
        """Where to look first when the service fails."""
        return self.log_file

    def prepare(self) -> None:
        """Write config files and initialise data folders (idempotent)."""

    @abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str] | None:
        return None

    def ping(self) -> bool:
        """Cheap liveness: is it answering at all? (`after_start` runs once this is true.)"""
        return port_open(HOST, self.port)

    def after_start(self) -> None:
        """Work to do once the service answers, e.g. creating users (idempotent)."""

    @abstractmethod
    def check(self) -> str:
        """Raise if the service is not serving yet; return a short health note when it is. Reads only."""

    def probe(self) -> str:
        """A check that writes (the broker sends a message); by default the read-only check."""
        return self.check()
