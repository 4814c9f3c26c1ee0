"""Where a purchase's CPU goes: wrk against fresh processes, with py-spy on the producer and the consumer and
JDK Flight Recorder on the broker's JVM, attached by PID while the load runs.

    python -m tests.benchmarks.profile --mode sold_out|live|idle [--duration 10] [--out /tmp/prof-out] [--jfr] [--gil]

For each process profiled it writes, under --out: py-spy's raw stacks (`<mode>-<role>.txt`, collapsed, one
line a stack with its sample count: any flame graph tool reads them), the top functions by self and
inclusive samples (`<mode>-<role>.top.txt`); the CPU each thread of every process spent during the profile
(`<mode>-threads.txt`, from /proc); with --jfr the broker's recording and its top methods and packages
(`<mode>-broker.jfr`, `<mode>-broker.top.txt`). py-spy samples only threads on the CPU (no --idle); with --gil
only the thread that holds the GIL, and the top says at how many of the instants sampled one did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from flashsale.bench.cpu import CpuMeter
from flashsale.config import Settings
from tests.benchmarks.wrk_bench import SERVERS, fleet_of, metric, on_sale, own_database, parse_wrk, wrk_command

#: py-spy from the dev lock, beside this interpreter.
PY_SPY = Path(os.environ.get("PY_SPY", Path(sys.executable).with_name("py-spy")))
#: Seconds of load before the profilers attach: connections open, the JIT warm.
WARMUP_S = 3
TOP = 25
ACCEPTED = "flashsale_purchases_total"
#: The broker's frames by package, first match wins: (label, prefixes of the class name).
PACKAGES = (
    ("grpc/netty", ("io.grpc.", "io.netty.", "com.google.protobuf.", "org.apache.rocketmq.shaded.")),
    ("proxy: gRPC service and activities", ("org.apache.rocketmq.proxy.grpc.",)),
    ("proxy: processor/service", ("org.apache.rocketmq.proxy.",)),
    ("broker: transaction (half, op queue, check)", ("org.apache.rocketmq.broker.transaction.",)),
    ("broker: pop/receive/ack", ("org.apache.rocketmq.broker.processor.Pop", "org.apache.rocketmq.broker.pop.")),
    ("broker: processors", ("org.apache.rocketmq.broker.processor.",)),
    ("broker: other", ("org.apache.rocketmq.broker.",)),
    ("store: timer wheel", ("org.apache.rocketmq.store.timer.",)),
    ("store: commit log, queues, flush", ("org.apache.rocketmq.store.",)),
    ("remoting", ("org.apache.rocketmq.remoting.",)),
    ("rocketmq common", ("org.apache.rocketmq.common.",)),
    ("logging", ("ch.qos.logback.", "org.slf4j.", "org.apache.rocketmq.logging.", "org.apache.rocketmq.shaded.")),
    ("jdk", ("java.", "javax.", "jdk.", "sun.")),
)


def top_of(stacks: Iterable[tuple[list[str], int]]) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, and samples per frame: as the innermost (self) and anywhere on the stack (inclusive)."""
    total, own, inclusive = 0, Counter[str](), Counter[str]()
    for frames, count in stacks:
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, own, inclusive


def py_spy_stacks(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) stacks, outermost frame first, without the thread's frame."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        stacks.append((frames, int(count)))
    return stacks


def threads_of(path: Path) -> Counter[str]:
    """Samples per thread (py-spy --threads names each stack's thread first)."""
    counts = Counter[str]()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        first = stack.split(";", 2)
        name = next((f for f in first if f.startswith("thread (")), "?")
        counts[name.partition("): ")[2] or name] += int(count)  # by name: "thread (TID): NAME"
    return counts


