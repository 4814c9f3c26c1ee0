"""docker-compose.yml, for users who have Docker: valid for compose, shaped like the native stack, and
watched by a Prometheus and a Grafana that ask the processes only for what they serve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

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


def test_compose_accepts_the_file() -> None:
    result = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_same_services_as_the_native_stack() -> None:
    services = compose_services()
    assert {"redis", "mysql", "namesrv", "broker", "init", "producer", "consumer", "checker"} <= set(services)
    assert services["namesrv"]["image"].startswith("apache/rocketmq:5")
    assert services["broker"]["image"].startswith("apache/rocketmq:5")
    assert "--enable-proxy" in services["broker"]["command"]
    assert services["redis"]["image"] == "redis:7" and services["mysql"]["image"].startswith("mysql:8")
    assert services["producer"]["command"] == ["flashsale", "producer", "run"]
    assert services["consumer"]["command"] == ["flashsale", "consumer", "run", "--metrics-port", "9101"]
    assert services["checker"]["command"] == ["flashsale", "checker", "run", "--metrics-port", "9102"]


def test_compose_publishes_ports_on_loopback_only() -> None:
    services = compose_services()
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published)


def test_compose_and_the_native_stack_run_one_rocketmq_version_with_one_broker_config() -> None:
    from flashsale import constants as c

    services = compose_services()
    for name in ("namesrv", "broker"):
        assert services[name]["image"] == f"apache/rocketmq:{c.ROCKETMQ_VERSION}"
    mounts = [v.split(":")[0] for v in services["broker"]["volumes"] if isinstance(v, str)]
    assert "./infra/rocketmq/broker.conf" in mounts
    assert "-c" in services["broker"]["command"]


def test_prometheus_and_grafana_live_in_the_broker_namespace_with_their_config_from_infra() -> None:
    services = compose_services()
    for name in ("prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:broker"
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")
        for source in mounts(services[name]).values():
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == "./infra/prometheus/prometheus.yml"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert mounts(services["grafana"])["/etc/grafana/provisioning"] == "./infra/grafana/provisioning"
    assert mounts(services["grafana"])["/var/lib/grafana/dashboards"] == "./infra/grafana/dashboards"
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_the_broker_publishes_the_proxy_producer_prometheus_and_grafana_ports() -> None:
    published = {str(p).split(":")[-1] for p in compose_services()["broker"]["ports"]}
    assert {"8081", "8000", "9090", "3000"} <= published


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
    from flashsale.config import Settings
    from flashsale.stack.layout import StackLayout
    from flashsale.stack.services import BrokerService, broker_settings

    settings = Settings(home=tmp_path)
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


def test_the_check_window_outlasts_the_worst_recovery() -> None:
    """docs/operations.md, "The check window": 10 minutes cover a broker restart with its clients' reconnect
    (about 30 s), and a Redis or checker outage an operator fixes within minutes."""
    from flashsale.config import Settings
    from flashsale.stack.services import broker_settings

    conf = broker_settings()
    window_s = int(conf["transactionCheckMax"]) * int(conf["transactionCheckInterval"]) / 1000
    assert window_s >= 600
    assert Settings().check_grace_s * 1000 <= int(conf["transactionTimeOut"])
    assert int(conf["transactionOpBatchInterval"]) < int(conf["transactionTimeOut"])
