"""What every benchmark prints: figures, a ratio against the baseline of the same run, and a verdict."""

import math
import os
import platform
import statistics
from collections.abc import Sequence

import psutil


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear between the closest ranks, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def target(label: str, value: str, goal: str, ok: bool) -> bool:
    """Print one target line; returns ok, so a benchmark can exit non-zero when one is missed."""
    print(f"  target {label}: {value} (goal {goal}) -> {verdict(ok)}")
    return ok


def machine() -> str:
    """The machine, and its load average as the benchmark starts (other processes make every figure noisier)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, load average {load}"


def heading(text: str) -> None:
    print(f"\n== {text}")


def _cpu(processes) -> float:
    """User + system CPU seconds of these processes (those that exit meanwhile count for nothing)."""
    total = 0.0
    for p in processes:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def cpu_seconds(process: psutil.Process) -> float:
    return _cpu([process, *process.children(recursive=True)])


def postgres_cpu() -> float:
    return _cpu(p for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postmaster"))
