"""The local stack's own settings: its state folder, the ports its servers listen on, its topology.

Read from FLASHSALE_* variables like the product's settings (flashsale.config); the server ports are the
same declaration the product's client addresses default to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from flashsale import constants as c
from flashsale.config import DEFAULT_DATABASE, ServerPorts, from_env, group, setting
from flashsale.errors import ConfigError

#: Broker groups the local stack can run (broker-a, broker-b, ...).
MAX_BROKER_GROUPS = 4


@dataclass(frozen=True)
class StackTopology:
    redis_masters: int = setting(
        1,
        "REDIS_MASTERS",
        "Redis masters of the stack: 1 is a single node, 3 or more a Redis Cluster on REDIS_PORT and up",
        kind="int",
        minimum=1,
    )
    redis_replicas: int = setting(
        0,
        "REDIS_REPLICAS",
        "replicas of each Redis Cluster master (a replica takes over when its master dies)",
        kind="int",
    )
    broker_groups: int = setting(
        1,
        "BROKER_GROUPS",
        "RocketMQ broker groups: 1 is a broker with its own gRPC proxy, 2 or more are broker-a, broker-b, ... "
        "behind one proxy (group n listens on BROKER_PORT + 10n)",
        kind="int",
        minimum=1,
    )

    def __post_init__(self) -> None:
        if self.broker_groups > MAX_BROKER_GROUPS:
            raise ConfigError(
                f"{c.ENV_PREFIX}BROKER_GROUPS={self.broker_groups}: the stack runs at most {MAX_BROKER_GROUPS}",
                hint=f"use 1 to {MAX_BROKER_GROUPS}",
            )
        if self.redis_masters == 2:
            raise ConfigError(
                f"{c.ENV_PREFIX}REDIS_MASTERS=2: a Redis Cluster needs at least 3 masters",
                hint="use 1 for a single node, or 3 or more for a cluster",
            )
        if self.redis_masters == 1 and self.redis_replicas:
            raise ConfigError(
                f"{c.ENV_PREFIX}REDIS_REPLICAS={self.redis_replicas} needs a Redis Cluster",
                hint=f"set {c.ENV_PREFIX}REDIS_MASTERS to 3 or more",
            )

    @property
    def redis_cluster(self) -> bool:
        return self.redis_masters > 1

    @property
    def redis_nodes(self) -> int:
        return self.redis_masters * (1 + self.redis_replicas)


@dataclass(frozen=True)
class StackSettings:
    home: Path = setting(Path(".flashsale"), "HOME", "state folder of the local stack: data, logs, PIDs", kind="path")
    ports: ServerPorts = group(ServerPorts)
    topology: StackTopology = group(StackTopology)
    #: The database MariaDB creates for the application: the one the product's MYSQL_URL names.
    database: str = DEFAULT_DATABASE

    def with_overrides(self, **changes: object) -> StackSettings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StackSettings:
        settings: StackSettings = from_env(cls, environ)
        return settings
