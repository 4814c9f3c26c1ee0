"""Every command, run as a user runs it (`python -m flashsale ...`) against the real stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from flashsale import failpoints
from flashsale.adapters.redis.stock import RedisStock
from flashsale.config import Settings
from flashsale.models import Purchase
from flashsale.net import is_loopback
from flashsale.ops.setup import set_stock
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Pipeline, post
from tests.conftest import session_env
from tests.oracle import balanced, now, redis_client


def run(settings: Settings, *args: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**session_env(settings), **env}
    return subprocess.run(
        [sys.executable, "-m", "flashsale", *args], capture_output=True, text=True, timeout=timeout_s, env=environ
    )


def test_stack_status_reports_every_service_healthy_and_listening_on_loopback(settings: Settings) -> None:
    result = run(settings, "stack", "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    services = {s["name"]: s for s in json.loads(result.stdout)["services"]}
    assert set(services) == {"redis", "mariadb", "namesrv", "broker"}
    for service in services.values():
        assert service["healthy"] and service["pid"] and service["address"].startswith("127.0.0.1:")
    for name in ("redis", "mariadb", "namesrv"):
        assert services[name]["listening"] and all(is_loopback(a) for a in services[name]["listening"])
    broker = services["broker"]["listening"]
    assert f"127.0.0.1:{settings.ports.broker}" in broker and f"127.0.0.1:{settings.ports.broker - 2}" in broker
    # RocketMQ 5.3 binds these three to the wildcard address whatever its configuration says (see README).
    wildcard = {a.rsplit(":", 1)[1] for a in broker if not is_loopback(a)}
    assert wildcard <= {
        str(settings.ports.broker + 1),
        str(settings.ports.proxy_grpc),
        str(settings.ports.proxy_remoting),
    }


def _probe_topic_offset(settings: Settings) -> int:
    """Messages ever written to the stack's probe topic (queue 0), asked of the broker directly."""
    from flashsale.adapters.rocketmq import admin as rocketmq_admin
    from flashsale.stack.rocketmq import PROBE_TOPIC

    get_max_offset = 30  # RequestCode.GET_MAX_OFFSET
    header, _ = rocketmq_admin.call(
        f"127.0.0.1:{settings.ports.broker}", get_max_offset, {"topic": PROBE_TOPIC, "queueId": 0}
    )
    return int(header["extFields"]["offset"])


def test_stack_status_only_reads_and_probe_sends_one_message(settings: Settings) -> None:
    before = _probe_topic_offset(settings)
    assert run(settings, "stack", "status").returncode == 0
    assert _probe_topic_offset(settings) == before
    probed = run(settings, "stack", "status", "broker", "--probe", "--json")
    assert probed.returncode == 0, probed.stderr
    assert "accepted a send" in json.loads(probed.stdout)["services"][0]["note"]
    assert _probe_topic_offset(settings) == before + 1


def test_a_second_stack_up_keeps_what_runs(settings: Settings) -> None:
    before = {s["name"]: s["pid"] for s in json.loads(run(settings, "stack", "status", "--json").stdout)["services"]}
    result = run(settings, "stack", "up", "--json")
    assert result.returncode == 0, result.stderr
    after = {s["name"]: (s["pid"], s["started"]) for s in json.loads(result.stdout)["services"]}
    assert after == {name: (pid, False) for name, pid in before.items()}


