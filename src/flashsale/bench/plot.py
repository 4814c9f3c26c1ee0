"""`flashsale bench --plot FILE.png`: how each strategy's sale went, second by second.

Top: accepted purchases per second. Bottom: latency p50 (solid) and p99 (dashed) of the answers given in
each interval, on a log scale. One colour per strategy; a dotted vertical line where its stock ran out
(its last accepted answer). matplotlib is imported here only, and only when a plot is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from flashsale.bench.load import LoadReport
from flashsale.errors import InvalidInput

#: Width of one interval of the plot, in seconds.
BIN_S = 0.25


def series(load: LoadReport, bin_s: float = BIN_S) -> tuple[list[float], list[float], list[float], list[float]]:
    """(time, accepted per second, p50 ms, p99 ms) per interval of the sale; latency is NaN where none ended."""
    if not load.answers:
        return [], [], [], []
    count = int(max(a.at_s for a in load.answers) / bin_s) + 1
    accepted = [0] * count
    latencies: list[list[float]] = [[] for _ in range(count)]
    for answer in load.answers:
        i = int(answer.at_s / bin_s)
        latencies[i].append(answer.latency_s * 1000)
        if answer.status == "accepted":
            accepted[i] += 1
    times = [(i + 0.5) * bin_s for i in range(count)]
    return times, [n / bin_s for n in accepted], [_pct(v, 0.50) for v in latencies], [_pct(v, 0.99) for v in latencies]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def plot(runs: Sequence[tuple[str, LoadReport]], path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InvalidInput(
            "--plot needs matplotlib", hint="install it: pip install 'flashsale[plot]' (make install does)"
        ) from exc
    figure, (rate_axis, latency_axis) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for index, (name, load) in enumerate(runs):
        colour = f"C{index}"
        times, rate, p50, p99 = series(load)
        rate_axis.plot(times, rate, color=colour, label=name)
        latency_axis.plot(times, p50, color=colour, label=f"{name} p50")
        latency_axis.plot(times, p99, color=colour, linestyle="--", label=f"{name} p99")
        if load.sellout_s:
            for axis in (rate_axis, latency_axis):
                axis.axvline(load.sellout_s, color=colour, linestyle=":", linewidth=1)
    rate_axis.set_ylabel("accepted purchases / s")
    rate_axis.set_title("flash sale: accepted per second (dotted: sold out)")
    rate_axis.legend(loc="upper right")
    latency_axis.set_yscale("log")
    latency_axis.set_ylabel("latency, ms (log)")
    latency_axis.set_xlabel("seconds since the first attempt")
    latency_axis.legend(loc="upper right", fontsize="small", ncol=2)
    for axis in (rate_axis, latency_axis):
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
