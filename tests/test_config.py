"""The configuration file on a real supervisor: broken files refused at start (exit 2,
the key and the line named) and at reload (the running configuration stays), a new
limit applied by SIGHUP while jobs run, and per-queue pauses kept across a restart."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import TASKS, HQEnv, Supervisor, error_code, file_lines, ok, wait_for

EPS = 0.005


def write_config(hq: HQEnv, text: str, name: str = "hq.toml") -> Path:
    path = hq.dir / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def rows_of(sup: Supervisor, ids: list[int]) -> list[dict[str, Any]]:
    marks = ",".join("?" * len(ids))
    return [dict(r) for r in sup.db_query(
        f"SELECT id, status, attempts, worker_pid, started_at, finished_at FROM jobs"
        f" WHERE id IN ({marks}) ORDER BY started_at, id", tuple(ids))]


# ---------------------------------------------------------------------------
# refused at start


BROKEN = {
    "queue-concurrency-0": ("[queues.default]\nconcurrency = 0\n", "queues.default.concurrency", 2),
    "workers-count-string": ('[workers]\ncount = "x"\n', "workers.count", 2),
    "unknown-key-in-section": ("[workers]\nprefetch = 1\nbogus = 1\n", "workers.bogus", 3),
    "unknown-key-in-queue-table": ("[queues.default]\nconcurrency = 1\nburst = 3\n", "burst", 3),
    "bad-task-limit": (f'[limits."{TASKS}.add"]\nconcurrency = 1\nrate = "often"\n',
                       f'limits."{TASKS}.add".rate', 3),
    "bad-cron": (f'[schedules.nightly]\ntask = "{TASKS}.noop"\ncron = "every night"\n',
                 "schedules.nightly.cron", 3),
    "socket-mode-locking-out-the-owner": ('[store]\ndurability = "normal"\n[socket]\nmode = "0066"\n',
                                          "socket.mode", 4),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_config_refused_at_start(hq: HQEnv, case: str) -> None:
    text, key, line = BROKEN[case]
    path = write_config(hq, text)
    sup = hq.supervisor(workers=1, start=False)
    sup.start("--config", str(path), wait=False)
    code = sup.wait_exit(15)
    out = sup.log_text()
    assert code == 2, f"exit code {code}:\n{out}"
    assert key in out, out
    assert f"{path} line {line}:" in out, f"the message does not name line {line}:\n{out}"
    assert not sup.socket.exists(), "a refused configuration must not start serving"
    assert sup.session() == []


@pytest.mark.timeout(30)
def test_broken_config_from_environment_refused(hq: HQEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(hq, "[shutdown]\ngrace = 5\n\n[queues.default]\nconcurrency = 0\n")
    monkeypatch.setenv("HOSTQUEUE_CONFIG", str(path))
    sup = hq.supervisor(workers=1, start=False)
    sup.start(wait=False)
    assert sup.wait_exit(15) == 2
    out = sup.log_text()
    assert "queues.default.concurrency" in out and f"{path} line 5:" in out, out


# ---------------------------------------------------------------------------
# reload


@pytest.mark.timeout(40)
def test_reload_applies_a_new_limit_while_jobs_run(hq: HQEnv) -> None:
    path = write_config(hq, """
        [queues.default]
        concurrency = 3
        """)
    sup = hq.supervisor(workers=3, start=False)
    sup.start("--config", str(path))
    old_pids = sup.worker_pids()
    marker, release = hq.path("marker"), hq.path("release")
    running = [sup.submit("block", {"marker": marker, "release": release})["id"] for _ in range(3)]
    wait_for(lambda: len(file_lines(marker)) == 3, 10, "three jobs to run at once (concurrency 3)")

    path.write_text("[queues.default]\nconcurrency = 1\n")
    sup.signal(signal.SIGHUP)
    wait_for(lambda: sup.status()["shaping"]["queues"]["default"]["concurrency"] == 1, 10,
             "the reload to apply concurrency 1")
    assert sup.status()["shaping"]["queues"]["default"]["running"] == 3, "held jobs count against the new limit"

    later = [sup.submit("sleeper", {"seconds": 0.3})["id"] for _ in range(3)]
    # Fresh workers are up and idle, yet the new jobs wait: three are held, the limit is 1.
    wait_for(lambda: sum(1 for w in sup.status()["workers"] if w["state"] == "idle") >= 3, 10,
             "the replacement workers to be idle")
    for job_id in later:
        job = sup.get(job_id)
        assert job["status"] == "pending", job
        assert "concurrency limit 1" in job["waiting"], job["waiting"]
    assert [sup.get(j)["status"] for j in running] == ["running"] * 3

    Path(release).touch()
    for job_id in running:
        job = sup.wait_job(job_id)
        assert job["status"] == "completed" and job["attempts"] == 1, job
        assert job["worker_pid"] in old_pids, "a running job moved to another worker"
        assert job["result"]["released"] is True
    for job_id in later:
        assert sup.wait_job(job_id)["status"] == "completed"
    old_end = max(r["finished_at"] for r in rows_of(sup, running))
    rows = rows_of(sup, later)
    assert rows[0]["started_at"] >= old_end - EPS, "a new job started while three were held"
    for prev, nxt in zip(rows, rows[1:]):
        assert nxt["started_at"] >= prev["finished_at"] - EPS, f"two jobs at once under concurrency 1: {prev} {nxt}"
    assert not (old_pids & {r["worker_pid"] for r in rows}), "new jobs run on the fresh workers"


@pytest.mark.timeout(40)
def test_reload_applies_a_new_retention(hq: HQEnv) -> None:
    """retention.completed lowered by a reload deletes completed jobs on the new
    schedule (the retention part kept reading the configuration it started with)."""
    path = write_config(hq, """
        [retention]
        completed = 3600
        """)
    sup = hq.supervisor(workers=1, start=False)
    sup.start("--config", str(path))
    job = sup.submit("noop")
    assert sup.wait_job(job["id"])["status"] == "completed"
    path.write_text("[retention]\ncompleted = 1\n")
    sup.signal(signal.SIGHUP)
    wait_for(lambda: not sup.db_query("SELECT id FROM jobs WHERE id = ?", (job["id"],)), 15,
             "the completed job to be deleted under the reloaded retention of 1 s")


@pytest.mark.timeout(40)
def test_broken_reload_keeps_the_running_configuration(hq: HQEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(hq, """
        [workers]
        count = 2

        [queues.default]
        concurrency = 2
        """)
    monkeypatch.setenv("HOSTQUEUE_CONFIG", str(path))
    sup = hq.supervisor(workers=None)
    pids = sup.worker_pids()
    assert len(pids) == 2
    assert sup.status()["shaping"]["queues"]["default"]["concurrency"] == 2

    path.write_text("[workers]\ncount = 2\n\n[queues.default]\nconcurrency = 0\n")
    reply = sup.request("reload")
    assert error_code(reply) == "bad_request"
    message = reply["error"]["message"]
    assert "queues.default.concurrency" in message and "line 5" in message, message
    assert "running configuration stays" in message

    path.write_text('[workers]\ncount = "x"\n\n[queues.default]\nconcurrency = 1\n')
    sup.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in sup.log_text() and "workers.count" in sup.log_text(), 10,
             "the SIGHUP reload to be refused in the log")

    st = sup.status()
    assert st["state"] == "running"
    assert st["shaping"]["queues"]["default"]["concurrency"] == 2, "the limit changed after a refused reload"
    assert st["target_workers"] == 2
    assert sup.worker_pids() == pids, "a refused reload replaced workers"
    assert all(w["state"] == "idle" for w in st["workers"])

    # The running limit still acts: two of three blocking jobs run, the third waits.
    marker, release = hq.path("marker"), hq.path("release")
    ids = [sup.submit("block", {"marker": marker, "release": release})["id"] for _ in range(3)]
    wait_for(lambda: len(file_lines(marker)) == 2, 10, "two jobs to run")
    waiting = [j for j in (sup.get(i) for i in ids) if j["status"] == "pending"]
    assert len(waiting) == 1 and "concurrency limit 2" in waiting[0]["waiting"], waiting
    Path(release).touch()
    for job_id in ids:
        assert sup.wait_job(job_id)["status"] == "completed"
    assert {r["worker_pid"] for r in rows_of(sup, ids)} <= pids


# ---------------------------------------------------------------------------
# pauses kept across a restart


@pytest.mark.timeout(40)
def test_queue_pause_persists_across_restart(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    assert ok(sup.request("pause", queue="q"))["paused"] == ["q"]
    before = sup.submit("noop", queue="q")["id"]
    assert sup.stop() == 0

    sup.start()
    st = sup.status()
    assert st["paused"] == ["q"], "the pause was lost in the restart"
    after = sup.submit("noop", queue="q")["id"]
    # Another queue runs: the worker is free, yet q's jobs do not start.
    other = sup.submit("noop")["id"]
    assert sup.wait_job(other)["status"] == "completed"
    t = time.time()
    wait_for(lambda: time.time() - t > 0.5, 2, "half a second with q paused")
    for job_id in (before, after):
        job = sup.get(job_id)
        assert job["status"] == "pending", job
        assert "paused" in job["waiting"], job["waiting"]
    rows = rows_of(sup, [before, after])
    assert all(r["started_at"] is None for r in rows), rows

    assert ok(sup.request("resume", queue="q"))["paused"] == []
    for job_id in (before, after):
        assert sup.wait_job(job_id, 10)["status"] == "completed"
    assert sup.stop() == 0
    sup.start()
    assert sup.status()["paused"] == []


@pytest.mark.timeout(60)
def test_socket_mode_from_the_file(hq: HQEnv) -> None:
    """[socket] mode sets the socket's permissions; the peer check still applies."""
    import os
    import stat

    path = write_config(hq, """
        [socket]
        mode = "0640"
        """)
    sup = hq.supervisor(workers=1, start=False)
    sup.start("--config", str(path))
    assert stat.S_IMODE(os.stat(sup.socket).st_mode) == 0o640
    assert ok(sup.request("ping"))
