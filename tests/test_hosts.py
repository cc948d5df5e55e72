"""Several hosts sharing one PostgreSQL store (docs/postgresql.md): each host is a
real supervisor with its own socket and workers, on one schema of a real server.

What is checked: jobs submitted on one host run on all of them; a client on one
host waits on, aborts and pauses jobs of another; a host killed with -9 has its
running jobs run again elsewhere within its lease and a renewal; a host frozen
past its lease stores nothing more when it wakes (its late outcomes are refused)
and exits 1; one idempotency key submitted on three hosts at once makes one job;
a schedule on three hosts fires once per due time; with NOTIFY off, hosts poll.
"""

from __future__ import annotations

import collections
import os
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import TASKS, HQEnv, Supervisor, is_alive, ok, wait_for

pytestmark = pytest.mark.postgres


def hosts(pg: HQEnv, n: int, workers: int = 2, extra: tuple[str, ...] = (),
          config: str | None = None) -> list[Supervisor]:
    """n supervisors on one schema (the first one's), each with its own socket."""
    args = extra
    if config is not None:
        path = pg.dir / "hq.toml"
        path.write_text(textwrap.dedent(config))
        args = ("--config", str(path), *extra)
    out: list[Supervisor] = []
    for i in range(n):
        sup = pg.supervisor(workers=workers, name=f"h{i}", start=False)
        if out:
            sup.pg_schema = out[0].pg_schema
        sup.start(*args)
        out.append(sup)
    return out


def runs(log: Path) -> dict[int, list[int]]:
    """job id -> pids of the workers that ran it (the record task's log)."""
    out: dict[int, list[int]] = collections.defaultdict(list)
    if log.exists():
        for line in log.read_text().splitlines():
            _tag, job, _attempt, pid = line.split()
            out[int(job)].append(int(pid))
    return out


@pytest.mark.timeout(60)
def test_jobs_submitted_on_one_host_run_on_every_host(pg: HQEnv) -> None:
    """12 half-second jobs submitted on host 0 run on the workers of all three hosts
    (in about 1 s, not 3); a client of host 2 waits on each; status lists 3 hosts."""
    hs = hosts(pg, 3)
    log = pg.path("runs.log")
    workers = {i: h.worker_pids() for i, h in enumerate(hs)}
    started = time.monotonic()
    ids = ok(hs[0].request("submit_many", task=f"{TASKS}.record",
                           args=[{"log": log, "tag": f"t{i}", "sleep": 0.5} for i in range(12)],
                           reply="ids"))["ids"]
    for job_id in ids:
        assert hs[2].wait_job(job_id)["status"] == "completed"
    took = time.monotonic() - started
    ran = runs(Path(log))
    assert sorted(ran) == sorted(ids) and all(len(p) == 1 for p in ran.values()), ran
    on = {i for i, pids in workers.items() for p in ran.values() if p[0] in pids}
    assert on == {0, 1, 2}, (on, workers, ran)
    assert took < 2.5, f"12 jobs of 0.5 s on 6 workers took {took:.2f} s"
    status = hs[1].status()
    alive = status["hosts"]
    assert len(alive) == 3 and {h["pid"] for h in alive} == {h.pid for h in hs}, alive
    assert all(h["lease_left"] > 0 for h in alive)
    assert status["cluster"]["host"] in {h["id"] for h in alive}
    shown = pg.cli("ctl", "--socket", str(hs[1].socket), "status")
    assert shown.returncode == 0, shown.stderr
    assert "hosts alive (3; * this one)" in shown.stdout, shown.stdout
    assert all(str(h.pid) in shown.stdout for h in hs), shown.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("notify", ["on", "off"])
def test_a_host_without_workers_hands_everything_on(pg: HQEnv, notify: str) -> None:
    """Host 0 has no workers: what it is given is released, and host 1 runs it, woken
    by NOTIFY (or, with --pg-notify off, by its poll); delayed jobs run when due."""
    extra = ("--pg-notify", notify, "--pg-poll", "0.2")
    a = pg.supervisor(workers=0, name="a", start=False)
    a.start(*extra)
    b = pg.supervisor(workers=1, name="b", start=False)
    b.pg_schema = a.pg_schema
    b.start(*extra)
    job = a.submit("add", {"a": 2, "b": 3})
    assert a.wait_job(job["id"], timeout=10)["result"] == 5
    later = a.submit("add", {"a": 1, "b": 1}, delay=1.0)
    done = b.wait_job(later["id"], timeout=10)
    assert done["result"] == 2 and done["started_at"] >= later["run_at"]
    many = ok(a.request("submit_many", task=f"{TASKS}.add",
                        args=[{"a": i, "b": 0} for i in range(200)], reply="ids"))["ids"]
    for i, job_id in enumerate(many):
        assert a.wait_job(job_id, timeout=20)["result"] == i
    assert b.status()["cluster"]["claimed"] >= 202


