from __future__ import annotations

from pathlib import Path

import pytest

from flashsale import failpoints
from flashsale.cli.main import VARIABLES
from flashsale.config import Settings, variables
from flashsale.errors import ConfigError
from flashsale.stack.settings import StackSettings


def test_settings_default_to_the_local_stack() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.mysql_url == "mysql+pymysql://flashsale:flashsale@127.0.0.1:3306/flashsale"
    assert settings.rocketmq_endpoint == "127.0.0.1:8081"
    assert settings.namesrv_addr == "127.0.0.1:9876"
    assert settings.failpoints == frozenset()


def test_stack_settings_default_to_a_state_folder_here_and_one_node_of_each_server() -> None:
    stack = StackSettings.from_env({})
    assert stack.home == Path(".flashsale")
    assert (stack.topology.redis_masters, stack.topology.redis_replicas, stack.topology.broker_groups) == (1, 0, 1)
    assert stack.database == "flashsale"


def test_the_stack_starts_its_servers_on_the_ports_the_client_addresses_default_to() -> None:
    env = {
        "FLASHSALE_REDIS_PORT": "7000",
        "FLASHSALE_MYSQL_PORT": "7001",
        "FLASHSALE_PROXY_PORT": "7002",
        "FLASHSALE_NAMESRV_PORT": "7003",
        "FLASHSALE_HOME": "/tmp/elsewhere",
    }
    stack, settings = StackSettings.from_env(env), Settings.from_env(env)
    assert stack.ports == settings.ports
    ports = stack.ports
    assert (ports.redis, ports.mysql, ports.proxy_grpc, ports.namesrv) == (7000, 7001, 7002, 7003)
    assert stack.home == Path("/tmp/elsewhere")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"FLASHSALE_BROKER_PORT": "0"}, "FLASHSALE_BROKER_PORT"),
        ({"FLASHSALE_REDIS_MASTERS": "2"}, "FLASHSALE_REDIS_MASTERS"),
        ({"FLASHSALE_REDIS_REPLICAS": "1"}, "FLASHSALE_REDIS_REPLICAS"),
        ({"FLASHSALE_BROKER_GROUPS": "5"}, "FLASHSALE_BROKER_GROUPS"),
        ({"FLASHSALE_BROKER_GROUPS": "x"}, "FLASHSALE_BROKER_GROUPS"),
    ],
)
def test_stack_settings_name_the_variable_of_a_bad_value(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        StackSettings.from_env(env)


def test_settings_derive_client_addresses_from_the_stack_ports() -> None:
    settings = Settings.from_env(
        {
            "FLASHSALE_REDIS_PORT": "7000",
            "FLASHSALE_MYSQL_PORT": "7001",
            "FLASHSALE_PROXY_PORT": "7002",
            "FLASHSALE_NAMESRV_PORT": "7003",
        }
    )
    assert settings.redis_url == "redis://127.0.0.1:7000/0"
    assert settings.mysql_url.endswith("@127.0.0.1:7001/flashsale")
    assert settings.rocketmq_endpoint == "127.0.0.1:7002"
    assert settings.namesrv_addr == "127.0.0.1:7003"


def test_settings_prefer_explicit_urls_to_ports() -> None:
    settings = Settings.from_env(
        {
            "FLASHSALE_REDIS_PORT": "7000",
            "FLASHSALE_REDIS_URL": "redis://cache.example:6380/2",
            "FLASHSALE_MYSQL_URL": "mysql+pymysql://u:p@db.example:3307/sale",
            "FLASHSALE_ROCKETMQ_ENDPOINT": "mq.example:9000",
        }
    )
    assert settings.redis_url == "redis://cache.example:6380/2"
    assert settings.mysql_url == "mysql+pymysql://u:p@db.example:3307/sale"
    assert settings.mysql_database == "sale"
    assert settings.rocketmq_endpoint == "mq.example:9000"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FLASHSALE_REDIS_PORT", "abc"),
        ("FLASHSALE_MYSQL_PORT", "70000"),
        ("FLASHSALE_HTTP_PORT", "0"),
        ("FLASHSALE_BATCH_SIZE", "0"),
        ("FLASHSALE_CHECK_GRACE_S", "soon"),
        ("FLASHSALE_REDIS_URL", "http://127.0.0.1:6379/0"),
        ("FLASHSALE_MYSQL_URL", "mysql://127.0.0.1/flashsale"),
        ("FLASHSALE_NAMESPACE", "my.sale"),
        ("FLASHSALE_NAMESPACE", "a:b"),
        ("FLASHSALE_ROCKETMQ_ENDPOINT", "127.0.0.1"),
        ("FLASHSALE_NAMESRV_ADDR", "127.0.0.1:99999"),
    ],
)
def test_settings_name_the_variable_of_a_bad_value(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_settings_refuse_a_namespace_rocketmq_cannot_name_topics_with() -> None:
    with pytest.raises(ConfigError, match="FLASHSALE_NAMESPACE"):
        Settings.from_env({"FLASHSALE_NAMESPACE": "a@b"})


def test_settings_derive_topic_and_group_names_from_the_namespace() -> None:
    settings = Settings.from_env({"FLASHSALE_NAMESPACE": "blackfriday"})
    assert settings.deduction_topic == "blackfriday-deductions"
    assert settings.replay_topic == "blackfriday-replays"
    assert settings.consumer_group == "blackfriday-apply"


def test_settings_parse_failpoints_as_a_trimmed_comma_separated_set() -> None:
    a, b = failpoints.AFTER_HALF_MESSAGE, failpoints.AFTER_DB_COMMIT
    settings = Settings.from_env({"FLASHSALE_FAILPOINTS": f" {a} , {b},,{a} ,"})
    assert settings.failpoints == frozenset({a, b})


def test_settings_refuse_a_misspelt_failpoint_instead_of_ignoring_it() -> None:
    with pytest.raises(ConfigError, match=r"FLASHSALE_FAILPOINTS.*producer-after-half"):
        Settings.from_env({"FLASHSALE_FAILPOINTS": "producer-after-half"})


def test_every_variable_has_a_flashsale_prefix_and_a_meaning() -> None:
    assert all(v.env.startswith("FLASHSALE_") and v.meaning for v in VARIABLES)
    assert len({v.name for v in VARIABLES}) == len(VARIABLES)


def test_the_variables_are_the_stacks_then_the_products_the_shared_ports_once() -> None:
    stack, product = variables(StackSettings), variables(Settings)
    assert [v.name for v in VARIABLES] == list(dict.fromkeys(v.name for v in (*stack, *product)))
    assert {"HOME", "REDIS_MASTERS", "BROKER_GROUPS"} <= {v.name for v in stack} - {v.name for v in product}
    assert {"REDIS_PORT", "MYSQL_PORT", "PROXY_PORT", "NAMESRV_PORT"} <= {v.name for v in stack} & {
        v.name for v in product
    }


def test_a_failpoint_may_name_the_time_it_kills_and_a_malformed_one_is_refused() -> None:
    settings = Settings.from_env({"FLASHSALE_FAILPOINTS": "producer-after-prededuct@300,consumer-after-db-commit"})
    assert settings.failpoints == {"producer-after-prededuct@300", "consumer-after-db-commit"}
    for bad in ("producer-after-prededuct@0", "producer-after-prededuct@x", "no-such-point@3"):
        with pytest.raises(ConfigError, match="unknown point"):
            Settings.from_env({"FLASHSALE_FAILPOINTS": bad})


def test_a_failpoint_at_n_kills_the_process_the_nth_time_it_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[int] = []
    monkeypatch.setattr(failpoints.os, "kill", lambda pid, sig: kills.append(pid))
    monkeypatch.setattr(failpoints, "_reached", {})
    active = frozenset({f"{failpoints.AFTER_PREDEDUCT}@3"})
    for _ in range(2):
        failpoints.hit(active, failpoints.AFTER_PREDEDUCT)
        failpoints.hit(active, failpoints.AFTER_HALF_MESSAGE)  # another point: not counted
    assert kills == []
    failpoints.hit(active, failpoints.AFTER_PREDEDUCT)
    assert len(kills) == 1