def test_init_is_idempotent_and_says_what_exists(settings: Settings) -> None:
    result = run(settings, "init", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["migrations_applied"] == [] and report["schema_version"] >= 1
    assert report["topics"] == {
        settings.deduction_topic: "TRANSACTION",
        settings.replay_topic: "NORMAL",
        settings.deadline_topic: "DELAY",
    }
    from flashsale import constants as c
    from flashsale.adapters.rocketmq import admin as rocketmq_admin
    from flashsale.ops.setup import RETRY_MAX_TIMES

    for broker in rocketmq_admin.cluster_brokers(settings.namesrv_addr, c.CLUSTER_NAME):
        for name in (settings.consumer_group, settings.expiry_group):
            assert rocketmq_admin.group_config(broker, name)["retryMaxTimes"] == RETRY_MAX_TIMES
        assert rocketmq_admin.topic_info(broker, settings.deadline_topic).message_type == "DELAY"


def test_stock_set_then_show_side_by_side(settings: Settings, sku: str) -> None:
    assert run(settings, "stock", "set", sku, "40", "--per-user-limit", "2").returncode == 0
    shown = run(settings, "stock", "show", sku, "--json")
    assert shown.returncode == 0
    view = json.loads(shown.stdout)
    assert (view["redis"]["stock"], view["redis"]["per_user_limit"]) == (40, 2)
    assert (view["mysql"]["stock"], view["mysql"]["initial"]) == (40, 40)
    table = run(settings, "stock", "show", sku)
    assert "Redis" in table.stdout and "MySQL" in table.stdout


@pytest.mark.parametrize(
    ("args", "env", "expected_code", "says"),
    [
        (("stock", "set", "{sku}", "-5"), {}, 2, "'QTY': -5 is not in the range 0<=x<="),
        (("stock", "set", "{sku}", "2.5"), {}, 2, "'QTY': '2.5' is not a valid integer"),
        (("stock", "set", "{sku}", "10", "--per-user-limit", "x"), {}, 2, "'--per-user-limit': 'x' is not a valid"),
        (("stock", "set", "bad sku", "10"), {}, 2, "sku must be"),
        (("stock", "show", "no-such-{sku}"), {}, 2, "unknown SKU"),
        (("reconcile", "no-such-{sku}"), {}, 2, "unknown SKU"),
        (("replay", "--sku", "{sku}", "--since", "last tuesday"), {}, 2, "--since: 'last tuesday' is not a time"),
        (("replay",), {}, 2, "choose exactly one"),
        (("bench", "--strategy", "warp-speed"), {}, 2, "unknown strategy"),
        (("bench", "--producer-url", "ftp:/x", "--attempts", "1"), {}, 2, "not an http:// URL"),
        (("bench", "--stock", "0"), {}, 2, "'--stock': 0 is not in the range x>=1"),
        (("bench", "--unpaid", "1"), {}, 2, "'--unpaid': 1.0 is not in the range 0<=x<1"),
        (("bench", "--unpaid", "0.3", "--pay-within", "soon"), {}, 2, "--pay-within: 'soon' is not a duration"),
        (("bench", "--unpaid", "0.3", "--pay-within", "2d"), {}, 2, "at most 1d (as `stock set` allows)"),
        (("bench", "--pay-within", "5s"), {}, 2, "--pay-within goes with --unpaid"),
        (("bench", "--unpaid", "0.3", "--strategy", "mysql-lock"), {}, 2, "leave --strategy and --producer-url out"),
        (("producer", "run"), {"FLASHSALE_HTTP_PORT": "abc"}, 2, "(env var: 'FLASHSALE_HTTP_PORT'): 'abc'"),
        (("demo", "--buyers", "0"), {}, 2, "--buyers"),
        (("stock", "show", "{sku}"), {"FLASHSALE_REDIS_URL": "redis://127.0.0.1:1/0"}, 3, "redis://127.0.0.1:1/0"),
        (("init",), {"FLASHSALE_MYSQL_URL": "postgres://x/y"}, 2, "FLASHSALE_MYSQL_URL"),
        (("stock", "set", "{sku}", "1"), {"FLASHSALE_REDIS_PORT": "sixty"}, 2, "FLASHSALE_REDIS_PORT"),
        (("stack", "up", "kafka"), {}, 2, "unknown service kafka"),
    ],
)
def test_bad_input_gets_one_clear_line_a_nonzero_exit_and_changes_nothing(
    settings: Settings,
    redis_stock: RedisStock,
    sku: str,
    args: tuple[str, ...],
    env: dict[str, str],
    expected_code: int,
    says: str,
) -> None:
    set_stock(settings, sku, 7)
    before = now(settings, sku)
    result = run(settings, *(a.format(sku=sku) for a in args), **env)
    assert result.returncode == expected_code, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    after = now(settings, sku)
    assert after == before  # Redis, MySQL and the orders, read back with plain commands
    assert redis_stock.view(sku).stock == 7 and redis_stock.history(sku) == 0


def test_stock_set_refuses_to_overwrite_a_sale_in_progress(
    settings: Settings, redis_stock: RedisStock, sku: str
) -> None:
    set_stock(settings, sku, 5)
    # A deduction in Redis that the consumer has not applied to MySQL yet: it is in flight.
    redis_stock.prededuct(sku, "m1", [Purchase("t1", "u1", 1)])
    result = run(settings, "stock", "set", sku, "500")
    assert result.returncode == 4 and "--reset" in result.stderr
    refused = run(settings, "stock", "set", sku, "500", "--reset")
    assert refused.returncode == 4 and "not applied yet" in refused.stderr and "--force" in refused.stderr
    assert redis_stock.view(sku).stock == 4
    assert mysql_view(settings, sku) == (5, 5)
    assert run(settings, "stock", "set", sku, "500", "--reset", "--force").returncode == 0
    assert redis_stock.view(sku).stock == 500
    assert mysql_view(settings, sku) == (500, 500)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["7", "--per-user-limit", "1000000000"], "1000000000 is not in the range 0<=x<=999999999"),
        (["1000000000001"], "1000000000001 is not in the range 0<=x<=1000000000000"),
    ],
)
def test_stock_set_checks_every_bound_before_writing_anything(
    settings: Settings, redis_stock: RedisStock, sku: str, args: list[str], message: str
) -> None:
    set_stock(settings, sku, 5)
    result = run(settings, "stock", "set", sku, *args, "--reset")
    assert result.returncode == 2 and message in result.stderr
    assert redis_stock.view(sku).stock == 5
    assert mysql_view(settings, sku) == (5, 5)


