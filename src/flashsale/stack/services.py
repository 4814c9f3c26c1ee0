"""The servers of the local stack, each started natively on 127.0.0.1 with its state under FLASHSALE_HOME.

MariaDB and RocketMQ are here; Redis, a node or a cluster of them, is in redis_nodes.py.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from flashsale import constants as c
from flashsale.config import Settings
from flashsale.errors import FlashSaleError, StackError
from flashsale.stack import install
from flashsale.stack.layout import StackLayout, infra_file

HOST = c.DEFAULT_HOST
#: The stack's own NORMAL topic, used to prove the broker accepts a send.
PROBE_TOPIC = "flashsale-stack-probe"
#: JDK 17 module openings RocketMQ's store and controller code may reflect into.
JDK17_OPENS = (
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
)
#: The broker's settings shared with docker-compose.yml (transaction checks among them).
BROKER_CONF = "rocketmq/broker.conf"


def broker_settings() -> dict[str, str]:
    """The shared broker settings, as the broker reads them (java.util.Properties: a later key wins)."""
    settings = {}
    for line in infra_file(BROKER_CONF).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


class Service(ABC):
    name: str
    #: Seconds `up` waits for the service to become healthy.
    ready_timeout_s: ClassVar[float] = 60.0
    #: Seconds `down` waits after SIGTERM before SIGKILL.
    stop_grace_s: ClassVar[float] = 20.0

    def __init__(self, layout: StackLayout, settings: Settings) -> None:
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
        from flashsale.stack.procs import port_open

        return port_open(HOST, self.port)

    def after_start(self) -> None:
        """Work to do once the service answers, e.g. creating users (idempotent)."""

    @abstractmethod
    def check(self) -> str:
        """Raise if the service is not serving yet; return a short health note when it is. Reads only."""

    def probe(self) -> str:
        """A check that writes (the broker sends a message); by default the read-only check."""
        return self.check()


class MariaDBService(Service):
    name = "mariadb"
    ready_timeout_s = 90.0
    stop_grace_s = 60.0

    @property
    def port(self) -> int:
        return self.settings.ports.mysql

    @property
    def socket(self) -> Path:
        return self.dir / "mariadb.sock"

    def prepare(self) -> None:
        datadir = self.dir / "data"
        if (datadir / "mysql").is_dir():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        user = getpass.getuser()
        result = subprocess.run(
            [
                install.program("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={datadir}",
                f"--user={user}",
                "--auth-root-authentication-method=socket",
                f"--auth-root-socket-user={user}",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise StackError(f"mariadb-install-db failed:\n{tail}")

    def command(self) -> list[str]:
        cmd = [
            install.program("mariadbd"),
            "--no-defaults",
            f"--datadir={self.dir / 'data'}",
            f"--socket={self.socket}",
            f"--pid-file={self.dir / 'mariadb.pid'}",
            f"--port={self.port}",
            f"--bind-address={HOST}",
            f"--log-error={self.log_file}",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--innodb-buffer-pool-size=256M",
            "--max-connections=500",
            # Every commit reaches the disk: acked deductions must survive a crash.
            "--innodb-flush-log-at-trx-commit=1",
            # No table-wide AUTO-INC lock for INSERT ... SELECT (the orders): two consumers never queue on it.
            "--innodb-autoinc-lock-mode=2",
        ]
        if os.geteuid() == 0:
            cmd.append("--user=root")
        return cmd

    def _root_sql(self, sql: str) -> str:
        result = subprocess.run(
            [install.program("mariadb"), "--no-defaults", f"--socket={self.socket}", "-u", "root", "-N", "-e", sql],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise StackError(f"mariadb refused the bootstrap SQL: {result.stderr.strip()}")
        return result.stdout

    def ping(self) -> bool:
        try:
            self._root_sql("SELECT 1")
        except (StackError, subprocess.TimeoutExpired):
            return False
        return True

    def after_start(self) -> None:
        user, password = c.DEFAULT_DB_USER, c.DEFAULT_DB_PASSWORD
        statements = [f"CREATE DATABASE IF NOT EXISTS `{self.settings.mysql_database}` CHARACTER SET utf8mb4"]
        for host in ("127.0.0.1", "localhost"):
            statements += [
                f"CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY '{password}'",
                # `flashsale%` also covers the test databases (flashsale_test_*).
                f"GRANT ALL PRIVILEGES ON `{c.DEFAULT_DATABASE}%`.* TO '{user}'@'{host}'",
            ]
        self._root_sql("; ".join(statements))

    def check(self) -> str:
        import pymysql

        try:
            conn = pymysql.connect(
                host=HOST, port=self.port, user=c.DEFAULT_DB_USER, password=c.DEFAULT_DB_PASSWORD, connect_timeout=2
            )
        except pymysql.MySQLError as exc:
            raise StackError(f"mariadb does not accept the application user: {exc}") from exc
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                row = cur.fetchone()
        finally:
            conn.close()
        return f"mariadb {row[0] if row else '?'}"


class _RocketMQService(Service):
    """Name server and broker run from the same Maven-resolved jars and the same folder."""

    stop_grace_s = 40.0

    def __init__(self, layout: StackLayout, settings: Settings) -> None:
        super().__init__(layout, settings)
        self.dir = layout.service_dir("rocketmq")

    @property
    def conf_dir(self) -> Path:
        return self.dir / "conf"

    @property
    def namesrv_addr(self) -> str:
        return f"{HOST}:{self.settings.ports.namesrv}"

    @property
    def detail_log(self) -> Path:
        return self.dir / "home" / "logs" / "rocketmqlogs" / f"{self.logback}.log"

    logback: ClassVar[str]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["ROCKETMQ_HOME"] = str(self.dir)  # must be set; no file under it is read with ACL off
        env["NAMESRV_ADDR"] = self.namesrv_addr  # never let a component look a name server up elsewhere
        env.pop("RMQ_PROXY_HOME", None)
        return env

    def java(self, heap: str, main: str, *extra: str) -> list[str]:
        lib = install.rocketmq_lib()
        return [
            install.program("java"),
            "-server",
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:-OmitStackTraceInFastThrow",
            *JDK17_OPENS,
            *extra,
            f"-Duser.home={self.dir / 'home'}",
            f"-Drocketmq.home.dir={self.dir}",
            f"-Drmq.logback.configurationFile=rmq.{self.logback}.logback.xml",
            # -Dflashsale.home tells `ps` readers which stack a JVM belongs to.
            f"-Dflashsale.home={self.layout.home}",
            "-cp",
            f"{self.conf_dir}{os.pathsep}{lib}/*",
            main,
        ]


class NamesrvService(_RocketMQService):
    name = "namesrv"
    logback = "namesrv"

    @property
    def port(self) -> int:
        return self.settings.ports.namesrv

    def prepare(self) -> None:
        install.rocketmq_lib()
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "namesrv").mkdir(parents=True, exist_ok=True)
        # java.util.Properties: no comments after values, no trailing spaces.
        (self.conf_dir / "namesrv.conf").write_text(
            "\n".join(
                [
                    f"listenPort={self.port}",
                    f"bindAddress={HOST}",
                    f"kvConfigPath={self.dir / 'namesrv' / 'kvConfig.json'}",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return [
            *self.java("256m", "org.apache.rocketmq.namesrv.NamesrvStartup"),
            "-c",
            str(self.conf_dir / "namesrv.conf"),
        ]

    def check(self) -> str:
        from flashsale.adapters import rocketmq_admin

        brokers = rocketmq_admin.cluster_brokers(self.address, c.CLUSTER_NAME)
        return f"{len(brokers)} broker(s) registered"


class BrokerService(_RocketMQService):
    """The broker and its gRPC proxy in one JVM: `mqbroker --enable-proxy` is ProxyStartup in local mode."""

    name = "broker"
    logback = "proxy"
    ready_timeout_s = 120.0

    @property
    def port(self) -> int:
        return self.settings.ports.proxy_grpc

    @property
    def broker_addr(self) -> str:
        return f"{HOST}:{self.settings.ports.broker}"

    @property
    def ports(self) -> tuple[int, ...]:
        b = self.settings.ports.broker
        # remoting, fast (VIP) channel = port-2, HA = port+1, gRPC proxy, proxy remoting
        return (b, b - 2, b + 1, self.settings.ports.proxy_grpc, self.settings.ports.proxy_remoting)

    def prepare(self) -> None:
        install.rocketmq_lib()
        store = self.dir / "store"
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        overrides = [
            "",
            "# The native stack's own ports and paths (flashsale stack up).",
            f"brokerClusterName={c.CLUSTER_NAME}",
            f"namesrvAddr={self.namesrv_addr}",
            f"brokerIP1={HOST}",
            f"brokerIP2={HOST}",
            f"bindAddress={HOST}",
            f"listenPort={self.settings.ports.broker}",
            f"haListenPort={self.settings.ports.broker + 1}",
            f"storePathRootDir={store}",
            f"storePathCommitLog={store / 'commitlog'}",
            "",
        ]
        shared = infra_file(BROKER_CONF).read_text()
        (self.conf_dir / "broker.conf").write_text(shared.rstrip("\n") + "\n" + "\n".join(overrides))
        (self.conf_dir / "rmq-proxy.json").write_text(
            json.dumps(
                {
                    "rocketMQClusterName": c.CLUSTER_NAME,
                    "proxyMode": "local",
                    "namesrvAddr": self.namesrv_addr,
                    "localServeAddr": HOST,
                    "grpcServerPort": self.settings.ports.proxy_grpc,
                    "remotingListenPort": self.settings.ports.proxy_remoting,
                    "brokerConfigPath": str(self.conf_dir / "broker.conf"),
                    "grpcShutdownTimeSeconds": 3,
                    "transactionDataMaxWaitClearMillis": 1000,
                    "minInvisibleTimeMillsForRecv": 1000,
                    "grpcClientConsumerMinLongPollingTimeoutMillis": 1000,
                    "enablePrintJstack": False,
                },
                indent=2,
            )
        )

    def command(self) -> list[str]:
        return [
            *self.java("1g", "org.apache.rocketmq.proxy.ProxyStartup", "-XX:MaxDirectMemorySize=1g"),
            "-pm",
            "local",
            "-bc",
            str(self.conf_dir / "broker.conf"),
            "-pc",
            str(self.conf_dir / "rmq-proxy.json"),
            "-n",
            self.namesrv_addr,
        ]

    def check(self) -> str:
        """Read-only: registered with the name server, and its gRPC proxy port answers."""
        from flashsale.adapters import rocketmq_admin
        from flashsale.stack.procs import port_open

        if self.broker_addr not in rocketmq_admin.cluster_brokers(self.namesrv_addr, c.CLUSTER_NAME):
            raise StackError(f"broker {self.broker_addr} is not registered with the name server yet")
        if not port_open(HOST, self.port):
            raise StackError(f"the gRPC proxy on {self.address} does not answer")
        return f"registered as {self.broker_addr}"

    def probe(self) -> str:
        """Send one message through the proxy (on the stack's own probe topic): proof that it takes writes."""
        from flashsale.adapters import rocketmq_admin, rocketmq_producer

        if rocketmq_admin.topic_info(self.broker_addr, PROBE_TOPIC) is None:
            rocketmq_admin.create_topic(self.broker_addr, PROBE_TOPIC, queues=1, message_type="NORMAL")
        try:
            message_id = rocketmq_producer.probe_send(self.address, PROBE_TOPIC, timeout_s=15)
        except FlashSaleError as exc:
            raise StackError(f"the proxy does not accept a send yet: {exc}") from exc
        return f"accepted a send ({message_id})"


def services(layout: StackLayout, settings: Settings) -> list[Service]:
    """Every service of the stack's topology, in start order (the broker registers with the name server)."""
    from flashsale.stack import redis_nodes

    return [
        *redis_nodes.nodes(layout, settings),
        MariaDBService(layout, settings),
        NamesrvService(layout, settings),
        BrokerService(layout, settings),
    ]
