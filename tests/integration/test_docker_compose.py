"""docker-compose.yml, for users who have Docker: valid for compose, shaped like the native stack, and
watched by a Prometheus and a Grafana that ask the processes only for what they serve."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_CONFIG = ROOT / "infra" / "prometheus" / "prometheus.yml"
GRAFANA_DATASOURCE = ROOT / "infra" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = ROOT / "infra" / "grafana" / "provisioning" / "dashboards" / "flashsale.yml"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "flashsale.json"

#: The metrics the dashboard may query, named as PromQL sees them (counters with `_total`, histogram
#: buckets with `_bucket`): what the producer, consumer and checker export on /metrics.
EXPORTED_METRICS = frozenset(
    {
        "flashsale_purchases_total",
        "flashsale_checks_total",
        "flashsale_consumer_messages_total",
        "flashsale_consumer_batches_total",
        "flashsale_broker_resyncs_total",
        "flashsale_purchase_seconds_bucket",
        "flashsale_check_seconds_bucket",
        "flashsale_consumer_batch_seconds_bucket",
        "flashsale_purchases_in_flight",
        "flashsale_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    }
)
_METRIC_NAME = re.compile(r"(?<![\w:])(?:flashsale|process)_[A-Za-z0-9_:]*")


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    # Debian's docker-compose validates the same file without a Docker engine (`make test` installs it).
    assert shutil.which("docker-compose"), "neither `docker compose` nor `docker-compose` is installed"
    return ["docker-compose"]


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def _values(node: Any, key: str) -> list[Any]:
    """Every value stored under `key`, at any depth (a collapsed row nests its panels)."""
    if isinstance(node, dict):
        found = [node[key]] if key in node else []
        return found + [v for child in node.values() for v in _values(child, key)]
    if isinstance(node, list):
        return [v for child in node for v in _values(child, key)]
    return []


def dashboard_exprs() -> list[str]:
    return [str(expr) for expr in _values(json.loads(DASHBOARD.read_text()), "expr")]


def dashboard_metric_names() -> set[str]:
    """The metric names the dashboard queries, exactly as its PromQL spells them."""
    return {name for expr in dashboard_exprs() for name in _METRIC_NAME.findall(expr)}


def metrics_ports() -> dict[str, int]:
    """The port each flashsale process serves /metrics on in compose: the producer's HTTP port, or the
    --metrics-port of the consumer and the checker."""
    from flashsale import constants as c

    services = compose_services()
    producer_env = services["producer"].get("environment", {})
    ports = {"producer": int(producer_env.get("FLASHSALE_HTTP_PORT", c.DEFAULT_HTTP_PORT))}
    for role in ("consumer", "checker"):
        command = services[role]["command"]
        assert "--metrics-port" in command, f"{role} serves no metrics in compose"
        ports[role] = int(command[command.index("--metrics-port") + 1])
    return ports


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts: where in the container each ./ path of the repository lands."""
    found: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith("./"):
            found[target] = source
    return found


PROFILES = ("single", "cluster")


def profile_of(service: dict[str, Any]) -> str | None:
    """The topology a service belongs to; None: both."""
    profiles = service.get("profiles")
    if profiles is None:
        return None
    assert len(profiles) == 1 and profiles[0] in PROFILES, profiles
    return str(profiles[0])


def in_profile(profile: str) -> dict[str, Any]:
    return {name: s for name, s in compose_services().items() if profile_of(s) in (None, profile)}


def flags(command: list[str] | str) -> dict[str, str]:
    """`--name value` pairs of a server's command line (a shell command is split on spaces first)."""
    words = command.split() if isinstance(command, str) else [w for part in command for w in str(part).split()]
    return {w[2:]: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_accepts_the_file_in_both_topologies(profile: str) -> None:
    result = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COMPOSE_PROFILES": profile},
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_single_topology_unless_told_otherwise() -> None:
    env = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines() if "=" in line)
    assert env["COMPOSE_PROFILES"] == "single"