def mysql_view(settings: Settings, sku: str) -> tuple[int, int]:
    """(initial, stock) of the SKU in MySQL, read with plain SQL."""
    books = now(settings, sku)
    return books.mysql_initial, books.mysql_stock


def test_bench_compares_every_strategy_over_the_same_http_with_the_same_load(
    settings: Settings, tmp_path: Path
) -> None:
    picture = tmp_path / "bench.png"
    result = run(
        settings,
        "bench",
        "--strategy",
        "mysql-lock,mysql-optimistic,pipeline-b1,pipeline",
        "--json",
        "--stock",
        "100",
        "--attempts",
        "400",
        "--buyers",
        "20",
        "--plot",
        str(picture),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = {r["strategy"]: r for r in json.loads(result.stdout)["results"]}
    assert set(results) == {"mysql-lock", "mysql-optimistic", "pipeline-b1", "pipeline"}
    for r in results.values():
        (sku,) = r["skus"]
        books = now(settings, sku)
        # What the bench says it sold is what MySQL holds, read back with plain SQL.
        assert r["attempts"] == 400 and r["consistent"], r
        assert r["accepted"] == books.order_count == len(books.mysql_deducted) <= 100
        assert books.mysql_stock + sum(books.mysql_deducted.values()) == books.mysql_initial == 100
        # No latency exceeds the whole run, and the rate is the attempts over the run's time.
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["elapsed_s"] * 1000
        assert r["throughput"] == pytest.approx(400 / r["elapsed_s"], rel=0.01)
        assert "mariadb" in r["cpu_ms_per_accepted"]  # every strategy's books live in MariaDB
        if r["strategy"] in ("mysql-lock", "mysql-optimistic"):
            # MariaDB does all their work. (With group commit, 100 purchases are a batch or two: less than
            # the 10 ms the kernel counts CPU time in, so a pipeline's share may read 0.)
            assert r["cpu_ms_per_accepted"]["mariadb"] > 0
    assert results["mysql-lock"]["accepted"] == results["pipeline"]["accepted"] == 100
    assert results["mysql-lock"]["cpu_ms_per_accepted"]["baseline"] > 0
    assert {"producer", "consumer", "checker", "broker", "redis"} <= set(results["pipeline"]["cpu_ms_per_accepted"])
    # One transaction per purchase, then far fewer with group commit (the bench's own count of half messages).
    assert results["pipeline-b1"]["transactions_per_accepted"] >= 1.0
    assert results["pipeline"]["transactions_per_accepted"] < results["pipeline-b1"]["transactions_per_accepted"]
    assert balanced(settings, results["pipeline"]["skus"][0]).problems == []
    lock = results["mysql-lock"]
    for r in results.values():
        assert r["ratio"] == pytest.approx(r["throughput"] / lock["throughput"], abs=0.01)
        assert r["p99_ratio"] == pytest.approx(r["p99_ms"] / lock["p99_ms"], abs=0.002)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_takes_a_thousand_buyers_in_an_open_loop(settings: Settings) -> None:
    result = run(
        settings,
        "bench",
        "--strategy",
        "pipeline",
        "--json",
        "--stock",
        "200",
        "--attempts",
        "2000",
        "--buyers",
        "1000",
        "--rate",
        "1000",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (pipeline,) = json.loads(result.stdout)["results"]
    assert pipeline["attempts"] == 2000 and pipeline["accepted"] == 200 and pipeline["consistent"]
    assert pipeline["rejected"] == {"sold_out": 1800}
    # Due at 1,000 a second: the sale cannot take much less than two seconds.
    assert pipeline["elapsed_s"] >= 1.9


def test_demo_runs_a_whole_sale_and_ends_with_balanced_books(settings: Settings) -> None:
    result = run(settings, "demo", "--stock", "60", "--attempts", "300", "--buyers", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accepted 60" in result.stdout and "sold_out 240" in result.stdout
    assert "flashsale stack down" in result.stdout
    sku = re.search(r"3/6 (demo-\S+): 60 units", result.stdout)
    assert sku is not None, result.stdout
    books = balanced(settings, sku[1])
    assert books.problems == [] and books.order_count == 60 and books.mysql_stock == 0


def test_bench_backlog_times_the_consumer_draining_what_the_broker_buffered(settings: Settings) -> None:
    result = run(
        settings,
        "bench",
        "--strategy",
        "pipeline",
        "--backlog",
        "--batch-size",
        "64",
        "--json",
        "--stock",
        "300",
        "--attempts",
        "300",
        "--buyers",
        "20",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (pipeline,) = json.loads(result.stdout)["results"]
    assert pipeline["accepted"] == 300 and pipeline["consistent"]
    books = balanced(settings, pipeline["skus"][0])
    assert books.problems == [] and books.order_count == 300
    assert pipeline["drain_s"] > 0
    assert pipeline["applied_per_s"] == pytest.approx(300 / pipeline["drain_s"], rel=0.05)


def test_every_process_logs_one_json_object_per_line_with_the_ids_of_what_it_did_when_asked(
    pipeline: Pipeline, settings: Settings, sku: str
) -> None:
    json_logs = {"FLASHSALE_LOG_FORMAT": "json"}
    set_stock(settings, sku, 5)
    checker = pipeline.checker(**json_logs)
    consumer = pipeline.consumer(**json_logs)
    producer, url = pipeline.producer(**json_logs)
    assert post(url, {"sku": sku, "user_id": "u1", "qty": 1, "token": "t-json"})[1]["status"] == "accepted"
    # A producer that dies after its half message: the check that rolls it back is logged with its ids.
    doomed, doomed_url = pipeline.producer(failpoints=failpoints.AFTER_HALF_MESSAGE, **json_logs)
    try:
        post(doomed_url, {"sku": sku, "user_id": "u2", "qty": 1, "token": "t-json-doomed"}, timeout_s=15)
    except OSError:
        pass
    checker.wait_for(
        lambda: "key t-json-doomed -> rollback" in checker.text() + producer.text(), "answering the check", 60
    )
    assert balanced(settings, sku, 60).problems == []
    for child in (checker, consumer, producer):
        child.terminate()
    events = {}
    for role, child in (("checker", checker), ("consumer", consumer), ("producer", producer), ("producer", doomed)):
        # Every line is one JSON object naming its process: nothing printed around the logger.
        lines = [json.loads(line) for line in child.text().splitlines() if line.strip()]
        assert lines and all(e["process"] == role and e["pid"] == child.popen.pid for e in lines), role
        assert all(e["level"] and e["ts"] and e["logger"] for e in lines)
        events[child.popen.pid] = lines
    checks = [
        e for e in events[checker.popen.pid] + events[producer.popen.pid] if "t-json-doomed -> rollback" in e["message"]
    ]
    assert checks and all(e.get("token") == "t-json-doomed" and e.get("message_id") for e in checks), checks
    assert any(e["message"].startswith("checker answering transaction checks") for e in events[checker.popen.pid])
    assert any("batch: 1 applied" in e["message"] for e in events[consumer.popen.pid])
    assert any("failpoint" in e["message"] and e["level"] == "CRITICAL" for e in events[doomed.popen.pid])


def _log(settings: Settings, sku: str) -> list[dict[str, int | str]]:
    """The SKU's Redis log entries, read with plain commands."""
    r = redis_client(settings.redis_url)
    try:
        return [json.loads(raw) for raw in r.hgetall(f"fs:{{{sku}}}:log").values()]
    finally:
        r.close()


def test_bench_with_non_payers_resells_what_expires_and_reports_what_the_books_hold(settings: Settings) -> None:
    stock, attempts = 40, 480
    result = run(
        settings,
        "bench",
        "--unpaid",
        "0.3",
        "--pay-within",
        "2s",
        "--json",
        "--stock",
        str(stock),
        "--attempts",
        str(attempts),
        "--buyers",
        "20",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    results = {r["strategy"]: r for r in out["results"]}
    orders, plain = results["pipeline-orders"], results["pipeline"]
    assert out["config"]["rate"] == attempts / 6  # spread over three deadlines of 2 s
    assert orders["consistent"] and plain["consistent"] and orders["attempts"] == plain["attempts"] == attempts
    life, (sku,) = orders["lifecycle"], orders["skus"]
    books = balanced(settings, sku)  # Redis and MySQL read with plain commands and SQL, never with reconcile
    assert books.problems == []
    statuses = Counter(books.order_status.values())
    # Units conserved, never oversold: loaded = on sale + paid (+ awaiting payment: none once it settled).
    assert books.mysql_stock + statuses["paid"] == books.redis_stock + statuses["paid"] == stock
    # Every purchase the buyers were told was accepted is an order in MySQL; the ones past the stock loaded
    # sold units given back.
    assert orders["accepted"] == len(books.mysql_deducted) == books.order_count == life["orders"]
    assert life["resold"] == orders["accepted"] - stock > 0 and life["oversold"] == life["lost"] == 0
    # The non-payers' orders expired, each giving back its unit once (a stock_returns row); the rest paid.
    assert life["expired"] == life["unpaid_buyers"] == statuses["expired"] == len(books.mysql_returned) > 0
    assert life["paid"] == statuses["paid"] == orders["accepted"] - life["unpaid_buyers"]
    assert life["payments"] == {"paid": life["paid"]} and set(statuses) == {"paid", "expired"}
    assert life["back_unsold"] == life["expired"] - life["resold"] == books.mysql_stock == books.redis_stock
    # Lateness and the time to a resale, bounded by the raw log entries.
    entries = _log(settings, sku)
    late = sorted(int(e["decided_ts"]) - int(e["due"]) for e in entries if e["order"] == "expired")
    assert 0 <= late[0] <= life["lateness_p50_ms"] <= life["lateness_p99_ms"] <= late[-1]
    bought = sorted(int(e["ts"]) for e in entries)
    first_back = min(int(e["decided_ts"]) for e in entries if e["order"] == "expired")
    first_due = min(int(e["due"]) for e in entries if e["order"] == "expired")
    assert 0 <= life["resold_after_due_p50_ms"] <= life["resold_after_due_p99_ms"] <= bought[-1] - first_due
    assert life["resold_per_s"] == pytest.approx(life["resold"] / ((bought[-1] - first_back) / 1000), rel=0.01)
    # The sale without orders: the same load, every unit sold once, nothing decided after.
    plain_books = balanced(settings, plain["skus"][0])
    assert plain["accepted"] == stock == plain_books.order_count and plain_books.problems == []
    assert (plain["lifecycle"]["resold"], plain["lifecycle"]["expired"], plain["lifecycle"]["paid"]) == (0, 0, 0)
    assert "expirer" in orders["cpu_ms_per_accepted"] and "expirer" not in plain["cpu_ms_per_accepted"]
    assert plain["cpu_window_s"] >= orders["cpu_window_s"] - 0.1  # the same time, idle processes weigh the same
    cpu = orders["cpu_ms_per_accepted"]["all"], plain["cpu_ms_per_accepted"]["all"]
    assert life["cpu_x_plain"] == pytest.approx(cpu[0] / cpu[1], abs=0.01)
    added_ms = 1000 * (orders["cpu_s"] - plain["cpu_s"]) / orders["accepted"]
    assert life["cpu_extra_ms_per_accepted"] == pytest.approx(added_ms, abs=0.002)
    assert orders["cpu_ms_per_accepted"]["all"] == pytest.approx(1000 * orders["cpu_s"] / orders["accepted"], abs=0.01)


def test_a_process_logs_one_json_object_per_line_when_asked(pipeline: Pipeline) -> None:
    checker = pipeline.checker(FLASHSALE_LOG_FORMAT="json")
    checker.terminate()
    events = [json.loads(line) for line in checker.text().splitlines() if line.strip()]
    assert any(e["message"].startswith("checker answering transaction checks") for e in events)
    assert all(e["process"] == "checker" and e["pid"] == checker.popen.pid for e in events if "process" in e)


def test_a_baseline_out_of_connections_is_reported_with_its_errors_and_the_run_goes_on(
    settings: Settings, stack_settings: StackSettings
) -> None:
    from flashsale.stack.manager import Stack
    from flashsale.stack.mariadb import MariaDBService

    mariadb = MariaDBService(Stack(stack_settings).layout, stack_settings)
    before = int(mariadb._root_sql("SELECT @@GLOBAL.max_connections").strip())
    mariadb._root_sql("SET GLOBAL max_connections = 30")  # the baseline wants 64; a few are in use already
    try:
        result = run(
            settings,
            "bench",
            "--strategy",
            "mysql-lock,pipeline",
            "--json",
            "--stock",
            "50",
            "--attempts",
            "600",
            "--buyers",
            "64",
        )
    finally:
        mariadb._root_sql(f"SET GLOBAL max_connections = {before}")
    results = {r["strategy"]: r for r in json.loads(result.stdout)["results"]}
    lock = results["mysql-lock"]
    assert lock["attempts"] == 600 and lock["rejected"].get("error", 0) > 0
    assert any("Too many connections" in e for e in lock["errors"]), lock["errors"]
    assert lock["consistent"]  # what it did accept, it booked
    assert results["pipeline"]["accepted"] == 50 and results["pipeline"]["consistent"]
