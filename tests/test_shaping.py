"""Queues and limits on a real supervisor: order between and within queues, a queue's
concurrency cap, min_interval, rate, per-task limits, limits combined, and what
`get` and `status` say about waiting jobs.

Timing is read from the store: ``started_at`` (the claim) and ``finished_at`` of
each job. Tolerances suit a noisy 2-core machine: a gap must be at least 0.8x the
configured one, and totals get a generous upper bound.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL

from conftest import TASKS, HQEnv, Supervisor, file_lines, ok, wait_for

EPS = 0.005  # clock granularity between a job's end and the next claim


def start_with(hq: HQEnv, config: str, workers: int | None = 2) -> tuple[Supervisor, Path]:
    path = hq.dir / "hq.toml"
    path.write_text(textwrap.dedent(config))
    sup = hq.supervisor(workers=workers, start=False)
    sup.start("--config", str(path))
    return sup, path


def submit_many(sup: Supervisor, task: str, args: list[dict[str, Any]], **opts: Any) -> list[int]:
    jobs = sup.call("submit_many", "jobs", task=f"{TASKS}.{task}", args=args, **opts)
    return [j["id"] for j in jobs]


def wait_all(sup: Supervisor, ids: list[int], timeout: float) -> list[dict[str, Any]]:
    """Every job ended (in the store); their rows, ordered by started_at."""
    marks = ",".join("?" * len(ids))

    def done() -> list[dict[str, Any]] | None:
        rows = [dict(r) for r in sup.db_query(
            f"SELECT id, task, queue, status, attempts, started_at, finished_at, worker_pid"
            f" FROM jobs WHERE id IN ({marks}) ORDER BY started_at, id", tuple(ids))]
        if len(rows) == len(ids) and all(r["status"] in ("completed", "failed", "cancelled", "expired") for r in rows):
            return rows
        return None

    rows = wait_for(done, timeout, f"jobs {ids} to end")
    assert [r["status"] for r in rows] == ["completed"] * len(ids), rows
    return rows


def gaps(rows: list[dict[str, Any]]) -> list[float]:
    starts = [r["started_at"] for r in rows]
    return [b - a for a, b in zip(starts, starts[1:])]


# ---------------------------------------------------------------------------
# order


@pytest.mark.timeout(40)
def test_priority_order_within_and_between_queues(hq: HQEnv) -> None:
    """order = "priority": the highest priority job of any queue first, then submit order."""
    sup, _ = start_with(hq, """
        [queues]
        order = "priority"
        [queues.a]
        [queues.b]
        """, workers=1)
    log = hq.path("order.log")
    ok(sup.request("pause"))  # every queue: nothing starts while we submit
    plan = [("a", 0, "a0"), ("a", 5, "a5"), ("b", 5, "b5"), ("b", 10, "b10"),
            ("a", 0, "a0-2"), ("b", 0, "b0"), ("a", -1, "a-1"), ("b", 7, "b7")]
    ids = [sup.submit("record", {"log": log, "tag": tag}, queue=q, priority=p)["id"] for q, p, tag in plan]
    assert sup.get(ids[0])["status"] == "pending"
    ok(sup.request("resume"))
    wait_all(sup, ids, 20)
    ran = [line.split()[0] for line in file_lines(log)]
    assert ran == ["b10", "b7", "a5", "b5", "a0", "a0-2", "b0", "a-1"]


@pytest.mark.timeout(40)
def test_strict_order_between_queues(hq: HQEnv) -> None:
    """order = "strict": queues in file order, whatever the priorities; priority within a queue."""
    sup, _ = start_with(hq, """
        [queues]
        order = "strict"
        [queues.first]
        [queues.second]
        """, workers=1)
    log = hq.path("order.log")
    ok(sup.request("pause"))
    plan = [("second", 100, "s100"), ("first", 0, "f0"), ("second", 50, "s50"),
            ("first", 3, "f3"), ("other", 1000, "o1000"), ("first", 0, "f0-2")]
    ids = [sup.submit("record", {"log": log, "tag": tag}, queue=q, priority=p)["id"] for q, p, tag in plan]
    ok(sup.request("resume"))
    wait_all(sup, ids, 20)
    ran = [line.split()[0] for line in file_lines(log)]
    # A queue the file does not name comes after the named ones.
    assert ran == ["f3", "f0", "f0-2", "s100", "s50", "o1000"]


# ---------------------------------------------------------------------------
# limits


@pytest.mark.timeout(40)
def test_queue_concurrency_cap_under_load(hq: HQEnv) -> None:
    """concurrency = 1 with 3 workers and 6 slow jobs: one at a time, never two."""
    sup, _ = start_with(hq, """
        [queues.capped]
        concurrency = 1
        """, workers=3)
    duration = 0.3
    t0 = time.time()
    ids = submit_many(sup, "sleeper", [{"seconds": duration}] * 6, queue="capped")
    free = submit_many(sup, "sleeper", [{"seconds": 1.0}] * 2)  # the default queue is not capped
    seen_running: list[int] = []
    seen_busy: list[int] = []

    def sample_until_done() -> bool:
        st = sup.status()
        seen_running.append(st["shaping"]["queues"]["capped"]["running"])
        seen_busy.append(sum(1 for w in st["workers"] if w["state"] == "busy"))
        return st["running_jobs"] == 0 and st["ready_jobs"] == 0

    wait_for(sample_until_done, 30, "every job to end", interval=0.05)
    rows = wait_all(sup, ids, 10)
    free_rows = wait_all(sup, free, 10)
    for prev, nxt in zip(rows, rows[1:]):
        assert nxt["started_at"] >= prev["finished_at"] - EPS, f"two capped jobs overlapped: {prev} {nxt}"
    span = rows[-1]["finished_at"] - rows[0]["started_at"]
    assert 6 * duration * 0.8 <= span <= 6 * duration + 8, span
    assert rows[-1]["finished_at"] - t0 >= 6 * duration * 0.8
    assert max(seen_running) == 1, seen_running
    assert max(seen_busy) >= 2, "the uncapped default queue should run beside the capped one"
    # The uncapped jobs ran while the capped queue was busy, not after it.
    assert free_rows[0]["started_at"] < rows[-1]["started_at"]
    assert len({r["worker_pid"] for r in rows}) >= 1


@pytest.mark.timeout(40)
def test_min_interval_spaces_starts(hq: HQEnv) -> None:
    interval = 0.4
    sup, _ = start_with(hq, f"""
        [queues.spaced]
        min_interval = {interval}
        """, workers=2)
    ids = submit_many(sup, "noop", [{}] * 5, queue="spaced")
    rows = wait_all(sup, ids, 20)
    for g in gaps(rows):
        assert g >= 0.8 * interval, gaps(rows)
    span = rows[-1]["started_at"] - rows[0]["started_at"]
    assert span <= 4 * interval + 3, span


@pytest.mark.timeout(40)
def test_rate_limits_starts_in_any_window(hq: HQEnv) -> None:
    """rate = "2/1": at most 2 starts in any 1 s window (bursts of 2 allowed)."""
    n, per = 2, 1.0
    sup, _ = start_with(hq, f"""
        [queues.rated]
        rate = "{n}/{per:g}"
        """, workers=2)
    ids = submit_many(sup, "noop", [{}] * 6, queue="rated")
    rows = wait_all(sup, ids, 20)
    starts = [r["started_at"] for r in rows]
    for i in range(len(starts) - n):
        assert starts[i + n] - starts[i] >= 0.8 * per, f"{n + 1} starts within {per} s: {starts}"
    span = starts[-1] - starts[0]
    assert span <= 2 * per + 3, span
    # A rate is not an interval: the first two may start together.
    assert starts[1] - starts[0] < 0.8 * per, starts


@pytest.mark.timeout(40)
def test_per_task_limit_only_limits_that_task(hq: HQEnv) -> None:
    interval = 0.8
    sup, _ = start_with(hq, f"""
        [limits."{TASKS}.add"]
        min_interval = {interval}
        """, workers=2)
    adds = submit_many(sup, "add", [{"a": i, "b": 1} for i in range(3)])
    noops = submit_many(sup, "noop", [{}] * 6)  # same (default) queue, another task
    add_rows = wait_all(sup, adds, 20)
    noop_rows = wait_all(sup, noops, 20)
    for g in gaps(add_rows):
        assert g >= 0.8 * interval, gaps(add_rows)
    assert add_rows[-1]["started_at"] - add_rows[0]["started_at"] <= 2 * interval + 3
    # The other task ran freely: all of it was done before the last limited start.
    assert max(r["finished_at"] for r in noop_rows) < add_rows[-1]["started_at"], (noop_rows, add_rows)
    assert min(gaps(noop_rows)) < 0.8 * interval


@pytest.mark.timeout(40)
def test_concurrency_and_min_interval_apply_together(hq: HQEnv) -> None:
    interval = 0.5
    sup, _ = start_with(hq, f"""
        [queues.combo]
        concurrency = 1
        min_interval = {interval}
        """, workers=2)
    durations = [0.9, 0.05, 0.9, 0.05, 0.05]
    ids = submit_many(sup, "sleeper", [{"seconds": d} for d in durations], queue="combo")
    rows = wait_all(sup, ids, 30)
    assert [r["id"] for r in rows] == ids, "one lane, one priority: submit order"
    for prev, nxt in zip(rows, rows[1:]):
        assert nxt["started_at"] >= prev["finished_at"] - EPS, f"overlap: {prev} {nxt}"  # concurrency
        assert nxt["started_at"] - prev["started_at"] >= 0.8 * interval, f"too close: {prev} {nxt}"  # interval
    # After a long job the concurrency cap decided the gap; after a short one, the interval.
    g = gaps(rows)
    assert g[0] >= 0.8 * durations[0] and g[2] >= 0.8 * durations[2], g
    assert g[1] >= 0.8 * interval and g[3] >= 0.8 * interval, g
    span = rows[-1]["finished_at"] - rows[0]["started_at"]
    assert span <= sum(durations) + 4 * interval + 5, span


# ---------------------------------------------------------------------------
# what a waiting job and the status say


@pytest.mark.timeout(40)
def test_get_waiting_says_why_and_status_shows_shaping(hq: HQEnv) -> None:
    sup, _ = start_with(hq, """
        [queues.c]
        concurrency = 1
        [queues.r]
        rate = "1/60"
        """, workers=2)
    marker, release = hq.path("marker"), hq.path("release")
    holder = sup.submit("block", {"marker": marker, "release": release}, queue="c")["id"]
    wait_for(lambda: file_lines(marker), 10, "the blocking job to start")
    held = sup.submit("noop", queue="c")["id"]

    first = sup.submit("noop", queue="r")["id"]
    assert sup.wait_job(first)["status"] == "completed"
    rated = sup.submit("noop", queue="r")["id"]

    ok(sup.request("pause", queue="p"))
    paused = sup.submit("noop", queue="p")["id"]

    def waiting(job_id: int) -> str:
        job = sup.get(job_id)
        assert job["status"] == "pending", job
        return str(job["waiting"])

    assert "concurrency" in wait_for(lambda: waiting(held), 5, "a waiting reason")
    assert "queue c" in waiting(held)
    assert "rate" in waiting(rated) and "queue r" in waiting(rated)
    assert "paused" in waiting(paused) and "p" in waiting(paused)

    st = sup.status()
    shaping = st["shaping"]
    assert shaping["order"] == "priority"
    assert shaping["queues"]["c"]["concurrency"] == 1 and shaping["queues"]["c"]["running"] == 1
    assert shaping["queues"]["r"]["rate"] == "1/60"
    assert st["waiting_by_queue"].get("c") == 1
    assert st["waiting_by_queue"].get("r") == 1
    assert st["waiting_by_queue"].get("p") == 1
    assert st["paused"] == ["p"]
    assert st["autoscale"] is None

    # The waiting is real: still pending a moment later, then runs once its holder ends.
    assert sup.get(held)["status"] == "pending"
    Path(release).touch()
    assert sup.wait_job(holder)["status"] == "completed"
    assert sup.wait_job(held, 10)["status"] == "completed"
    assert sup.get(rated)["status"] == "pending"


@pytest.mark.timeout(30)
def test_waiting_by_queue_forgets_aborted_jobs(hq: HQEnv) -> None:
    """A pending job aborted in a paused queue no longer counts as waiting there."""
    sup = hq.supervisor(workers=1)
    ok(sup.request("pause", queue="q"))
    ids = submit_many(sup, "noop", [{}] * 3, queue="q")
    assert sup.status()["waiting_by_queue"] == {"q": 3}
    assert ok(sup.request("abort", job=ids[1]))["job"]["status"] == "cancelled"
    st = sup.status()
    assert st["waiting_by_queue"] == {"q": 2}, st["waiting_by_queue"]


@pytest.mark.timeout(30)
def test_a_finished_job_frees_its_concurrency_slot_at_once(hq: HQEnv) -> None:
    """A job that has ended frees its queue's concurrency slot when it ends: with two
    workers and concurrency 1, each job starts as soon as the one before it is done
    (and the ended job is reported at once, not after whatever its worker runs next)."""
    duration = 0.6
    sup, _ = start_with(hq, """
        [queues.pair]
        concurrency = 1
        """, workers=2)
    ids = submit_many(sup, "sleeper", [{"seconds": duration}] * 3, queue="pair")
    rows = {r["id"]: r for r in wait_all(sup, ids, 15)}
    for before, after in zip(ids, ids[1:]):
        took = rows[before]["finished_at"] - rows[before]["started_at"]
        assert took < duration + 0.4, f"a {duration} s job was reported done after {took:.2f} s"
        waited = rows[after]["started_at"] - rows[before]["finished_at"]
        assert -0.05 < waited < 0.4, f"job {after} waited {waited:.2f} s after the slot was freed"