def render(title: str, total: int, rows: dict[str, Counter[str]]) -> str:
    lines = [f"{title}: {total} samples"]
    for kind, counter in rows.items():
        lines.append(f"\n{kind} (top {TOP}):")
        for name, count in counter.most_common(TOP):
            lines.append(f"{100 * count / max(total, 1):6.1f}%  {count:7d}  {name}")
    return "\n".join(lines) + "\n"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed) of a process, from /proc. A thread named as
    its process (Python's threads and granian's workers all say "python") is told apart by its id, the one
    py-spy's stacks name it by."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    process = Path(f"/proc/{pid}/comm").read_text().strip()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        name = f"{name} (thread {task.name})" if name == process else name
        fields = stat[stat.rindex(")") + 2 :].split()
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return used


def thread_report(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], seconds: float) -> str:
    lines = [f"CPU per thread over {seconds:.1f} s, % of a core"]
    for role, threads in after.items():
        spent = {n: s - before[role].get(n, 0.0) for n, s in threads.items()}
        lines.append(f"\n{role}: {100 * sum(spent.values()) / seconds:.1f}%")
        for name, s in sorted(spent.items(), key=lambda kv: -kv[1])[:15]:
            if s > 0:
                lines.append(f"  {100 * s / seconds:6.1f}%  {name}")
    return "\n".join(lines) + "\n"


