"""Every command, run as a user runs it (`python -m flashsale ...`) against the real stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from flashsale import failpoints
from flashsale.adapters.redis.stock import RedisStock
from flashsale.adapters.rocketmq import admin as rocketmq_admin
from flashsale.config import Settings
from flashsale.models import DeductionMessage, Purchase
from flashsale.net import is_loopback
from flashsale.ops.setup import set_stock
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.acceptance.harness import Pipeline, post
from tests.conftest import session_env
from tests.oracle import Books, balanced, mysql_connection, now, redis_client


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
        (("replay", "--token", "t-1", "--sku", "no-such-{sku}"), {}, 2, "unknown SKU"),
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


def test_a_replay_of_dead_letters_exits_1_while_one_it_cannot_replay_stays_open(settings: Settings, sku: str) -> None:
    """A dead letter whose body cannot be read is reported under `cannot replay` and stays open (reconcile
    counts it): the run did not do what it was asked, and its exit code says so, run after run. One whose
    token the log does not hold as deducted is settled (nothing was sold to apply): listed, and closed."""
    set_stock(settings, sku, 10)

    def letter(message_id: str, body: bytes, purchase: str) -> None:
        with mysql_connection(settings.mysql_url) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO dead_letters (message_id, topic, message_key, sku, reason, body, purchase)"
                " VALUES (%s, 't', NULL, %s, 'test', %s, %s)",
                (message_id, sku, body, purchase),
            )
            conn.commit()

    letter(f"m1-{sku}", DeductionMessage(sku, (Purchase("never-sold", "u1", 1),), f"m1-{sku}").encode(), "never-sold")
    runs = [run(settings, "replay", "--dead-letters", "--sku", sku, "--json")]
    letter(f"m2-{sku}", b"{not json", "")
    runs += [run(settings, "replay", "--dead-letters", "--sku", sku, "--json") for _ in range(2)]
    reports = [json.loads(r.stdout) for r in runs]
    assert [r.returncode for r in runs] == [0, 1, 1], [r.stdout + r.stderr for r in runs]
    assert [(len(r["unreplayable"]), r["not_deducted"], r["dead_letters_marked"]) for r in reports] == [
        (0, ["never-sold"], 1),
        (1, [], 0),
        (1, [], 0),
    ]


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


def _half_messages(settings: Settings) -> int:
    """Half messages the broker has ever taken, asked of the broker (its system topic of them has one queue).
    The broker also writes there again a half message it checks: a count from it is a bound from above."""
    return rocketmq_admin.max_offset(f"127.0.0.1:{settings.ports.broker}", "RMQ_SYS_TRANS_HALF_TOPIC", 0)


def _logged_at(folder: Path, role: str, says: str) -> float:
    """When the bench's `role` process first logged a line with `says` (any line for ""): the line's own
    timestamp, in seconds since the epoch."""
    (log,) = folder.glob(f"{role}-*.log")
    line = next((line for line in log.read_text().splitlines() if says in line), None)
    assert line is not None, f"{log} never says {says!r}"
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()  # local time


def _bench_logs(stack_settings: StackSettings, strategy: str, sku: str) -> Path:
    """Where the bench's processes of `strategy` logged: logs/bench-<run>/<strategy>, the run in the SKU."""
    run = sku.removeprefix("bench-").split("-", 1)[0]
    return Stack(stack_settings).layout.logs / f"bench-{run}" / strategy


def _served(stack_settings: StackSettings, strategy: str, sku: str) -> tuple[float, float]:
    """When the strategy's server (a baseline, or the producer) listened, and when the bench stopped it:
    its buyers could only be answered in between."""
    folder = _bench_logs(stack_settings, strategy, sku)
    role = "baseline" if strategy in ("mysql-lock", "mysql-optimistic") else "producer"
    return _logged_at(folder, role, " listening on "), _logged_at(folder, role, "received SIGTERM")


def _sold_at(settings: Settings, strategy: str, sku: str) -> list[float]:
    """When each accepted purchase was made, in seconds since the epoch, on its store's own clock:
    MariaDB's for a baseline (its order's created_at), Redis's for the pipeline (its log entry's ts)."""
    if strategy not in ("mysql-lock", "mysql-optimistic"):
        return [int(e["ts"]) / 1000 for e in _log(settings, sku)]
    return [float(t) for t in _column(settings, "SELECT UNIX_TIMESTAMP(created_at) FROM orders WHERE sku = %s", sku)]


