"""Where the local stack keeps things: one state folder (FLASHSALE_HOME) and one shared jar cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flashsale.errors import StackError

#: RocketMQ server version resolved from Maven Central by infra/rocketmq/pom.xml.
ROCKETMQ_VERSION = "5.3.3"


@dataclass(frozen=True)
class StackLayout:
    home: Path

    @classmethod
    def at(cls, home: Path) -> StackLayout:
        return cls(home.expanduser().resolve())

    def service_dir(self, name: str) -> Path:
        return self.home / name

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.home / "run" / f"{name}.json"


def jar_cache() -> Path:
    """RocketMQ jars are shared by every state folder of this user and survive `stack down`."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flashsale" / f"rocketmq-{ROCKETMQ_VERSION}"


def infra_file(relative: str) -> Path:
    """A file of the repository's infra/ folder, from the installed wheel or from a source checkout."""
    here = Path(__file__).resolve()
    for candidate in (here.parent.parent / "_infra" / relative, here.parents[3] / "infra" / relative):
        if candidate.is_file():
            return candidate
    raise StackError(f"infra/{relative} is missing from this installation", hint="reinstall flashsale")
