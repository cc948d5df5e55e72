"""Losing nothing: kill -9 of the supervisor or of a worker, one supervisor per store,
the store's journal mode."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL

from conftest import TASKS, HQEnv, file_lines, is_alive, ok, wait_for


@pytest.mark.timeout(90)
def test_kill9_supervisor_loses_no_acknowledged_job(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    marker, release, log = hq.path("started"), hq.path("release"), hq.path("runs.log")
    acked: list[int] = []
    with sup.conn() as c:
        for _ in range(2):  # one long job on each worker
            acked.append(ok(c.request("submit", task=f"{TASKS}.block",
                                      args={"marker": marker, "release": release}))["job"]["id"])
        wait_for(lambda: len(file_lines(marker)) == 2, 10, "both long jobs to run")
        acked += [j["id"] for j in ok(c.request(
            "submit_many", task=f"{TASKS}.record",
            args=[{"log": log, "tag": f"m{i}"} for i in range(40)]))["jobs"]]
        for i in range(20):
            acked.append(ok(c.request("submit", task=f"{TASKS}.record",
                                      args={"log": log, "tag": f"s{i}"}))["job"]["id"])
    assert len(set(acked)) == 62
    workers = sup.worker_pids()
    assert len(workers) == 2

    sup.kill9()

    # No orphan: every worker dies with the supervisor (pipe EOF / parent-death signal).
    wait_for(lambda: not any(is_alive(pid) for pid in workers), 10, "the orphaned workers to exit")
    wait_for(lambda: not sup.session(), 10, "no process left in the supervisor's session")
    rows = {r["id"]: r["status"] for r in sup.db_query("SELECT id, status FROM jobs")}
    assert set(acked) <= set(rows), f"acknowledged jobs missing from the store: {set(acked) - set(rows)}"
    assert rows[acked[0]] == "running" and rows[acked[1]] == "running"

    open(release, "w").close()
    sup.start()
    for job_id in acked:
        assert sup.wait_job(job_id)["status"] == "completed"
    statuses = {r["id"]: r["status"] for r in sup.db_query("SELECT id, status FROM jobs")}
    assert all(statuses[i] == "completed" for i in acked), statuses
    runs = [line.split()[0] for line in file_lines(log)]
    assert len(runs) == 60, "a job that never started before the kill ran more than once"
    assert sorted(runs) == sorted([f"m{i}" for i in range(40)] + [f"s{i}" for i in range(20)])
    for long_job in acked[:2]:
        # The interruption by the supervisor's death uses up no attempt; it is recorded.
        assert sup.db_job(long_job)["attempts"] == 1, "the interrupted attempt is not charged"
        logged = sup.db_query("SELECT status FROM attempts WHERE job_id = ?", (long_job,))
        assert [r["status"] for r in logged][:1] == ["interrupted"], [tuple(r) for r in logged]

    assert sup.stop() == 0
    wait_for(lambda: not sup.session(), 10, "no process left after a clean stop")


@pytest.mark.timeout(60)
def test_a_job_held_as_it_was_submitted_is_pending_and_survives_a_crash(hq: HQEnv) -> None:
    """A one-job submit handed to an idle worker in the turn it arrives is written held
    (pending, with the worker's pid: it stays out of the index of waiting jobs). To
    everyone it is pending with no worker; `stats` counts it pending; after a kill -9
    of the supervisor it runs again, uncharged, and the store keeps no worker for it
    meanwhile. The worker is stopped (SIGSTOP) so that the job stays held."""
    sup = hq.supervisor(workers=1)
    (worker,) = sup.worker_pids()
    os.kill(worker, signal.SIGSTOP)
    try:
        job = sup.submit("add", {"a": 2, "b": 3})
        rows = sup.db_query("SELECT status, worker_pid FROM jobs WHERE id = ?", (job["id"],))
        assert (rows[0][0], rows[0][1]) == ("pending", worker), [tuple(r) for r in rows]
        shown = sup.get(job["id"])
        assert shown["status"] == "pending" and shown["worker_pid"] is None, shown
        stats = sup.call("stats", "stats")
        assert stats["pending"] == 1 and stats["running"] == 0, stats
        sup.kill9()
    finally:
        os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not sup.session(), 10, "no process left in the supervisor's session")
    sup.start()
    done = sup.wait_job(job["id"])
    assert done["status"] == "completed" and done["result"] == 5, done
    assert done["attempts"] == 1 and done["worker_pid"] != worker, done
    assert sup.call("stats", "stats")["pending"] == 0


@pytest.mark.timeout(60)
def test_worker_killed_mid_job_is_retried(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    marker, release = hq.path("started"), hq.path("release")
    job = sup.submit("block", {"marker": marker, "release": release}, retries=2)
    wait_for(lambda: file_lines(marker), 10, "the job to start")
    victim = int(file_lines(marker)[0].split()[2])
    assert victim in sup.worker_pids()

    os.kill(victim, signal.SIGKILL)
    open(release, "w").close()  # the next attempt may finish
    done = sup.wait_job(job["id"])

    assert done["status"] == "completed", done
    assert done["attempts"] == 2
    attempts = sup.get(job["id"])["attempt_log"]
    assert attempts[0]["attempt"] == 1
    assert attempts[0]["status"] == "retrying"
    assert attempts[0]["error"]["type"] == "WorkerLost"
    assert "SIGKILL" in attempts[0]["error"]["message"]
    assert attempts[0]["worker_pid"] == victim
    stored = sup.db_query("SELECT error FROM attempts WHERE job_id = ? AND attempt = 1", (job["id"],))
    assert "SIGKILL" in stored[0]["error"]

    replacements = wait_for(
        lambda: (lambda p: p if len(p) == 2 and victim not in p else None)(sup.worker_pids()),
        15, "a new worker to replace the killed one",
    )
    assert not is_alive(victim)
    assert len(replacements) == 2


@pytest.mark.timeout(60)
def test_worker_killed_while_holding_jobs_charges_only_the_running_one(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    marker, release, log = hq.path("started"), hq.path("release"), hq.path("runs.log")
    sup.call("pause", "paused")
    running = sup.submit("block", {"marker": marker, "release": release}, retries=0)
    held = [sup.submit("record", {"log": log, "tag": f"h{i}"}, retries=0)["id"] for i in range(4)]
    sup.call("resume", "paused")
    wait_for(lambda: file_lines(marker), 10, "the long job to start")
    victim = int(file_lines(marker)[0].split()[2])

    os.kill(victim, signal.SIGKILL)
    done = sup.wait_job(running["id"])
    assert done["status"] == "failed" and done["attempts"] == 1
    assert "SIGKILL" in done["error"]["message"]
    # The jobs it held but had not started lose no attempt: they run on the new worker.
    for job_id in held:
        job = sup.wait_job(job_id)
        assert job["status"] == "completed", job
        assert job["attempts"] == 1
    assert sorted(line.split()[0] for line in file_lines(log)) == ["h0", "h1", "h2", "h3"]
    assert victim not in sup.wait_workers(1)


@pytest.mark.sqlite_only  # on PostgreSQL a second supervisor joins as a host (test_hosts.py)
@pytest.mark.timeout(30)
def test_second_supervisor_on_same_store_refuses(hq: HQEnv) -> None:
    first = hq.supervisor(workers=1)
    cmd = [*first.command(), "--socket", hq.path("other.sock")]
    result = subprocess.run(cmd, cwd=str(hq.dir), env=hq.env(), capture_output=True, text=True,
                            timeout=20, start_new_session=True)
    assert result.returncode == 1, result
    output = result.stdout + result.stderr
    assert (first.pg_schema or os.path.abspath(first.store)) in output, output
    assert str(first.pid) in output, output
    # The first one is undisturbed.
    assert first.ping()["pid"] == first.pid
    assert not os.path.exists(hq.path("other.sock"))


@pytest.mark.sqlite_only
@pytest.mark.timeout(30)
def test_store_is_in_wal_mode(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    sup.wait_job(sup.submit("noop")["id"])
    conn = sqlite3.connect(str(sup.store))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    assert sup.integrity() == "ok"


@pytest.mark.sqlite_only
@pytest.mark.timeout(60)
def test_a_store_with_the_old_status_index_upgrades_recovers_and_counts(hq: HQEnv) -> None:
    """A store written before jobs_ended (schema 4, with jobs_status) upgrades in
    place (schema 6 adds interruptions); jobs it left running are recovered by a
    scan and run again, uncharged (the supervisor's death uses up no attempt, even
    the last); counts by state come from the ended-jobs index and, for running
    jobs, from the supervisor's memory; listing and retry by state work."""
    from hostqueue.store.sqlite import MIGRATIONS

    store = hq.dir / "old.db"
    conn = sqlite3.connect(str(store), isolation_level=None)
    for _, script in MIGRATIONS[:4]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 4")
    noop, t = f"{TASKS}.noop", time.time() - 60  # recent: within retention
    rows = [  # id, queue, status, attempts, max_attempts, finished_at
        (1, "default", "completed", 1, 1, t),
        (2, "q2", "failed", 1, 1, t),
        (3, "default", "running", 1, 3, None),  # interrupted: runs again, uncharged
        (4, "default", "running", 2, 2, None),  # its last attempt: runs again, uncharged
        (5, "q2", "pending", 0, 1, None),
    ]
    conn.executemany(
        "INSERT INTO jobs (id, task, queue, status, args, attempts, max_attempts, created_at,"
        " run_at, finished_at) VALUES (?, ?, ?, ?, '{}', ?, ?, ?, ?, ?)",
        [(i, noop, q, s, a, m, t, t, f) for i, q, s, a, m, f in rows],
    )
    conn.close()

    sup = hq.supervisor(workers=1, store=store, start=False)
    sup.start()
    assert sup.db_query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    indexes = {r[0] for r in sup.db_query("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "jobs_ended" in indexes and not {"jobs_status", "jobs_status_finished"} & indexes
    assert sup.wait_job(3)["status"] == "completed"
    assert sup.db_job(3)["attempts"] == 1, "the interrupted attempt is not charged"
    assert sup.wait_job(5)["status"] == "completed"
    last = sup.wait_job(4)
    assert last["status"] == "completed" and last["attempts"] == 2, last
    assert sup.db_job(4)["interruptions"] == 0, "an attempt that ends resets the count"

    stats = sup.call("stats", "stats")
    assert (stats["completed"], stats["failed"], stats["running"], stats["pending"]) == (4, 1, 0, 0)
    assert stats["queues"]["default"]["completed"] == 3 and stats["queues"]["default"]["failed"] == 0
    assert stats["queues"]["q2"]["completed"] == 1 and stats["queues"]["q2"]["failed"] == 1
    assert {j["id"] for j in sup.call("list", "jobs", status="failed")} == {2}

    marker, release = hq.path("started"), hq.path("release")
    held = sup.submit("block", {"marker": marker, "release": release}, queue="q2")
    wait_for(lambda: file_lines(marker), 10, "the blocking job to start")
    stats = sup.call("stats", "stats")
    assert stats["running"] == 1 and stats["queues"]["q2"]["running"] == 1, stats
    assert [j["id"] for j in sup.call("list", "jobs", status="running")] == [held["id"]]
    open(release, "w").close()
    assert sup.wait_job(held["id"])["status"] == "completed"

    revived = sup.call("retry_all", "jobs", status="failed", queue="q2")
    assert [j["id"] for j in revived] == [2]
    assert sup.wait_job(2)["status"] == "completed"
    assert sup.call("stats", "stats")["queues"]["q2"] == {
        **{k: 0 for k in ("pending", "scheduled", "running", "failed", "cancelled", "expired")},
        "completed": 3,
    }
