"""RocketMQ of the local stack: the name server, then one broker group with its own gRPC proxy, or several
broker groups behind one proxy in cluster mode."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

from flashsale import constants as c
from flashsale.errors import BusError, FlashSaleError, ServiceUnavailable, StackError
from flashsale.models import Resolution
from flashsale.net import port_open
from flashsale.polling import poll_until
from flashsale.stack import install
from flashsale.stack.layout import StackLayout, infra_file
from flashsale.stack.service import HOST, Service
from flashsale.stack.settings import StackSettings

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
#: The gRPC proxy's settings shared with docker-compose.yml (the stack sets its own ports and mode).
PROXY_CONF = "rocketmq/rmq-proxy.json"
#: Broker group n listens on BROKER_PORT + n * this (each group uses its port, port-2 and port+1).
BROKER_PORT_STEP = 10


def broker_settings() -> dict[str, str]:
    """The shared broker settings, as the broker reads them (java.util.Properties: a later key wins)."""
    settings = {}
    for line in infra_file(BROKER_CONF).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


class _RocketMQService(Service):
    """Name server, brokers and proxy run from the same Maven-resolved jars, under one folder."""

    stop_grace_s = 40.0
    after_namesrv = True

    def __init__(self, layout: StackLayout, settings: StackSettings) -> None:
        super().__init__(layout, settings)
        self.dir = layout.service_dir("rocketmq")

    @property
    def conf_dir(self) -> Path:
        return self.dir / "conf"

    @property
    def user_home(self) -> Path:
        """The JVM's user.home, where its logs go: one per process of a broker group topology."""
        return self.dir / "home"

    @property
    def namesrv_addr(self) -> str:
        return f"{HOST}:{self.settings.ports.namesrv}"

    @property
    def detail_log(self) -> Path:
        return self.user_home / "logs" / "rocketmqlogs" / f"{self.logback}.log"

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
            f"-Duser.home={self.user_home}",
            f"-Drocketmq.home.dir={self.dir}",
            f"-Drmq.logback.configurationFile=rmq.{self.logback}.logback.xml",
            # -Dflashsale.home tells `ps` readers which stack a JVM belongs to.
            f"-Dflashsale.home={self.layout.home}",
            "-cp",
            f"{self.conf_dir}{os.pathsep}{lib}/*",
            main,
        ]

    def write_proxy_conf(self, path: Path, **own: object) -> None:
        """The shared proxy settings with the stack's own name server and ports (`own` wins)."""
        settings = json.loads(infra_file(PROXY_CONF).read_text())
        settings.update(
            namesrvAddr=self.namesrv_addr,
            localServeAddr=HOST,
            grpcServerPort=self.settings.ports.proxy_grpc,
            remotingListenPort=self.settings.ports.proxy_remoting,
            **own,
        )
        path.write_text(json.dumps(settings, indent=2))

    @property
    def proxy_ports(self) -> tuple[int, int]:
        """The gRPC proxy's ports: gRPC (what clients use) and remoting."""
        return (self.settings.ports.proxy_grpc, self.settings.ports.proxy_remoting)

    def proxy_answers(self) -> None:
        if not port_open(HOST, self.settings.ports.proxy_grpc):
            raise StackError(f"the gRPC proxy on {HOST}:{self.settings.ports.proxy_grpc} does not answer")

    def brokers(self) -> list[str]:
        from flashsale.adapters.rocketmq import admin as rocketmq_admin

        return rocketmq_admin.cluster_brokers(self.namesrv_addr, c.CLUSTER_NAME)

    def send_probe(self, proxy: str) -> str:
        """Send one message through the proxy on the stack's own probe topic, which every broker carries."""
        from flashsale.adapters.rocketmq import admin as rocketmq_admin

        for broker in self.brokers():
            if rocketmq_admin.topic_info(broker, PROBE_TOPIC) is None:
                rocketmq_admin.create_topic(broker, PROBE_TOPIC, queues=1, message_type="NORMAL")
        try:
            message_id = probe_send(proxy, PROBE_TOPIC, timeout_s=15)
        except FlashSaleError as exc:
            raise StackError(f"the proxy does not accept a send yet: {exc}") from exc
        return f"accepted a send ({message_id})"