@pytest.mark.timeout(60)
def test_abort_and_pause_reach_the_host_that_holds_the_job(pg: HQEnv) -> None:
    a, b = hosts(pg, 2, workers=1)
    marker, release = pg.path("marker"), pg.path("release")
    blocked = a.submit("block", {"marker": marker, "release": release})["id"]
    wait_for(lambda: os.path.exists(marker), 10, "the job to start on host a")
    job = ok(b.request("abort", job=blocked))["job"]
    assert job["abort_requested"] is True
    assert a.wait_job(blocked)["status"] == "cancelled"
    # A pause given to host a holds host b too.
    assert a.call("pause", "paused", queue="slow") == ["slow"]
    wait_for(lambda: b.status()["paused"] == ["slow"], 5, "host b to learn the pause")
    held = b.submit("add", {"a": 1, "b": 1}, queue="slow")["id"]
    assert a.get(held)["status"] == "pending"
    assert a.call("resume", "paused", queue="slow") == []
    assert b.wait_job(held)["status"] == "completed"
    # A released job nobody took yet is aborted where it lies.
    assert a.call("pause", "paused", queue="slow") == ["slow"]
    wait_for(lambda: b.status()["paused"] == ["slow"], 5, "host b to learn the pause")
    waiting = a.submit("add", {"a": 1, "b": 1}, queue="slow")["id"]
    assert ok(b.request("abort", job=waiting))["job"]["status"] == "cancelled"