def _column(settings: Settings, sql: str, sku: str) -> list[object]:
    conn = mysql_connection(settings.mysql_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, (sku,))
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def _mysql_problems(books: Books) -> list[str]:
    """What keeps a baseline's books from agreeing: it sells from MySQL alone, so its books are MySQL's."""
    problems = []
    if books.mysql_stock + sum(books.mysql_deducted.values()) != books.mysql_initial:
        problems.append(f"stock {books.mysql_stock} + {books.mysql_deducted} != initial {books.mysql_initial}")
    if dict(books.orders) != dict.fromkeys(books.mysql_deducted, 1):
        problems.append(f"orders {sorted(books.orders)} != deductions {sorted(books.mysql_deducted)}")
    if books.ordered_qty != sum(books.mysql_deducted.values()):
        problems.append(f"ordered {books.ordered_qty} units, deducted {sum(books.mysql_deducted.values())}")
    return problems


#: The least and the most attempts a second a strategy can have answered.
Bounds = tuple[float, float]
#: Seconds a time may read early: log lines and Redis's log entries give it to the millisecond, cut.
CUT_S = 0.001
#: Seconds a server's "listening on" line may come after its first answers (it is logged once serving).
LOGGED_LATE_S = 0.2
#: Seconds the bench's times may be off by: it gives them to the millisecond, rounded.
ROUNDED_S = 0.0005


def _check_strategy(settings: Settings, stack_settings: StackSettings, r: dict, clock: tuple[float, float]) -> Bounds:
    """One strategy's result against what the test sees itself; returns the bounds on its rate.

    Its sale took at least the time between its first and last purchase on the store's own clock, and
    at most the life of its server (from the server's own log), which lies inside the test's clock."""
    (sku,) = r["skus"]
    books = now(settings, sku)
    # What the bench says it sold is what MySQL holds, read back with plain SQL.
    assert r["attempts"] == 400 and r["consistent"], r
    assert r["accepted"] == books.order_count == len(books.mysql_deducted) <= 200
    assert _mysql_problems(books) == [] and books.mysql_initial == 200
    listened, stopped = _served(stack_settings, r["strategy"], sku)
    sold = _sold_at(settings, r["strategy"], sku)
    assert clock[0] <= listened and stopped <= clock[1]
    # The server logs that it listens just after it starts serving: buyers that found it ready at once
    # may have bought a few milliseconds before that line.
    assert listened - LOGGED_LATE_S <= min(sold) and max(sold) <= stopped + CUT_S, (listened, sold, stopped)
    least, most = max(sold) - min(sold) - CUT_S, stopped - listened + LOGGED_LATE_S
    assert least <= r["elapsed_s"] + ROUNDED_S and r["elapsed_s"] - ROUNDED_S <= most, (least, r["elapsed_s"], most)
    assert least <= r["sellout_s"] + ROUNDED_S and r["sellout_s"] <= r["elapsed_s"]
    # The rate is the attempts over that time: within what the two bounds allow (given to 0.1 a second).
    low, high = r["attempts"] / most, r["attempts"] / least
    assert low - 0.05 <= r["throughput"] <= high + 0.05, (low, r["throughput"], high)
    assert r["throughput"] == pytest.approx(400 / r["elapsed_s"], rel=0.01)
    # No latency exceeds the whole run.
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["elapsed_s"] * 1000
    assert "mariadb" in r["cpu_ms_per_accepted"]  # every strategy's books live in MariaDB
    if r["strategy"] in ("mysql-lock", "mysql-optimistic"):
        # MariaDB does all their work. (With group commit, 200 purchases are a batch or two: less than
        # the 10 ms the kernel counts CPU time in, so a pipeline's share may read 0.)
        assert r["cpu_ms_per_accepted"]["mariadb"] > 0
    return low, high


