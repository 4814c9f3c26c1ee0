"""Settings: frozen dataclasses built from FLASHSALE_* environment variables.

Each setting is declared once, as a dataclass field made by `setting(default, name, meaning)`: that one
line gives its default, its variable and what it means. `variables()` (printed by `--help`) and
`from_env` are both read off those fields, and a malformed value is reported with its variable's name.
A settings dataclass may hold another (`group`); the local stack's own settings (StackSettings, in the
stack package) are built the same way and hold the same `ServerPorts`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from flashsale import constants as c
from flashsale import failpoints
from flashsale.errors import ConfigError

# The application's database and user: the default MYSQL_URL names them, and the local stack creates them.
DEFAULT_DATABASE = "flashsale"
DEFAULT_DB_USER = "flashsale"
DEFAULT_DB_PASSWORD = "flashsale"

#: How a variable's text becomes a value.
Kind = Literal["text", "int", "number", "port", "path", "names"]


def setting(default: Any, name: str, meaning: str, *, kind: Kind = "text", minimum: float = 0) -> Any:
    """A settings field whose value comes from FLASHSALE_<name> (see the module docstring)."""
    metadata = {"env": name, "meaning": meaning, "kind": kind, "minimum": minimum}
    if isinstance(default, frozenset):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


def group(cls: type) -> Any:
    """A settings field holding another settings dataclass, whose own settings are read the same way."""
    return field(default_factory=cls, metadata={"group": cls})


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str

    @property
    def env(self) -> str:
        return c.ENV_PREFIX + self.name


@dataclass(frozen=True)
class ServerPorts:
    """Where the servers listen: client addresses default to these ports, and the local stack starts its
    servers on them."""

    redis: int = setting(c.DEFAULT_REDIS_PORT, "REDIS_PORT", "port of the stack's Redis", kind="port")
    mysql: int = setting(c.DEFAULT_MYSQL_PORT, "MYSQL_PORT", "port of the stack's MariaDB", kind="port")
    namesrv: int = setting(
        c.DEFAULT_NAMESRV_PORT, "NAMESRV_PORT", "port of the stack's RocketMQ name server", kind="port"
    )
    broker: int = setting(
        c.DEFAULT_BROKER_PORT,
        "BROKER_PORT",
        "broker remoting port (the broker also uses port-2 and port+1)",
        kind="port",
    )
    proxy_grpc: int = setting(
        c.DEFAULT_PROXY_GRPC_PORT, "PROXY_PORT", "RocketMQ gRPC proxy port (what clients use)", kind="port"
    )
    proxy_remoting: int = setting(
        c.DEFAULT_PROXY_REMOTING_PORT, "PROXY_REMOTING_PORT", "RocketMQ proxy remoting port", kind="port"
    )


@dataclass(frozen=True)
class ClientSettings:
    """What every process's Redis client shares."""

    redis_timeout_s: float = setting(
        1.0,
        "REDIS_TIMEOUT_S",
        "Redis socket timeout; past it a purchase is reported pending",
        kind="number",
        minimum=0.01,
    )
    redis_wait_ms: int = setting(
        500,
        "REDIS_WAIT_MS",
        "with Redis Cluster replicas: how long a pre-deduct or a check waits for a replica to hold it (WAIT); "
        "0: never wait (a failover may then lose what a buyer was told)",
        kind="int",
    )


@dataclass(frozen=True)
class PaymentSettings:
    """How the producer trusts the payment service's confirmations (POST /orders/{token}/pay)."""

    secret: str = setting(
        "",
        "PAYMENT_SECRET",
        "shared secret the payment service signs its confirmations with (HMAC-SHA256); empty: payments are refused",
    )
    max_age_s: float = setting(
        300.0,
        "PAYMENT_MAX_AGE_S",
        "a signed payment is refused when its ts_ms is further than this from the producer's clock, either way",
        kind="number",
        minimum=1,
    )