def jfr_stacks(recording: Path) -> list[tuple[list[str], int]]:
    """The execution samples of a JFR recording, outermost frame first, as Class.method."""
    printed = subprocess.run(
        ["jfr", "print", "--json", "--stack-depth", "64", "--events", "jdk.ExecutionSample", str(recording)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stacks = []
    for event in json.loads(printed)["recording"]["events"]:
        frames = (event["values"].get("stackTrace") or {}).get("frames") or []
        # JFR names classes as the JVM does (org/apache/...): dotted, as the packages above are.
        names = [f"{f['method']['type']['name'].replace('/', '.')}.{f['method']['name']}" for f in frames]
        stacks.append((names[::-1], 1))
    return stacks


def package_of(frame: str) -> str:
    return next((label for label, prefixes in PACKAGES if frame.startswith(prefixes)), "other")


def jfr_report(recording: Path) -> str:
    stacks = jfr_stacks(recording)
    total, own, inclusive = top_of(stacks)
    by_package = Counter[str]()
    first_rocketmq = Counter[str]()
    for frames, count in stacks:
        if frames:
            by_package[package_of(frames[-1])] += count
            # The innermost RocketMQ frame: which of its parts a sample in the JDK or a library serves.
            ours = next((f for f in reversed(frames) if f.startswith("org.apache.rocketmq.")), "(no rocketmq frame)")
            first_rocketmq[ours] += count
    rows = {
        "self, by package": by_package,
        "self, by method": own,
        "inclusive, by method": inclusive,
        "innermost rocketmq frame": first_rocketmq,
    }
    return render(f"broker JFR {recording.name}", total, rows)


def start_profilers(pids: dict[str, int], roles: list[str], args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    spies = []
    for role in roles:
        command = [str(PY_SPY), "record", "--pid", str(pids[role]), "--duration", str(args.duration)]
        command += ["--rate", str(args.rate), "--format", "raw", "--threads", "--function"]
        # py-spy reads native stacks only from a paused process; without them it need not pause it.
        command += ["--native"] if args.native else ["--nonblocking"]
        command += ["--gil"] if args.gil else []
        command += ["--output", str(args.out / f"{args.mode}-{role}.txt")]
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    if args.jfr:
        recording = args.out / f"{args.mode}-broker.jfr"
        subprocess.run(
            ["jcmd", str(pids["broker"]), "JFR.start", "name=flashsale-profile", "settings=profile"],
            check=True,
            capture_output=True,
        )
        args.recording = recording
    return spies


def stop_profilers(spies: list[subprocess.Popen[bytes]], pids: dict[str, int], args: argparse.Namespace) -> None:
    for spy in spies:
        spy.wait(args.duration + 60)
    time.sleep(max(0.0, args.started + args.duration - time.perf_counter()))
    if args.jfr:
        subprocess.run(
            ["jcmd", str(pids["broker"]), "JFR.stop", "name=flashsale-profile", f"filename={args.recording}"],
            check=True,
            capture_output=True,
        )


def profile(args: argparse.Namespace) -> None:
    with own_database("p") as settings:
        _profile(settings, args)


def _profile(settings: Settings, args: argparse.Namespace) -> None:
    sku = f"prof-{args.mode}-{uuid.uuid4().hex[:6]}"
    stock = 10**9 if args.mode == "live" else 0
    roles = ["producer"] if args.mode == "sold_out" else ["producer", "consumer"]
    with on_sale(settings, sku, stock), fleet_of(settings, args.group_size) as (pids, url):
        # idle: the same processes with no load, for what the stack costs doing nothing.
        wrk = (
            ["sleep", "0"]
            if args.mode == "idle"
            else wrk_command(url, sku, args.duration + WARMUP_S + 2, args.connections)
        )
        load = subprocess.Popen(wrk, stdout=subprocess.PIPE, text=True)
        time.sleep(WARMUP_S)
        accepted = -metric(url, ACCEPTED, '{status="accepted"}')
        meter, before, args.started = CpuMeter(pids), {r: thread_cpu(p) for r, p in pids.items()}, time.perf_counter()
        stop_profilers(start_profilers(pids, roles, args), pids, args)
        seconds, used = time.perf_counter() - args.started, meter.used()
        accepted += metric(url, ACCEPTED, '{status="accepted"}')
        after = {r: thread_cpu(p) for r, p in pids.items()}
        out = load.communicate()[0]
    rate = parse_wrk(out)[0] if args.mode != "idle" else 0.0
    summary = [
        f"{args.mode}: wrk {rate:,.0f} requests/s, {accepted:,.0f} accepted while profiled; CPU over the profile:"
    ]
    summary += [
        f"  {name}: {100 * s / seconds:.1f}% of a core"
        + (f", {1000 * s / accepted:.3f} ms per accepted" if accepted else "")
        for name, s in used.items()
    ]
    threads = thread_report(before, after, seconds)
    (args.out / f"{args.mode}-threads.txt").write_text("\n".join(summary) + "\n\n" + threads)
    print("\n".join(summary))
    write_tops(roles, args)


def write_tops(roles: list[str], args: argparse.Namespace) -> None:
    for role in roles:
        raw = args.out / f"{args.mode}-{role}.txt"
        if not raw.exists():
            print(f"py-spy wrote nothing for the {role}")
            continue
        total, own, inclusive = top_of(py_spy_stacks(raw))
        top = render(f"{args.mode} {role}, samples with a Python frame", total, {"self": own, "inclusive": inclusive})
        # Every sample, by thread: one with no Python frame ran native code only (granian's workers, say).
        threads = threads_of(raw)
        top += "\n" + render(f"{args.mode} {role}, every sample", sum(threads.values()), {"by thread": threads})
        if args.gil:  # one thread at most holds the GIL at each instant sampled
            held = sum(threads.values()) / (args.rate * args.duration)
            top += f"\nthe GIL was held at {100 * held:.0f}% of the instants sampled\n"
        (args.out / f"{args.mode}-{role}.top.txt").write_text(top)
    if args.jfr:
        (args.out / f"{args.mode}-broker.top.txt").write_text(jfr_report(args.recording))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("sold_out", "live", "idle"), default="live")
    parser.add_argument("--duration", type=int, default=10, help="seconds profiled (wrk runs a few more)")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--group-size", type=int, default=256)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="py-spy --native: C and Rust frames too")
    parser.add_argument("--gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    parser.add_argument("--jfr", action="store_true", help="record the broker's JVM with JDK Flight Recorder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/prof-out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.jfr and "broker" not in SERVERS:
        parser.error("the broker's PID is not known")
    profile(args)


if __name__ == "__main__":
    main()
