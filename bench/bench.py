"""hostqueue benchmark: throughput and latency of no-op jobs on a real supervisor.

    python bench/bench.py                 # 20,000 jobs, 2 workers, 3 runs
    python bench/bench.py --jobs 5000 --runs 1 --quick

Each run starts a fresh supervisor (`hostqueue run`) on a temporary store with
the default durable settings (WAL, synchronous=NORMAL: acknowledged means
committed) and measures, printing a table of medians and spreads:

- bulk enqueue: submit_many in chunks of 1,000, jobs/s until every ack;
- pipelined enqueue: one client sending single submits without waiting, jobs/s;
- end to end: from the first submit to the last job completed, jobs/s, for the
  bulk submits (measured from the store's own created_at / finished_at);
- latency: submit-to-result of 300 sequential jobs with idle workers, p50/p99 ms;
- idle CPU: supervisor and workers' CPU seconds over a quiet period.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hostqueue.client import Client  # noqa: E402

TASKS = '''
import hostqueue

@hostqueue.task
def noop(ctx):
    return None
'''


class Run:
    def __init__(self, workers: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="hqb-", dir="/tmp")
        with open(os.path.join(self.dir, "benchtasks.py"), "w") as f:
            f.write(TASKS)
        self.store = os.path.join(self.dir, "b.db")
        self.socket = os.path.join(self.dir, "b.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hostqueue", "run", "--store", self.store, "--socket", self.socket,
             "--workers", str(workers), "--tasks", os.path.join(self.dir, "benchtasks.py"),
             "--log-level", "warning"],
            cwd=ROOT, start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with Client(self.socket) as c:
                    status = c.status()
                    if sum(1 for w in status["workers"] if w["state"] == "idle") >= workers:
                        break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("supervisor did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def bulk(run: Run, n: int) -> tuple[float, float]:
    """(enqueue jobs/s, end-to-end jobs/s) for n no-op jobs submitted in chunks."""
    with Client(run.socket) as c:
        t0 = time.perf_counter()
        ids: list[int] = []
        pending = [c.send("submit_many", task="benchtasks.noop", args=[{}] * min(1000, n - i))
                   for i in range(0, n, 1000)]
        for rid in pending:
            ids.extend(j["id"] for j in c.receive(rid)["jobs"])
        enqueue = n / (time.perf_counter() - t0)
        waits = [c.send("wait", job=i) for i in (ids[-1], ids[len(ids) // 2])]
        for rid in waits:
            c.receive(rid)
        for job in c.list_jobs(status="pending", limit=10000) + c.list_jobs(status="running", limit=10000):
            c.wait(job["id"])
    db = sqlite3.connect(run.store)
    first, last, done = db.execute(
        "SELECT MIN(created_at), MAX(finished_at), SUM(status = 'completed') FROM jobs WHERE id BETWEEN ? AND ?",
        (ids[0], ids[-1]),
    ).fetchone()
    db.close()
    assert done == n, f"only {done} of {n} jobs completed"
    return enqueue, n / (last - first)


def pipelined(run: Run, n: int) -> float:
    """Jobs/s for one client sending n single submits without waiting for each ack."""
    with Client(run.socket) as c:
        t0 = time.perf_counter()
        rids = [c.send("submit", task="benchtasks.noop") for _ in range(n)]
        for rid in rids:
            c.receive(rid)
        return n / (time.perf_counter() - t0)


def latency(run: Run, n: int = 300) -> tuple[float, float]:
    with Client(run.socket) as c:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            job = c.submit("benchtasks.noop")
            c.wait(job.id)
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99) - 1] * 1000


def idle_cpu(run: Run, seconds: float) -> float:
    parent = psutil.Process(run.proc.pid)
    procs = [parent] + parent.children()
    before = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(seconds)
    return sum(sum(p.cpu_times()[:2]) for p in procs) - before


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) < 2:
        return f"{med:,.1f}"
    return f"{med:,.1f} (±{(max(values) - min(values)) / 2:,.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    parser.add_argument("--quick", action="store_true", help="a few seconds: checks it works, not how fast")
    opts = parser.parse_args()
    if opts.quick:
        opts.jobs, opts.runs, opts.idle = min(opts.jobs, 2000), 1, 1.0
    results: dict[str, list[float]] = {k: [] for k in ("enqueue", "e2e", "pipelined", "p50", "p99", "idle")}
    for i in range(opts.runs):
        run = Run(opts.workers)
        try:
            enq, e2e = bulk(run, opts.jobs)
            results["enqueue"].append(enq)
            results["e2e"].append(e2e)
            results["pipelined"].append(pipelined(run, min(opts.jobs, 10_000)))
            p50, p99 = latency(run, 100 if opts.quick else 300)
            results["p50"].append(p50)
            results["p99"].append(p99)
            results["idle"].append(idle_cpu(run, opts.idle))
        finally:
            run.close()
        print(f"run {i + 1}/{opts.runs} done", file=sys.stderr)
    print(f"\nhostqueue, {opts.workers} workers, no-op task, {opts.jobs:,} jobs, median of {opts.runs} runs (± half the range)\n")
    rows = [
        ("bulk enqueue (jobs/s)", spread(results["enqueue"])),
        ("end to end, bulk submit (jobs/s)", spread(results["e2e"])),
        ("pipelined single submits (jobs/s)", spread(results["pipelined"])),
        ("submit-to-result p50 (ms)", spread(results["p50"])),
        ("submit-to-result p99 (ms)", spread(results["p99"])),
        (f"CPU while idle for {opts.idle:g} s (s)", spread(results["idle"])),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 20}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
