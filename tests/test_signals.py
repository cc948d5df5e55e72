"""Signals to the supervisor: HUP (reload), TERM (drain), QUIT (fast stop)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from conftest import TASKS, HQEnv, error_code, file_lines, wait_for


@pytest.mark.timeout(60)
def test_hup_replaces_every_worker_without_losing_jobs(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    old = sup.wait_workers(2)
    marker, release, log = hq.path("started"), hq.path("release"), hq.path("runs.log")

    running = sup.submit("block", {"marker": marker, "release": release})
    wait_for(lambda: file_lines(marker), 10, "the long job to start")
    # Short jobs queued behind it: the idle worker holds several when the HUP comes.
    before = [sup.submit("record", {"log": log, "tag": f"before-{i}", "sleep": 0.05})["id"]
              for i in range(12)]
    sup.signal(signal.SIGHUP)
    after = [sup.submit("record", {"log": log, "tag": f"after-{i}"})["id"] for i in range(12)]

    # Fresh workers come while the old busy one still runs its job.
    wait_for(lambda: len(sup.worker_pids() - old) == 2, 15, "two fresh workers")
    assert sup.get(running["id"])["status"] == "running"

    open(release, "w").close()
    done = sup.wait_job(running["id"])
    assert done["status"] == "completed", done
    assert done["attempts"] == 1
    assert done["result"]["released"] is True

    for job_id in before + after:
        job = sup.wait_job(job_id)
        assert job["status"] == "completed", job
        assert job["attempts"] == 1, job
    runs = Counter(line.split()[0] for line in file_lines(log))
    assert runs == Counter({f"{w}-{i}": 1 for w in ("before", "after") for i in range(12)})

    new = sup.wait_workers(2)
    assert not (new & old), f"old workers {new & old} survived the reload"
    assert sup.status()["target_workers"] == 2
    assert sup.db_query("SELECT COUNT(*) FROM jobs WHERE status != 'completed'")[0][0] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_sigterm_drains_running_job_then_exits_0(hq: HQEnv, sig: int) -> None:
    sup = hq.supervisor(workers=2, grace=20)
    marker, release = hq.path("started"), hq.path("release")
    job = sup.submit("block", {"marker": marker, "release": release})
    wait_for(lambda: file_lines(marker), 10, "the job to start")

    sup.signal(sig)
    wait_for(lambda: sup.status()["state"] == "draining", 5, "status to say draining")
    assert sup.ping()["state"] == "draining"
    reply = sup.request("submit", task="hqtasks.add", args={"a": 1, "b": 2})
    assert error_code(reply) == "draining"
    assert sup.proc.poll() is None, "the supervisor left before its running job ended"

    open(release, "w").close()
    assert sup.wait_exit(15) == 0

    row = sup.db_job(job["id"])
    assert row["status"] == "completed"
    assert row["attempts"] == 1
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 1, "the refused submit was stored"
    wait_for(lambda: not sup.session(), 5, "every worker to exit with the supervisor")


@pytest.mark.timeout(60)
def test_sigterm_past_grace_puts_job_back_uncharged(hq: HQEnv) -> None:
    grace = 1.5
    sup = hq.supervisor(workers=1, grace=grace)
    marker, release = hq.path("started"), hq.path("release")
    job = sup.submit("block", {"marker": marker, "release": release, "seconds": 60})
    wait_for(lambda: file_lines(marker), 10, "the job to start")

    sent = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(grace + 10) == 0
    took = time.monotonic() - sent
    assert grace * 0.9 <= took <= grace + 5, f"exited {took:.2f} s after SIGTERM (grace {grace} s)"

    row = sup.db_job(job["id"])
    assert row["status"] == "pending"
    assert row["attempts"] == 0, "an attempt stopped by the drain must not be charged"
    wait_for(lambda: not sup.session(), 5, "every worker to exit with the supervisor")

    open(release, "w").close()
    sup.start()
    done = sup.wait_job(job["id"])
    assert done["status"] == "completed"
    assert done["attempts"] == 1
    assert len(file_lines(marker)) == 2


@pytest.mark.timeout(60)
def test_sigquit_stops_fast_and_requeues(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1, grace=30)
    marker, release = hq.path("started"), hq.path("release")
    job = sup.submit("block", {"marker": marker, "release": release, "seconds": 60})
    wait_for(lambda: file_lines(marker), 10, "the job to start")

    sent = time.monotonic()
    sup.signal(signal.SIGQUIT)
    assert sup.wait_exit(10) == 0
    assert time.monotonic() - sent < 5, "SIGQUIT waited as if it were a drain"

    row = sup.db_job(job["id"])
    assert row["status"] == "pending"
    wait_for(lambda: not sup.session(), 5, "every worker to exit with the supervisor")

    open(release, "w").close()
    sup.start()
    assert sup.wait_job(job["id"])["status"] == "completed"


@pytest.mark.timeout(60)
def test_sigterm_gives_back_held_jobs_without_starting_them(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1, grace=20)
    marker, release, log = hq.path("started"), hq.path("release"), hq.path("runs.log")
    # Paused, then resumed: the one worker takes the long job and holds the rest.
    sup.call("pause", "paused")
    long_job = sup.submit("block", {"marker": marker, "release": release})
    held = [sup.submit("record", {"log": log, "tag": f"h{i}"})["id"] for i in range(4)]
    sup.call("resume", "paused")
    wait_for(lambda: file_lines(marker), 10, "the long job to start")

    sup.signal(signal.SIGTERM)
    wait_for(lambda: sup.status()["state"] == "draining", 5, "status to say draining")
    open(release, "w").close()
    assert sup.wait_exit(15) == 0

    assert sup.db_job(long_job["id"])["status"] == "completed"
    for job_id in held:
        row = sup.db_job(job_id)
        assert (row["status"], row["attempts"]) == ("pending", 0), dict(row)
    assert file_lines(log) == [], "a job started during the drain"

    sup.start()
    for job_id in held:
        done = sup.wait_job(job_id)
        assert done["status"] == "completed" and done["attempts"] == 1
    assert sorted(line.split()[0] for line in file_lines(log)) == ["h0", "h1", "h2", "h3"]


@pytest.mark.timeout(60)
def test_hup_loads_new_task_code_and_refuses_a_broken_module(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    old = sup.wait_workers(2)
    source = hq.tasks_path.read_text()

    hq.tasks_path.write_text(source + "\n\n@hostqueue.task\ndef added(ctx):\n    return 'new code'\n")
    sup.signal(signal.SIGHUP)
    wait_for(lambda: sup.request("submit", task="hqtasks.added", delay=3600)["ok"], 10,
             "the new task to be known")
    job = sup.submit("added")
    assert sup.wait_job(job["id"])["result"] == "new code"
    # Fresh workers, done importing (so that breaking the file below cannot reach them).
    st = wait_for(lambda: (lambda st: st if len(st["workers"]) == 2 and all(
        w["state"] == "idle" and w["pid"] not in old for w in st["workers"]) else None)(sup.status()),
        10, "two fresh idle workers")
    fresh = {w["pid"] for w in st["workers"]}
    assert sup.worker_pids() == fresh

    hq.tasks_path.write_text(source + "\n\nthis is not python (\n")
    sup.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in sup.log_text(), 10, "the reload to be refused in the log")
    reply = sup.request("reload")
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert "hqtasks" in reply["error"]["message"]
    # The running tasks and workers stay.
    assert sup.worker_pids() == fresh
    assert sup.wait_job(sup.submit("added")["id"])["result"] == "new code"
    assert sup.wait_job(sup.submit("add", {"a": 1, "b": 2})["id"])["result"] == 3


@pytest.mark.timeout(60)
def test_sigterm_to_a_worker_finishes_its_job_and_it_is_replaced(hq: HQEnv) -> None:
    """TERM sent to a worker itself (not the supervisor): an idle one exits at once,
    a busy one after its job; either way the pool is whole again."""
    import os

    sup = hq.supervisor(workers=1)
    [idle] = sup.wait_workers(1)
    os.kill(idle, signal.SIGTERM)  # waiting on its job channel: woken, it exits
    wait_for(lambda: sup.worker_pids() and idle not in sup.worker_pids(), 10,
             "the idle worker to exit on TERM and be replaced")

    [busy] = sup.wait_workers(1)
    marker, release = hq.path("started"), hq.path("release")
    job = sup.submit("block", {"marker": marker, "release": release})
    wait_for(lambda: file_lines(marker), 10, "the job to start")
    os.kill(busy, signal.SIGTERM)
    open(release, "w").close()
    done = sup.wait_job(job["id"])
    # Finished by the worker that got TERM, in its first attempt: it did not die first.
    assert done["status"] == "completed" and done["attempts"] == 1, done
    assert done["worker_pid"] == busy, done
    wait_for(lambda: sup.worker_pids() and busy not in sup.worker_pids(), 10,
             "the busy worker to exit after its job and be replaced")
    assert sup.wait_job(sup.submit("add", {"a": 1, "b": 2})["id"])["result"] == 3


@pytest.mark.timeout(60)
def test_hup_gives_back_at_once_the_jobs_a_busy_worker_was_handed_ahead(hq: HQEnv) -> None:
    """Fast jobs handed to a busy worker ahead of time (prefetch) wait, not started, in
    it; when the worker is retired they go back at once, uncharged, and run elsewhere
    while its long job goes on."""
    sup = hq.supervisor(workers=1)
    marker, release = hq.path("started"), hq.path("release")
    open(release, "w").close()
    for _ in range(5):  # `block` measured fast: several are handed out together
        sup.wait_job(sup.submit("block", {"marker": hq.path("warm"), "release": release})["id"])
    os.unlink(release)
    log = hq.path("ahead")
    jobs = sup.call("submit_many", "jobs", task=f"{TASKS}.block",
                    args=[{"marker": marker, "release": release}]
                    + [{"marker": log, "release": hq.path("warm")}] * 5)
    long_job, ahead = jobs[0], [j["id"] for j in jobs[1:]]
    wait_for(lambda: file_lines(marker), 10, "the long job to start")
    [old] = sup.worker_pids()
    wait_for(lambda: sup.status()["workers"][0]["held"] == 5, 10,
             "the busy worker to hold the fast jobs, not started")

    sup.signal(signal.SIGHUP)
    for job_id in ahead:
        done = sup.wait_job(job_id, timeout=15)
        assert done["status"] == "completed" and done["attempts"] == 1, done
        assert done["worker_pid"] != old, done
    assert sup.get(long_job["id"])["status"] == "running", "the long job did not go on"

    open(release, "w").close()
    done = sup.wait_job(long_job["id"])
    assert done["status"] == "completed" and done["attempts"] == 1 and done["worker_pid"] == old
