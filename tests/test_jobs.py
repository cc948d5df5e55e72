"""One job's way: submit, run, result; failures, retries, delays, priorities, keys, abort."""

from __future__ import annotations

import os
import threading
import time

import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL

from conftest import TASKS, Conn, HQEnv, Supervisor, error_code, file_lines, ok, wait_for


@pytest.mark.timeout(30)
def test_submit_wait_result(sup: Supervisor) -> None:
    job = sup.submit("add", {"a": 2, "b": 3})
    assert job["status"] == "pending" and job["attempts"] == 0
    assert job["task"] == f"{TASKS}.add" and job["queue"] == "default"

    done = sup.wait_job(job["id"])
    assert done["status"] == "completed"
    assert done["result"] == 5
    assert done["error"] is None
    assert done["attempts"] == 1
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    assert done["worker_pid"] in sup.worker_pids()

    row = sup.db_job(job["id"])
    assert row["status"] == "completed" and row["result"] == "5" and row["attempts"] == 1


@pytest.mark.timeout(30)
def test_submit_with_wait_answers_once_the_job_ended(sup: Supervisor) -> None:
    reply = ok(sup.request("submit", task=f"{TASKS}.add", args={"a": 2, "b": 3}, wait=True))
    job = reply["job"]
    assert reply["duplicate"] is False
    assert job["status"] == "completed" and job["result"] == 5 and job["attempts"] == 1
    # Answered after the job's end was committed: the store says the same.
    row = sup.db_job(job["id"])
    assert row["status"] == "completed" and row["result"] == "5"

    failed = ok(sup.request("submit", task=f"{TASKS}.permanent", args={"message": "no"}, wait=30))
    assert failed["job"]["status"] == "failed" and failed["job"]["error"]["message"] == "no"

    # A job still running when `wait` runs out: the reply shows it as it stands; it
    # stays submitted and ends as any other.
    t0 = time.monotonic()
    slow = ok(sup.request("submit", task=f"{TASKS}.slow", args={"seconds": 1.0, "steps": 2}, wait=0.2))
    assert time.monotonic() - t0 < 0.9, "the reply waited for the end, not for `wait`"
    assert slow["job"]["status"] in ("pending", "running") and slow["duplicate"] is False
    assert sup.wait_job(slow["job"]["id"])["status"] == "completed"


@pytest.mark.timeout(30)
def test_waits_on_one_job_each_end_their_own_way(sup: Supervisor) -> None:
    """Several waits on one running job: one runs out (timeout), one's client goes
    away, the others hear the end; a wait after the end is answered from the store."""
    marker, release = sup.env.path("started"), sup.env.path("release")
    job = sup.submit("block", {"marker": marker, "release": release})
    wait_for(lambda: os.path.exists(marker), 10, "the job to start")
    a, b, gone = Conn(sup.socket), Conn(sup.socket), Conn(sup.socket)
    t0 = time.monotonic()
    short = error_code(a.request("wait", job=job["id"], timeout=0.2))
    assert short == "timeout" and time.monotonic() - t0 < 5
    waiting = [b.send_op("wait", job=job["id"]), b.send_op("wait", job=job["id"], timeout=30)]
    gone.send_op("wait", job=job["id"])
    submitted_waiting = b.send_op("submit", task=f"{TASKS}.add", args={"a": 1, "b": 1}, wait=True)
    gone.close()
    open(release, "w").close()
    for rid in waiting:
        assert ok(b.read_for(rid))["job"]["status"] == "completed"
    assert ok(b.read_for(submitted_waiting))["job"]["result"] == 2
    assert ok(a.request("wait", job=job["id"], timeout=0))["job"]["status"] == "completed"
    for c in (a, b):
        c.close()
    assert "Traceback" not in sup.log_text(), sup.log_text()[-3000:]


@pytest.mark.timeout(30)
def test_a_watcher_that_waits_hears_the_end_before_the_reply(sup: Supervisor) -> None:
    """On one connection, a watch of a job and a wait for it: the `completed` event
    comes before the wait's reply (both follow the commit of the end)."""
    marker, release = sup.env.path("started"), sup.env.path("release")
    job = sup.submit("block", {"marker": marker, "release": release})
    c = Conn(sup.socket)
    watch = c.send_op("watch", job=job["id"])
    assert ok(c.read_for(watch))
    wait_for(lambda: os.path.exists(marker), 10, "the job to start")
    waiting = c.send_op("wait", job=job["id"])
    open(release, "w").close()
    seen = []
    while not any(m.get("id") == waiting for m in seen):
        seen.append(c.read(timeout=10))
    kinds = [m.get("event", "reply") for m in seen if m.get("id") in (watch, waiting)]
    assert kinds[-2:] == ["completed", "reply"], seen
    c.close()


