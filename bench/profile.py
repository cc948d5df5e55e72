"""Profile the supervisor (and its workers) under one of the benchmark's loads, with py-spy.

    python bench/profile.py e2e-bulk          # or: e2e-one, latency, enqueue-bulk, deep-e2e
    python bench/profile.py e2e-bulk --seconds 10 --rate 500 --out /tmp/prof

Starts a supervisor as bench.py does, runs the load in a loop while
`py-spy record -f raw --threads --subprocesses` samples it, then prints where the
time went: per process and thread, the share of the wall time it was on a CPU,
and its top frames by self time and by inclusive time. The raw profile stays in
--out for flame graphs (e.g. with inferno or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import hq

LOADS: dict[str, str] = {
    "e2e-bulk": "submit_many of 1,000 x 20, then wait for all; repeated",
    "e2e-one": "20,000 pipelined single submits, then wait for all; repeated",
    "latency": "submit one job, wait for it; repeated",
    "enqueue-bulk": "submit_many of 1,000 x 20 into a paused queue; repeated",
    "enqueue-one": "sequential single submits into a paused queue",
    "deep-e2e": "e2e-bulk of 2,000 jobs with --depth jobs pending in a paused queue",
}


def load_fn(name: str, sup: hq.Supervisor, depth: int) -> Callable[[], None]:
    if name == "e2e-bulk":
        return lambda: hq.end_to_end_bulk(sup, 20_000) and None
    if name == "e2e-one":
        return lambda: hq.end_to_end_pipelined(sup, 20_000) and None
    if name == "latency":
        def once() -> None:
            job = sup.client.submit(hq.TASK)
            sup.client.wait(job.id)
        return once
    if name in ("enqueue-bulk", "enqueue-one"):
        sup.client.pause("enqueue")
        if name == "enqueue-one":
            return lambda: sup.client.submit(hq.TASK, queue="enqueue") and None
        return lambda: hq.submit_bulk(sup, 20_000, queue="enqueue") and None
    if name == "deep-e2e":
        print(f"filling {depth:,} pending jobs first", file=sys.stderr)
        hq.fill_deep(sup, depth)
        return lambda: hq.end_to_end_bulk(sup, 2_000, budget=600) and None
    raise SystemExit(f"unknown load {name!r}; loads: {', '.join(LOADS)}")


FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = os.path.relpath(path, os.path.dirname(HERE)) if path.startswith("/") else path
    return f"{m.group('fn')} ({path})"


def summarise(raw: str, seconds: float, rate: int, pids: dict[int, str], top: int) -> str:
    """Per process/thread: CPU share of wall time; top frames by self and inclusive samples."""
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    with open(raw) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = stack.split(";")
            # py-spy puts "process PID:"cmd"" and "thread (0x..)" first with these options.
            head = []
            while frames and (frames[0].startswith("process ") or frames[0].startswith("thread ")):
                head.append(frames.pop(0))
            who = " / ".join(_who(h, pids) for h in head) or "?"
            totals[who] += count
            if frames:
                by_thread[who][short(frames[-1])] += count
                for fr in {short(x) for x in frames}:
                    incl[who][fr] += count
    expected = seconds * rate
    out = [f"{seconds:.1f} s sampled at {rate} Hz ({expected:,.0f} samples = one CPU busy all the time)"]
    for who, n in totals.most_common():
        if n < expected * 0.02:
            continue
        out.append("")
        out.append(f"== {who}: {n:,} samples, on a CPU {100 * n / expected:.0f}% of the time")
        out.append("  self:")
        for fr, c in by_thread[who].most_common(top):
            out.append(f"    {100 * c / n:5.1f}%  {fr}")
        out.append("  inclusive:")
        shown = [(fr, c) for fr, c in incl[who].most_common() if c < n * 0.995][:top]
        for fr, c in shown:
            out.append(f"    {100 * c / n:5.1f}%  {fr}")
    return "\n".join(out)


def _who(head: str, pids: dict[int, str]) -> str:
    m = re.match(r"process (\d+)", head)
    if m:
        pid = int(m.group(1))
        return f"{pids.get(pid, 'process')} {pid}"
    m = re.match(r"thread \((0x[0-9a-fA-F]+)\)", head)
    return head if not m else head.split(" (")[0] + " " + m.group(1)[-4:]


def cpu_split(fn: Callable[[], None], sup: Any, workers: list[Any], seconds: float) -> str:
    """Without the profiler: CPU seconds per wall second of each process and thread."""
    import psutil

    me = psutil.Process()

    def sample() -> dict[str, float]:
        out = {"client (this process)": sum(me.cpu_times()[:2])}
        for t in sup.threads():
            out[f"supervisor thread {t.id}" + (" (main)" if t.id == sup.pid else "")] = t.user_time + t.system_time
        for w in workers:
            out[f"worker {w.pid}"] = sum(w.cpu_times()[:2])
        return out

    before = sample()
    t0 = time.monotonic()
    rounds = 0
    while time.monotonic() - t0 < seconds:
        fn()
        rounds += 1
    took = time.monotonic() - t0
    after = sample()
    lines = [(f"without the profiler: {rounds} rounds in {took:.1f} s; CPU used per wall second"
              " (2 cores = 2.00):")]
    total = 0.0
    for k in after:
        used = (after[k] - before.get(k, 0.0)) / took
        total += used
        if used >= 0.005:
            lines.append(f"  {used:5.2f}  {k}")
    lines.append(f"  {total:5.2f}  in all")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("load", choices=sorted(LOADS))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--depth", type=int, default=200_000)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default="/tmp/hostqueue-profile")
    parser.add_argument("--source", default=os.path.dirname(HERE))
    opts = parser.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    os.makedirs(opts.out, exist_ok=True)
    raw = os.path.join(opts.out, f"{opts.load}.txt")
    sup = hq.Supervisor(os.path.abspath(opts.source), opts.workers)
    try:
        sup.start()
        fn = load_fn(opts.load, sup, opts.depth)
        fn()  # warm
        s, workers = sup.processes()
        print(cpu_split(fn, s, workers, opts.seconds))
        pids = {s.pid: "supervisor"} | {w.pid: "worker" for w in workers}
        spy = subprocess.Popen(
            ["py-spy", "record", "-f", "raw", "--threads", "--subprocesses", "-r", str(opts.rate),
             "-p", str(s.pid), "-o", raw, "-d", str(int(opts.seconds) + 5)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches
        t0 = time.monotonic()
        rounds = 0
        while time.monotonic() - t0 < opts.seconds:
            fn()
            rounds += 1
        took = time.monotonic() - t0
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        print(f"load {opts.load}: {LOADS[opts.load]}; {rounds} rounds in {took:.1f} s")
        print(summarise(raw, took + 1.0, opts.rate, pids, opts.top))
        print(f"\nraw profile: {raw}")
    finally:
        sup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
