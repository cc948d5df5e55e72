"""The supervisor core's contract (DESIGN.md), one defect of the old core per test: fair
dispatch (prefetched jobs never wait behind a slow job while a worker is idle; a priority
job is never held behind lower ones; unmeasured tasks spread over the pool), honest states
(a prefetched job is pending to everyone), crash semantics (a
supervisor's death charges no attempt; three deaths in a row fail a job), an event loop that
never waits on the store, dispatch that costs the same however many queue names were used,
weighted order without a penalty for a queue that ran alone, one deadline rule, an abort
honoured by returning, and a drain right after start.

Every test runs real supervisors (``conftest.HQEnv``) with, beside the suite's ``hqtasks``
module, a task module of its own, ``coretasks`` (``CORE_TASKS`` below, written into the
test's directory and passed with one more ``--tasks``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import textwrap
import threading
import time
from typing import Any

import psutil
import pytest

from conftest import (
    TASKS, Conn, HQEnv, Supervisor, error_code, file_lines, is_alive, ok, wait_for,
)

FINAL = ("completed", "failed", "cancelled", "expired")
CORE = "coretasks"

CORE_TASKS = textwrap.dedent(
    '''
    """Tasks of tests/test_core.py (written by the test into its directory)."""
    import os
    import time

    import hostqueue


    def _append(path, text):
        """One O_APPEND write: whole lines, never interleaved between workers."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (text + "\\n").encode())
        finally:
            os.close(fd)


    @hostqueue.task(backoff_base=0.05, backoff_cap=0.2)
    def work(ctx, i=0, slow=0.0, log=None, release=None):
        """Fast unless told otherwise: sleep `slow` s, or wait for the file `release`
        (at most `slow` s, 60 s when 0). With `log`, append "start|end i job attempt pid time"."""
        if log:
            _append(log, f"start {i} {ctx.job_id} {ctx.attempt} {os.getpid()} {time.time():.6f}")
        if release:
            end = time.monotonic() + (slow or 60.0)
            while time.monotonic() < end and not os.path.exists(release):
                time.sleep(0.005)
        elif slow:
            time.sleep(slow)
        if log:
            _append(log, f"end {i} {ctx.job_id} {ctx.attempt} {os.getpid()} {time.time():.6f}")
        return i


    @hostqueue.task
    def tick(ctx, seconds=1.0, log=None, tag="-"):
        """Sleep `seconds`; with `log`, append "start|end tag job pid time" around it."""
        if log:
            _append(log, f"start {tag} {ctx.job_id} {os.getpid()} {time.time():.6f}")
        time.sleep(seconds)
        if log:
            _append(log, f"end {tag} {ctx.job_id} {os.getpid()} {time.time():.6f}")
        return tag


    @hostqueue.task
    def polite(ctx, marker, seconds=20.0):
        """Say it started, then poll ctx.aborted; on an abort, return normally."""
        _append(marker, f"{ctx.job_id} {ctx.attempt} {os.getpid()}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if ctx.aborted:
                return {"stopped": True}
            time.sleep(0.01)
        return {"stopped": False}
    '''
)


# ---------------------------------------------------------------------------------------------
# helpers


def core_supervisor(hq: HQEnv, workers: int | None = 2, config: str | None = None,
                    grace: float = 10.0, start: bool = True) -> Supervisor:
    """A supervisor that also loads ``coretasks`` (and the configuration file, if given).
    Restart it with ``restart(sup)``: its extra arguments are kept on it."""
    path = hq.dir / f"{CORE}.py"
    if not path.exists():
        path.write_text(CORE_TASKS)
    extra: tuple[str, ...] = ("--tasks", str(path))
    if config is not None:
        conf = hq.dir / f"core-{len(hq.supervisors) + 1}.toml"
        conf.write_text(textwrap.dedent(config))
        extra += ("--config", str(conf))
    sup = hq.supervisor(workers=workers, grace=grace, start=False)
    sup.extra_args = extra  # kept for every restart
    if start:
        sup.start()
    return sup


def restart(sup: Supervisor, timeout: float = 20.0) -> None:
    """Start again on the same store, with the same arguments; until it serves."""
    sup.start_serving(timeout)


def submit_many(sup: Supervisor, task: str, args: list[dict[str, Any]], **opts: Any) -> list[int]:
    """One submit_many (ids only); the new ids in order."""
    with sup.conn(60) as c:
        reply = ok(c.request("submit_many", task=task, args=args, reply="ids", **opts))
    return list(reply["ids"])


def statuses(sup: Supervisor, ids: list[int]) -> dict[int, str]:
    """Job id -> status, as the store file has them."""
    out: dict[int, str] = {}
    for n in range(0, len(ids), 900):
        chunk = ids[n:n + 900]
        marks = ",".join("?" * len(chunk))
        for row in sup.db_query(f"SELECT id, status FROM jobs WHERE id IN ({marks})", tuple(chunk)):
            out[row["id"]] = row["status"]
    return out


def count_status(sup: Supervisor, first: int, last: int, status: str = "completed") -> int:
    rows = sup.db_query("SELECT COUNT(*) FROM jobs WHERE id BETWEEN ? AND ? AND status = ?",
                        (first, last, status))
    return int(rows[0][0])


def wait_ended(sup: Supervisor, ids: list[int], timeout: float) -> dict[int, str]:
    """Every job of ``ids`` ended (read from the store file); their statuses."""
    def ended() -> dict[int, str] | None:
        st = statuses(sup, ids)
        return st if len(st) == len(ids) and all(s in FINAL for s in st.values()) else None

    found: dict[int, str] = wait_for(ended, timeout, f"{len(ids)} jobs to end", interval=0.05)
    return found


def train(sup: Supervisor, n: int, queue: str | None = None, timeout: float = 30.0) -> None:
    """Run n fast ``work`` jobs (teaches the supervisor that ``work`` is fast)."""
    opts = {"queue": queue} if queue else {}
    ids = submit_many(sup, f"{CORE}.work", [{"i": i} for i in range(n)], **opts)
    wait_for(lambda: count_status(sup, ids[0], ids[-1]) == n, timeout,
             f"the {n} training jobs to complete", interval=0.05)


def log_rows(path: str) -> list[list[str]]:
    return [line.split() for line in file_lines(path)]


# ---------------------------------------------------------------------------------------------
# 1. fair dispatch


@pytest.mark.timeout(40)
def test_fast_jobs_never_wait_behind_a_slow_job_of_a_fast_task(hq: HQEnv) -> None:
    """2 workers; ``work`` is measured fast (3,000 runs); then 2,000 jobs of it where the one
    with i == 5 takes 6 s. Every fast one must complete while the slow one still runs: none
    may sit, prefetched, behind it on its worker while the other worker is idle."""
    sup = core_supervisor(hq, workers=2)
    train(sup, 3000)
    log = hq.path("slow.log")
    args: list[dict[str, Any]] = [{"i": i} for i in range(2000)]
    args[5] = {"i": 5, "slow": 6.0, "log": log}
    began = time.monotonic()
    ids = submit_many(sup, f"{CORE}.work", args)
    slow_id = ids[5]
    fast_ids = ids[:5] + ids[6:]
    wait_for(lambda: log_rows(log), 5, "the slow job to start")

    def fast_done() -> bool:
        return count_status(sup, ids[0], ids[-1]) - (sup.db_job(slow_id)["status"] == "completed") \
            >= len(fast_ids)

    try:
        wait_for(fast_done, 3.0 - (time.monotonic() - began), "all 1,999 fast jobs to complete", 0.05)
    except AssertionError:
        st = statuses(sup, fast_ids)
        late = sorted(i for i, s in st.items() if s != "completed")
        raise AssertionError(
            f"{len(late)} of the 1,999 fast jobs had not completed {time.monotonic() - began:.1f} s"
            f" after the submit, while the 6 s job (id {slow_id}) ran; e.g. {late[:5]} "
            f"(their store status: {sorted(set(st[i] for i in late))})"
        ) from None
    took = time.monotonic() - began
    # Its start reaches the store with the next group commit, a moment after the task
    # logged it: it reads running within a second, 5 s before it ends.
    try:
        wait_for(lambda: sup.db_job(slow_id)["status"] == "running", 1.0, "the slow job to read running")
    except AssertionError:
        raise AssertionError(
            f"the slow job is {sup.db_job(slow_id)['status']} 1 s after the fast ones were done"
            f" ({took:.1f} s after the submit): it should still run") from None
    assert sup.wait_job(slow_id, timeout=15)["status"] == "completed"


@pytest.mark.timeout(40)
def test_priority_job_is_not_held_behind_a_slow_job(hq: HQEnv) -> None:
    """2 workers; ``work`` is measured fast. One worker runs an 8 s job of it, the other a
    backlog of 0.5 s jobs; a priority=100 job submitted then must finish within ~1-2 s (the
    other worker takes it once its current job ends), not after the 8 s job."""
    sup = core_supervisor(hq, workers=2)
    train(sup, 300)
    log = hq.path("work.log")
    ticks = hq.path("ticks.log")
    slow = sup.submit(f"{CORE}.work", {"i": -1, "slow": 8.0, "log": log})
    wait_for(lambda: log_rows(log), 5, "the 8 s job to start")
    backlog = submit_many(sup, f"{CORE}.tick", [{"seconds": 0.5, "log": ticks, "tag": f"t{n}"}
                                               for n in range(6)])
    backlog += submit_many(sup, f"{CORE}.work", [{"i": n} for n in range(20)])
    wait_for(lambda: log_rows(ticks), 5, "the backlog to start on the other worker")
    began = time.time()
    urgent = sup.submit(f"{CORE}.work", {"i": 100, "log": log}, priority=100)
    done = sup.wait_job(urgent["id"], timeout=15)
    assert done["status"] == "completed", done
    took = done["finished_at"] - began
    slow_now = sup.get(slow["id"])
    assert took <= 2.0, (
        f"the priority=100 job finished {took:.2f} s after its submit (the 8 s job is"
        f" {slow_now['status']}; worker of the priority job: {done['worker_pid']}, of the 8 s"
        f" job: {slow_now['worker_pid']})")
    assert done["worker_pid"] != slow_now["worker_pid"]
    wait_ended(sup, [slow["id"], *backlog], 20)


class StatusSampler(threading.Thread):
    """Reads ``status`` every ~30 ms on one connection and keeps what it saw."""

    def __init__(self, sup: Supervisor) -> None:
        super().__init__(daemon=True)
        self.sup = sup
        self.stop = threading.Event()
        self.samples: list[tuple[float, list[dict[str, Any]]]] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with self.sup.conn(10) as c:
                while not self.stop.is_set():
                    st = ok(c.request("status"))["status"]
                    self.samples.append((time.monotonic(), st["workers"]))
                    self.stop.wait(0.03)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


@pytest.mark.timeout(40)
def test_jobs_of_an_unmeasured_task_spread_over_the_pool(hq: HQEnv) -> None:
    """A fresh supervisor with 4 workers and eight 3 s jobs of a task never run before,
    submitted one by one: they run in 2 rounds (~6 s), and no worker ever holds more than
    one of them unstarted while another worker is idle."""
    sup = core_supervisor(hq, workers=4)
    log = hq.path("ticks.log")
    sampler = StatusSampler(sup)
    sampler.start()
    began = time.monotonic()
    ids = [sup.submit(f"{CORE}.tick", {"seconds": 3.0, "log": log, "tag": f"t{n}"})["id"]
           for n in range(8)]
    try:
        wait_for(lambda: all(s == "completed" for s in statuses(sup, ids).values())
                 and len(statuses(sup, ids)) == 8, 20, "the 8 jobs to complete", 0.05)
        took = time.monotonic() - began
    finally:
        sampler.stop.set()
        sampler.join(5)
    assert not sampler.errors, sampler.errors
    bad = []
    for at, workers in sampler.samples:
        idle = [w["pid"] for w in workers if w["state"] == "idle"]
        hoarding = {w["pid"]: w["held"] for w in workers if w["held"] - 1 > 1}
        if idle and hoarding:
            bad.append((round(at - began, 2), hoarding, idle))
    per_worker: dict[str, int] = {}
    for row in log_rows(log):
        if row[0] == "start":
            per_worker[row[3]] = per_worker.get(row[3], 0) + 1
    assert not bad, (
        f"workers held more than one job unstarted while others were idle, at (s, {{pid: held}},"
        f" idle pids): {bad[:3]} ... ({len(bad)} samples); jobs run per worker pid: {per_worker};"
        f" all 8 took {took:.1f} s")
    assert took <= 7.5, f"the 8 jobs took {took:.1f} s on 4 workers (2 rounds of 3 s: ~6 s); per worker: {per_worker}"


# ---------------------------------------------------------------------------------------------
# 2. honest states


@pytest.mark.timeout(40)
def test_a_prefetched_job_is_pending_to_everyone(hq: HQEnv) -> None:
    """1 worker runs a long blocking job of a task measured fast; 3 jobs of that task are
    submitted behind it. Until they really start they are pending everywhere: ``get``
    (status pending, no started_at), the store row, a watch (no ``started`` event), and
    ``stats`` (1 running, not 4)."""
    sup = core_supervisor(hq, workers=1)
    train(sup, 300)
    log, release = hq.path("work.log"), hq.path("release")
    everything = sup.conn(15)
    watch_all = everything.send_op("watch", task=f"{CORE}.work")
    assert ok(everything.read_for(watch_all))["watching"] is None
    blocker = sup.submit(f"{CORE}.work", {"i": 0, "log": log, "release": release, "slow": 30})
    wait_for(lambda: log_rows(log), 5, "the blocking job to start")
    behind = [sup.submit(f"{CORE}.work", {"i": n, "log": log})["id"] for n in (1, 2, 3)]
    # Each job's own stream too, opened while it waits.
    watches = {}
    for job_id in behind:
        c = sup.conn(15)
        rid = c.send_op("watch", job=job_id)
        assert ok(c.read_for(rid))["watching"] == job_id
        watches[job_id] = (c, rid)
    try:
        # The submits' own dispatch has happened by now (a few loop turns): look for a while.
        seen: list[dict[str, Any]] = []
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                seen.append(everything.read_for(watch_all, timeout=max(0.01, end - time.monotonic())))
            except (TimeoutError, OSError):
                break
        early = [(e["event"], e["job_id"]) for e in seen if e["event"] == "started" and e["job_id"] in behind]
        assert len(log_rows(log)) == 1, "a job behind the blocking one has started"
        problems = []
        for job_id in behind:
            job = sup.get(job_id)
            if job["status"] != "pending" or job["started_at"] is not None:
                problems.append(f"get {job_id}: status {job['status']}, started_at {job['started_at']}")
            row = sup.db_job(job_id)
            if row["status"] != "pending":
                problems.append(f"store row {job_id}: status {row['status']}, attempts {row['attempts']}")
        stats = sup.call("stats", "stats")
        if stats["running"] != 1:
            problems.append(f"stats: running {stats['running']}, pending {stats['pending']} (1 runs, 3 wait)")
        if early:
            problems.append(f"watch of every job: 'started' events before the tasks started: {early}")
        for job_id, (c, rid) in watches.items():
            try:
                event = c.read_for(rid, timeout=0.2)
            except (TimeoutError, OSError):
                continue
            problems.append(f"watch of job {job_id}: {event['event']} event before it started")
        assert not problems, "jobs that have not started read as started:\n" + "\n".join(problems)

        # Once released they start, and say so.
        open(release, "w").close()
        for job_id, (c, rid) in watches.items():
            kinds = []
            for event in c.events(rid, timeout=10):
                kinds.append(event["event"])
                if event["event"] in FINAL:
                    break
            assert kinds[0] == "started" and kinds[-1] == "completed", (job_id, kinds)
        assert sup.wait_job(blocker["id"])["status"] == "completed"
    finally:
        everything.close()
        for c, _ in watches.values():
            c.close()


# ---------------------------------------------------------------------------------------------
# 3. crash semantics


def kill9_with_workers(sup: Supervisor) -> None:
    """kill -9 the supervisor; its workers must die with it."""
    workers = sup.worker_pids()
    assert workers, "no worker to watch"
    sup.kill9()
    wait_for(lambda: not any(is_alive(pid) for pid in workers), 10,
             f"the workers {sorted(workers)} to die with their supervisor")


@pytest.mark.timeout(60)
def test_a_supervisor_crash_charges_no_attempt(hq: HQEnv) -> None:
    """1 worker runs a 3 s job (retries=0) with 100 jobs (retries=0) submitted behind it;
    kill -9 of the supervisor; after a restart on the same store every one of the 101 jobs
    ends completed, and the interrupted one has used 1 attempt, not 2."""
    sup = core_supervisor(hq, workers=1)
    log = hq.path("work.log")
    long = sup.submit(f"{CORE}.work", {"i": -1, "slow": 3.0, "log": log}, retries=0)
    wait_for(lambda: log_rows(log), 5, "the 3 s job to start")
    behind = submit_many(sup, f"{CORE}.work", [{"i": n} for n in range(100)], retries=0)
    kill9_with_workers(sup)
    before = {r["id"]: (r["status"], r["attempts"]) for r in
              sup.db_query("SELECT id, status, attempts FROM jobs WHERE id >= ?", (long["id"],))}
    restart(sup)
    st = wait_ended(sup, [long["id"], *behind], 30)
    failed = sorted(i for i, s in st.items() if s != "completed")
    assert not failed, (
        f"{len(failed)} of 101 jobs did not complete after the crash: "
        + ", ".join(f"{i}: {st[i]} (at the kill: {before.get(i)}; error: "
                    f"{(sup.db_job(i)['error'] or '')[:120]})" for i in failed[:3]))
    runs = [r for r in log_rows(hq.path("work.log")) if r[0] == "start"]
    assert len(runs) == 2, f"the interrupted job should have run twice: {runs}"
    row = sup.db_job(long["id"])
    assert row["attempts"] <= 1, (
        f"the interrupted job used {row['attempts']} attempts: the supervisor's death must not use one")
    assert sup.stop() == 0


@pytest.mark.timeout(60)
def test_three_supervisor_deaths_in_a_row_fail_the_job(hq: HQEnv) -> None:
    """A job interrupted by 3 kills -9 of the supervisor in a row (it has retries left) ends
    failed at the 3rd restart, with an error that says it was interrupted 3 times."""
    sup = core_supervisor(hq, workers=1)
    log, release = hq.path("work.log"), hq.path("release")
    job = sup.submit(f"{CORE}.work", {"i": 0, "log": log, "release": release, "slow": 60}, retries=5)
    for death in (1, 2, 3):
        wait_for(lambda: len(log_rows(log)) >= death, 10, f"run {death} of the job to start")
        # Its start stored too: a kill before that commit interrupts nothing the store knows.
        wait_for(lambda: sup.get(job["id"])["status"] == "running", 10, f"run {death} stored")
        kill9_with_workers(sup)
        restart(sup)

    def ended_or_rerun() -> dict[str, Any] | None:
        got = sup.get(job["id"])
        return got if got["status"] in FINAL or len(log_rows(log)) > 3 else None

    done = wait_for(ended_or_rerun, 10, "the job to end after its 3rd interruption")
    assert done["status"] == "failed", (
        f"after 3 supervisor deaths in a row the job is {done['status']} (attempts {done['attempts']},"
        f" runs so far {len(log_rows(log))}): it should have failed")
    message = (done["error"] or {}).get("message", "")
    assert "interrupted" in message.lower(), done["error"]
    assert len(log_rows(log)) == 3, log_rows(log)


# ---------------------------------------------------------------------------------------------
# 4. the event loop never waits on the store


class Submitting(threading.Thread):
    """One submit on a connection of its own; keeps the reply (or the exception)."""

    def __init__(self, sup: Supervisor, args: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.sup = sup
        self.args = args
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.sent = threading.Event()

    def run(self) -> None:
        try:
            with self.sup.conn(30) as c:
                rid = c.send_op("submit", task=f"{CORE}.work", args=self.args)
                self.sent.set()
                self.reply = c.read_for(rid, 30)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.sent.set()


@pytest.mark.timeout(40)
def test_the_socket_answers_while_another_process_holds_the_store_lock(hq: HQEnv) -> None:
    """Another process holds the SQLite file's write lock for ~3 s: ``ping`` answers within
    0.5 s throughout; submits made meanwhile wait and succeed, or are refused with
    ``store_busy``; every acknowledged job is in the store afterwards and runs."""
    sup = core_supervisor(hq, workers=2)
    train(sup, 20)
    blocker = sqlite3.connect(str(sup.store), timeout=10, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    locked_at = time.monotonic()
    submitters = []
    slow_pings: list[tuple[float, Any]] = []
    try:
        for n in range(3):
            s = Submitting(sup, {"i": 1000 + n})
            s.start()
            s.sent.wait(5)
            submitters.append(s)
        while time.monotonic() - locked_at < 3.0:
            t0 = time.monotonic()
            try:
                with Conn(sup.socket, timeout=2) as c:
                    ok(c.request("ping"))
            except (TimeoutError, OSError):
                slow_pings.append((round(t0 - locked_at, 2), "no answer within 2 s"))
                break
            took = time.monotonic() - t0
            if took > 0.5:
                slow_pings.append((round(t0 - locked_at, 2), round(took, 2)))
            wait_for(lambda: time.monotonic() - t0 >= 0.1, 1, "the next ping's turn", 0.02)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not slow_pings, (
        f"ping took over 0.5 s while another process held the store's lock (at s after the lock,"
        f" took s): {slow_pings}")
    acked = []
    for s in submitters:
        s.join(30)
        assert s.error is None, s.error
        assert s.reply is not None
        if s.reply.get("ok"):
            acked.append(s.reply["job"]["id"])
        else:
            assert error_code(s.reply) == "store_busy", s.reply
    for job_id in acked:
        assert sup.wait_job(job_id, timeout=15)["status"] == "completed"
        assert sup.db_job(job_id)["status"] == "completed"


# ---------------------------------------------------------------------------------------------
# 5. dispatch cost does not grow with the names ever used


def lone_latency(sup: Supervisor, n: int = 50) -> float:
    """Median time of n lone submit-and-waits of a noop job in ``default`` (one connection)."""
    times = []
    with sup.conn(10) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            reply = ok(c.request("submit", task=f"{TASKS}.noop", wait=10))
            times.append(time.perf_counter() - t0)
            assert reply["job"]["status"] == "completed", reply
    return statistics.median(times)


def pipelined_submits(sup: Supervisor, requests: list[dict[str, Any]], window: int = 500) -> list[int]:
    """Send submits on one connection, at most ``window`` unanswered at a time; the ids."""
    ids: list[int] = []
    with sup.conn(30) as c:
        pending: list[int] = []
        for req in requests:
            pending.append(c.send_op("submit", **req))
            if len(pending) >= window:
                ids.append(ok(c.read_for(pending.pop(0), 30))["job"]["id"])
        for rid in pending:
            ids.append(ok(c.read_for(rid, 30))["job"]["id"])
    return ids


@pytest.mark.timeout(60)
def test_dispatch_cost_does_not_grow_with_queue_names_ever_used(hq: HQEnv) -> None:
    """After 20,000 jobs, each in a queue of its own name, have run, a lone submit-and-wait
    in ``default`` takes about as long as before (at most 4x; before the fix: about 30x).
    The names are used 2,500 at a time, and the cost is also checked after each 2,500 (at
    most 10x: before the fix, 4.8x after the first 2,500 and growing), so that a cost that
    grows with the names fails early instead of running for minutes. Each figure is the
    best of up to 3 medians, so that a moment of load on the machine does not fail it."""
    sup = core_supervisor(hq, workers=2)
    lone_latency(sup, 20)  # warm up
    before = lone_latency(sup)

    def latency(limit: float, samples: int) -> float:
        best = lone_latency(sup, samples)
        for _ in range(2):
            if best <= limit:
                break
            best = min(best, lone_latency(sup, samples))
        return best

    n, chunk = 20_000, 2_500
    began = time.monotonic()
    for first in range(0, n, chunk):
        ids = pipelined_submits(sup, [{"task": f"{TASKS}.noop", "queue": f"q{k}"}
                                      for k in range(first, first + chunk)])
        wait_for(lambda: count_status(sup, ids[0], ids[-1]) == chunk, 20,
                 f"jobs {first:,} to {first + chunk:,} (each in a queue of its own) to complete",
                 interval=0.1)
        now = latency(10 * before, 21)
        assert now <= 10 * before, (
            f"a lone submit-and-wait took {now * 1000:.2f} ms (median of 21) after"
            f" {first + chunk:,} jobs ran in queues of their own, {before * 1000:.2f} ms before"
            f" ({now / before:.1f}x; {time.monotonic() - began:.1f} s so far)")
    after = latency(4 * before, 50)
    assert after <= 4 * before, (
        f"a lone submit-and-wait took {after * 1000:.2f} ms (median of 50) after {n:,} jobs ran"
        f" in queues of their own, {before * 1000:.2f} ms before ({after / before:.1f}x)")


# ---------------------------------------------------------------------------------------------
# 6. weighted order


@pytest.mark.timeout(60)
def test_weighted_order_owes_nothing_for_running_alone(hq: HQEnv) -> None:
    """``order = "weighted"``, queues a and b of weight 1, 1 worker: a runs 5,000 jobs
    alone; then, both backlogged (300 each, submitted while paused), the first 200 starts
    are shared about evenly (b gets 35% to 65%), not all b's until it has caught up."""
    sup = core_supervisor(hq, workers=1, config="""
        [queues]
        order = "weighted"
        [queues.a]
        weight = 1
        [queues.b]
        weight = 1
        """)
    train(sup, 5000, queue="a")
    log = hq.path("order.log")
    ok(sup.request("pause"))
    ids = []
    for q in ("a", "b"):
        ids += submit_many(sup, f"{TASKS}.record", [{"log": log, "tag": q} for _ in range(300)], queue=q)
    ok(sup.request("resume"))
    wait_for(lambda: len(file_lines(log)) >= 200, 20, "200 of the 600 jobs to run", 0.05)
    first = [line.split()[0] for line in file_lines(log)[:200]]
    share = first.count("b") / len(first)
    assert 0.35 <= share <= 0.65, (
        f"queue b got {share:.0%} of the first 200 starts after a ran 5,000 jobs alone"
        f" (weights 1 and 1); order of the first 20: {''.join(first[:20])}")
    wait_ended(sup, ids, 30)


# ---------------------------------------------------------------------------------------------
# 8. deadlines: one rule everywhere


@pytest.mark.timeout(30)
def test_a_retry_due_after_the_deadline_expires_at_the_deadline(hq: HQEnv) -> None:
    """deadline=2; the first attempt raises Retry(delay=5): the job ends expired at its
    deadline (not run again at 5 s), and its error says 1 attempt ran before."""
    sup = core_supervisor(hq, workers=2)
    job = sup.submit("retry_once", {"delay": 5.0}, deadline=2)
    deadline = job["deadline"]
    assert deadline == pytest.approx(job["created_at"] + 2, abs=0.01), job
    done = sup.wait_job(job["id"], timeout=15)
    late = done["finished_at"] - deadline
    assert done["status"] == "expired", (
        f"the job is {done['status']} ({done['attempts']} attempts, finished {late:+.2f} s from"
        f" its deadline): a retry due after the deadline must not run")
    assert -0.2 <= late <= 1.0, f"expired {late:+.2f} s from its deadline"
    message = done["error"]["message"]
    assert "1 attempt" in message, done["error"]
    assert sup.db_job(job["id"])["status"] == "expired"


# ---------------------------------------------------------------------------------------------
# 9. abort


@pytest.mark.timeout(30)
def test_a_task_that_returns_after_an_abort_ends_cancelled_with_its_result(hq: HQEnv) -> None:
    """A task that sees ctx.aborted and returns normally ends cancelled after an abort, and
    its return value is kept as the job's result."""
    sup = core_supervisor(hq, workers=2)
    marker = hq.path("polite")
    job = sup.submit(f"{CORE}.polite", {"marker": marker})
    wait_for(lambda: file_lines(marker), 10, "the job to start")
    ok(sup.request("abort", job=job["id"]))
    done = sup.wait_job(job["id"], timeout=15)
    assert done["status"] == "cancelled", (
        f"the job is {done['status']} (result {done['result']!r}) after an abort it honoured by returning")
    assert done["result"] == {"stopped": True}, done
    row = sup.db_job(job["id"])
    assert row["status"] == "cancelled" and json.loads(row["result"]) == {"stopped": True}, row


# ---------------------------------------------------------------------------------------------
# 12. SIGTERM drain right after start


def pin(pid: int, cpu: int) -> None:
    """Every thread of process ``pid`` on one CPU."""
    for thread in psutil.Process(pid).threads():
        try:
            os.sched_setaffinity(thread.id, {cpu})
        except OSError:  # the thread ended meanwhile
            pass


@pytest.mark.timeout(60)
def test_sigterm_right_after_start_lets_the_jobs_finish(hq: HQEnv) -> None:
    """3 workers, 3 jobs of 2 s submitted at once as soon as the supervisor is ready, then
    SIGTERM: all 3 complete before the supervisor exits 0 (none goes back to pending), and
    the drain's log line says "3 jobs running on 3 workers".

    The jobs reach the workers a moment before the drain begins; whether a worker has begun
    its job by then is a matter of scheduling, so the test makes it likely that it has not:
    the workers share one CPU, the supervisor (and this test) another, and the scene is
    played 4 times, each with a fresh supervisor."""
    cpus = sorted(os.sched_getaffinity(0))
    mine = set(cpus)
    try:
        for round_ in range(1, 5):
            sup = core_supervisor(hq, workers=3, grace=10.0)
            if len(cpus) >= 2:
                os.sched_setaffinity(0, {cpus[1]})
                pin(sup.pid, cpus[1])
                for worker in sup.worker_pids():
                    pin(worker, cpus[0])
            log = hq.path(f"ticks-{round_}.log")
            ids = submit_many(sup, f"{CORE}.tick",
                              [{"seconds": 2.0, "log": log, "tag": f"t{n}"} for n in range(3)])
            sup.signal(signal.SIGTERM)
            code = sup.wait_exit(20)
            st = statuses(sup, ids)
            text = sup.log_text()
            drain = [line.split("INFO ")[-1] for line in text.splitlines() if "draining" in line]
            assert st == {i: "completed" for i in ids}, (
                f"round {round_}: after a SIGTERM right after the submit the jobs are {st} (runs"
                f" started: {sum(r[0] == 'start' for r in log_rows(log))}); drain log: {drain}")
            assert code == 0
            assert "3 jobs running on 3 workers" in text, drain
    finally:
        os.sched_setaffinity(0, mine)


# ---------------------------------------------------------------------------------------------
# 9. no polling


def wakeups(pids: list[int]) -> int:
    """Voluntary context switches of these processes' threads, summed (a thread that sleeps
    in epoll and wakes for a timer counts one each time)."""
    total = 0
    for pid in pids:
        try:
            for t in psutil.Process(pid).threads():
                try:
                    with open(f"/proc/{pid}/task/{t.id}/status") as f:
                        for line in f:
                            if line.startswith("voluntary_ctxt_switches"):
                                total += int(line.split()[1])
                except FileNotFoundError:
                    pass
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.timeout(60)
def test_an_idle_supervisor_wakes_for_nothing(hq: HQEnv) -> None:
    """After jobs ran (each handed to an idle worker, which arms the start watchdog), a
    supervisor with nothing to do does not wake: its processes' threads do not switch once
    in 3.5 s (the watchdog, 3 s after the last hand-out, used to fire for nothing)."""
    sup = core_supervisor(hq, workers=2)
    ids = submit_many(sup, f"{CORE}.work", [{"i": i} for i in range(20)])
    ids += submit_many(sup, f"{CORE}.tick", [{"seconds": 0.1}])
    wait_ended(sup, ids, 20)
    pids = [sup.pid, *sup.worker_pids()]
    with sup.conn(10) as c:  # kept open: a client's hang-up would wake the supervisor
        def idle() -> bool:
            status = ok(c.request("status"))["status"]
            return bool(status["running_jobs"] == 0 and status["held_jobs"] == 0)

        wait_for(idle, 10, "nothing running or held", interval=0.05)
        # The last outcomes are stored and announced a moment after the jobs read ended:
        # the window starts once 0.3 s passed without a switch.
        last: list[int | None] = [None]  # the first look only takes the count

        def settled() -> bool:
            now = wakeups(pids)
            quiet, last[0] = now == last[0], now
            return quiet

        wait_for(settled, 5, "the supervisor to settle after the jobs", interval=0.3)
        before = wakeups(pids)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # a quiet period, measured from outside
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        woke = wakeups(pids) - before
    assert woke == 0, f"an idle supervisor and its workers woke {woke} times in 3.5 s"
