"""Settings: frozen dataclasses built from FLASHSALE_* environment variables.

Every variable is declared once in `VARIABLES` (name, default, meaning); the CLI prints that table in
`--help`, and a malformed value is reported with the variable's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from flashsale import constants as c
from flashsale import failpoints
from flashsale.errors import ConfigError

N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str

    @property
    def env(self) -> str:
        return c.ENV_PREFIX + self.name


VARIABLES: tuple[Variable, ...] = (
    Variable("HOME", "./.flashsale", "state folder of the local stack: data, logs, PIDs"),
    Variable("REDIS_PORT", str(c.DEFAULT_REDIS_PORT), "port of the stack's Redis"),
    Variable("MYSQL_PORT", str(c.DEFAULT_MYSQL_PORT), "port of the stack's MariaDB"),
    Variable("NAMESRV_PORT", str(c.DEFAULT_NAMESRV_PORT), "port of the stack's RocketMQ name server"),
    Variable(
        "BROKER_PORT", str(c.DEFAULT_BROKER_PORT), "broker remoting port (the broker also uses port-2 and port+1)"
    ),
    Variable("PROXY_PORT", str(c.DEFAULT_PROXY_GRPC_PORT), "RocketMQ gRPC proxy port (what clients use)"),
    Variable("PROXY_REMOTING_PORT", str(c.DEFAULT_PROXY_REMOTING_PORT), "RocketMQ proxy remoting port"),
    Variable("REDIS_URL", "", "Redis URL (default: redis://127.0.0.1:<REDIS_PORT>/0)"),
    Variable(
        "MYSQL_URL",
        "",
        "SQLAlchemy URL (default: mysql+pymysql://flashsale:flashsale@127.0.0.1:<MYSQL_PORT>/flashsale)",
    ),
    Variable("ROCKETMQ_ENDPOINT", "", "gRPC proxy host:port (default: 127.0.0.1:<PROXY_PORT>)"),
    Variable("NAMESRV_ADDR", "", "name server host:port for topic admin (default: 127.0.0.1:<NAMESRV_PORT>)"),
    Variable("NAMESPACE", c.DEFAULT_NAMESPACE, "prefix of topic and consumer group names"),
    Variable("HTTP_HOST", c.DEFAULT_HOST, "address the producer's HTTP service listens on"),
    Variable("HTTP_PORT", str(c.DEFAULT_HTTP_PORT), "port the producer's HTTP service listens on"),
    Variable("REDIS_CONNECTIONS", "64", "Redis connections of one producer (purchases beyond it wait for one)"),
    Variable("MAX_IN_FLIGHT", "2048", "purchases queued in the producer before it answers 503"),
    Variable("REDIS_TIMEOUT_S", "1.0", "Redis socket timeout; past it a purchase is reported pending"),
    Variable("SOLD_OUT_CACHE_S", "0.5", "how long a producer trusts its local sold-out flag"),
    Variable("CHECK_GRACE_S", "6", "age before the checker fences and rolls back a half message with no log"),
    Variable("BATCH_SIZE", "256", "most deductions the consumer applies in one database transaction"),
    Variable("INVISIBLE_S", "30", "seconds a received message stays hidden from other consumers"),
    Variable("POLL_WAIT_S", "2", "long-poll wait of one receive call"),
    Variable("MAX_BACKOFF_S", "8", "longest pause of the consumer after a database failure"),
    Variable("SETTLE_S", "30", "reconcile ignores Redis deductions younger than this (still in flight)"),
    Variable("FAILPOINTS", "", "comma-separated crash points for fault-injection tests (see docs/operations.md)"),
)
_BY_NAME = {v.name: v for v in VARIABLES}


class _Env:
    """Typed, named access to FLASHSALE_* variables."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str:
        var = _BY_NAME[name]
        return self._environ.get(var.env, var.default).strip()

    def integer(self, name: str, *, minimum: int = 0) -> int:
        return self._parsed(name, int, "an integer", minimum)

    def number(self, name: str, *, minimum: float = 0.0) -> float:
        return self._parsed(name, float, "a number", minimum)

    def _parsed(self, name: str, convert: Callable[[str], N], kind: str, minimum: N) -> N:
        env, raw = _BY_NAME[name].env, self.text(name)
        try:
            value = convert(raw)
        except ValueError:
            raise ConfigError(f"{env}={raw!r} is not {kind}") from None
        if value < minimum:
            raise ConfigError(f"{env}={value} must be >= {minimum}")
        return value

    def port(self, name: str) -> int:
        value = self.integer(name, minimum=1)
        if value > 65535:
            raise ConfigError(f"{_BY_NAME[name].env}={value} is not a TCP port (1-65535)")
        return value


@dataclass(frozen=True)
class StackPorts:
    redis: int = c.DEFAULT_REDIS_PORT
    mysql: int = c.DEFAULT_MYSQL_PORT
    namesrv: int = c.DEFAULT_NAMESRV_PORT
    broker: int = c.DEFAULT_BROKER_PORT
    proxy_grpc: int = c.DEFAULT_PROXY_GRPC_PORT
    proxy_remoting: int = c.DEFAULT_PROXY_REMOTING_PORT


