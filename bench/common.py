"""Helpers shared by the benchmark's parts: figures, statistics, processes, tables.

Imported by bench.py and hq.py (the project's Python) and by the peer runners
(the peers' virtualenv), so it needs nothing beyond the standard library and
psutil.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

# One completion record written by a peer's task (see peers/tasks_*.py): the
# time as 17 characters and a newline, appended to one file by every worker.
RECORD = 18


class BenchError(Exception):
    """A functional failure: jobs lost, wrong results, a system that did not answer."""


# -- figures ------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    target: str | None = None  # hostqueue's target, as text (checked by check())


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no samples")
    rank = max(1, int(-(-q * len(sorted_values) // 100)))  # ceil(q/100 * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_figures(samples: list[float], wanted: int) -> dict[str, float]:
    """The latency figures (ms) of submit-to-result samples given in seconds; marked
    capped when the time budget stopped the run before ``wanted`` samples."""
    s = sorted(samples)
    out = {
        "lat_p50": percentile(s, 50) * 1000,
        "lat_p99": percentile(s, 99) * 1000,
        "lat_max": s[-1] * 1000,
        "lat_n": float(len(s)),
    }
    if len(s) < wanted:
        out["lat_capped"] = 1.0
    return out


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def fmt_number(value: float) -> str:
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    if a == 0:
        return "0"
    return f"{value:.3f}"


def fmt_values(values: list[float]) -> str:
    """'median [min-max]' (or just the value for one run)."""
    if not values:
        return "n/a"
    med, lo, hi = median_spread(values)
    if len(values) == 1 or lo == hi:
        return fmt_number(med)
    return f"{fmt_number(med)} [{fmt_number(lo)}-{fmt_number(hi)}]"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = [header] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- waiting ------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    """Call check() until it returns something true; BenchError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- completion records (peers) -----------------------------------------------------


def records_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def wait_records(path: str, start: int, n: int, timeout: float) -> tuple[float, float]:
    """Wait until n more completion records follow byte offset start; return the
    first and the last completion time among them."""
    want = start + n * RECORD
    wait_until(lambda: records_size(path) >= want, timeout,
               f"{n} jobs to complete (seen {(records_size(path) - start) // RECORD})")
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(n * RECORD)
    times = [float(data[i:i + RECORD - 1]) for i in range(0, len(data), RECORD)]
    if len(times) != n:
        raise BenchError(f"completion records are torn: {len(data)} bytes for {n} jobs")
    return min(times), max(times)


# -- processes ----------------------------------------------------------------------


def tree(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes and all their descendants (those that still exist)."""
    out: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out[p.pid] = p
            for c in p.children(recursive=True):
                out[c.pid] = c
        except psutil.NoSuchProcess:
            continue
    return list(out.values())


def rss_mb(procs: Iterable[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def cpu_and_switches(procs: Iterable[psutil.Process]) -> tuple[float, int]:
    cpu, switches = 0.0, 0
    for p in procs:
        try:
            t = p.cpu_times()
            cpu += t.user + t.system
            switches += p.num_ctx_switches().voluntary
        except psutil.NoSuchProcess:
            pass
    return cpu, switches


def idle_usage(procs: list[psutil.Process], seconds: float) -> dict[str, float]:
    """CPU seconds and voluntary context switches (wake-ups) of procs over a quiet period."""
    cpu0, sw0 = cpu_and_switches(procs)
    time.sleep(seconds)
    cpu1, sw1 = cpu_and_switches(procs)
    return {"idle_cpu": cpu1 - cpu0, "idle_wakeups": float(sw1 - sw0)}


def machine_note() -> dict[str, Any]:
    """What else the machine was doing: load averages and CPU count."""
    la = os.getloadavg()
    return {"cpus": os.cpu_count(), "load1": la[0], "load5": la[1]}