def test_compose_runs_the_same_services_as_the_native_stack() -> None:
    services = compose_services()
    assert {"mysql", "namesrv", "init", "producer", "consumer", "checker"} <= set(in_profile("single"))
    assert services["namesrv"]["image"].startswith("apache/rocketmq:5")
    assert services["mysql"]["image"].startswith("mysql:8")
    assert services["producer"]["command"] == ["flashsale", "producer", "run"]
    assert services["consumer"]["command"] == ["flashsale", "consumer", "run", "--metrics-port", "9101"]
    assert services["checker"]["command"] == ["flashsale", "checker", "run", "--metrics-port", "9102"]

    single = in_profile("single")
    assert {"redis", "broker"} <= set(single) and not {"proxy", "broker-a", "redis-0"} & set(single)
    assert single["redis"]["image"] == f"redis:{native_redis_line()}"
    assert "--enable-proxy" in single["broker"]["command"]


def native_redis_line() -> str:
    """The release line (7.0) of the native stack's redis-server: compose runs the same one, since how a
    WAIT counts a connection's writes changed between lines."""
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+\.\d+)\.", version)
    assert match, version
    return match[1]


def test_every_redis_of_compose_is_the_native_stacks_release_line() -> None:
    redises = [s for name, s in compose_services().items() if name == "redis" or name.startswith("redis-")]
    assert len(redises) >= 7  # the single node, and the six nodes of the cluster profile
    assert {s["image"] for s in redises} == {f"redis:{native_redis_line()}"}


def test_the_cluster_profile_is_the_native_cluster_topology() -> None:
    """`flashsale stack up --redis-masters 3 --redis-replicas 1 --broker-groups 2`, in containers."""
    from flashsale.stack.rocketmq import BROKER_PORT_STEP

    cluster = in_profile("cluster")
    assert not {"redis", "broker"} & set(cluster)
    nodes = [f"redis-{i}" for i in range(6)]
    assert {*nodes, "redis-cluster", "broker-a", "broker-b", "proxy"} <= set(cluster)
    ports = [int(cluster[n]["environment"]["PORT"]) for n in nodes]
    assert ports == list(range(6379, 6385))
    for node in nodes:
        options = flags(cluster[node]["entrypoint"])
        assert options["cluster-enabled"] == "yes" and options["port"] == "$$PORT"
    create = str(cluster["redis-cluster"]["entrypoint"][-1])
    assert "--cluster create " + " ".join(f"127.0.0.1:{p}" for p in ports) in create
    assert flags(create)["cluster-replicas"] == "1"

    assert "--enable-proxy" not in cluster["broker-a"]["command"]
    assert "brokerName=broker-b" in cluster["broker-b"]["command"][-1]
    assert f"listenPort={10911 + BROKER_PORT_STEP}" in cluster["broker-b"]["command"][-1]
    for name in ("broker-a", "broker-b"):
        assert mounts(cluster[name])["/home/rocketmq/flashsale/broker.conf"] == "./infra/rocketmq/broker.conf"
    proxy = cluster["proxy"]
    assert proxy["command"][:2] == ["sh", "mqproxy"]
    assert mounts(proxy)["/home/rocketmq/flashsale/rmq-proxy.json"] == "./infra/rocketmq/rmq-proxy.json"
    proxy_conf = json.loads((ROOT / "infra" / "rocketmq" / "rmq-proxy.json").read_text())
    assert proxy_conf["proxyMode"] == "cluster" and proxy_conf["grpcServerPort"] == 8081