@dataclass(frozen=True)
class ProducerSettings:
    http_host: str = c.DEFAULT_HOST
    http_port: int = c.DEFAULT_HTTP_PORT
    redis_connections: int = 64
    max_in_flight: int = 2048
    redis_timeout_s: float = 1.0
    sold_out_cache_s: float = 0.5


@dataclass(frozen=True)
class ConsumerSettings:
    batch_size: int = 256
    invisible_s: int = 30
    poll_wait_s: int = 2
    max_backoff_s: float = 8.0


@dataclass(frozen=True)
class Settings:
    home: Path = Path(".flashsale")
    ports: StackPorts = field(default_factory=StackPorts)
    redis_url: str = ""
    mysql_url: str = ""
    rocketmq_endpoint: str = ""
    namesrv_addr: str = ""
    namespace: str = c.DEFAULT_NAMESPACE
    producer: ProducerSettings = field(default_factory=ProducerSettings)
    consumer: ConsumerSettings = field(default_factory=ConsumerSettings)
    check_grace_s: float = 6.0
    settle_s: float = 30.0
    failpoints: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Client addresses default to the local stack's ports: one place decides each port.
        host = c.DEFAULT_HOST
        defaults = {
            "redis_url": f"redis://{host}:{self.ports.redis}/0",
            "mysql_url": (
                f"mysql+pymysql://{c.DEFAULT_DB_USER}:{c.DEFAULT_DB_PASSWORD}@{host}:{self.ports.mysql}/{c.DEFAULT_DATABASE}"
            ),
            "rocketmq_endpoint": f"{host}:{self.ports.proxy_grpc}",
            "namesrv_addr": f"{host}:{self.ports.namesrv}",
        }
        for name, value in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)
        _check_url(self.redis_url, ("redis", "rediss"), "REDIS_URL")
        _check_url(self.mysql_url, ("mysql+pymysql",), "MYSQL_URL")
        _check_hostport(self.rocketmq_endpoint, "ROCKETMQ_ENDPOINT")
        _check_hostport(self.namesrv_addr, "NAMESRV_ADDR")
        if not c.NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ConfigError(
                f"{c.ENV_PREFIX}NAMESPACE={self.namespace!r} must be 1-40 letters, digits, '-' or '_' (it names topics)"
            )
        unknown = sorted(self.failpoints - failpoints.KNOWN)
        if unknown:
            raise ConfigError(
                f"{c.ENV_PREFIX}FAILPOINTS names unknown point(s) {', '.join(unknown)}",
                hint=f"known: {', '.join(sorted(failpoints.KNOWN))}",
            )

    @property
    def deduction_topic(self) -> str:
        return f"{self.namespace}-{c.DEDUCTION_TOPIC_SUFFIX}"

    @property
    def replay_topic(self) -> str:
        return f"{self.namespace}-{c.REPLAY_TOPIC_SUFFIX}"

    @property
    def consumer_group(self) -> str:
        return f"{self.namespace}-{c.CONSUMER_GROUP_SUFFIX}"

    @property
    def mysql_database(self) -> str:
        return urlsplit(self.mysql_url).path.lstrip("/") or c.DEFAULT_DATABASE

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = _Env(os.environ if environ is None else environ)
        ports = StackPorts(
            redis=env.port("REDIS_PORT"),
            mysql=env.port("MYSQL_PORT"),
            namesrv=env.port("NAMESRV_PORT"),
            broker=env.port("BROKER_PORT"),
            proxy_grpc=env.port("PROXY_PORT"),
            proxy_remoting=env.port("PROXY_REMOTING_PORT"),
        )
        producer = ProducerSettings(
            http_host=env.text("HTTP_HOST"),
            http_port=env.port("HTTP_PORT"),
            redis_connections=env.integer("REDIS_CONNECTIONS", minimum=1),
            max_in_flight=env.integer("MAX_IN_FLIGHT", minimum=1),
            redis_timeout_s=env.number("REDIS_TIMEOUT_S", minimum=0.01),
            sold_out_cache_s=env.number("SOLD_OUT_CACHE_S"),
        )
        consumer = ConsumerSettings(
            batch_size=env.integer("BATCH_SIZE", minimum=1),
            invisible_s=env.integer("INVISIBLE_S", minimum=2),
            poll_wait_s=env.integer("POLL_WAIT_S", minimum=1),
            max_backoff_s=env.number("MAX_BACKOFF_S", minimum=0.1),
        )
        return cls(
            home=Path(env.text("HOME") or ".flashsale").expanduser(),
            ports=ports,
            redis_url=env.text("REDIS_URL"),
            mysql_url=env.text("MYSQL_URL"),
            rocketmq_endpoint=env.text("ROCKETMQ_ENDPOINT"),
            namesrv_addr=env.text("NAMESRV_ADDR"),
            namespace=env.text("NAMESPACE"),
            producer=producer,
            consumer=consumer,
            check_grace_s=env.number("CHECK_GRACE_S"),
            settle_s=env.number("SETTLE_S"),
            failpoints=frozenset(p.strip() for p in env.text("FAILPOINTS").split(",") if p.strip()),
        )


def _check_url(url: str, schemes: tuple[str, ...], var: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(
            f"{c.ENV_PREFIX}{var}={url!r} is not a valid URL",
            hint=f"expected {' or '.join(s + '://host:port/...' for s in schemes)}",
        )


def _check_hostport(value: str, var: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{c.ENV_PREFIX}{var}={value!r} must be host:port")
