"""Worker recycling (by job count and by memory) and autoscale (grow while jobs
wait, shrink after idle_timeout, off after a manual `scale`), on real supervisors."""

from __future__ import annotations

import collections
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import TASKS, HQEnv, Supervisor, is_alive, wait_for


def start_with(hq: HQEnv, config: str, workers: int | None = 1) -> tuple[Supervisor, Path]:
    path = hq.dir / "hq.toml"
    path.write_text(textwrap.dedent(config))
    sup = hq.supervisor(workers=workers, start=False)
    sup.start("--config", str(path))
    return sup, path


def submit_many(sup: Supervisor, task: str, args: list[dict[str, Any]], **opts: Any) -> list[int]:
    return [j["id"] for j in sup.call("submit_many", "jobs", task=f"{TASKS}.{task}", args=args, **opts)]


def ended_rows(sup: Supervisor, ids: list[int], timeout: float) -> list[dict[str, Any]]:
    marks = ",".join("?" * len(ids))

    def done() -> list[dict[str, Any]] | None:
        rows = [dict(r) for r in sup.db_query(
            f"SELECT id, status, attempts, worker_pid, started_at, finished_at FROM jobs"
            f" WHERE id IN ({marks}) ORDER BY id", tuple(ids))]
        ended = all(r["status"] in ("completed", "failed", "cancelled", "expired") for r in rows)
        return rows if len(rows) == len(ids) and ended else None

    return wait_for(done, timeout, f"jobs {ids} to end")


# ---------------------------------------------------------------------------
# recycling


@pytest.mark.timeout(40)
def test_recycle_by_job_count(hq: HQEnv) -> None:
    """workers.max_jobs = 3: 9 jobs on one worker use at least three worker processes,
    none runs more than 3 jobs, and no job fails."""
    sup, _ = start_with(hq, """
        [workers]
        max_jobs = 3
        """, workers=1)
    first = sup.worker_pids()
    ids = submit_many(sup, "sleeper", [{"seconds": 0.05}] * 9)
    rows = ended_rows(sup, ids, 30)
    assert [r["status"] for r in rows] == ["completed"] * 9, rows
    assert all(r["attempts"] == 1 for r in rows), "a recycled worker must not cost a job an attempt"
    per_pid = collections.Counter(r["worker_pid"] for r in rows)
    assert len(per_pid) >= 3, f"the worker pid changed fewer than twice: {per_pid}"
    assert max(per_pid.values()) <= 3, f"a worker ran more than max_jobs = 3 jobs: {dict(per_pid)}"
    assert first & set(per_pid), "the first worker ran the first jobs"
    # Recycled workers are gone, and the pool is back to its size.
    sup.wait_workers(1)
    for pid in per_pid:
        if pid not in sup.worker_pids():
            wait_for(lambda pid=pid: not is_alive(pid), 10, f"recycled worker {pid} to exit")
    assert sup.status()["counters"].get("recycled", 0) >= 2
    # A recycled worker that has exited is a zombie until the supervisor's pidfd
    # watch reaps it, a moment later.
    wait_for(lambda: sup.zombie_children() == [], 5, "the supervisor to reap every recycled worker")


@pytest.mark.timeout(40)
def test_recycle_by_memory(hq: HQEnv) -> None:
    """workers.max_memory = 60 (MB): a job that leaves 100 MB in the worker completes,
    then the worker is replaced; small jobs do not trigger it."""
    sup, _ = start_with(hq, """
        [workers]
        max_memory = 60
        """, workers=1)
    (pid,) = sup.worker_pids()
    for _ in range(2):
        assert sup.wait_job(sup.submit("noop")["id"])["worker_pid"] == pid
    assert sup.worker_pids() == {pid}, "a small worker was recycled"

    job = sup.wait_job(sup.submit("hoard", {"mb": 100})["id"])
    assert job["status"] == "completed", job
    assert job["result"]["pid"] == pid and job["result"]["held_mb"] == 100
    assert job["attempts"] == 1
    wait_for(lambda: not is_alive(pid), 10, f"the bloated worker {pid} to exit")
    (new,) = sup.wait_workers(1)
    assert new != pid
    after = sup.wait_job(sup.submit("noop")["id"])
    assert after["status"] == "completed" and after["worker_pid"] == new
    st = sup.status()
    assert st["counters"].get("recycled") == 1
    assert all(w["rss"] is None or w["rss"] < 60 * 1024 * 1024 for w in st["workers"])


# ---------------------------------------------------------------------------
# autoscale


AUTOSCALE = """
    [workers]
    count = 1
    min = 1
    max = 3
    idle_timeout = 1
    {extra}
    """


