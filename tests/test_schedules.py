"""Cron schedules on a real supervisor: firing, persistence across restarts (no lost
and no doubled runs), the misfire policies, `hostqueue schedule list`, and tasks
declared with ``@hostqueue.task(cron=...)``.

Crons here have a seconds field (6 fields, seconds first): "*/2 * * * * *" is due
at every even second.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL

from conftest import TASKS, HQEnv, Supervisor, wait_for


def start_with(hq: HQEnv, config: str, workers: int | None = 1,
               extra: tuple[str, ...] = ()) -> tuple[Supervisor, Path]:
    path = hq.dir / "hq.toml"
    path.write_text(textwrap.dedent(config))
    sup = hq.supervisor(workers=workers, start=False)
    sup.start("--config", str(path), *extra)
    return sup, path


def jobs_in(sup: Supervisor, queue: str) -> list[dict[str, Any]]:
    return [dict(r) for r in sup.db_query(
        "SELECT id, task, status, created_at FROM jobs WHERE queue = ? ORDER BY id", (queue,))]


def schedule_rows(sup: Supervisor) -> dict[str, dict[str, Any]]:
    return {r["name"]: dict(r) for r in sup.db_query("SELECT * FROM schedules")}


def schedules_op(sup: Supervisor) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in sup.call("schedules", "schedules")}


def next_even(t: float) -> float:
    """The first due time of "*/2 * * * * *" strictly after t."""
    return math.floor(t / 2) * 2 + 2.0


@pytest.mark.timeout(40)
def test_missed_runs_across_a_restart_run_once_or_skip(hq: HQEnv) -> None:
    """Stopped across two due times: misfire "run_once" submits exactly one job at start,
    "skip" submits none; both go on at their next due time, once each."""
    sup, path = start_with(hq, f"""
        [schedules.once]
        task = "{TASKS}.noop"
        cron = "*/2 * * * * *"
        queue = "once"
        misfire = "run_once"

        [schedules.skipped]
        task = "{TASKS}.noop"
        cron = "*/2 * * * * *"
        queue = "skip"
        misfire = "skip"
        """)
    wait_for(lambda: jobs_in(sup, "once") and jobs_in(sup, "skip"), 8, "both schedules to fire once")
    assert sup.stop() == 0
    stopped = time.time()
    before = {q: jobs_in(sup, q) for q in ("once", "skip")}
    rows = schedule_rows(sup)
    assert set(rows) == {"once", "skipped"}
    for name, queue in (("once", "once"), ("skipped", "skip")):
        row = rows[name]
        assert row["last_job"] == before[queue][-1]["id"], (row, before[queue])
        assert row["next_run"] > row["last_run"]
        assert row["next_run"] == next_even(row["last_run"])
    due = max(r["next_run"] for r in rows.values())
    # Stay stopped across at least two due times.
    wait_for(lambda: time.time() > due + 2.3, 10, "two due times to pass while stopped")

    restart = time.time()
    sup.start("--config", str(path))
    ready = time.time()
    after = {q: [j for j in jobs_in(sup, q) if j["created_at"] > stopped] for q in ("once", "skip")}
    assert after["once"], "run_once: no job for the runs missed while stopped"
    catch_up = after["once"][0]
    assert restart <= catch_up["created_at"] <= ready, "the missed run is submitted at start"
    regular = next_even(catch_up["created_at"])
    missed_once = [j for j in after["once"] if j["created_at"] < regular]
    missed_skip = [j for j in after["skip"] if j["created_at"] < regular]
    assert len(missed_once) == 1, f"run_once: expected one job for the missed runs, got {missed_once}"
    assert missed_skip == [], f"skip: expected no job for the missed runs, got {missed_skip}"
    # Both schedules go on, one job per due time.
    def at_regular() -> dict[str, list[dict[str, Any]]] | None:
        found = {q: [j for j in jobs_in(sup, q) if regular <= j["created_at"] < regular + 2]
                 for q in ("once", "skip")}
        return found if all(found.values()) else None

    found = wait_for(at_regular, 6, "the first regular run after the restart")
    wait_for(lambda: time.time() > regular + 2.1, 5, "the regular window to end")
    for q in ("once", "skip"):
        window = [j for j in jobs_in(sup, q) if regular <= j["created_at"] < regular + 2]
        assert len(window) == 1, f"{q}: {len(window)} jobs for one due time: {window}"
    assert found
    total_once = jobs_in(sup, "once")
    assert all(j["status"] in ("pending", "running", "completed") for j in total_once)


@pytest.mark.timeout(40)
def test_restart_before_the_due_time_runs_once_and_schedule_list(hq: HQEnv) -> None:
    """Restarted before its due time the schedule fires once, at that time; restarted
    after it, not again. `hostqueue schedule list --json` shows the state."""
    t0 = time.time()
    due = float(int(t0) + 7)
    second = int(due) % 60
    sup, path = start_with(hq, f"""
        [schedules.minutely]
        task = "{TASKS}.add"
        cron = "{second} * * * * *"
        args = {{ a = 40, b = 2 }}
        queue = "cron"
        """)
    st = schedules_op(sup)["minutely"]
    assert st["next_run"] == due and st["last_run"] is None and st["last_job"] is None
    assert (st["task"], st["args"], st["misfire"], st["timezone"]) == (f"{TASKS}.add", {"a": 40, "b": 2}, "run_once", "UTC")
    assert sup.stop() == 0
    assert time.time() < due - 1, "the machine is too slow for this test's timeline"
    assert schedule_rows(sup)["minutely"]["next_run"] == due
    assert jobs_in(sup, "cron") == []

    sup.start("--config", str(path))
    assert time.time() < due, "restarted too late for this test's timeline"
    assert jobs_in(sup, "cron") == [], "nothing was due yet"
    job = wait_for(lambda: jobs_in(sup, "cron"), due - time.time() + 5, "the schedule to fire")[0]
    assert job["created_at"] >= due
    assert sup.wait_job(job["id"])["result"] == 42
    row = wait_for(lambda: (r := schedule_rows(sup)["minutely"])["last_job"] == job["id"] and r,
                   5, "the store to name the job")
    assert row["next_run"] == due + 60 and row["last_run"] >= due

    out = hq.cli("schedule", "--socket", str(sup.socket), "list", "--json")
    assert out.returncode == 0, out.stderr
    listed = {s["name"]: s for s in json.loads(out.stdout)}
    assert listed["minutely"]["next_run"] == due + 60
    assert listed["minutely"]["last_job"] == job["id"]
    assert due <= listed["minutely"]["last_run"] <= time.time()
    assert listed["minutely"]["cron"] == f"{second} * * * * *"

    # Restarted after the run: the run is not repeated.
    assert sup.stop() == 0
    sup.start("--config", str(path))
    assert [j["id"] for j in jobs_in(sup, "cron")] == [job["id"]]
    again = schedules_op(sup)["minutely"]
    assert again["next_run"] == due + 60 and again["last_job"] == job["id"]


@pytest.mark.timeout(30)
def test_task_declared_with_cron_gets_a_schedule(hq: HQEnv) -> None:
    module = hq.dir / "hqcron.py"
    module.write_text(textwrap.dedent('''
        import hostqueue

        @hostqueue.task(cron="*/2 * * * * *")
        def tick(ctx):
            return "tick"
        '''))
    sup = hq.supervisor(workers=1, start=False)
    sup.start("--tasks", str(module))
    entry = schedules_op(sup).get("hqcron.tick")
    assert entry is not None, schedules_op(sup)
    assert (entry["task"], entry["cron"], entry["timezone"], entry["args"]) == ("hqcron.tick", "*/2 * * * * *", "UTC", {})
    assert entry["next_run"] == next_even(entry["next_run"] - 2)
    jobs = wait_for(lambda: sup.call("list", "jobs", task="hqcron.tick"), 6, "the cron task to be submitted")
    job = sup.wait_job(jobs[-1]["id"])
    assert job["result"] == "tick" and job["args"] == {}
    wait_for(lambda: schedules_op(sup)["hqcron.tick"]["last_job"] is not None, 5, "last_job to be set")
    # Tasks without cron= have no schedule.
    assert set(schedules_op(sup)) == {"hqcron.tick"}