def test_every_redis_in_compose_runs_the_native_nodes_settings(tmp_path: Path) -> None:
    """The options a native node's redis.conf sets, a compose Redis sets to the same values."""
    from flashsale.stack.layout import StackLayout
    from flashsale.stack.redis_nodes import RedisNode
    from flashsale.stack.settings import StackSettings, StackTopology

    services = compose_services()
    for native_masters, names in ((1, ["redis"]), (3, [f"redis-{i}" for i in range(6)])):
        topology = StackTopology(redis_masters=native_masters, redis_replicas=0 if native_masters == 1 else 1)
        node = RedisNode(StackLayout.at(tmp_path), StackSettings(home=tmp_path, topology=topology))
        node.prepare()
        native = dict(line.split(" ", 1) for line in (node.dir / "redis.conf").read_text().splitlines() if line)
        shared = {
            k: v for k, v in native.items() if k.startswith(("append", "auto-aof", "maxmemory", "cluster-", "repl-"))
        }
        shared.pop("cluster-config-file", None)
        assert len(shared) >= (4 if native_masters == 1 else 9), shared
        for name in names:
            command = services[name].get("entrypoint") or services[name]["command"]
            assert {k: flags(command).get(k) for k in shared} == shared, name


def test_compose_publishes_ports_on_loopback_only() -> None:
    services = compose_services()
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published)


def test_compose_and_the_native_stack_run_one_rocketmq_version_with_one_broker_config() -> None:
    from flashsale.stack.layout import ROCKETMQ_VERSION

    services = compose_services()
    for name in ("namesrv", "broker", "broker-a", "broker-b", "proxy"):
        assert services[name]["image"] == f"apache/rocketmq:{ROCKETMQ_VERSION}"
    for name in ("broker", "broker-a"):
        assert mounts(services[name])["/home/rocketmq/flashsale/broker.conf"] == "./infra/rocketmq/broker.conf"
        assert "-c" in services[name]["command"]


def test_every_server_but_mysql_and_every_process_live_in_the_name_servers_namespace() -> None:
    """Brokers advertise 127.0.0.1, and so do Redis Cluster nodes: their clients must share that loopback."""
    for name, service in compose_services().items():
        if name not in ("namesrv", "mysql"):
            assert service["network_mode"] == "service:namesrv", name
        for source in mounts(service).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def test_prometheus_and_grafana_have_their_config_from_infra() -> None:
    services = compose_services()
    for name in ("prometheus", "grafana"):
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == "./infra/prometheus/prometheus.yml"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert mounts(services["grafana"])["/etc/grafana/provisioning"] == "./infra/grafana/provisioning"
    assert mounts(services["grafana"])["/var/lib/grafana/dashboards"] == "./infra/grafana/dashboards"
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_the_name_server_publishes_the_proxy_redis_producer_prometheus_and_grafana_ports() -> None:
    published = {str(p).split(":", 1)[1].rsplit(":", 1)[0] for p in compose_services()["namesrv"]["ports"]}
    assert {"8081", "6379-6384", "8000", "9090", "3000", "10911", "10921"} <= published


def test_prometheus_scrapes_each_process_on_the_port_it_serves_metrics_on() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    scraped = {
        job["job_name"]: [target for static in job["static_configs"] for target in static["targets"]]
        for job in config["scrape_configs"]
    }
    assert scraped == {role: [f"127.0.0.1:{port}"] for role, port in metrics_ports().items()}


def test_grafana_reads_prometheus_where_it_listens_and_loads_the_mounted_dashboards() -> None:
    (datasource,) = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["name"] == "Prometheus"
    assert datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://127.0.0.1:9090"
    (provider,) = yaml.safe_load(GRAFANA_DASHBOARDS.read_text())["providers"]
    assert provider["options"]["path"] in mounts(compose_services()["grafana"])


def test_every_dashboard_query_reads_the_provisioned_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "flashsale" and dashboard["title"] == "flashsale"
    datasources = _values(dashboard, "datasource")
    assert datasources and all(d == {"type": "prometheus", "uid": "prometheus"} for d in datasources)
    targets = [t for panel in _values(dashboard, "targets") for t in panel]
    assert targets and all(str(t.get("expr", "")).strip() for t in targets)


def test_the_dashboard_queries_only_metrics_the_processes_export() -> None:
    names = dashboard_metric_names()
    assert names, "the dashboard queries no flashsale_ or process_ metric"
    assert names <= EXPORTED_METRICS, f"not exported: {sorted(names - EXPORTED_METRICS)}"