@pytest.mark.timeout(30)
def test_autoscale_grows_for_a_backlog_with_default_settings(hq: HQEnv) -> None:
    """A backlog of slow jobs grows the pool to workers.max (default prefetch)."""
    sup, _ = start_with(hq, AUTOSCALE.format(extra=""), workers=None)
    sup.wait_workers(1)
    ids = submit_many(sup, "sleeper", [{"seconds": 1.5}] * 6)
    wait_for(lambda: sup.status()["target_workers"] == 3 and len(sup.worker_pids()) == 3, 6,
             "the pool to grow to 3 while 6 slow jobs wait")
    rows = ended_rows(sup, ids, 20)
    assert len({r["worker_pid"] for r in rows}) >= 2


@pytest.mark.timeout(40)
def test_autoscale_grows_shrinks_and_scale_turns_it_off(hq: HQEnv) -> None:
    sup, _ = start_with(hq, AUTOSCALE.format(extra="prefetch = 1"), workers=None)
    sup.wait_workers(1)
    st = sup.status()
    assert st["autoscale"] == {"min": 1, "max": 3, "idle_timeout": 1.0}
    assert st["target_workers"] == 1

    ids = submit_many(sup, "sleeper", [{"seconds": 1.0}] * 6)
    sizes: list[int] = []

    def grown() -> bool:
        sizes.append(len(sup.worker_pids()))
        return sup.status()["target_workers"] == 3 and sizes[-1] == 3

    wait_for(grown, 8, "the pool to grow to 3 while jobs wait")
    rows = ended_rows(sup, ids, 20)
    assert [r["status"] for r in rows] == ["completed"] * 6
    assert len({r["worker_pid"] for r in rows}) == 3, "the new workers took jobs"
    ended = max(r["finished_at"] for r in rows)
    assert max(sizes) <= 3, "the pool grew beyond workers.max"

    # Idle for idle_timeout: back to workers.min, not below.
    wait_for(lambda: sup.status()["target_workers"] == 1 and len(sup.worker_pids()) == 1, 8,
             "the pool to shrink back to 1")
    assert time.time() - ended >= 0.8, "shrank before idle_timeout"
    wait_for(lambda: sup.zombie_children() == [], 5, "the supervisor to reap every retired worker")

    # A manual size turns autoscale off: the pool keeps it past idle_timeout.
    assert sup.call("scale", "scale", n=2) == {"previous": 1, "target": 2}
    assert sup.status()["autoscale"] is None
    sup.wait_workers(2)
    wait_for(lambda: all(w["state"] == "idle" for w in sup.status()["workers"]), 10, "idle workers")
    idle_since = time.time()
    wait_for(lambda: time.time() - idle_since > 2.0 and len(sup.worker_pids()) == 2, 5,
             "two idle timeouts with the pool at 2")
    assert sup.status()["target_workers"] == 2
    assert len(sup.worker_pids()) == 2
    # ... and jobs waiting do not grow it either.
    more = submit_many(sup, "sleeper", [{"seconds": 0.6}] * 4)
    wait_for(lambda: sup.status()["running_jobs"] == 2, 5, "two jobs running")
    assert sup.status()["target_workers"] == 2
    ended_rows(sup, more, 15)
    assert sup.status()["target_workers"] == 2


BREAKS_IN_WORKERS = '''
import os
import sys

# Imports in the supervisor (so it starts) but not in a worker: every worker dies at start.
if sys.argv[0].endswith(("worker.py", os.path.join("worker", "__main__.py"))):
    raise RuntimeError("this module cannot be imported in a worker")
'''


@pytest.mark.timeout(60)
def test_workers_that_die_at_start_are_restarted_with_growing_delays(hq: HQEnv) -> None:
    """A crash loop is damped: few restarts, little CPU, and status says why."""
    import psutil

    breaker = hq.dir / "worker_breaker.py"
    breaker.write_text(BREAKS_IN_WORKERS)
    sup = hq.supervisor(workers=2, start=False)
    sup.start("--tasks", str(breaker), wait=False)

    def pool_error() -> str | None:
        try:
            return sup.status().get("pool_error")
        except Exception:  # noqa: BLE001 - not answering yet
            return None

    error = wait_for(pool_error, 15, "status to report the pool's trouble")
    assert "cannot import" in error, error
    proc = psutil.Process(sup.pid)
    cpu_before = sum(proc.cpu_times()[:2])
    window = 4.0
    deadline = time.monotonic() + window
    wait_for(lambda: time.monotonic() >= deadline, window + 2, "the observation window to pass")
    cpu = sum(proc.cpu_times()[:2]) - cpu_before
    failures = sup.log_text().count("could not import the task modules")
    # Without damping two workers restart hundreds of times in a few seconds.
    assert failures <= 16, f"{failures} failed starts: the crash loop is not damped"
    assert cpu < 0.5 * window, f"the supervisor used {cpu:.2f} s of CPU in {window} s of crash loop"
    assert sup.status()["state"] == "running" and sup.request("ping")["ok"]
