"""docker-compose.yml, for users who have Docker: valid for compose, and shaped like the native stack."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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


def test_compose_and_the_native_stack_run_one_rocketmq_version_with_one_broker_config() -> None:
    from flashsale import constants as c

    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name in ("namesrv", "broker"):
        assert services[name]["image"] == f"apache/rocketmq:{c.ROCKETMQ_VERSION}"
    mounts = [v.split(":")[0] for v in services["broker"]["volumes"] if isinstance(v, str)]
    assert "./infra/rocketmq/broker.conf" in mounts
    assert "-c" in services["broker"]["command"]


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
