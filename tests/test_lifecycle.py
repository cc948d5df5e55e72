"""The job lifecycle of docs/lifecycle.md: backoff, attempt logs, time limits, worker
deaths, runs and abort by run, result caching, retention, the dead-letter set, events,
per-job resources, and retries across a supervisor restart."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from typing import Any

import pytest

from conftest import (
    ROOT, TASKS, Conn, HQEnv, Supervisor, error_code, file_lines, is_alive, ok, wait_for,
)

FINAL = ("completed", "failed", "cancelled", "expired")


def within(value: float, nominal: float, low: float = 0.5) -> bool:
    """A delay on a noisy 2-core machine: between ``low`` x and 3x + 0.3 s of nominal.

    A busy machine only makes a gap longer (the timer cannot fire before run_at), so
    where the lower end is known (backoff jitter is at least 0.75x; Retry(delay=) is
    exact) ``low`` can be tighter than 0.5."""
    return low * nominal <= value <= 3 * nominal + 0.3


def starts(job: dict[str, Any]) -> list[float]:
    return [a["started_at"] for a in job["attempt_log"]]


def fresh_pool(sup: Supervisor, n: int, gone: set[int]) -> set[int]:
    """Wait until exactly n workers run and none of them is one of ``gone``; their pids."""
    def ready() -> set[int] | None:
        pids = sup.worker_pids()
        return pids if len(pids) == n and not pids & gone else None

    found: set[int] = wait_for(ready, 15, f"{n} workers, none of them {sorted(gone)}")
    return found


def cli_ok(hq: HQEnv, sup: Supervisor, *args: str) -> str:
    result = hq.cli(*args, timeout=20)
    assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
    return result.stdout


# -- 1. backoff and Retry -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_backoff_spacing_and_retry_delay(sup: Supervisor) -> None:
    # backoff_base=0.2, factor 2, retries=2: attempts ~0.2 s then ~0.4 s apart.
    backoff = sup.submit("backoff_fail")
    # Retry(delay=0.5) on a task whose own backoff would wait >= 3.75 s; retries=1.
    retried = sup.submit("retry_later", {"delay": 0.5})

    done = sup.get(sup.wait_job(backoff["id"])["id"])
    assert done["status"] == "failed" and done["attempts"] == 3 == done["max_attempts"]
    s = starts(done)
    assert len(s) == 3, done["attempt_log"]
    gaps = [s[1] - s[0], s[2] - s[1]]
    # Jitter is 0.75x..1.25x: a gap under 0.7x means the wrong base or factor.
    assert within(gaps[0], 0.2, low=0.7), f"first retry came {gaps[0]:.3f} s after the first attempt, not ~0.2 s"
    assert within(gaps[1], 0.4, low=0.7), f"second retry came {gaps[1]:.3f} s after the second attempt, not ~0.4 s"
    # The same times are in the store's attempts table.
    rows = sup.db_query("SELECT attempt, started_at FROM attempts WHERE job_id = ? ORDER BY attempt",
                        (backoff["id"],))
    assert [r["attempt"] for r in rows] == [1, 2, 3]
    assert [r["started_at"] for r in rows] == s

    done = sup.get(sup.wait_job(retried["id"])["id"])
    # Retry used up the one attempt left: the second Retry, with none left, fails the job.
    assert done["status"] == "failed", done
    assert done["attempts"] == 2 == done["max_attempts"]
    assert done["error"]["type"] == "Retry"
    assert done["error"]["message"] == "not yet (attempt 2)"
    log = done["attempt_log"]
    assert [(a["attempt"], a["status"]) for a in log] == [(1, "retrying"), (2, "failed")]
    gap = log[1]["started_at"] - log[0]["started_at"]
    assert within(gap, 0.5, low=0.9), f"Retry(delay=0.5) ran the next attempt {gap:.3f} s later"
    assert sup.db_job(retried["id"])["status"] == "failed"


# -- 2. every attempt's error is kept ----------------------------------------------------------


@pytest.mark.timeout(30)
def test_every_attempt_error_is_kept_and_shown(hq: HQEnv, sup: Supervisor) -> None:
    job = sup.submit("fail_numbered")  # retries=2: three attempts
    assert sup.wait_job(job["id"])["status"] == "failed"
    done = sup.get(job["id"])
    assert done["attempts"] == 3
    log = done["attempt_log"]
    assert [(a["attempt"], a["status"]) for a in log] == [(1, "retrying"), (2, "retrying"), (3, "failed")]
    for n, attempt in enumerate(log, 1):
        error = attempt["error"]
        assert error["type"] == "ValueError", attempt
        assert error["message"] == f"failure of attempt {n}", attempt
        assert "Traceback" in error["traceback"] and "fail_numbered" in error["traceback"], attempt
        assert isinstance(attempt["worker_pid"], int) and attempt["worker_pid"] > 0, attempt
        assert isinstance(attempt["duration"], (int, float)) and 0 <= attempt["duration"] < 5, attempt
        assert attempt["finished_at"] >= attempt["started_at"]
    assert done["error"]["message"] == "failure of attempt 3"
    stored = sup.db_query("SELECT attempt, error FROM attempts WHERE job_id = ? ORDER BY attempt",
                          (job["id"],))
    assert [json.loads(r["error"])["message"] for r in stored] == [f"failure of attempt {n}" for n in (1, 2, 3)]

    out = cli_ok(hq, sup, "job", "--socket", str(sup.socket), "show", str(job["id"]))
    for n, attempt in enumerate(log, 1):
        assert f"attempt {n}: {attempt['status']}" in out, out
        assert f"failure of attempt {n}" in out, out
        assert f"pid {attempt['worker_pid']}" in out, out
    assert out.count("Traceback") >= 3, out


# -- 3. time limits -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_soft_time_limit_interrupts_a_sleep_and_keeps_the_worker(sup: Supervisor) -> None:
    before = sup.wait_workers(2)
    job = sup.submit("sleeper", {"seconds": 5}, timeout=0.5, retries=1)
    done = sup.wait_job(job["id"], timeout=10)
    assert done["status"] == "failed" and done["attempts"] == 2
    log = sup.get(job["id"])["attempt_log"]
    assert [a["status"] for a in log] == ["retrying", "failed"]
    for attempt in log:
        assert attempt["error"]["type"] == "TimeLimit"
        assert attempt["error"]["message"] == "time limit exceeded after 0.5 s", attempt
        assert "time.sleep" in attempt["error"]["traceback"], attempt
        assert 0.3 <= attempt["duration"] < 2.0, attempt  # interrupted at the soft limit, not killed
        assert attempt["worker_pid"] in before
    assert sup.worker_pids() == before, "a soft time limit must not cost a worker"


@pytest.mark.timeout(40)
def test_task_ignoring_its_time_limit_has_its_worker_replaced(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=3, extra_args=("--prefetch", "1"))
    before = sup.wait_workers(3)
    marker, bystander_marker, release = hq.path("stubborn"), hq.path("bystander"), hq.path("release")
    bystander = sup.submit("block", {"marker": bystander_marker, "release": release, "seconds": 30},
                           retries=0)
    wait_for(lambda: file_lines(bystander_marker), 10, "the bystander job to start")
    bystander_pid = int(file_lines(bystander_marker)[0].split()[2])
    catches_base = sup.submit("stubborn", {"marker": marker, "catch": "base"}, timeout=0.5, retries=0)
    catches_name = sup.submit("stubborn", {"marker": marker, "catch": "timelimit"}, timeout=0.5,
                              retries=0)

    def caught() -> dict[int, int] | None:
        found = {int(line.split()[0]): int(line.split()[2]) for line in file_lines(marker)
                 if line.endswith("caught TimeLimit")}
        return found if len(found) == 2 else None

    victims = wait_for(caught, 10, "both stubborn tasks to catch TimeLimit (the soft limit)")
    assert bystander_pid not in victims.values()

    for job in (catches_base, catches_name):
        done = sup.wait_job(job["id"], timeout=15)
        assert done["status"] == "failed", done
        assert done["attempts"] == 1
        assert done["error"]["type"] == "TimeLimit"
        assert done["error"]["message"] == "time limit exceeded after 0.5 s; the worker was killed"
        ran = done["finished_at"] - done["started_at"]
        # Killed about 2 s after the 0.5 s limit.
        assert 2.3 <= ran <= 3 * 2.5 + 0.3, f"killed {ran:.2f} s after the start"
        victim = victims[job["id"]]
        assert done["worker_pid"] == victim
        wait_for(lambda pid=victim: not is_alive(pid), 10, f"worker {victim} to be gone")
        stored = sup.db_query("SELECT status, error FROM attempts WHERE job_id = ?", (job["id"],))
        assert [r["status"] for r in stored] == ["failed"]
        assert "the worker was killed" in stored[0]["error"]

    # The pool is back to 3, with fresh workers in place of the killed ones.
    after = fresh_pool(sup, 3, set(victims.values()))
    assert bystander_pid in after and len(after - before) == 2

    # The job on the third worker was untouched.
    assert sup.get(bystander["id"])["status"] == "running"
    open(release, "w").close()
    done = sup.wait_job(bystander["id"])
    assert done["status"] == "completed" and done["attempts"] == 1, done
    assert done["result"] == {"released": True, "pid": bystander_pid}
    assert sup.get(bystander["id"])["attempt_log"] == []


# -- 4. worker deaths ----------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_worker_deaths_are_reported_retried_then_failed(sup: Supervisor) -> None:
    before = sup.wait_workers(2)
    exits = sup.submit("exit_code", {"code": 3})  # retries=1
    segv = sup.submit("segfault")  # retries=1
    dead: set[int] = set()
    for job, message in ((exits, "worker exited with code 3"), (segv, "worker killed by signal SIGSEGV")):
        done = sup.wait_job(job["id"])
        assert done["status"] == "failed", done
        assert done["attempts"] == 2 == done["max_attempts"]
        assert done["error"]["type"] == "WorkerLost"
        assert done["error"]["message"].startswith(message), done["error"]
        log = sup.get(job["id"])["attempt_log"]
        assert [(a["attempt"], a["status"]) for a in log] == [(1, "retrying"), (2, "failed")]
        for attempt in log:
            assert attempt["error"]["type"] == "WorkerLost"
            assert attempt["error"]["message"].startswith(message), attempt
            dead.add(attempt["worker_pid"])
    assert len(dead) == 4, f"four attempts killed four workers, but the log names {dead}"
    wait_for(lambda: not any(is_alive(pid) for pid in dead), 10, "the dead workers to be reaped")
    after = fresh_pool(sup, 2, dead)
    assert not after & before
    # And they work.
    assert sup.wait_job(sup.submit("add", {"a": 2, "b": 2})["id"])["result"] == 4


# -- 5. abort by run -----------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_abort_run_cancels_only_that_run(hq: HQEnv, sup: Supervisor) -> None:
    m1, m2, m3 = hq.path("r1-a"), hq.path("r2-b"), hq.path("r1-c")
    delayed = [sup.submit("add", {"a": i, "b": 0}, delay=60, run_id="r1")["id"] for i in range(2)]
    running = sup.submit("abortable", {"marker": m1, "seconds": 30}, run_id="r1")["id"]
    other_delayed = sup.submit("add", {"a": 9, "b": 9}, delay=60, run_id="r2")["id"]
    other_running = sup.submit("abortable", {"marker": m2, "seconds": 30}, run_id="r2")["id"]
    wait_for(lambda: file_lines(m1) and file_lines(m2), 10, "both long jobs to start")

    reply = sup.call("abort_run", "jobs", run_id="r1")
    assert sorted(j["id"] for j in reply) == sorted(delayed + [running])
    by_id = {j["id"]: j for j in reply}
    assert all(by_id[i]["status"] == "cancelled" for i in delayed), reply
    assert by_id[running]["abort_requested"] is True

    done = sup.wait_job(running, timeout=10)
    assert done["status"] == "cancelled" and done["error"]["type"] == "Aborted", done
    for job_id in delayed:
        assert sup.db_job(job_id)["status"] == "cancelled"

    # The same through the command line, on jobs added to r1 afterwards.
    later_delayed = sup.submit("add", {"a": 5, "b": 5}, delay=60, run_id="r1")["id"]
    later_running = sup.submit("abortable", {"marker": m3, "seconds": 30}, run_id="r1")["id"]
    wait_for(lambda: file_lines(m3), 10, "the second long job of r1 to start")
    out = cli_ok(hq, sup, "job", "--socket", str(sup.socket), "abort", "--run-id", "r1", "--json")
    aborted = json.loads(out)
    assert sorted(j["id"] for j in aborted) == sorted([later_delayed, later_running]), aborted
    assert sup.wait_job(later_running, timeout=10)["status"] == "cancelled"
    assert sup.db_job(later_delayed)["status"] == "cancelled"

    # Run r2 is untouched: its scheduled job waits, its running job runs, unasked to abort.
    assert sup.db_job(other_delayed)["status"] == "pending"
    other = sup.get(other_running)
    assert other["status"] == "running" and other["abort_requested"] is False, other
    assert len(file_lines(m2)) == 1
    stats = sup.call("stats", "stats", run_id="r2")
    assert (stats["scheduled"], stats["running"], stats["cancelled"]) == (1, 1, 0), stats
    stats = sup.call("stats", "stats", run_id="r1")
    assert (stats["cancelled"], stats["pending"], stats["scheduled"], stats["running"]) == (5, 0, 0, 0), stats


# -- 6. runs: list and stats ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_list_and_stats_by_run(hq: HQEnv, sup: Supervisor) -> None:
    ra = [sup.submit("add", {"a": i, "b": 1}, run_id="ra")["id"] for i in range(2)]
    ra.append(sup.submit("fail", retries=0, run_id="ra")["id"])
    ra.append(sup.submit("add", {"a": 0, "b": 0}, delay=60, run_id="ra")["id"])
    rb = [sup.submit("add", {"a": 7, "b": 1}, run_id="rb")["id"],
          sup.submit("add", {"a": 7, "b": 2}, delay=60, run_id="rb")["id"]]
    loose = sup.submit("add", {"a": 1, "b": 1})["id"]
    for job_id in (ra[0], ra[1], ra[2], rb[0], loose):
        assert sup.wait_job(job_id)["status"] in FINAL

    jobs = sup.call("list", "jobs", run_id="ra")
    assert [j["id"] for j in jobs] == sorted(ra, reverse=True), "newest first, only run ra"
    assert all(j["run_id"] == "ra" for j in jobs)
    assert [j["id"] for j in sup.call("list", "jobs", run_id="rb")] == sorted(rb, reverse=True)
    assert sup.call("list", "jobs", run_id="nope") == []
    assert {j["id"] for j in sup.call("list", "jobs", run_id="ra", status="completed")} == set(ra[:2])

    stats = sup.call("stats", "stats", run_id="ra")
    expected = {"pending": 0, "scheduled": 1, "running": 0, "completed": 2, "failed": 1,
                "cancelled": 0, "expired": 0}
    assert {k: stats[k] for k in expected} == expected, stats
    assert {k: v for k, v in stats["queues"]["default"].items() if k in expected} == expected
    stats = sup.call("stats", "stats", run_id="rb")
    assert (stats["completed"], stats["scheduled"], stats["failed"]) == (1, 1, 0), stats
    everything = sup.call("stats", "stats")
    assert (everything["completed"], everything["failed"], everything["scheduled"]) == (4, 1, 2), everything

    listed = json.loads(cli_ok(hq, sup, "job", "--socket", str(sup.socket), "list", "--run-id", "ra", "--json"))
    assert [j["id"] for j in listed] == sorted(ra, reverse=True)
    counted = json.loads(cli_ok(hq, sup, "ctl", "--socket", str(sup.socket), "stats", "--run-id", "ra", "--json"))
    assert {k: counted[k] for k in expected} == expected, counted


# -- 7. key_ttl ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_key_ttl_answers_with_the_stored_result_until_it_lapses(sup: Supervisor) -> None:
    with sup.conn() as c:
        first = ok(c.request("submit", task=f"{TASKS}.add", args={"a": 1, "b": 2}, key="K"))
        assert first["duplicate"] is False
        job_id = first["job"]["id"]
        assert sup.wait_job(job_id)["status"] == "completed"

        again = ok(c.request("submit", task=f"{TASKS}.add", args={"a": 9, "b": 9}, key="K", key_ttl=60))
        assert again["duplicate"] is True
        assert again["job"]["id"] == job_id
        assert again["job"]["status"] == "completed" and again["job"]["result"] == 3
        assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 1, "a cached answer added a row"

        short = ok(c.request("submit", task=f"{TASKS}.add", args={"a": 2, "b": 2}, key="K2"))["job"]
        finished = sup.wait_job(short["id"])
        assert finished["status"] == "completed"
        # Let more than key_ttl (0.5 s) pass since it completed.
        wait_for(lambda: time.time() > finished["finished_at"] + 1.0, 5, "1 s to pass")
        fresh = ok(c.request("submit", task=f"{TASKS}.add", args={"a": 3, "b": 3}, key="K2", key_ttl=0.5))
    assert fresh["duplicate"] is False
    assert fresh["job"]["id"] not in (short["id"], job_id)
    assert sup.wait_job(fresh["job"]["id"])["result"] == 6
    assert sup.db_query("SELECT COUNT(*) FROM jobs WHERE key = 'K2'")[0][0] == 2
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 3


# -- 8. retention --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_retention_deletes_completed_jobs_and_keeps_failed_ones(
        hq: HQEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTQUEUE_RETENTION_COMPLETED", "1")
    monkeypatch.setenv("HOSTQUEUE_RETENTION_FAILED", "0")  # forever
    sup = hq.supervisor(workers=2)
    # Two attempts each, so that both have rows in the attempts table.
    completed = sup.submit("flaky", {"log": hq.path("flaky.log"), "fail_times": 1})["id"]
    failed = sup.submit("fail", retries=1)["id"]
    # Retention goes queue by queue (the ended-jobs index is by state, then queue).
    elsewhere = sup.submit("noop", queue="other")["id"]
    assert sup.wait_job(elsewhere)["status"] == "completed"
    done = sup.wait_job(completed)
    assert done["status"] == "completed" and done["attempts"] == 2
    assert sup.wait_job(failed)["status"] == "failed"

    def attempt_rows(job_id: int) -> int:
        return int(sup.db_query("SELECT COUNT(*) FROM attempts WHERE job_id = ?", (job_id,))[0][0])

    assert attempt_rows(failed) == 2

    def gone() -> float | None:
        return time.time() if not sup.db_query("SELECT id FROM jobs WHERE id = ?", (completed,)) else None

    gone_at = wait_for(gone, 8, "the completed job's row to be deleted after 1 s")
    wait_for(lambda: not sup.db_query("SELECT id FROM jobs WHERE id = ?", (elsewhere,)), 8,
             "the completed job of the other queue to be deleted too")
    assert gone_at >= done["finished_at"] + 1.0 - 0.05, "deleted before its retention was over"
    assert attempt_rows(completed) == 0, "the deleted job's attempts stayed behind"
    assert error_code(sup.request("get", job=completed)) == "not_found"

    # Failed jobs are kept forever (0), with their attempts.
    assert sup.db_job(failed)["status"] == "failed"
    assert attempt_rows(failed) == 2
    assert sup.get(failed)["status"] == "failed"


# -- 9. the dead-letter set ------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_dead_letter_list_and_retry_by_filter(hq: HQEnv, sup: Supervisor) -> None:
    sock = str(sup.socket)
    # flaky fails its first run and succeeds afterwards (one log file per job).
    flaky = [sup.submit("flaky", {"log": hq.path(f"f{i}.log"), "fail_times": 1}, retries=0)["id"]
             for i in range(2)]
    other = sup.submit("fail", {"message": "other task"}, retries=0)["id"]
    perm = sup.submit("permanent", {"message": "never"})["id"]
    for job_id in flaky + [other, perm]:
        assert sup.wait_job(job_id)["status"] == "failed"

    listed = json.loads(cli_ok(hq, sup, "job", "--socket", sock, "list", "--status", "failed", "--json"))
    assert sorted(j["id"] for j in listed) == sorted(flaky + [other, perm])
    errors = {j["id"]: j["error"] for j in listed}
    for job_id in flaky:
        assert errors[job_id]["type"] == "ValueError" and errors[job_id]["message"] == "flaky: run 1 fails"
    assert errors[other]["message"] == "other task"
    assert errors[perm]["type"] == "Permanent"

    # Paused, so the state right after the retry can be seen before the jobs run again.
    sup.call("pause", "paused")
    back = sup.call("retry_all", "jobs", status="failed", task=f"{TASKS}.flaky")
    assert sorted(j["id"] for j in back) == sorted(flaky)
    for job in back:
        assert job["status"] == "pending" and job["attempts"] == 0 and job["error"] is None, job
    for job_id in flaky:
        row = sup.db_job(job_id)
        assert (row["status"], row["attempts"], row["error"]) == ("pending", 0, None), row
    for job_id in (other, perm):
        assert sup.db_job(job_id)["status"] == "failed"
    sup.call("resume", "paused")
    for job_id in flaky:
        done = sup.wait_job(job_id)
        assert done["status"] == "completed" and done["attempts"] == 1, done
        assert done["result"] == {"runs": 2}

    # The command line, on a new failure of the same task.
    late = sup.submit("flaky", {"log": hq.path("late.log"), "fail_times": 1}, retries=0)["id"]
    assert sup.wait_job(late)["status"] == "failed"
    sup.call("pause", "paused")
    out = cli_ok(hq, sup, "job", "--socket", sock, "retry", "--status", "failed", "--task",
                 f"{TASKS}.flaky", "--json")
    assert [j["id"] for j in json.loads(out)] == [late]
    row = sup.db_job(late)
    assert (row["status"], row["attempts"]) == ("pending", 0), row
    sup.call("resume", "paused")
    done = sup.wait_job(late)
    assert done["status"] == "completed" and done["attempts"] == 1 and done["result"] == {"runs": 2}
    for job_id in (other, perm):
        row = sup.db_job(job_id)
        assert (row["status"], row["attempts"]) == ("failed", 1), row


@pytest.mark.timeout(30)
def test_retried_job_keeps_the_errors_of_its_earlier_attempts(hq: HQEnv, sup: Supervisor) -> None:
    """"Every failed attempt is kept" (lifecycle.md), also across `job retry`: a failed job put
    back with fresh attempts that fails again still shows the errors of its first attempts."""
    log = hq.path("runs.log")  # flaky fails every run here; its message counts the runs
    job = sup.submit("flaky", {"log": log, "fail_times": 100}, retries=1)["id"]
    assert sup.wait_job(job)["status"] == "failed"
    first = [a["error"]["message"] for a in sup.get(job)["attempt_log"]]
    assert first == ["flaky: run 1 fails", "flaky: run 2 fails"]

    assert sup.call("retry", "job", job=job)["attempts"] in (0, 1)
    done = sup.wait_job(job)
    assert done["status"] == "failed" and done["attempts"] == 2
    assert len(file_lines(log)) == 4
    kept = [a["error"]["message"] for a in sup.get(job)["attempt_log"]]
    assert sorted(kept) == [f"flaky: run {n} fails" for n in (1, 2, 3, 4)], (
        f"the errors of the attempts before the retry were overwritten: attempt_log has {kept}")


# -- 10. events ----------------------------------------------------------------------------------


def read_lines(proc: subprocess.Popen[bytes], want: int, deadline: float,
               on_idle: Any = None) -> list[str]:
    """Lines from proc's stdout until ``want`` lines or the deadline; ``on_idle`` is called
    whenever nothing came for 0.3 s."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buffer = b""
    lines: list[str] = []
    try:
        while len(lines) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(lines)} of {want} lines before the deadline: {lines}")
            if not sel.select(min(left, 0.3)):
                if proc.poll() is not None:
                    raise AssertionError(f"watch exited with {proc.returncode}: {lines} {buffer!r}")
                if on_idle is not None:
                    on_idle()
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"watch closed its output: {lines} {buffer!r}")
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(line.decode())
    finally:
        sel.close()
    return lines


