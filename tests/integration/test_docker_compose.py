"""docker-compose.yml, for users who have Docker: valid for compose, and shaped like the native stack."""

from __future__ import annotations

import shutil
import subprocess

import yaml

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    # Debian's docker-compose validates the same file without a Docker engine (`make test` installs it).
    assert shutil.which("docker-compose"), "neither `docker compose` nor `docker-compose` is installed"
    return ["docker-compose"]


def test_compose_accepts_the_file() -> None:
    result = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_the_same_services_as_the_native_stack() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert {"redis", "mysql", "namesrv", "broker", "init", "producer", "consumer", "checker"} <= set(services)
    assert services["namesrv"]["image"].startswith("apache/rocketmq:5")
    assert services["broker"]["image"].startswith("apache/rocketmq:5")
    assert "--enable-proxy" in services["broker"]["command"]
    assert services["redis"]["image"] == "redis:7" and services["mysql"]["image"].startswith("mysql:8")
    for role in ("producer", "consumer", "checker"):
        assert services[role]["command"] == ["flashsale", role, "run"]


def test_compose_publishes_ports_on_loopback_only() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published)


def test_the_compose_broker_config_advertises_loopback_and_the_stack_transaction_timing() -> None:
    from flashsale.stack import services

    conf = dict(line.split("=", 1) for line in (ROOT / "infra/docker/broker.conf").read_text().split())
    assert conf["brokerIP1"] == "127.0.0.1"
    assert int(conf["transactionTimeOut"]) == services.TRANSACTION_TIMEOUT_MS
    assert int(conf["transactionCheckInterval"]) == services.TRANSACTION_CHECK_INTERVAL_MS
    assert int(conf["transactionCheckMax"]) == services.TRANSACTION_CHECK_MAX