def test_the_native_broker_config_is_the_shared_one_plus_its_own_ports_and_paths(tmp_path: Path) -> None:
    from flashsale.stack.layout import StackLayout
    from flashsale.stack.rocketmq import BrokerService, broker_settings
    from flashsale.stack.settings import StackSettings

    settings = StackSettings(home=tmp_path)
    broker = BrokerService(StackLayout.at(tmp_path), settings)
    broker.prepare()
    native: dict[str, str] = {}
    for line in (broker.conf_dir / "broker.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            native[key] = value  # a later key wins, as in java.util.Properties
    shared = broker_settings()
    own = {"namesrvAddr", "bindAddress", "haListenPort", "storePathCommitLog", "storePathRootDir", "listenPort"}
    assert {k: v for k, v in native.items() if k not in own} == {k: v for k, v in shared.items() if k not in own}
    assert native["storePathRootDir"].startswith(str(tmp_path))
    assert native["brokerIP1"] == "127.0.0.1"
    local = json.loads((broker.conf_dir / "rmq-proxy.json").read_text())
    assert local["proxyMode"] == "local" and local["brokerConfigPath"] == str(broker.conf_file)


def test_the_check_window_outlasts_the_worst_recovery() -> None:
    """docs/operations.md, "The check window": 10 minutes cover a broker restart with its clients' reconnect
    (about 30 s), and a Redis or checker outage an operator fixes within minutes."""
    from flashsale.config import Settings
    from flashsale.stack.rocketmq import broker_settings

    conf = broker_settings()
    window_s = int(conf["transactionCheckMax"]) * int(conf["transactionCheckInterval"]) / 1000
    assert window_s >= 600
    assert Settings().check_grace_s * 1000 <= int(conf["transactionTimeOut"])
    assert int(conf["transactionOpBatchInterval"]) < int(conf["transactionTimeOut"])


def _properties(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key] = value  # a later key wins, as in java.util.Properties
    return found


def test_native_broker_groups_are_the_shared_config_with_a_name_and_ports_each(tmp_path: Path) -> None:
    from flashsale.stack.layout import StackLayout
    from flashsale.stack.rocketmq import GroupBroker, ProxyService, broker_settings
    from flashsale.stack.settings import StackSettings, StackTopology
    from flashsale.stack.topology import services

    settings = StackSettings(home=tmp_path, topology=StackTopology(broker_groups=2))
    stack = services(StackLayout.at(tmp_path), settings)
    assert [s.name for s in stack][-4:] == ["namesrv", "broker-a", "broker-b", "proxy"]
    groups = [s for s in stack if isinstance(s, GroupBroker)]
    for group, port in zip(groups, (10911, 10921), strict=True):
        group.prepare()
        native = _properties(group.conf_file)
        assert native["brokerName"] == group.name and native["listenPort"] == str(port)
        assert native["haListenPort"] == str(port + 1) and native["storePathRootDir"].endswith(f"{group.name}/store")
        for key in ("transactionCheckMax", "transactionCheckInterval", "transactionTimeOut", "brokerIP1"):
            assert native[key] == broker_settings()[key]
    assert groups[0].store != groups[1].store and groups[0].user_home != groups[1].user_home

    proxy = next(s for s in stack if isinstance(s, ProxyService))
    proxy.prepare()
    native_proxy = json.loads((proxy.conf_dir / "rmq-proxy-cluster.json").read_text())
    shared = json.loads((ROOT / "infra" / "rocketmq" / "rmq-proxy.json").read_text())
    own = {"namesrvAddr", "grpcServerPort", "remotingListenPort"}
    assert {k: v for k, v in native_proxy.items() if k not in own} == {k: v for k, v in shared.items() if k not in own}
    assert native_proxy["proxyMode"] == "cluster" and native_proxy["namesrvAddr"] == "127.0.0.1:9876"
