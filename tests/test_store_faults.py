"""Store faults (issue 5): a full disk under a running supervisor, a read-only store and a
corrupt store at start. The disk is a small tmpfs (these tests need root and mount; they
skip where mounting is not allowed). What each test proves is in docs/reliability.md.

No client ever gets ``ok: true`` for a job that is not in the store: the disk-full test
reads the store file for every acknowledged id, and checks that no refused job shows up
later.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, TASKS, HQEnv, error_code, ok, wait_for

MIB = 1024 * 1024
START_DEADLINE = 8.0  # a supervisor that refuses its store exits well within this


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[reliability] {text}", flush=True)


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=30)


@pytest.fixture
def mounts(hq: HQEnv) -> Iterator[Callable[..., None]]:
    """``mount(*args)`` runs mount(8) and remembers the target (the last argument), which is
    unmounted at the end, after every process of the test is gone. Skips the test if the
    first mount is not allowed here."""
    targets: list[str] = []

    def mount(*args: str) -> None:
        done = run("mount", *args)
        if done.returncode != 0:
            if not targets:
                pytest.skip(f"cannot mount here: {done.stderr.strip()}")
            raise AssertionError(f"mount {' '.join(args)}: {done.stderr}")
        if args[-1] not in targets:
            targets.append(args[-1])

    try:
        yield mount
    finally:
        hq.cleanup()  # nothing may keep the mounts busy
        for target in reversed(targets):
            if run("umount", target).returncode != 0:
                run("umount", "-l", target)


def start_raw(hq: HQEnv, store: Path, name: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """``hostqueue run`` on ``store``, with stdout and stderr in files of their own."""
    out, err = hq.dir / f"{name}.out", hq.dir / f"{name}.err"
    cmd = [sys.executable, "-m", "hostqueue", "run", "--store", str(store),
           "--socket", str(hq.dir / f"{name}.sock"), "--tasks", str(hq.tasks_path), "--workers", "1"]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=hq.env(), stdin=subprocess.DEVNULL,
                                stdout=o, stderr=e, start_new_session=True)
    hq.procs.append(proc)
    return proc, out, err


def refused_at_start(hq: HQEnv, stores: dict[str, Path], reasons: tuple[str, ...]) -> list[str]:
    """Start a supervisor on each store at once; each must exit non-zero within the deadline
    with a clear message (no traceback) naming its store and one of ``reasons``, and leave
    the store file as it was. Returns the problems found."""
    before = {name: store.read_bytes() for name, store in stores.items()}
    started = {name: start_raw(hq, store, name) for name, store in stores.items()}
    deadline = time.monotonic() + START_DEADLINE
    problems = []
    for name, (proc, out, err) in started.items():
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            code = None
        stderr = err.read_text(errors="replace")
        store = stores[name]
        if code is None:
            problems.append(f"{name}: still running {START_DEADLINE:.0f} s after the start; stderr:\n{stderr[-1500:]}")
        elif code == 0:
            problems.append(f"{name}: exited 0")
        if str(store) not in stderr:
            problems.append(f"{name}: stderr does not name the store {store}:\n{stderr[-1500:]}")
        if not any(reason in stderr.lower() for reason in reasons):
            problems.append(f"{name}: stderr gives none of the reasons {reasons}:\n{stderr[-1500:]}")
        if "Traceback" in stderr:
            problems.append(f"{name}: a traceback instead of a message:\n{stderr[-2500:]}")
        if store.read_bytes() != before[name]:
            problems.append(f"{name}: the store file was modified")
    return problems


def valid_store(hq: HQEnv) -> Path:
    """A store with a few finished and a few pending jobs, cleanly stopped."""
    sup = hq.supervisor(workers=1, name="origin")
    for i in range(5):
        sup.wait_job(sup.submit("add", {"a": i, "b": 1})["id"])
    for i in range(5):
        sup.submit("add", {"a": i, "b": 2}, delay=3600)
    assert sup.stop() == 0
    return sup.store


# ---------------------------------------------------------------------------------------------
# (a) disk full, (d) no ok:true for a job that is not in the store


@pytest.mark.timeout(90)
def test_disk_full_refuses_submits_quickly_and_recovers(
        hq: HQEnv, mounts: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    disk = hq.dir / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk))
    filler = disk / "filler"
    filler.write_bytes(b"\0" * 100_000)
    sup = hq.supervisor(workers=2, store=disk / "q.db")
    big = "z" * 4000
    acked: dict[int, str] = {}
    refused: list[str] = []
    slowest = 0.0
    with sup.conn(timeout=10) as conn:
        i = consecutive = 0
        while consecutive < 20 and i < 3000:
            token, i = f"t{i}", i + 1
            t = time.monotonic()
            reply = conn.request("submit", task=f"{TASKS}.blob", args={"data": big, "token": token})
            took = time.monotonic() - t
            if reply["ok"]:
                acked[reply["job"]["id"]] = token
                consecutive = 0
                continue
            assert error_code(reply) == "store_error", reply
            assert str(sup.store) not in reply["error"]["message"], "a client is told the store's path"
            assert took < 1.0, f"a refused submit took {took:.2f} s"
            slowest = max(slowest, took)
            refused.append(token)
            consecutive += 1
        assert refused, f"the disk never filled ({len(acked)} jobs stored)"
        assert acked, "the store failed before the disk was full"
        tokens = [f"m{k}" for k in range(5)]
        t = time.monotonic()
        reply = conn.request("submit_many", task=f"{TASKS}.blob",
                             args=[{"data": big, "token": tk} for tk in tokens])
        assert error_code(reply) == "store_error" and time.monotonic() - t < 1.0, reply
        refused += tokens
        # The supervisor keeps answering.
        assert ok(conn.request("ping"))["pong"]["state"] == "running"
        assert ok(conn.request("status"))["status"]["state"] == "running"
    assert sup.proc is not None and sup.proc.poll() is None

    def stored() -> dict[int, str]:
        return {int(r["id"]): json.loads(r["args"])["token"] for r in sup.db_query("SELECT id, args FROM jobs")}

    # Every acknowledged job is in the store file, and nothing refused is.
    rows = stored()
    missing = {i: t for i, t in acked.items() if rows.get(i) != t}
    assert not missing, f"acknowledged but not in the store: {missing}"
    assert not set(refused) & set(rows.values())
    # Jobs whose end (or claim) the full disk refused: a wait is not told they ended
    # before that is committed; it times out instead.
    # (A full disk still takes a write now and then, when SQLite reuses WAL pages: a wait
    # answered ok must find the end in the store.)
    unrecorded = [i for i in acked if sup.db_job(i)["status"] != "completed"]
    for job_id in unrecorded[:3]:
        reply = sup.request("wait", job=job_id, timeout=0.3)
        if reply.get("ok"):
            assert sup.db_job(job_id)["status"] == reply["job"]["status"], (
                f"a wait was told job {job_id} ended before its end was stored: {reply['job']['status']}")
        else:
            assert error_code(reply) == "timeout", reply
    full_at = time.monotonic()

    # Space again: submits are taken (the store is retried with a backoff of at most 5 s).
    filler.unlink()
    mounts("-o", "remount,size=10m", str(disk))

    def accepted() -> dict[str, Any] | None:
        reply = sup.request("submit", task=f"{TASKS}.blob", args={"data": big, "token": "again"})
        if reply["ok"]:
            return reply
        assert error_code(reply) == "store_error", reply
        return None

    again = wait_for(accepted, 20, "a submit to be accepted once there is space")
    recovered = time.monotonic() - full_at
    acked[again["job"]["id"]] = "again"
    for k in range(10):
        job = sup.submit("blob", {"data": big, "token": f"after{k}"})
        acked[job["id"]] = f"after{k}"

    wait_for(lambda: sup.db_query("SELECT COUNT(*) FROM jobs WHERE status != 'completed'")[0][0] == 0, 30,
             "every stored job to complete")
    rows = stored()
    assert set(rows) == set(acked), (sorted(set(rows) - set(acked)), sorted(set(acked) - set(rows)))
    assert all(rows[i] == t for i, t in acked.items())
    assert not set(refused) & set(rows.values()), "a refused submit was stored after all"
    for job_id in acked:
        assert sup.get(job_id)["result"] == len(big)
    assert sup.integrity() == "ok"
    assert sup.stop() == 0
    report(capsys, (
        f"disk full (700 KiB tmpfs): {len(unrecorded)} jobs with an end or claim not stored while full"
        f" (waits on them timed out); "
        f"{len(acked) - 11} submits stored before it filled, {len(refused)} refused"
        f" with store_error in at most {slowest * 1000:.0f} ms, submits taken again {recovered:.2f} s after"
        f" space came back; every acknowledged job completed"))


# ---------------------------------------------------------------------------------------------
# (b) read-only store


@pytest.mark.timeout(60)
def test_read_only_store_is_refused_at_start_with_a_clear_message(
        hq: HQEnv, mounts: Callable[..., None]) -> None:
    """As root, chmod 0444 does not stop us: the store is made read-only with mounts. Two
    cases: the store's directory is a read-only file system, and the store file alone is
    (a read-only bind mount; its directory is writable)."""
    origin = valid_store(hq)
    ro_dir = hq.dir / "ro"
    ro_dir.mkdir()
    mounts("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ro_dir))
    shutil.copy(origin, ro_dir / "q.db")
    mounts("-o", "remount,ro", str(ro_dir))
    ro_file = hq.dir / "rofile.db"
    shutil.copy(origin, ro_file)
    mounts("--bind", str(ro_file), str(ro_file))
    mounts("-o", "remount,ro,bind", str(ro_file))
    problems = refused_at_start(hq, {"read-only directory": ro_dir / "q.db", "read-only file": ro_file},
                                ("read-only", "readonly", "read only"))
    assert not problems, "\n\n".join(problems)


# ---------------------------------------------------------------------------------------------
# (c) corrupt store


@pytest.mark.timeout(60)
def test_corrupt_store_is_refused_at_start_and_left_untouched(hq: HQEnv) -> None:
    origin = valid_store(hq).read_bytes()
    rng = random.Random(5)
    stores = {
        "text": b"this is not a hostqueue store\n" * 100,
        "random": rng.randbytes(len(origin)),
        # A valid header and first page (the schema), garbage in every other page.
        "pages": origin[:4096] + rng.randbytes(len(origin) - 4096),
    }
    paths = {}
    for name, content in stores.items():
        path = hq.dir / f"corrupt-{name}.db"
        path.write_bytes(content)
        paths[name] = path
    problems = refused_at_start(hq, paths, ("not a database", "malformed", "corrupt"))
    assert not problems, "\n\n".join(problems)


# ---------------------------------------------------------------------------------------------
# (e) reads and a drain while the disk is full; (f) one corrupt page


@pytest.mark.timeout(90)
def test_reads_and_sigterm_are_served_while_the_disk_is_full(
        hq: HQEnv, mounts: Callable[..., None]) -> None:
    """While the disk is full and the supervisor's writes are refused (and retried),
    reads do not queue behind them: `get`, `stats`, `list`, `metrics` and `abort` answer
    within 2 s; SIGTERM ends it within its grace (before: most of them got no reply
    within 10 s, and SIGTERM did not end it within 45-90 s); what it could not write is
    reported in its log."""
    disk = hq.dir / "disk"
    disk.mkdir()
    mounts("-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk))
    (disk / "filler").write_bytes(b"\0" * 100_000)
    sup = hq.supervisor(workers=2, store=disk / "q.db", grace=2.0)
    big = "z" * 4000
    acked: list[int] = []
    release = hq.path("release")
    with sup.conn(timeout=10) as conn:
        acked.append(ok(conn.request("submit", task=f"{TASKS}.blob", args={
            "token": "r", "result_size": 300_000, "release": release}))["job"]["id"])
        for i in range(3000):
            reply = conn.request("submit", task=f"{TASKS}.blob", args={"data": big, "token": f"t{i}"})
            if not reply["ok"]:
                break
            acked.append(reply["job"]["id"])
        assert len(acked) > 1, "the store failed before the disk was full"
        pending = conn.request("submit", task=f"{TASKS}.blob", args={"data": "", "token": "p"},
                               delay=3600)
    # An outcome that needs more space than the full disk has (small ones may still
    # fit: SQLite reuses the WAL's pages after a checkpoint): the job with a 300 KB
    # result, submitted before the disk filled, ends now.
    Path(release).touch()
    # Its outcome waits for space: writes are failing now.
    wait_for(lambda: sup.status()["store_error"], 10, "the store to refuse writes")
    slowest = 0.0
    for op, fields in [("get", {"job": acked[0]}), ("stats", {}), ("list", {"status": "pending"}),
                       ("metrics", {}), ("get", {"job": acked[-1]}), ("abort", {"job": acked[-1]})]:
        t = time.monotonic()
        reply = sup.request(op, reply_timeout=5.0, **fields)
        took = time.monotonic() - t
        slowest = max(slowest, took)
        assert took < 2.0, f"{op} took {took:.1f} s while the disk is full: {reply}"
        assert reply.get("ok") or error_code(reply) in ("store_error", "invalid_state"), reply
    assert pending is not None
    t = time.monotonic()
    sup.signal(15)
    code = sup.wait_exit(2.0 + 5.0)
    took = time.monotonic() - t
    assert took < 2.0 + 5.0, f"SIGTERM took {took:.1f} s with a grace of 2 s"
    assert code in (0, 1), code
    if code == 1:
        assert "the store did not take" in sup.log_text(), sup.log_text()[-2000:]


@pytest.mark.timeout(90)
def test_a_store_with_one_corrupt_page_is_named_corrupt_and_never_wedges(hq: HQEnv) -> None:
    """One garbled page among many: the supervisor refuses to start, naming corruption
    (SQLite's quick_check) and how to go on; started anyway (--store-check off), every
    error names the store as corrupt (not `internal`, not "wait for space or
    permissions"), `stats` keeps answering, and SIGTERM ends it within its grace (before:
    no check; `stats` answered internal "cannot commit transaction - SQL statements in
    progress", then nothing; writes were retried forever; SIGTERM did not stop it)."""
    import sqlite3

    sup = hq.supervisor(workers=1, name="origin")
    with sup.conn(60) as c:
        ids = []
        for _ in range(5):
            ids += ok(c.request("submit_many", task=f"{TASKS}.add", args=[{"a": 1, "b": 2}] * 300,
                                reply="ids"))["ids"]
    wait_for(lambda: sup.call("stats", "stats")["completed"] == len(ids), 30, "the jobs to complete")
    assert sup.stop() == 0
    # A leaf page of the index of ended jobs: the supervisor can start (it reads pending
    # jobs through the table), and counting by state runs into it.
    with sqlite3.connect(str(sup.store)) as conn:
        leaves = [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'jobs_ended' AND pagetype = 'leaf'")]
    assert len(leaves) > 2, leaves
    bad = leaves[len(leaves) // 2] - 1
    data = bytearray(sup.store.read_bytes())
    data[bad * 4096:(bad + 1) * 4096] = random.Random(7).randbytes(4096)
    sup.store.write_bytes(bytes(data))

    sup.start(wait=False)
    assert sup.wait_exit(START_DEADLINE) == 1
    log = sup.log_text()
    assert "corrupt" in log and "--store-check off" in log and "Traceback" not in log, log[-2000:]

    sup.grace = 2.0
    sup.start("--store-check", "off", wait=False)
    wait_for(lambda: sup.ping()["state"] == "running", 15, "the supervisor to serve")
    for _ in range(3):
        reply = sup.request("stats", reply_timeout=5.0)
        assert not reply["ok"] and error_code(reply) == "store_error", reply
        assert "corrupt" in reply["error"]["message"], reply
    t = time.monotonic()
    sup.signal(15)
    code = sup.wait_exit(2.0 + 5.0)
    assert time.monotonic() - t < 7.0 and code in (0, 1), code
