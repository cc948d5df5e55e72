"""The pool's size: the scale op, SIGTTIN/SIGTTOU, retiring busy workers, persistence,
and no zombies after replacements."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from conftest import HQEnv, Supervisor, error_code, file_lines, is_alive, title, wait_for


@pytest.mark.timeout(40)
def test_scale_op_up_and_down(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    before = sup.wait_workers(2)

    assert sup.call("scale", "scale", n=4) == {"previous": 2, "target": 4}
    four = sup.wait_workers(4)
    assert before < four, "scaling up replaced workers instead of adding"
    wait_for(lambda: all(w["state"] == "idle" for w in sup.status()["workers"]), 10,
             "the new workers to be idle")
    assert sup.status()["target_workers"] == 4

    assert sup.call("scale", "scale", n=1) == {"previous": 4, "target": 1}
    one = sup.wait_workers(1)
    assert one < four
    st = sup.status()
    assert st["target_workers"] == 1
    wait_for(lambda: len(sup.status()["workers"]) == 1, 5, "status to list one worker")

    # The pool still works at its new size.
    job = sup.submit("add", {"a": 20, "b": 22})
    assert sup.wait_job(job["id"])["result"] == 42


@pytest.mark.timeout(30)
def test_scale_out_of_range_is_refused(sup: Supervisor) -> None:
    for n in (-1, 257):
        assert error_code(sup.request("scale", n=n)) == "bad_request"
    assert error_code(sup.request("scale", n="3")) == "bad_request"
    assert error_code(sup.request("scale")) == "bad_request"
    assert sup.status()["target_workers"] == 2
    assert len(sup.wait_workers(2)) == 2


@pytest.mark.timeout(40)
def test_sigttin_and_sigttou_add_and_remove_one(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    sup.wait_workers(2)
    sup.signal(signal.SIGTTIN)
    sup.wait_workers(3)
    sup.signal(signal.SIGTTIN)
    sup.wait_workers(4)
    assert sup.status()["target_workers"] == 4
    # One signal at a time: the kernel merges a signal sent while the same one is pending.
    for n in (3, 2, 1):
        sup.signal(signal.SIGTTOU)
        sup.wait_workers(n)
    assert sup.status()["target_workers"] == 1
    assert sup.ping()["pid"] == sup.pid


@pytest.mark.timeout(40)
def test_retiring_busy_worker_finishes_its_job(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    marker, release = hq.path("started"), hq.path("release")
    jobs = [sup.submit("block", {"marker": marker, "release": release}) for _ in range(2)]
    wait_for(lambda: len(file_lines(marker)) == 2, 10, "both jobs to run")
    busy = {int(line.split()[2]) for line in file_lines(marker)}
    assert len(busy) == 2

    sup.call("scale", "scale", n=1)
    retiring = wait_for(
        lambda: [w for w in sup.status()["workers"] if w["state"] == "retiring"], 10,
        "one worker to be retiring",
    )
    assert len(retiring) == 1 and retiring[0]["pid"] in busy
    # Both still run their job: nobody was killed to shrink the pool.
    assert all(is_alive(pid) for pid in busy)
    assert {j["id"] for j in (sup.get(j["id"]) for j in jobs) if j["status"] == "running"} == {
        j["id"] for j in jobs
    }

    open(release, "w").close()
    for job in jobs:
        done = sup.wait_job(job["id"])
        assert done["status"] == "completed", done
        assert done["attempts"] == 1
        assert done["result"]["released"] is True
    remaining = sup.wait_workers(1)
    assert remaining < busy
    assert not is_alive(retiring[0]["pid"])


@pytest.mark.timeout(40)
def test_target_size_persists_across_restart(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    sup.call("scale", "scale", n=3)
    sup.wait_workers(3)
    assert sup.stop() == 0

    sup.start(workers=None)  # no --workers: the size kept in the store
    assert sup.status()["target_workers"] == 3
    assert len(sup.wait_workers(3)) == 3


@pytest.mark.timeout(60)
def test_no_zombies_after_worker_replacements(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    gone: set[int] = set()
    start = sup.wait_workers(2)

    sup.call("scale", "scale", n=4)
    four = sup.wait_workers(4)
    sup.call("scale", "scale", n=1)
    one = sup.wait_workers(1)
    gone |= four - one
    sup.call("scale", "scale", n=3)
    three = sup.wait_workers(3)

    victim = sorted(three)[0]
    os.kill(victim, signal.SIGKILL)
    gone.add(victim)
    after = wait_for(
        lambda: (lambda p: p if len(p) == 3 and victim not in p else None)(sup.worker_pids()),
        15, "the killed worker to be replaced",
    )
    gone |= (start | four | three) - after
    assert len(gone) >= 4

    wait_for(lambda: not sup.zombie_children(), 5, "no zombie children of the supervisor")
    for pid in gone:
        assert not is_alive(pid), f"worker {pid} should have exited"
    assert sup.zombie_children() == []
    assert sup.ping()["pid"] == sup.pid


@pytest.mark.timeout(30)
def test_process_titles(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    proc = psutil.Process(sup.pid)
    wait_for(lambda: title(proc).startswith("hostqueue supervisor"), 5, "the supervisor's title")
    assert os.path.abspath(sup.store) in title(proc)

    workers = sup.workers()
    assert len(workers) == 2
    wait_for(lambda: all(title(w).startswith("hostqueue worker") for w in workers), 5,
             f"worker titles (now {[title(w) for w in workers]})")

    marker, release = hq.path("started"), hq.path("release")
    job = sup.submit("block", {"marker": marker, "release": release})
    wait_for(lambda: file_lines(marker), 10, "the job to start")
    busy = psutil.Process(int(file_lines(marker)[0].split()[2]))
    wait_for(lambda: f"job {job['id']}" in title(busy), 5, f"the busy worker's title (now {title(busy)!r})")
    assert title(busy).startswith("hostqueue worker")
    open(release, "w").close()
    sup.wait_job(job["id"])