@pytest.mark.timeout(30)
def test_submit_with_wait_and_a_key_waits_for_the_existing_job(sup: Supervisor) -> None:
    first = sup.submit("slow", {"seconds": 0.5, "steps": 1}, key="k-wait")
    reply = ok(sup.request("submit", task=f"{TASKS}.slow", args={"seconds": 0.5, "steps": 1},
                           key="k-wait", wait=True))
    assert reply["duplicate"] is True
    assert reply["job"]["id"] == first["id"] and reply["job"]["status"] == "completed"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wait", [-1, "soon", [1], 10**9])
def test_submit_with_a_bad_wait_is_refused_and_stores_nothing(sup: Supervisor, wait: object) -> None:
    reply = sup.request("submit", task=f"{TASKS}.add", args={"a": 1, "b": 1}, wait=wait)
    assert error_code(reply) == "bad_request"
    assert "'wait'" in reply["error"]["message"]
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 0


@pytest.mark.timeout(30)
def test_failing_task_is_retried_then_fails_with_error(sup: Supervisor) -> None:
    job = sup.submit("fail", {"message": "boom 42"}, retries=2)
    assert job["max_attempts"] == 3

    done = sup.wait_job(job["id"])
    assert done["status"] == "failed"
    assert done["attempts"] == 3
    error = done["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "boom 42"
    assert "Traceback" in error["traceback"] and "raise ValueError(message)" in error["traceback"]

    row = sup.db_job(job["id"])
    assert row["status"] == "failed" and row["attempts"] == 3
    attempts = sup.db_query("SELECT attempt, status FROM attempts WHERE job_id = ? ORDER BY attempt",
                            (job["id"],))
    assert [tuple(a) for a in attempts] == [(1, "retrying"), (2, "retrying"), (3, "failed")]


@pytest.mark.timeout(30)
def test_permanent_fails_after_one_attempt(sup: Supervisor) -> None:
    job = sup.submit("permanent", {"message": "bad image"}, retries=5)
    done = sup.wait_job(job["id"])
    assert done["status"] == "failed"
    assert done["attempts"] == 1
    assert done["error"]["type"] == "Permanent"
    assert done["error"]["message"] == "bad image"
    assert sup.db_job(job["id"])["attempts"] == 1


@pytest.mark.timeout(30)
def test_non_serializable_result_fails_clearly(sup: Supervisor) -> None:
    job = sup.submit("unserializable", retries=3)
    done = sup.wait_job(job["id"])
    assert done["status"] == "failed"
    assert done["attempts"] == 1, "a result that cannot be stored will not be fixed by a retry"
    message = done["error"]["message"]
    assert "JSON" in message and "unserializable" in message, message
    assert done["result"] is None


@pytest.mark.timeout(30)
def test_unknown_task_is_refused(sup: Supervisor) -> None:
    reply = sup.request("submit", task=f"{TASKS}.nope", args={})
    assert error_code(reply) == "unknown_task"
    assert "nope" in reply["error"]["message"]
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 0


@pytest.mark.timeout(30)
def test_delayed_job_waits_for_its_time(sup: Supervisor) -> None:
    job = sup.submit("add", {"a": 1, "b": 1}, delay=1)
    assert job["run_at"] >= job["created_at"] + 0.99
    assert sup.get(job["id"])["status"] == "pending"
    stats = sup.call("stats", "stats")
    assert stats["scheduled"] == 1 and stats["pending"] == 0

    done = sup.wait_job(job["id"], timeout=10)
    assert done["status"] == "completed" and done["result"] == 2
    assert done["started_at"] >= job["run_at"], "the job started before its run_at"
    assert time.time() >= job["run_at"]


@pytest.mark.timeout(90)
def test_stats_tell_scheduled_from_pending_across_a_restart(sup: Supervisor) -> None:
    """stats counts pending jobs from the index and reads only the scheduled ones'
    due times (known from memory): the split must hold for paused queues, after a
    restart, and once a scheduled job is due."""
    ok(sup.request("pause", queue="held"))
    for _ in range(3):
        sup.submit("add", {"a": 1, "b": 1}, queue="held")
    sup.submit("add", {"a": 1, "b": 1}, queue="held", delay=600)
    soon = sup.submit("add", {"a": 1, "b": 1}, delay=6)  # still scheduled after the restart
    sup.submit("add", {"a": 2, "b": 2}, delay=600)

    def counts() -> tuple[int, int, int, int]:
        stats = sup.call("stats", "stats")
        held, default = stats["queues"]["held"], stats["queues"]["default"]
        return held["pending"], held["scheduled"], default["pending"], default["scheduled"]

    assert counts() == (3, 1, 0, 2)
    sup.stop()
    sup.start()
    assert counts() == (3, 1, 0, 2), "after a restart, from the store"
    assert sup.wait_job(soon["id"], timeout=30)["status"] == "completed"
    assert counts() == (3, 1, 0, 1)


@pytest.mark.timeout(120)
def test_stats_add_up_while_jobs_start_and_end(hq: HQEnv) -> None:
    """No index of the store lists running jobs: stats counts them in memory and
    the rest in a read snapshot of the store. Both must describe one moment, so
    the counts add up to every job at every sample while 4,000 jobs drain."""
    sup = hq.supervisor(workers=4)
    states = ("pending", "scheduled", "running", "completed", "failed", "cancelled", "expired")
    n = 0
    with sup.conn() as c:
        for _ in range(4):
            ok(c.request("submit_many", task=f"{TASKS}.sleeper", args=[{"seconds": 0.002}] * 1000,
                         reply="ids"))
            n += 1000
    wrong: list[tuple[int, dict[str, int]]] = []
    samples = most_running = 0
    deadline = time.monotonic() + 90
    while True:
        stats = sup.call("stats", "stats")
        samples += 1
        total = sum(stats[k] for k in states)
        if total != n:
            wrong.append((total - n, {k: stats[k] for k in ("pending", "running", "completed")}))
        most_running = max(most_running, stats["running"])
        if stats["completed"] == n:
            break
        assert time.monotonic() < deadline, f"the jobs did not drain: {stats}"
    assert not wrong, f"{len(wrong)} of {samples} samples do not add up to {n}: {wrong[:5]}"
    assert samples > 20 and most_running > 0, (samples, most_running)


@pytest.mark.timeout(90)
def test_jobs_read_back_from_the_store_are_handed_out_within_prefetch(hq: HQEnv) -> None:
    """Jobs whose rows the supervisor does not hold in memory (pending at start, or
    beyond its cache) are read from the store before they are handed out, and a
    worker still holds at most `prefetch` of them (those being read for it
    included). Once, every dispatch turn read another batch for a busy worker while
    the last was being read: thousands of jobs were handed out long before they could
    start (94,000 at once while a million drained), and the supervisor's memory grew
    with them. Held jobs stay pending in the store: only started ones read running,
    one per worker at most."""
    prefetch, workers = 256, 2  # the default prefetch
    sup = hq.supervisor(workers=workers)
    assert sup.call("pause", "paused") == ["*"]
    n = 10_000
    with sup.conn() as c:
        for _ in range(n // 1000):
            ok(c.request("submit_many", task=f"{TASKS}.noop", args=[{}] * 1000, reply="ids"))
    assert sup.stop() == 0
    sup.start()  # the pause is kept; the jobs come from the store
    assert sup.call("resume", "paused") == []
    most_handed = most_stored = samples = 0
    deadline = time.monotonic() + 60
    with sup.conn() as c:
        while True:
            st = ok(c.request("status"))["status"]
            most_handed = max(most_handed, st["running_jobs"] + st["held_jobs"])
            ((running, completed),) = sup.db_query(
                "SELECT SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) FROM jobs")
            most_stored = max(most_stored, running or 0)
            samples += 1
            if completed == n:
                break
            assert time.monotonic() < deadline, f"{completed} of {n} jobs completed"
    assert most_handed <= workers * prefetch, f"{most_handed} jobs handed to {workers} workers at once"
    assert most_stored <= workers, f"{most_stored} jobs stored as running at once on {workers} workers"
    assert samples > 20 and most_handed > workers, (samples, most_handed)


@pytest.mark.timeout(30)
def test_priority_order(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    log = hq.path("order.log")
    assert sup.call("pause", "paused") == ["*"]
    # (tag, priority) in submit order; equal priorities run in submit order.
    plan = [("a", 0), ("b", 5), ("c", -3), ("d", 5), ("e", 10), ("f", 0)]
    ids = [sup.submit("record", {"log": log, "tag": tag}, priority=prio)["id"] for tag, prio in plan]
    assert sup.call("resume", "paused") == []
    for job_id in ids:
        assert sup.wait_job(job_id)["status"] == "completed"
    order = [line.split()[0] for line in file_lines(log)]
    assert order == ["e", "b", "d", "a", "f", "c"]


@pytest.mark.timeout(30)
def test_idempotency_key_returns_the_same_job(sup: Supervisor) -> None:
    with sup.conn() as c:
        first = ok(c.request("submit", task=f"{TASKS}.add", args={"a": 1, "b": 2}, key="k1", delay=60))
        second = ok(c.request("submit", task=f"{TASKS}.add", args={"a": 9, "b": 9}, key="k1", delay=60))
    assert first["duplicate"] is False
    assert second["duplicate"] is True
    assert second["job"]["id"] == first["job"]["id"]
    assert second["job"]["args"] == {"a": 1, "b": 2}
    assert sup.db_query("SELECT COUNT(*) FROM jobs WHERE key = 'k1'")[0][0] == 1


@pytest.mark.timeout(60)
def test_idempotency_key_under_concurrent_submits(sup: Supervisor) -> None:
    n = 30
    conns = [Conn(sup.socket) for _ in range(n)]
    barrier = threading.Barrier(n)
    replies: list[dict] = [{} for _ in range(n)]

    def submit(i: int) -> None:
        barrier.wait()
        replies[i] = conns[i].request("submit", task=f"{TASKS}.add", args={"a": i, "b": 0},
                                      key="same-key", delay=60)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in conns:
        c.close()

    for r in replies:
        ok(r)
    ids = {r["job"]["id"] for r in replies}
    assert len(ids) == 1, f"concurrent submits with one key made jobs {ids}"
    assert sum(1 for r in replies if r["duplicate"] is False) == 1
    assert sup.db_query("SELECT COUNT(*) FROM jobs WHERE key = 'same-key'")[0][0] == 1
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 1


@pytest.mark.timeout(30)
def test_abort_pending_job_cancels_at_once(sup: Supervisor) -> None:
    job = sup.submit("add", {"a": 1, "b": 2}, delay=60)
    aborted = sup.call("abort", "job", job=job["id"])
    assert aborted["status"] == "cancelled"
    assert sup.db_job(job["id"])["status"] == "cancelled"
    assert sup.wait_job(job["id"], timeout=5)["status"] == "cancelled"
    # Aborting again: it has already ended.
    assert error_code(sup.request("abort", job=job["id"])) == "invalid_state"


@pytest.mark.timeout(30)
def test_abort_running_job_that_checks_aborted(hq: HQEnv, sup: Supervisor) -> None:
    marker = hq.path("started")
    job = sup.submit("abortable", {"marker": marker, "seconds": 20})
    wait_for(lambda: file_lines(marker), 10, "the job to start")
    worker_pid = int(file_lines(marker)[0].split()[2])

    asked = time.monotonic()
    reply = sup.call("abort", "job", job=job["id"])
    assert reply["abort_requested"] is True
    done = sup.wait_job(job["id"], timeout=15)
    took = time.monotonic() - asked

    assert done["status"] == "cancelled"
    assert done["error"]["type"] == "Aborted"
    assert took < 5, f"the task checks ctx.aborted every 10 ms, yet cancelling took {took:.1f} s"
    # It stopped by itself: its worker was not killed.
    assert worker_pid in sup.worker_pids()
    row = sup.db_job(job["id"])
    assert row["status"] == "cancelled" and row["abort_requested"] == 1


@pytest.mark.timeout(30)
def test_new_jobs_run_after_a_scheduled_job_is_aborted(sup: Supervisor) -> None:
    scheduled = sup.submit("add", {"a": 1, "b": 1}, delay=60)
    assert sup.call("abort", "job", job=scheduled["id"])["status"] == "cancelled"
    job = sup.submit("add", {"a": 2, "b": 3})
    done = sup.wait_job(job["id"], timeout=5)
    assert done["status"] == "completed" and done["result"] == 5


@pytest.mark.timeout(30)
def test_deadline_expires_a_job_that_could_not_start(sup: Supervisor) -> None:
    job = sup.submit("add", {"a": 1, "b": 1}, delay=30, deadline=0.3)
    done = sup.wait_job(job["id"], timeout=5)
    assert done["status"] == "expired"
    assert done["attempts"] == 0 and done["started_at"] is None
    assert done["error"]["type"] == "Expired"
    assert sup.db_job(job["id"])["status"] == "expired"
    # The queue goes on.
    after = sup.submit("add", {"a": 2, "b": 2})
    assert sup.wait_job(after["id"], timeout=5)["result"] == 4


@pytest.mark.timeout(30)
def test_retry_of_an_aborted_scheduled_job_runs_it(sup: Supervisor) -> None:
    job = sup.submit("add", {"a": 3, "b": 3}, delay=60)
    assert sup.call("abort", "job", job=job["id"])["status"] == "cancelled"
    assert sup.call("retry", "job", job=job["id"])["status"] in ("pending", "running", "completed")
    done = sup.wait_job(job["id"], timeout=5)
    assert done["status"] == "completed" and done["result"] == 6


@pytest.mark.timeout(30)
def test_time_limit_fails_the_attempt(hq: HQEnv, sup: Supervisor) -> None:
    marker, release = hq.path("started"), hq.path("release")
    job = sup.submit("block", {"marker": marker, "release": release, "seconds": 20},
                     timeout=0.5, retries=0)
    done = sup.wait_job(job["id"], timeout=10)
    assert done["status"] == "failed"
    assert done["error"]["type"] == "TimeLimit"
    assert done["error"]["message"].startswith("time limit exceeded after 0.5 s")
    assert done["finished_at"] - done["started_at"] < 5