class NamesrvService(_RocketMQService):
    name = "namesrv"
    logback = "namesrv"
    after_namesrv = False

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
                    # Otherwise it probes itself every 3 s at the host's first non-loopback address.
                    "scanAvailableNameSrv=false",
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
        return f"{len(self.brokers())} broker(s) registered"


class _Broker(_RocketMQService):
    """One broker group's master: its settings are the shared file's plus its own name, ports and paths."""

    broker_name: str = "broker-a"

    @property
    def remoting_port(self) -> int:
        return self.settings.ports.broker

    @property
    def broker_addr(self) -> str:
        return f"{HOST}:{self.remoting_port}"

    @property
    def broker_ports(self) -> tuple[int, ...]:
        b = self.remoting_port
        return (b, b - 2, b + 1)  # remoting, fast (VIP) channel = port-2, HA = port+1

    @property
    def store(self) -> Path:
        return self.dir / "store"

    @property
    def conf_file(self) -> Path:
        return self.conf_dir / "broker.conf"

    def write_broker_conf(self) -> None:
        install.rocketmq_lib()
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        overrides = [
            "",
            "# The native stack's own name, ports and paths (flashsale stack up).",
            f"brokerClusterName={c.CLUSTER_NAME}",
            f"brokerName={self.broker_name}",
            f"namesrvAddr={self.namesrv_addr}",
            f"brokerIP1={HOST}",
            f"brokerIP2={HOST}",
            f"bindAddress={HOST}",
            f"listenPort={self.remoting_port}",
            f"haListenPort={self.remoting_port + 1}",
            f"storePathRootDir={self.store}",
            f"storePathCommitLog={self.store / 'commitlog'}",
            "",
        ]
        shared = infra_file(BROKER_CONF).read_text()
        self.conf_file.write_text(shared.rstrip("\n") + "\n" + "\n".join(overrides))

    def registered(self, *, nudge: bool = False) -> str:
        """Raise unless the name server lists this broker; with `nudge` (starting), first ask a broker that
        answers and is not listed to register at once rather than at its next period, 10 s on."""
        if self.broker_addr not in self.brokers():
            if nudge:
                self._register_now()
            raise StackError(f"broker {self.broker_addr} is not registered with the name server yet")
        return f"registered as {self.broker_name} on {self.broker_addr}"

    def _register_now(self) -> None:
        from flashsale.adapters.rocketmq import admin as rocketmq_admin

        try:
            rocketmq_admin.register_now(self.broker_addr)
        except FlashSaleError:  # not answering yet: asked again at the next poll
            pass

    def probe(self) -> str:
        return self.registered(nudge=True)


class BrokerService(_Broker):
    """One broker group: the broker and its gRPC proxy in one JVM (`mqbroker --enable-proxy` is
    ProxyStartup in local mode). Its proxy serves only its own broker's queues."""

    name = "broker"
    logback = "proxy"
    ready_timeout_s = 120.0

    @property
    def port(self) -> int:
        return self.settings.ports.proxy_grpc

    @property
    def ports(self) -> tuple[int, ...]:
        return (*self.broker_ports, *self.proxy_ports)

    def prepare(self) -> None:
        self.write_broker_conf()
        self.write_proxy_conf(self.conf_dir / "rmq-proxy.json", proxyMode="local", brokerConfigPath=str(self.conf_file))

    def command(self) -> list[str]:
        return [
            *self.java("1g", "org.apache.rocketmq.proxy.ProxyStartup", "-XX:MaxDirectMemorySize=1g"),
            "-pm",
            "local",
            "-bc",
            str(self.conf_file),
            "-pc",
            str(self.conf_dir / "rmq-proxy.json"),
            "-n",
            self.namesrv_addr,
        ]

    def check(self) -> str:
        """Read-only: registered with the name server, and its gRPC proxy port answers."""
        note = self.registered()
        self.proxy_answers()
        return note

    def probe(self) -> str:
        self.registered(nudge=True)
        self.proxy_answers()
        return self.send_probe(self.address)