@dataclass(frozen=True)
class ProducerSettings:
    http_host: str = setting(c.DEFAULT_HOST, "HTTP_HOST", "address the producer's HTTP service listens on")
    http_port: int = setting(
        c.DEFAULT_HTTP_PORT, "HTTP_PORT", "port the producer's HTTP service listens on", kind="port"
    )
    redis_connections: int = setting(
        64,
        "REDIS_CONNECTIONS",
        "Redis connections of one producer (purchases beyond it wait for one)",
        kind="int",
        minimum=1,
    )
    max_in_flight: int = setting(
        2048, "MAX_IN_FLIGHT", "purchases queued in the producer before it answers 503", kind="int", minimum=1
    )
    sold_out_cache_s: float = setting(
        0.5,
        "SOLD_OUT_CACHE_S",
        "how long a producer trusts what it last saw of a SKU's stock: sold out, or stock left (no read ahead of"
        " a group's transaction); 0: every group is read first",
        kind="number",
    )
    group_size: int = setting(
        256,
        "GROUP_SIZE",
        "most purchases of one SKU sharing one transaction (1: a transaction each)",
        kind="int",
        minimum=1,
    )
    group_wait_ms: float = setting(
        2.0, "GROUP_WAIT_MS", "longest a purchase waits for others to share its transaction", kind="number"
    )
    group_hold_ms: float = setting(
        50.0,
        "GROUP_HOLD_MS",
        "longest a group whose wait is up waits on while another group of its SKU is under way (0: never)",
        kind="number",
    )
    payments: PaymentSettings = group(PaymentSettings)


@dataclass(frozen=True)
class ConsumerSettings:
    batch_size: int = setting(
        256, "BATCH_SIZE", "most deductions the consumer applies in one database transaction", kind="int", minimum=1
    )
    invisible_s: int = setting(
        30, "INVISIBLE_S", "seconds a received message stays hidden from other consumers", kind="int", minimum=2
    )
    poll_wait_s: int = setting(1, "POLL_WAIT_S", "long-poll wait of one receive call", kind="int", minimum=1)
    max_backoff_s: float = setting(
        8.0, "MAX_BACKOFF_S", "longest pause of the consumer after a database failure", kind="number", minimum=0.1
    )