def test_bench_compares_every_strategy_over_the_same_http_with_the_same_load(
    settings: Settings, stack_settings: StackSettings, tmp_path: Path
) -> None:
    picture = tmp_path / "bench.png"
    half_before, started = _half_messages(settings), time.time()
    result = run(
        settings,
        "bench",
        "--strategy",
        "mysql-lock,mysql-optimistic,pipeline-b1,pipeline",
        "--json",
        "--stock",
        "200",
        "--attempts",
        "400",
        "--buyers",
        "20",
        "--plot",
        str(picture),
    )
    clock = (started, time.time())
    half = _half_messages(settings) - half_before
    assert result.returncode == 0, result.stdout + result.stderr
    results = {r["strategy"]: r for r in json.loads(result.stdout)["results"]}
    assert set(results) == {"mysql-lock", "mysql-optimistic", "pipeline-b1", "pipeline"}
    rates = {name: _check_strategy(settings, stack_settings, r, clock) for name, r in results.items()}
    assert sum(r["elapsed_s"] for r in results.values()) <= clock[1] - clock[0]
    assert results["mysql-lock"]["accepted"] == results["pipeline"]["accepted"] == 200
    assert results["mysql-lock"]["cpu_ms_per_accepted"]["baseline"] > 0
    assert {"producer", "consumer", "checker", "broker", "redis"} <= set(results["pipeline"]["cpu_ms_per_accepted"])
    _check_transactions(results, half)
    assert balanced(settings, results["pipeline"]["skus"][0]).problems == []
    lock, (lock_low, lock_high) = results["mysql-lock"], rates["mysql-lock"]
    for name, r in results.items():
        # Each ratio lies within what the bounds on the two rates allow (given to 0.01).
        low, high = rates[name]
        assert low / lock_high - 0.005 <= r["ratio"] <= high / lock_low + 0.005, (name, r["ratio"])
        assert r["ratio"] == pytest.approx(r["throughput"] / lock["throughput"], abs=0.01)
        assert r["p99_ratio"] == pytest.approx(r["p99_ms"] / lock["p99_ms"], abs=0.002)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_transactions(results: dict[str, dict], half: int) -> None:
    """One transaction per purchase, then far fewer with group commit: judged by the half messages the
    broker took over the run (only the two pipelines send any). pipeline-b1 sent at least one per purchase
    it accepted, so the rest, the most group commit can have sent, must be fewer than its purchases."""
    b1, grouped = results["pipeline-b1"], results["pipeline"]
    assert b1["transactions_per_accepted"] >= 1.0 and half >= b1["accepted"]
    assert half - b1["accepted"] < grouped["accepted"], (half, b1["accepted"], grouped["accepted"])
    # The producers' own count of them says no more than the broker took.
    said = b1["transactions_per_accepted"] * b1["accepted"] + grouped["transactions_per_accepted"] * grouped["accepted"]
    assert said <= half + 0.5, (said, half)
    assert grouped["transactions_per_accepted"] < b1["transactions_per_accepted"]


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
    books = balanced(settings, pipeline["skus"][0])  # plain Redis commands and SQL, not the bench's reconcile
    assert books.problems == [], books.problems
    assert books.order_count == books.sold == 200 and books.redis_stock == books.mysql_stock == 0
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


def test_bench_backlog_times_the_consumer_draining_what_the_broker_buffered(
    settings: Settings, stack_settings: StackSettings
) -> None:
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
    (sku,) = pipeline["skus"]
    books = balanced(settings, sku)
    assert books.problems == [] and books.order_count == len(books.mysql_deducted) == 300
    # The drain began after the sale's last purchase (Redis's clock) and before the consumer's first log
    # line; it ended once MySQL held its last row (MariaDB's clock), before the bench stopped the consumer.
    folder = _bench_logs(stack_settings, "pipeline", sku)
    last_sold = max(int(e["ts"]) for e in _log(settings, sku)) / 1000
    rows = _column(settings, "SELECT UNIX_TIMESTAMP(applied_at) FROM stock_deductions WHERE sku = %s", sku)
    applied = [float(t) for t in rows]
    least = max(applied) - _logged_at(folder, "consumer", "") - CUT_S
    most = _logged_at(folder, "consumer", "received SIGTERM") + CUT_S - last_sold
    drain_s = pipeline["drain_s"]
    assert 0 < least <= drain_s + ROUNDED_S and drain_s - ROUNDED_S <= most, (least, drain_s, most)
    assert 300 / most - 0.05 <= pipeline["applied_per_s"] <= 300 / least + 0.05
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
    lock, pipeline = results["mysql-lock"], results["pipeline"]
    assert lock["attempts"] == 600 and lock["rejected"].get("error", 0) > 0
    assert any("Too many connections" in e for e in lock["errors"]), lock["errors"]
    # What it did accept, it booked, and nothing else: its books read back with plain SQL.
    lock_books = now(settings, lock["skus"][0])
    assert lock["consistent"] and _mysql_problems(lock_books) == [] and lock_books.order_count == lock["accepted"]
    assert pipeline["accepted"] == 50 and pipeline["consistent"]
    books = balanced(settings, pipeline["skus"][0])
    assert books.problems == [] and books.order_count == books.sold == 50, books.problems