@pytest.mark.timeout(120)
def test_a_key_submitted_on_three_hosts_at_once_makes_one_job(pg: HQEnv) -> None:
    hs = hosts(pg, 3)
    for round_ in range(10):
        key = f"order-{round_}"
        replies: list[dict[str, Any]] = []
        barrier = threading.Barrier(6)

        def submit(host: Supervisor) -> None:
            barrier.wait()
            replies.append(host.request("submit", task=f"{TASKS}.add", args={"a": 1, "b": 1},
                                        key=key, delay=30))

        threads = [threading.Thread(target=submit, args=(h,)) for h in hs for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        jobs = [ok(r)["job"] for r in replies]
        assert len(jobs) == 6 and len({j["id"] for j in jobs}) == 1, replies
        rows = hs[0].db_query("SELECT id FROM jobs WHERE key = ?", (key,))
        assert [r[0] for r in rows] == [jobs[0]["id"]]


@pytest.mark.timeout(60)
def test_a_schedule_on_three_hosts_fires_once_per_due_time(pg: HQEnv) -> None:
    hs = hosts(pg, 3, workers=1, config=f"""
        [schedules.tick]
        task = "{TASKS}.noop"
        cron = "*/2 * * * * *"
        queue = "tick"
        """)
    time.sleep(0)  # the hosts started at once: every one has planned the schedule
    wait_for(lambda: len(hs[0].db_query("SELECT id FROM jobs WHERE queue = 'tick'")) >= 4, 20,
             "four due times")
    rows = hs[0].db_query("SELECT created_at FROM jobs WHERE queue = 'tick' ORDER BY id")
    due = [int(r[0] // 2) for r in rows]
    assert len(due) == len(set(due)), f"a due time fired twice: {due}"
    leaders = [h.status()["cluster"]["leader"] for h in hs]
    assert leaders.count(True) == 1, leaders


@pytest.mark.timeout(90)
def test_a_frozen_host_loses_its_jobs_and_its_late_outcomes_are_refused(pg: HQEnv) -> None:
    """Host a is frozen (SIGSTOP) past its 1 s lease while its two jobs run; host b
    runs them again. a's workers finish their copies meanwhile; when a wakes its
    writes are refused (fenced): it stops its workers, starts again in place (same
    PID) and rejoins as a new host; the store keeps b's outcomes, each job
    completed once."""
    a, b = hosts(pg, 2, extra=("--pg-lease", "1"))
    first_host = a.status()["cluster"]["host"]
    log = pg.path("runs.log")
    ids = [a.submit("record", {"log": log, "tag": f"t{i}", "sleep": 2.0})["id"] for i in range(2)]
    wait_for(lambda: a.status()["running_jobs"] == 2, 10, "both jobs to start on a")
    a_workers = a.worker_pids()
    b_workers = b.worker_pids()
    a.signal(signal.SIGSTOP)
    try:
        done = [b.wait_job(job_id, timeout=20) for job_id in ids]
        assert [d["status"] for d in done] == ["completed", "completed"]
        ran = runs(Path(log))
        wait_for(lambda: all(len(runs(Path(log))[i]) == 2 for i in ids), 10,
                 "a's workers to finish their copies too")
        ran = runs(Path(log))
        assert all({p for p in ran[i]} <= a_workers | b_workers for i in ids), ran
    finally:
        a.signal(signal.SIGCONT)
    wait_for(lambda: "rejoining" in a.log_text(), 20, "a to learn it lost its lease")
    assert "lapsed" in a.log_text()
    wait_for(lambda: not any(is_alive(p) for p in a_workers), 10, "a's workers to be stopped")
    back = wait_for(lambda: a.status()["cluster"], 20, "a to rejoin")
    assert back["host"] != first_host and a.proc is not None and a.proc.poll() is None
    alive = {h["id"] for h in b.status()["hosts"]}
    assert alive == {back["host"], b.status()["cluster"]["host"]}, alive
    assert a.wait_job(a.submit("add", {"a": 1, "b": 2})["id"])["result"] == 3
    after = [b.get(job_id) for job_id in ids]
    for before, now in zip(done, after):
        assert now["status"] == "completed" and now["finished_at"] == before["finished_at"]
        assert now["worker_pid"] in b_workers
    attempts = b.db_query("SELECT job_id, status FROM attempts ORDER BY seq")
    assert sorted(attempts) == sorted([(i, "interrupted") for i in ids]), attempts


def kill_rounds(pg: HQEnv, rounds: int) -> dict[str, Any]:
    """3 hosts; clients submit to all of them (below what the hosts can run, so that
    a rescued job does not wait behind a backlog); each round one host is killed
    (-9, with its workers), the others take its jobs over, and it starts again."""
    hs = hosts(pg, 3)
    log = pg.path("runs.log")
    acked: list[int] = []
    stop = threading.Event()
    errors: list[str] = []

    def client(host_index: int) -> None:
        n = 0
        while not stop.is_set():
            host = hs[host_index]
            try:
                reply = host.request("submit", task=f"{TASKS}.record",
                                     args={"log": log, "tag": f"c{host_index}", "sleep": 0.02},
                                     reply_timeout=5)
                time.sleep(0.03)  # about 75 jobs/s in all: under what 4 workers run
            except OSError:
                time.sleep(0.05)  # that host is down for now
                continue
            if reply.get("ok"):
                acked.append(reply["job"]["id"])
            elif reply["error"]["code"] not in ("draining", "store_error"):
                errors.append(str(reply))
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    rescue_times = []
    try:
        for round_ in range(rounds):
            wait_for(lambda: len(acked) > 60 * (round_ + 1), 20, "jobs to be submitted")
            victim = hs[round_ % 3]
            running = victim.status()["running_jobs"]
            workers = victim.worker_pids()
            running_ids = [r[0] for r in victim.db_query(
                "SELECT id FROM jobs WHERE status = 'running' AND owner ="
                " (SELECT id FROM hosts WHERE pid = ?)", (victim.pid,))]
            killed_at = time.monotonic()
            victim.kill9()
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            other = hs[(round_ + 1) % 3]
            for job_id in running_ids:
                reply = other.request("wait", job=job_id, timeout=15, reply_timeout=20)
                assert reply.get("ok") and reply["job"]["status"] == "completed", (
                    reply, other.db_query("SELECT id, status, owner, worker_pid, run_at FROM jobs"
                                          " WHERE id = ?", (job_id,)),
                    other.db_query("SELECT id, pid, lease_until FROM hosts"),
                    [(h.pid, h.status()["cluster"]) for h in hs if h is not victim])
            if running_ids:
                rescue_times.append(time.monotonic() - killed_at)
            del running
            victim.start_serving()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    for job_id in acked:
        reply = hs[0].request("wait", job=job_id, timeout=30, reply_timeout=35)
        assert reply.get("ok"), (reply, hs[0].db_query(
            "SELECT id, status, owner, worker_pid, run_at FROM jobs WHERE id = ?", (job_id,)),
            hs[0].db_query("SELECT id, pid, lease_until FROM hosts"))
    assert not errors, errors[:5]
    rows = hs[0].db_query("SELECT id, status FROM jobs")
    assert {r[0] for r in rows} >= set(acked)
    interrupted = {r[0] for r in hs[0].db_query(
        "SELECT job_id FROM attempts WHERE status = 'interrupted'")}
    twice = {i for i, pids in runs(Path(log)).items() if len(pids) > 1}
    assert twice <= interrupted, f"ran twice without being interrupted: {sorted(twice - interrupted)}"
    return {"acked": len(acked), "rescue_times": rescue_times, "twice": len(twice)}


@pytest.mark.timeout(120)
def test_a_killed_host_has_its_running_jobs_run_elsewhere(pg: HQEnv) -> None:
    """Two rounds of kill -9 of one of 3 hosts under load: every acknowledged job
    completes; the jobs the killed host was running complete elsewhere within
    6 s of the kill (a 5 s lease, renewals every second); only they ran twice."""
    result = kill_rounds(pg, 2)
    assert result["acked"] > 100
    assert all(t < 6.0 + 1.0 for t in result["rescue_times"]), result


@pytest.mark.torture
@pytest.mark.timeout(900)
def test_kill_one_of_three_hosts_twenty_rounds(pg: HQEnv) -> None:
    rounds = int(os.environ.get("HQ_HOST_ROUNDS", "20"))
    result = kill_rounds(pg, rounds)
    print(f"\nhosts torture: {rounds} rounds, {result['acked']} jobs acknowledged, 0 lost;"
          f" rescue after {min(result['rescue_times'] or [0]):.2f}-{max(result['rescue_times'] or [0]):.2f} s;"
          f" {result['twice']} jobs ran twice (each running at a kill)")


@pytest.mark.timeout(60)
def test_a_queue_cap_holds_across_hosts(pg: HQEnv) -> None:
    """[queues.capped] concurrency = 2 on 3 hosts of 2 workers: never more than 2 of
    its jobs run at once in the whole store, and they run on several hosts."""
    hs = hosts(pg, 3, config="""
        [queues.capped]
        concurrency = 2
        """)
    log = pg.path("runs.log")
    ids = []
    for i in range(12):  # submitted to every host in turn
        ids.append(hs[i % 3].submit("record", {"log": log, "tag": f"c{i}", "sleep": 0.3},
                                    queue="capped")["id"])
    most = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = hs[0].db_query("SELECT status, COUNT(*) FROM jobs WHERE queue = 'capped'"
                              " GROUP BY status")
        counts = {r[0]: r[1] for r in rows}
        most = max(most, counts.get("running", 0))
        if counts.get("completed", 0) == 12:
            break
        time.sleep(0.01)
    assert most <= 2, f"{most} jobs of a queue capped at 2 ran at once"
    assert most == 2
    for job_id in ids:
        assert hs[0].wait_job(job_id)["status"] == "completed"
    workers = {i: h.worker_pids() for i, h in enumerate(hs)}
    on = {i for i, pids in workers.items() for p in runs(Path(log)).values() if p[0] in pids}
    assert len(on) >= 2, on


@pytest.mark.timeout(60)
def test_a_watch_on_one_host_sees_the_progress_and_end_of_a_job_on_another(pg: HQEnv) -> None:
    a = pg.supervisor(workers=0, name="a")  # runs nothing: the job runs on b
    b = pg.supervisor(workers=1, name="b", start=False)
    b.pg_schema = a.pg_schema
    b.start()
    with a.conn() as c:
        ok(c.request("pause"))
        wait_for(lambda: b.status()["paused"] == ["*"], 5, "b to learn the pause")
        job = ok(c.request("submit", task=f"{TASKS}.slow", args={"seconds": 2.0, "steps": 8}))["job"]
        rid = c.send_op("watch", job=job["id"])
        assert c.read_for(rid) == {"id": rid, "ok": True, "watching": job["id"]}
        ok(c.request("resume"))
        events = []
        for event in c.events(rid, timeout=15):
            events.append(event)
            if event["event"] in ("completed", "failed", "cancelled", "expired"):
                break
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "completed", kinds
    fractions = [e["progress"] for e in events if e["event"] == "progress"]
    assert len(set(fractions)) >= 3 and fractions == sorted(fractions), fractions
    assert events[-1]["job"]["worker_pid"] in b.worker_pids()


@pytest.mark.timeout(60)
def test_a_retry_on_two_hosts_at_once_revives_the_job_once(pg: HQEnv) -> None:
    """A failed job retried through two hosts at the same moment: one retry wins (the
    job runs once more, on some host), the other is refused with invalid_state."""
    a, b = hosts(pg, 2)
    job = a.submit("fail", {"message": "no"}, retries=0)
    assert a.wait_job(job["id"])["status"] == "failed"
    for _ in range(5):
        replies: list[dict[str, Any]] = []
        barrier = threading.Barrier(2)

        def retry(host: Supervisor) -> None:
            barrier.wait()
            replies.append(host.request("retry", job=job["id"]))

        threads = [threading.Thread(target=retry, args=(h,)) for h in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        oks = [r for r in replies if r.get("ok")]
        assert len(oks) == 1, replies
        refused = [r for r in replies if not r.get("ok")]
        assert refused and refused[0]["error"]["code"] == "invalid_state", replies
        done = b.wait_job(job["id"])
        assert done["status"] == "failed" and done["attempts"] == 1, done
    attempts = a.db_query("SELECT COUNT(*) FROM attempts WHERE job_id = ?", (job["id"],))
    assert attempts[0][0] == 6  # the first run and one per round: never two at once