class GroupBroker(_Broker):
    """Broker group n of several (broker-a, broker-b, ...): a plain broker on BROKER_PORT + 10n; the
    proxy reaches every group."""

    logback = "broker"
    ready_timeout_s = 120.0

    def __init__(self, layout: StackLayout, settings: StackSettings, index: int) -> None:
        self.index = index
        self.broker_name = self.name = f"broker-{chr(ord('a') + index)}"
        super().__init__(layout, settings)

    @property
    def remoting_port(self) -> int:
        return self.settings.ports.broker + BROKER_PORT_STEP * self.index

    @property
    def port(self) -> int:
        return self.remoting_port

    @property
    def ports(self) -> tuple[int, ...]:
        return self.broker_ports

    @property
    def user_home(self) -> Path:
        return self.dir / self.name / "home"

    @property
    def store(self) -> Path:
        return self.dir / self.name / "store"

    @property
    def conf_file(self) -> Path:
        return self.conf_dir / f"{self.name}.conf"

    def prepare(self) -> None:
        self.write_broker_conf()

    def command(self) -> list[str]:
        return [
            *self.java("1g", "org.apache.rocketmq.broker.BrokerStartup", "-XX:MaxDirectMemorySize=1g"),
            "-c",
            str(self.conf_file),
            "-n",
            self.namesrv_addr,
        ]

    def check(self) -> str:
        return self.registered()


class ProxyService(_RocketMQService):
    """The gRPC proxy in cluster mode, in front of every broker group: clients see one endpoint, and
    the routes it hands out spread each topic's queues over all the groups."""

    name = "proxy"
    logback = "proxy"

    @property
    def port(self) -> int:
        return self.settings.ports.proxy_grpc

    @property
    def ports(self) -> tuple[int, ...]:
        return self.proxy_ports

    @property
    def user_home(self) -> Path:
        return self.dir / self.name / "home"

    def prepare(self) -> None:
        install.rocketmq_lib()
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.write_proxy_conf(self.conf_dir / "rmq-proxy-cluster.json", proxyMode="cluster")

    def command(self) -> list[str]:
        return [
            *self.java("512m", "org.apache.rocketmq.proxy.ProxyStartup"),
            "-pm",
            "cluster",
            "-pc",
            str(self.conf_dir / "rmq-proxy-cluster.json"),
            "-n",
            self.namesrv_addr,
        ]

    def check(self) -> str:
        groups = self.settings.topology.broker_groups
        registered = self.brokers()
        if len(registered) < groups:
            raise StackError(f"{len(registered)} of {groups} broker groups are registered with the name server")
        self.proxy_answers()
        return f"in front of {len(registered)} broker groups"

    def probe(self) -> str:
        self.check()
        return self.send_probe(self.address)


def probe_send(endpoint: str, topic: str, timeout_s: float = 30.0) -> str:
    """Send one normal message through the proxy; returns its id. Proves the broker really accepts writes."""
    from flashsale.adapters.rocketmq.producer import RocketMQProducer

    last: list[Exception] = []

    def attempt() -> str | None:
        producer = RocketMQProducer(endpoint, [topic], lambda _: Resolution.UNKNOWN)
        try:
            producer.start()
            return producer.send(topic, "probe", b"probe", "probe")
        except (ServiceUnavailable, BusError) as exc:
            last[:] = [exc]
            return None
        finally:
            producer.shutdown()

    message_id = poll_until(attempt, timeout_s, interval_s=1.0)
    if message_id is None:
        raise ServiceUnavailable("RocketMQ", endpoint, f"no probe message accepted on {topic}: {last[0]}")
    return message_id
