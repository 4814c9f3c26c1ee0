"""CPU time spent by named processes over a stretch of time: what a rate costs, process by process."""

from __future__ import annotations

import psutil


def cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system + times.children_user + times.children_system)


class CpuMeter:
    """Started once, read once: CPU seconds each process used in between."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = dict(pids)
        self._start = {name: cpu_seconds(pid) for name, pid in self._pids.items()}

    def used(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self._start[name] for name, pid in self._pids.items()}
