"""The Redis stage alone, measured from outside: pre-deducts per second of one hot SKU on 1 master and on 3.

On a Redis Cluster of its own (3 masters, no replicas: what WAIT costs is in docs/scaling.md), one
SKU is loaded in 1 partition (one master does all the work) and another in 3 partitions (one on each
master). redis-benchmark, Redis's own load generator in C, sends prededuct.lua itself, pipelined, with
a fresh message id, token and user in every call (__rand_int__), to the master of each partition at
once. The rate is the deductions that appeared in the partitions' logs over the measured stretch,
read with HLEN; the CPU of every redis-server (with its append-only file rewrites) and of the load
generators is read for the same stretch. Every stage starts on empty masters; rounds alternate 1 and
3 masters, and the median round is reported.

Target: 3 masters sell at least 1.7x what 1 master does (this box has 2 cores: 2x at most).

Run: `python -m tests.benchmarks.redis_stage [--seconds 8]` (part of `make bench`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass

import redis

from flashsale import constants as c
from flashsale.adapters.redis import lua
from flashsale.adapters.redis.keys import SkuKeys
from flashsale.adapters.redis.stock import RedisStock
from flashsale.bench.cpu import CpuMeter
from flashsale.stack import procs
from flashsale.stack.layout import StackLayout
from flashsale.stack.manager import Stack
from flashsale.stack.settings import StackSettings
from tests.conftest import ROOT, clean_environment, cluster_url

PORT = 7479
TARGET = 1.7
#: Connections and pipeline depth of each redis-benchmark (one per partition).
CONNECTIONS, PIPELINE = 32, 16
WARMUP_S = 2.0


@dataclass
class Stage:
    group: int  # purchases per script call, as group commit sends them
    partitions: int
    masters_used: int
    prededucts_per_s: float
    cpu_percent: dict[str, float]


def bench_cluster() -> StackSettings:
    """The benchmarks' own Redis Cluster: 3 masters, no replicas, on ports 7479 and up."""
    home = ROOT / ".flashsale" / "bench-cluster"
    env = {
        **clean_environment(),
        "FLASHSALE_HOME": str(home),
        "FLASHSALE_REDIS_PORT": str(PORT),
        "FLASHSALE_REDIS_MASTERS": "3",
        "FLASHSALE_REDIS_REPLICAS": "0",
    }
    return StackSettings.from_env(env)


def _load(url: str, partitions: int) -> tuple[list[tuple[str, int]], int]:
    """A SKU of (almost) endless stock in `partitions` partitions: each partition and its master's port,
    and the layout's epoch (every pre-deduct names it)."""
    sku = f"stage-{partitions}-{uuid.uuid4().hex[:8]}"
    stock = RedisStock(url)
    try:
        qty = c.MAX_STOCK - 1
        layout = stock.load_partitioned(sku, qty, partitions=partitions, refill=qty // partitions, threshold=0)
        client = stock.client
        assert isinstance(client, redis.RedisCluster)
        return [(p, client.get_node_from_key(SkuKeys.of(p).stock).port) for p in layout.parts], layout.epoch
    finally:
        stock.close()


def _generator(part: str, port: int, epoch: int, group: int) -> subprocess.Popen[bytes]:
    node = redis.Redis(port=port)
    try:
        node.script_load(lua.source("prededuct"))  # redis-benchmark sends EVALSHA only
    finally:
        node.close()
    keys = SkuKeys.of(part).all()
    command = [
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q",
        "-c", str(CONNECTIONS), "-P", str(PIPELINE), "-n", "2000000000", "-r", "1000000000",
        "EVALSHA", lua.sha1("prededuct"), str(len(keys)), *keys,
        "m__rand_int__", part, str(epoch), *(["t__rand_int__", "u__rand_int__", "1"] * group),
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _logged(url: str, parts: list[tuple[str, int]]) -> int:
    total = 0
    for part, port in parts:
        node = redis.Redis(port=port)
        try:
            total += int(node.hlen(SkuKeys.of(part).log))
        finally:
            node.close()
    return total


def _fresh(cluster: StackSettings) -> None:
    """Every master empty, with its append-only file compacted: each stage starts from the same state."""
    for i in range(cluster.topology.redis_nodes):
        node = redis.Redis(port=cluster.ports.redis + i)
        try:
            node.flushall()
            while int(node.info("persistence")["aof_rewrite_in_progress"]):
                time.sleep(0.1)
            node.bgrewriteaof()
            time.sleep(0.2)
            while int(node.info("persistence")["aof_rewrite_in_progress"]):
                time.sleep(0.1)
        finally:
            node.close()


def measure(cluster: StackSettings, partitions: int, seconds: float, group: int) -> Stage:
    _fresh(cluster)
    url = cluster_url(cluster)
    parts, epoch = _load(url, partitions)
    generators = [_generator(part, port, epoch, group) for part, port in parts]
    try:
        time.sleep(WARMUP_S)
        layout = StackLayout.at(cluster.home)
        servers = {}
        for i in range(cluster.topology.redis_nodes):
            record = procs.PidRecord.load(layout.pid_file(f"redis-{i}"))
            if record and procs.is_alive(record):
                servers[f"redis-{i}"] = record.pid
        meter = CpuMeter(
            {**servers, **{f"redis-benchmark {p}": g.pid for (p, _), g in zip(parts, generators, strict=True)}}
        )
        before, started = _logged(url, parts), time.perf_counter()
        time.sleep(seconds)
        after, elapsed = _logged(url, parts), time.perf_counter() - started
        used = meter.used()
    finally:
        for g in generators:
            g.kill()
            g.wait()
    return Stage(
        group=group,
        partitions=partitions,
        masters_used=len({port for _, port in parts}),
        prededucts_per_s=round((after - before) / elapsed),
        cpu_percent={name: round(100 * s / elapsed, 1) for name, s in used.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--groups", default="1,16", help="purchases per script call, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cluster = bench_cluster()
    stack = Stack(cluster)
    stack.down()
    shutil.rmtree(cluster.home, ignore_errors=True)
    stack.up(["redis"])
    rows = []
    try:
        for group in (int(g) for g in args.groups.split(",")):
            # Rounds alternate 1 and 3 masters; the round with the median ratio is reported.
            rounds = []
            for _ in range(args.rounds):
                one, three = (measure(cluster, p, args.seconds, group) for p in (1, 3))
                if not one.prededucts_per_s:
                    raise SystemExit("no pre-deduct ran on 1 master: is redis-benchmark installed (redis-tools)?")
                rounds.append((one, three, three.prededucts_per_s / one.prededucts_per_s))
            rows.append(sorted(rounds, key=lambda r: r[2])[len(rounds) // 2])
    finally:
        stack.down()
    report = [{"one": asdict(a), "three": asdict(b), "ratio": round(r, 2)} for a, b, r in rows]
    print(json.dumps(report, indent=2))
    for one, three, ratio in rows:
        print(
            f"redis stage, {one.group} purchase(s) per call: 1 master {one.prededucts_per_s:,.0f}/s, "
            f"3 masters {three.prededucts_per_s:,.0f}/s: {ratio:.2f}x "
            f"(target {TARGET}x: {'met' if ratio >= TARGET else 'MISSED'})"
        )


if __name__ == "__main__":
    main()