@dataclass(frozen=True)
class Settings:
    ports: ServerPorts = group(ServerPorts)
    redis_url: str = setting("", "REDIS_URL", "Redis URL (default: redis://127.0.0.1:<REDIS_PORT>/0)")
    mysql_url: str = setting(
        "",
        "MYSQL_URL",
        "SQLAlchemy URL (default: mysql+pymysql://flashsale:flashsale@127.0.0.1:<MYSQL_PORT>/flashsale)",
    )
    rocketmq_endpoint: str = setting("", "ROCKETMQ_ENDPOINT", "gRPC proxy host:port (default: 127.0.0.1:<PROXY_PORT>)")
    namesrv_addr: str = setting(
        "", "NAMESRV_ADDR", "name server host:port for topic admin (default: 127.0.0.1:<NAMESRV_PORT>)"
    )
    partition_refill: int = setting(
        100,
        "PARTITION_REFILL",
        "partitioned stock: units one refill moves from a SKU's pool to a partition's standby sub-domain",
        kind="int",
        minimum=1,
    )
    partition_threshold: int = setting(
        10,
        "PARTITION_THRESHOLD",
        "partitioned stock: a partition switches to its standby sub-domain when the active one falls below this",
        kind="int",
    )
    clients: ClientSettings = group(ClientSettings)
    namespace: str = setting(c.DEFAULT_NAMESPACE, "NAMESPACE", "prefix of topic and consumer group names")
    metrics_host: str = setting(
        c.DEFAULT_HOST, "METRICS_HOST", "address the consumer's and checker's /metrics and /readyz listen on"
    )
    producer: ProducerSettings = group(ProducerSettings)
    consumer: ConsumerSettings = group(ConsumerSettings)
    check_grace_s: float = setting(
        6.0,
        "CHECK_GRACE_S",
        "age before the checker fences and rolls back a half message that never ran",
        kind="number",
    )
    settle_s: float = setting(
        30.0, "SETTLE_S", "reconcile ignores Redis deductions younger than this (still in flight)", kind="number"
    )
    failpoints: frozenset[str] = setting(
        frozenset(),
        "FAILPOINTS",
        "comma-separated crash points for fault-injection tests (see docs/operations.md)",
        kind="names",
    )
    log_format: str = setting("text", "LOG_FORMAT", "text (one line per event) or json (one object per line)")

    def __post_init__(self) -> None:
        # Client addresses default to the local stack's ports: one place decides each port.
        host = c.DEFAULT_HOST
        defaults = {
            "redis_url": f"redis://{host}:{self.ports.redis}/0",
            "mysql_url": (
                f"mysql+pymysql://{DEFAULT_DB_USER}:{DEFAULT_DB_PASSWORD}@{host}:{self.ports.mysql}/{DEFAULT_DATABASE}"
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
        if self.clients.redis_wait_ms >= self.clients.redis_timeout_s * 1000:
            raise ConfigError(
                f"{c.ENV_PREFIX}REDIS_WAIT_MS={self.clients.redis_wait_ms} must be shorter than "
                f"{c.ENV_PREFIX}REDIS_TIMEOUT_S={self.clients.redis_timeout_s} (a WAIT longer than the socket "
                "timeout always times out)"
            )
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"{c.ENV_PREFIX}LOG_FORMAT={self.log_format!r} must be text or json")
        unknown = sorted(f for f in self.failpoints if not _is_failpoint(f))
        if unknown:
            raise ConfigError(
                f"{c.ENV_PREFIX}FAILPOINTS names unknown point(s) {', '.join(unknown)}",
                hint=f"known: {', '.join(sorted(failpoints.KNOWN))}, each alone or as name@N (the N-th time)",
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
    def deadline_topic(self) -> str:
        return f"{self.namespace}-{c.DEADLINE_TOPIC_SUFFIX}"

    @property
    def expiry_group(self) -> str:
        return f"{self.namespace}-{c.EXPIRY_GROUP_SUFFIX}"

    @property
    def mysql_database(self) -> str:
        return urlsplit(self.mysql_url).path.lstrip("/") or DEFAULT_DATABASE

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        settings: Settings = from_env(cls, environ)
        return settings


def from_env(cls: type, environ: Mapping[str, str] | None = None) -> Any:
    """A settings dataclass read from FLASHSALE_* variables (`environ`, by default the process's)."""
    return _from_env(cls, os.environ if environ is None else environ)


def _fields(cls: type) -> Iterator[dataclasses.Field[Any]]:
    """Every setting of `cls` and of the settings dataclasses it holds, in declaration order."""
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            yield from _fields(f.metadata["group"])
        elif "env" in f.metadata:
            yield f


def _from_env(cls: type, environ: Mapping[str, str]) -> Any:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            values[f.name] = _from_env(f.metadata["group"], environ)
        elif "env" in f.metadata:
            values[f.name] = _parse(f, environ.get(c.ENV_PREFIX + f.metadata["env"]))
    return cls(**values)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory
    return factory()


def _parse(f: dataclasses.Field[Any], raw: str | None) -> Any:
    env, kind, minimum = c.ENV_PREFIX + f.metadata["env"], f.metadata["kind"], f.metadata["minimum"]
    if raw is None or not raw.strip():
        return _default(f)
    text = raw.strip()
    if kind == "text":
        return text
    if kind == "path":
        return Path(text).expanduser()
    if kind == "names":
        return frozenset(p.strip() for p in text.split(",") if p.strip())
    convert, what = (float, "a number") if kind == "number" else (int, "an integer")
    try:
        value = convert(text)
    except ValueError:
        raise ConfigError(f"{env}={text!r} is not {what}") from None
    if kind == "port" and not 0 < value < 65536:
        raise ConfigError(f"{env}={value} is not a TCP port (1-65535)")
    if value < minimum:
        raise ConfigError(f"{env}={value} must be >= {minimum}")
    return value


def _shown(default: Any) -> str:
    if isinstance(default, frozenset):
        return ",".join(sorted(default))
    return str(default)


def variables(*classes: type) -> tuple[Variable, ...]:
    """The FLASHSALE_* variables of these settings dataclasses, in declaration order; a settings field two
    of them hold (the server ports) is listed once."""
    fields = dict.fromkeys(f for cls in classes for f in _fields(cls))
    return tuple(Variable(f.metadata["env"], _shown(_default(f)), f.metadata["meaning"]) for f in fields)


def field_default(cls: type, name: str) -> Any:
    """The default of one setting, for a CLI option that overrides it."""
    return _default(next(f for f in dataclasses.fields(cls) if f.name == name))


def variable(cls: type, name: str) -> str:
    """The FLASHSALE_* variable of one setting, for a CLI option's envvar."""
    return str(c.ENV_PREFIX + next(f for f in dataclasses.fields(cls) if f.name == name).metadata["env"])


def _is_failpoint(entry: str) -> bool:
    try:
        failpoints.parse(entry)
    except ValueError:
        return False
    return True


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
