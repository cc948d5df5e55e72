"""Runs one peer's figures, inside the peers' virtualenv, and prints them as JSON.

    <venv>/bin/python bench/peers/runner.py PEER --workdir DIR [--redis URL] --spec JSON

bench.py starts this once per round and peer. The peer's own worker command
runs as a subprocess, on the same no-op task as hostqueue's (tasks/*.py), and
every job appends its completion time to one file (tasks/done.py), so that the
end of a run is seen the same way for every peer. The figures are the ones
hq.py takes for hostqueue, under the same names.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/: common
sys.path.insert(0, os.path.join(HERE, "tasks"))

import psutil
from common import (
    RECORD,
    BenchError,
    idle_usage,
    latency_figures,
    records_size,
    rss_mb,
    tree,
    wait_records,
)


class Adapter:
    """What the benchmark needs of a peer; one subclass per peer (bench/peers/*_peer.py)."""

    label = ""
    bulk_api: str | None = None  # the peer's API for many jobs in one call, if it has one
    redis = True
    can_grow = False  # workers can be added to a running pool
    deep = False  # fill_deep() is supported

    def __init__(self, workdir: str, redis_url: str | None) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.done_file = os.path.join(workdir, "done.records")
        self.env = dict(os.environ, HQBENCH_DONE=self.done_file, PYTHONDONTWRITEBYTECODE="1",
                        PYTHONPATH=os.path.join(HERE, "tasks"))
        if redis_url:
            self.env["HQBENCH_REDIS"] = redis_url
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = open(os.path.join(workdir, f"{type(self).__module__}.log"), "ab")  # noqa: SIM115 - kept open for the workers

    def setup_env(self) -> None:
        """Before the tasks module is imported here (the client side)."""
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("HQBENCH")})

    # -- to implement

    def worker_commands(self, n: int) -> list[list[str]]:
        raise NotImplementedError

    def enqueue_one(self) -> None:
        raise NotImplementedError

    def enqueue_bulk(self, n: int) -> None:
        raise NotImplementedError

    def roundtrip(self) -> Any:
        """Submit one job and wait for its result."""
        raise NotImplementedError

    def flush(self) -> None:
        """Discard every waiting job."""
        raise NotImplementedError

    def grow(self, to: int) -> float:
        """Seconds to grow a running pool of 1 to `to` workers."""
        raise NotImplementedError

    def fill_deep(self, n: int) -> None:
        """n pending jobs of another queue behind the measured ones (where ``deep``)."""
        raise NotImplementedError

    # -- workers

    def start_workers(self, n: int) -> float:
        t0 = time.perf_counter()
        for cmd in self.worker_commands(n):
            self.procs.append(subprocess.Popen(
                cmd, cwd=os.path.join(HERE, "tasks"), env=self.env, stdout=self.log,
                stderr=self.log, start_new_session=True,
            ))
        # Ready when they run jobs: a few probes, then a moment for every process.
        self.e2e(max(4, 2 * n), bulk=False, budget=120.0)
        took = time.perf_counter() - t0
        time.sleep(1.0)
        return took

    def stop_workers(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # Leftover children (a pool's processes) of a killed parent.
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs = []

    def check_workers(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise BenchError(f"{self.label}: a worker command exited with code {p.returncode}")

    def worker_processes(self) -> list[psutil.Process]:
        return tree(p.pid for p in self.procs)

    def broker_processes(self, broker_pid: int | None) -> list[psutil.Process]:
        return tree([broker_pid]) if broker_pid else []

    # -- figures

    def e2e(self, n: int, bulk: bool, budget: float) -> dict[str, float]:
        """From the first submit to the last completion, jobs/s (capped by budget)."""
        start = records_size(self.done_file)
        t0 = time.time()
        if bulk:
            self.enqueue_bulk(n)
        else:
            for _ in range(n):
                self.enqueue_one()
        ack = time.time() - t0
        name = "e2e_bulk" if bulk else "e2e_one"
        try:
            first, last = wait_records(self.done_file, start, n, max(1.0, budget - ack))
        except BenchError:
            done = (records_size(self.done_file) - start) // RECORD
            elapsed = time.time() - t0
            if done == 0:
                raise
            self.flush()
            time.sleep(1.0)
            return {name: done / elapsed, f"{name}_ack": n / ack, f"{name}_capped": 1.0,
                    f"{name}_n": float(done)}
        time.sleep(0.05)  # the last job's result or ack, outside the figure
        return {name: n / (last - t0), f"{name}_ack": n / ack, f"{name}_n": float(n),
                f"{name}_steady": (n - 1) / max(last - first, 1e-6)}

    def enqueue_rates(self, one: int, bulk: int) -> dict[str, float]:
        """Enqueue alone, with no worker running; the jobs are then discarded. A slow
        peer enqueues fewer jobs in bulk (about 4 s worth; the count is reported)."""
        t0 = time.perf_counter()
        for _ in range(one):
            self.enqueue_one()
        out = {"enqueue_one": one / (time.perf_counter() - t0)}
        self.flush()
        bulk = min(bulk, max(1000, int(out["enqueue_one"] * 4)))
        out["enqueue_bulk_n"] = float(bulk)
        if self.bulk_api:
            t0 = time.perf_counter()
            self.enqueue_bulk(bulk)
            out["enqueue_bulk"] = bulk / (time.perf_counter() - t0)
            self.flush()
        return out

    def latency(self, n: int, budget: float) -> dict[str, float]:
        for _ in range(10):
            self.roundtrip()
        samples: list[float] = []
        deadline = time.monotonic() + budget
        for _ in range(n):
            t0 = time.perf_counter()
            result = self.roundtrip()
            samples.append(time.perf_counter() - t0)
            if result is not True:
                raise BenchError(f"{self.label}: a job returned {result!r}, not True")
            if time.monotonic() > deadline and len(samples) >= 10:
                break
        return latency_figures(samples, n)

    def memory(self, broker_pid: int | None) -> dict[str, float]:
        workers = self.worker_processes()
        broker = self.broker_processes(broker_pid)
        out = {"rss_total": rss_mb(workers + broker), "rss_workers": rss_mb(workers)}
        if broker:
            out["rss_supervisor"] = rss_mb(broker)
        return out

    def close(self) -> None:
        self.stop_workers()
        self.log.close()


def load(peer: str, workdir: str, redis_url: str | None) -> Adapter:
    name, _, variant = peer.partition("-")
    module = importlib.import_module(f"{name}_peer")
    adapter: Adapter = module.make(variant, workdir, redis_url)
    adapter.setup_env()
    return adapter


def measure_round(a: Adapter, spec: dict[str, Any], broker_pid: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    budget = float(spec["e2e_budget"])
    jobs = int(spec["jobs"])
    workers = int(spec["workers"])
    out.update(a.enqueue_rates(int(spec["one_by_one"]), jobs))
    out["start"] = a.start_workers(workers)
    # How many jobs this peer can do within the budget: the same count as hostqueue
    # where it can, fewer (and said) where it would take too long.
    probe = a.e2e(min(jobs, 300), bulk=False, budget=budget)
    rate = probe.get("e2e_one_steady", probe["e2e_one"])
    n = jobs if rate * budget * 0.5 >= jobs else max(500, int(rate * budget * 0.5))
    out["jobs"] = float(n)
    if a.bulk_api:
        out.update(a.e2e(n, bulk=True, budget=budget))
    out.update(a.e2e(n, bulk=False, budget=budget))
    out.update(a.latency(int(spec["latency"]), float(spec["latency_budget"])))
    out.update(a.memory(broker_pid))
    if spec.get("idle"):
        time.sleep(min(2.0, float(spec["idle"])))
        out.update(idle_usage(a.worker_processes() + a.broker_processes(broker_pid), float(spec["idle"])))
    a.check_workers()
    a.stop_workers()
    if spec.get("scaling"):
        scale_budget = float(spec.get("scale_budget", budget))
        n_scale = min(n, max(300, int(rate * scale_budget * 0.5)))
        out["scale_jobs"] = float(n_scale)
        for w in spec["scaling"]:
            a.start_workers(w)
            figure = a.e2e(n_scale, bulk=bool(a.bulk_api), budget=scale_budget)
            out[f"scale_{w}"] = figure["e2e_bulk" if a.bulk_api else "e2e_one"]
            a.check_workers()
            a.stop_workers()
        if a.can_grow:
            out["scale_up"] = a.grow(int(spec["scale_to"]))
            a.stop_workers()
    if spec.get("depth") and a.deep:
        t0 = time.perf_counter()
        a.fill_deep(int(spec["depth"]))
        out["deep_fill_seconds"] = time.perf_counter() - t0
        a.start_workers(workers)
        out.update({f"deep_{k}": v for k, v in a.e2e(n, bulk=False, budget=budget).items()})
        out.update({f"deep_{k}": v for k, v in a.latency(int(spec["latency"]), float(spec["latency_budget"])).items()})
        out.update({f"deep_{k}": v for k, v in a.memory(broker_pid).items()})
        a.stop_workers()
        t0 = time.perf_counter()
        for _ in range(int(spec["one_by_one"])):
            a.enqueue_one()
        out["deep_enqueue_one"] = int(spec["one_by_one"]) / (time.perf_counter() - t0)
        a.flush()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("peer")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--redis")
    parser.add_argument("--redis-pid", type=int)
    parser.add_argument("--spec", required=True)
    opts = parser.parse_args()
    spec = json.loads(opts.spec)
    a = load(opts.peer, opts.workdir, opts.redis)
    try:
        out = measure_round(a, spec, opts.redis_pid)
        out["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported to bench.py as the peer's failure
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        a.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