@pytest.mark.timeout(40)
def test_watch_by_run_sees_only_that_run_with_timestamps(hq: HQEnv, sup: Supervisor) -> None:
    with Conn(sup.socket) as c:
        rid = c.send_op("watch", run_id="ev")
        first = c.read_for(rid)
        assert first["ok"] is True and first["watching"] is None
        # Jobs of another run and of no run, finished before the run's job is submitted:
        # their events, if wrongly delivered, would come before the run's.
        other = sup.submit("fail", retries=1, run_id="other")["id"]
        loose = sup.submit("add", {"a": 1, "b": 1})["id"]
        sup.wait_job(other)
        sup.wait_job(loose)
        t0 = time.time()
        job = sup.submit("fail", {"message": "ev fails"}, retries=1, run_id="ev")["id"]
        events = []
        for event in c.events(rid, timeout=10):
            events.append(event)
            if event.get("event") in FINAL:
                break
        t1 = time.time()
    kinds = [e["event"] for e in events]
    assert all(e["job_id"] == job for e in events), f"events of other runs: {events}"
    assert kinds[0] == "submitted" and kinds[-1] == "failed", kinds
    assert sorted(kinds) == sorted(["submitted", "started", "retrying", "started", "failed"]), kinds
    ats = [e["at"] for e in events]
    assert all(isinstance(a, float) and t0 - 0.5 <= a <= t1 + 0.5 for a in ats), ats
    assert ats == sorted(ats), f"event times go backwards: {ats}"
    for e in events:
        assert e["job"]["run_id"] == "ev", e
    assert events[-1]["job"]["error"]["message"] == "ev fails"

    # hostqueue ctl watch --json --run-id R: JSON lines of run R only.
    cmd = [sys.executable, "-m", "hostqueue", "ctl", "--socket", str(sup.socket), "watch", "--json",
           "--run-id", "ev2"]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=hq.env(PYTHONUNBUFFERED="1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    hq.procs.append(proc)
    submitted: set[int] = set()

    def submit_pair() -> None:  # until the watcher has subscribed, the first ones may go unseen
        submitted.add(sup.submit("add", {"a": 1, "b": 2}, run_id="ev2")["id"])
        sup.submit("add", {"a": 1, "b": 3}, run_id="other2")

    try:
        submit_pair()
        lines = read_lines(proc, 6, time.monotonic() + 15, on_idle=submit_pair)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    parsed = [json.loads(line) for line in lines]
    for e in parsed:
        assert e["job_id"] in submitted, f"an event of another run: {e}"
        assert e["event"] in ("submitted", "started", "completed"), e
        assert isinstance(e["at"], float), e
        if "job" in e:
            assert e["job"]["run_id"] == "ev2", e


@pytest.mark.timeout(30)
def test_watch_sees_every_retrying_event_of_quick_retries(sup: Supervisor) -> None:
    """Every transition is an event: a task retrying at once (Retry(delay=0)) still gives
    one `retrying` event per retry."""
    with Conn(sup.socket) as c:
        rid = c.send_op("watch", run_id="quick")
        assert c.read_for(rid)["ok"] is True
        job = sup.submit("retry_now", run_id="quick")["id"]  # retries=2
        events = []
        for event in c.events(rid, timeout=10):
            events.append(event)
            if event.get("event") in FINAL:
                break
    done = sup.get(job)
    assert done["status"] == "failed" and done["attempts"] == 3
    assert [a["status"] for a in done["attempt_log"]] == ["retrying", "retrying", "failed"]
    kinds = [e["event"] for e in events]
    assert kinds.count("started") == 3 and kinds.count("failed") == 1, kinds
    assert kinds.count("retrying") == 2, f"retrying events were lost: {kinds}"


# -- 11. per-job resources -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_peak_memory_and_cpu_per_job(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    big = sup.wait_job(sup.submit("allocate", {"size": 50_000_000, "sleep": 0.1})["id"])
    assert big["status"] == "completed", big
    assert big["peak_rss"] is not None and big["peak_rss"] >= 50_000_000, big["peak_rss"]
    assert sup.db_job(big["id"])["peak_rss"] == big["peak_rss"]
    # The peak is reset between jobs: the next job on the same worker is small.
    small = sup.wait_job(sup.submit("sleeper", {"seconds": 0.1})["id"])
    assert small["worker_pid"] == big["worker_pid"]
    assert small["peak_rss"] is not None and 0 < small["peak_rss"] < 50_000_000, small["peak_rss"]

    busy = sup.wait_job(sup.submit("burn", {"seconds": 0.2})["id"])
    assert busy["status"] == "completed", busy
    duration = busy["finished_at"] - busy["started_at"]
    assert busy["cpu_seconds"] is not None and 0 < busy["cpu_seconds"] <= duration + 0.1, (
        busy["cpu_seconds"], duration)
    assert sup.db_job(busy["id"])["cpu_seconds"] == busy["cpu_seconds"]
    # A sleeping job uses far less CPU than a busy one.
    assert small["cpu_seconds"] is not None and small["cpu_seconds"] < busy["cpu_seconds"]


# -- 12. a scheduled retry survives kill -9 of the supervisor -------------------------------------


@pytest.mark.timeout(40)
def test_scheduled_retry_survives_a_supervisor_kill(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    job_id = sup.submit("retry_once", {"delay": 5})["id"]

    def retrying() -> dict[str, Any] | None:
        row = sup.db_job(job_id)
        return row if row["status"] == "pending" and row["attempts"] == 1 else None

    row = wait_for(retrying, 10, "the first attempt to ask for a retry")
    run_at = row["run_at"]
    assert within(run_at - time.time(), 5) and run_at > time.time() + 3, run_at - time.time()

    sup.kill9()
    sup.start()
    row = sup.db_job(job_id)
    assert (row["status"], row["attempts"], row["run_at"]) == ("pending", 1, run_at), row
    job = sup.get(job_id)
    assert job["status"] == "pending" and job["run_at"] == run_at
    assert sup.call("stats", "stats")["scheduled"] == 1

    # Not run early: until just before run_at it stays pending with one attempt.
    while time.time() < run_at - 0.2:
        row = sup.db_job(job_id)
        assert (row["status"], row["attempts"]) == ("pending", 1), (row, run_at - time.time())
        time.sleep(0.05)
    done = sup.wait_job(job_id, timeout=10)
    assert done["status"] == "completed", done
    assert done["attempts"] == 2 and done["result"] == {"attempt": 2}
    assert done["started_at"] >= run_at, "the retry ran before its run_at"
    log = sup.get(job_id)["attempt_log"]
    assert [(a["attempt"], a["status"]) for a in log][:1] == [(1, "retrying")]
    assert log[0]["error"]["type"] == "Retry"


@pytest.mark.timeout(60)
def test_abort_of_a_job_waiting_in_a_busy_worker_ends_it_at_once(hq: HQEnv) -> None:
    """A job handed ahead to a busy worker (prefetch), not started, is pending to
    everyone; aborted, it ends at once, and the long job in front of it goes on in
    the same worker."""
    sup = hq.supervisor(workers=1)
    marker, release = hq.path("started"), hq.path("release")
    open(release, "w").close()
    for _ in range(5):  # `block` measured fast: two of them are handed out together
        sup.wait_job(sup.submit("block", {"marker": hq.path("warm"), "release": release})["id"])
    os.unlink(release)
    long_job, waiting = sup.call("submit_many", "jobs", task=f"{TASKS}.block",
                                 args=[{"marker": marker, "release": release}] * 2)
    wait_for(lambda: file_lines(marker), 10, "the long job to start")
    [pid] = sup.worker_pids()
    wait_for(lambda: sup.status()["workers"][0]["held"] == 1, 10,
             "the busy worker to hold the second job, not started")
    held = sup.get(waiting["id"])
    assert held["status"] == "pending" and held["started_at"] is None, held

    ok(sup.request("abort", job=waiting["id"]))
    # Well within the 10 s after which an abort not honoured replaces the worker.
    done = sup.wait_job(waiting["id"], timeout=5)
    assert done["status"] == "cancelled" and done["result"] is None, done
    assert done["attempts"] == 0 and done["started_at"] is None, done
    assert sup.get(long_job["id"])["status"] == "running"
    assert sup.worker_pids() == {pid}, "the worker was replaced"

    open(release, "w").close()
    finished = sup.wait_job(long_job["id"])
    assert finished["status"] == "completed" and finished["attempts"] == 1
    assert finished["worker_pid"] == pid
    assert len(file_lines(marker)) == 1, "the aborted job never ran"
