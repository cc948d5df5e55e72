"""Reliability under crashes and load (issue 5): kill -9 of the supervisor in a loop while
clients submit, worker faults beside a job that must not notice them, drains under load,
and a load run. What each test proves is in docs/reliability.md.

The long variants are marked ``torture`` (deselected by default; run them with
``-m torture``) and take their sizes from the environment:

- ``HQ_TORTURE_ROUNDS`` (default 20): kill -9 rounds of the crash torture;
- ``HQ_LOAD_SECONDS`` (default 300) and ``HQ_LOAD_CLIENTS`` (default 50): the load run;
- ``HQ_SEED``: the seed of the crash torture's random moments (printed by every run).

Every run prints its figures (acknowledged jobs, re-executions, RSS, ...) as lines starting
with ``[reliability]``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    TASKS,
    Conn,
    HQEnv,
    Supervisor,
    error_code,
    file_lines,
    is_alive,
    wait_for,
)

MIB = 1024 * 1024


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


TORTURE_ROUNDS = env_int("HQ_TORTURE_ROUNDS", 20)
LOAD_SECONDS = env_int("HQ_LOAD_SECONDS", 300)
LOAD_CLIENTS = env_int("HQ_LOAD_CLIENTS", 50)


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """A figure for the person running the tests (shown even with -q and capture)."""
    with capsys.disabled():
        print(f"\n[reliability] {text}", flush=True)


def start_serving(sup: Supervisor, timeout: float = 20.0) -> None:
    """(Re)start the supervisor; until its socket answers in state running."""
    sup.start_serving(timeout)


def job_count(sup: Supervisor, where: str = "1") -> int:
    return int(sup.db_query(f"SELECT COUNT(*) FROM jobs WHERE {where}")[0][0])


# ---------------------------------------------------------------------------------------------
# 1. crash torture


class Submitter(threading.Thread):
    """A client that keeps submitting ``runlog`` jobs (submit and submit_many), each with a
    token of its own, and records what was acknowledged. When the supervisor dies under it,
    it reconnects once the socket answers again."""

    def __init__(self, number: int, socket_path: Any, log: str, seed: int,
                 stop: threading.Event) -> None:
        super().__init__(name=f"submitter-{number}", daemon=True)
        self.number = number
        self.socket_path = socket_path
        self.log = log
        self.rng = random.Random(seed)
        self.stop = stop
        self.acked: dict[int, str] = {}  # job id -> token, for every ok:true reply
        self.sent: set[str] = set()  # every token ever sent, acknowledged or not
        self.unexpected: list[Any] = []  # error replies, mismatched acks
        self.requests = 0

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                conn = Conn(self.socket_path, timeout=10)
            except OSError:
                self.stop.wait(0.01)  # the supervisor is down: try again in a moment
                continue
            try:
                while not self.stop.is_set():
                    k = 1 if self.rng.random() < 0.5 else self.rng.randint(2, 8)
                    tokens = [f"c{self.number}-{n + i}" for i in range(k)]
                    n += k
                    self.sent.update(tokens)
                    args = [{"log": self.log, "token": t} for t in tokens]
                    self.requests += 1
                    if k == 1:
                        reply = conn.request("submit", task=f"{TASKS}.runlog", args=args[0])
                        jobs = [reply["job"]] if reply.get("ok") else None
                    else:
                        reply = conn.request("submit_many", task=f"{TASKS}.runlog", args=args)
                        jobs = reply["jobs"] if reply.get("ok") else None
                    if jobs is None or len(jobs) != k:
                        self.unexpected.append(reply)
                        continue
                    for job, token in zip(jobs, tokens):
                        if job["args"].get("token") != token or job["id"] in self.acked:
                            self.unexpected.append(("mismatched ack", token, job))
                        self.acked[job["id"]] = token
                    self.stop.wait(self.rng.uniform(0, 0.004))  # pace: a backlog, not a flood
            except (OSError, EOFError, ValueError):
                pass  # the supervisor died mid-request: that request was not acknowledged
            finally:
                conn.close()


class Careless(threading.Thread):
    """Clients that do not play along, beside the submitters: silent watchers of every
    event that never read (one per round, kept open), and clients that send `wait` (or
    `submit` with `wait`) and hang up at once. They must cost the supervisor neither its
    memory nor its descriptors, nor any job."""

    def __init__(self, socket_path: Any, log: str, stop: threading.Event) -> None:
        super().__init__(name="careless", daemon=True)
        self.socket_path = str(socket_path)
        self.log = log
        self.stop = stop
        self.watchers: list[socket.socket] = []
        self.vanished = 0
        self.sent: set[str] = set()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                if len(self.watchers) < 5:
                    w = socket.socket(socket.AF_UNIX)
                    w.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    w.connect(self.socket_path)
                    w.sendall(b'{"id": 1, "op": "watch"}\n')
                    self.watchers.append(w)
                s = socket.socket(socket.AF_UNIX)
                s.connect(self.socket_path)
                n += 1
                if n % 2:
                    s.sendall(b'{"id": 1, "op": "wait", "job": %d}\n' % n)
                else:
                    self.sent.add(f"v{n}")
                    s.sendall(json.dumps({"id": 1, "op": "submit", "task": f"{TASKS}.runlog",
                                          "args": {"log": self.log, "token": f"v{n}"},
                                          "wait": 30}).encode() + b"\n")
                s.close()
                self.vanished += 1
            except OSError:
                pass  # the supervisor is down: try again in a moment
            self.stop.wait(0.02)
        for w in self.watchers:
            w.close()


def crash_torture(hq: HQEnv, capsys: pytest.CaptureFixture[str], rounds: int) -> None:
    seed = env_int("HQ_SEED", random.randrange(1 << 30))
    rng = random.Random(seed)
    report(capsys, f"crash torture: {rounds} rounds, HQ_SEED={seed}")
    shm_before = set(os.listdir("/dev/shm"))
    log = hq.path("runs.log")
    sup = hq.supervisor(workers=3, grace=5, start=False)
    began = time.monotonic()
    start_serving(sup)
    stop = threading.Event()
    clients = [Submitter(i, sup.socket, log, seed + i, stop) for i in range(3)]
    for client in clients:
        client.start()
    careless = Careless(sup.socket, log, stop)
    careless.start()
    running_at_kill: set[int] = set()
    killed_workers: set[int] = set()  # pids of the workers of each supervisor killed
    per_round = []

    def acked_so_far() -> int:
        return sum(len(c.acked) for c in clients)

    try:
        for r in range(rounds):
            round_start = time.monotonic()
            acked_before = acked_so_far()
            kill_after = rng.uniform(0.2, 1.0)

            def due(t0: float = round_start, wait: float = kill_after, n: int = acked_before) -> bool:
                return time.monotonic() - t0 >= wait and acked_so_far() > n

            wait_for(due, 30, f"round {r}: {kill_after:.2f} s of submits with some acknowledged")
            killed_workers |= sup.worker_pids()
            sup.kill9()
            # Every worker dies with it (zombies count as dead: PID 1 here does not reap).
            wait_for(lambda: not sup.session(), 10,
                     f"round {r}: every worker of the killed supervisor to die")
            new_shm = set(os.listdir("/dev/shm")) - shm_before
            assert not new_shm, f"round {r}: shared memory left in /dev/shm: {sorted(new_shm)}"
            running = {int(row[0]) for row in sup.db_query("SELECT id FROM jobs WHERE status = 'running'")}
            running_at_kill |= running
            per_round.append((round(kill_after, 2), acked_so_far() - acked_before, len(running)))
            if r == rounds - 1:
                stop.set()  # the last round: no more submits, let the backlog drain
            start_serving(sup)
    finally:
        stop.set()
        for client in clients:
            client.join(15)
        careless.join(15)
    assert not any(c.is_alive() for c in clients), "a submitter thread is stuck"

    unexpected = [u for c in clients for u in c.unexpected]
    assert not unexpected, f"unexpected replies to submits: {unexpected[:5]}"
    acked: dict[int, str] = {}
    for client in clients:
        overlap = set(client.acked) & set(acked)
        assert not overlap, f"job ids acknowledged to two clients: {sorted(overlap)[:10]}"
        acked.update(client.acked)
    sent = set().union(*(c.sent for c in clients)) | careless.sent

    def backlog() -> int:
        return job_count(sup, "status != 'completed'")

    wait_for(lambda: backlog() == 0, 60 + len(acked) / 100,
             "every job in the store to complete after the final restart")
    rows = {int(r["id"]): dict(r) for r in sup.db_query("SELECT id, status, attempts, args FROM jobs")}
    by_token: dict[str, int] = {}
    for job_id, row in rows.items():
        token = json.loads(row["args"])["token"]
        assert token in sent, f"job {job_id} has a token no client sent: {token!r}"
        assert token not in by_token, f"token {token} is in the store twice: jobs {by_token[token]} and {job_id}"
        by_token[token] = job_id
    for job_id, token in acked.items():
        assert job_id in rows, f"acknowledged job {job_id} ({token}) is not in the store"
        assert by_token[token] == job_id, f"acknowledged job {job_id} holds another token"
        assert rows[job_id]["status"] == "completed", rows[job_id]

    lines = file_lines(log)
    runs: Counter[str] = Counter()
    for line in lines:
        fields = line.split()
        assert len(fields) == 4, f"a torn run-log line: {line!r}"
        token, job_id = fields[0], int(fields[1])
        assert by_token.get(token) == job_id, f"a run of a job that is not in the store: {line!r}"
        runs[token] += 1
    never = [t for t in by_token if runs[t] == 0]
    assert not never, f"{len(never)} stored jobs never ran: {never[:10]}"
    re_executions = 0
    wrong: list[str] = []  # jobs charged for runs that were not theirs, or run twice at once
    runs_by: dict[str, list[int]] = {}
    for line in lines:
        token, _, _, pid = line.split()
        runs_by.setdefault(token, []).append(int(pid))
    for token, n in runs.items():
        job_id = by_token[token]
        attempts = rows[job_id]["attempts"]
        if n > 1:
            re_executions += n - 1
        # At least once; a supervisor's death charges nothing, whether the job had
        # started (it runs again) or was only held or pending (it runs then): every
        # job ends completed with the one attempt that completed it.
        if attempts != 1:
            wrong.append(f"job {job_id} ({token}) ran {n} times; the store counts {attempts}"
                         f" attempts, running at a kill: {job_id in running_at_kill}")
        # Only a run cut short by a kill is run again: one run at most by the workers
        # of the supervisor that was not killed.
        survivors = [pid for pid in runs_by[token] if pid not in killed_workers]
        if len(survivors) > 1:
            wrong.append(f"job {job_id} ({token}) ran {len(survivors)} times in the last supervisor")
    interrupted = job_count(sup, "id IN (SELECT job_id FROM attempts WHERE status = 'interrupted')")
    assert sup.integrity() == "ok"
    # The careless clients cost nothing that stays: descriptors and memory are back.
    fds = len(os.listdir(f"/proc/{sup.pid}/fd"))
    rss = psutil.Process(sup.pid).memory_info().rss / 2**20
    assert fds < 64, f"the supervisor holds {fds} descriptors after the careless clients left"
    assert rss < 150, f"the supervisor holds {rss:.0f} MiB after the careless clients left"
    assert sup.stop() == 0
    took = time.monotonic() - began
    unacked_stored = len(rows) - len(acked)
    report(capsys, (
        f"crash torture: {rounds} rounds in {took:.1f} s; {len(acked)} jobs acknowledged"
        f" ({unacked_stored} more stored whose ack was cut off by a kill), {len(runs)} ran,"
        f" {len(running_at_kill)} were running in the store at a kill ({interrupted} recorded"
        f" as interrupted), {re_executions} re-executions, {len(wrong)} jobs charged or run"
        f" wrongly; {careless.vanished} clients sent a wait and hung up, {len(careless.watchers)}"
        f" watchers never read; at the end {fds} descriptors, {rss:.0f} MiB;"
        f" per round (kill at s, acks, running at kill): {per_round}"))
    assert not wrong, "\n".join(wrong[:10])


@pytest.mark.timeout(120)
def test_crash_torture_short(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    crash_torture(hq, capsys, rounds=3)


@pytest.mark.torture
@pytest.mark.timeout(120 + 20 * TORTURE_ROUNDS)
def test_crash_torture(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    crash_torture(hq, capsys, rounds=TORTURE_ROUNDS)


@pytest.mark.timeout(60)
def test_a_job_that_ran_while_its_start_could_not_be_stored_runs_again_uncharged(hq: HQEnv) -> None:
    """A job starts in its worker before its start is committed (it is `running` from the
    moment its task starts; the store learns of it a commit later). Here the test holds
    SQLite's write lock (as a stalled disk would) while the job runs and ends, and the
    supervisor is killed: its start and end never reached the store. After the restart
    it runs again (at least once), and the run the store never saw charges nothing:
    a job with retries=0 completes, with one attempt counted."""
    sup = hq.supervisor(workers=1)
    marker, release = hq.path("started"), hq.path("release")
    open(release, "w").close()  # the job ends as soon as it starts
    sup.call("pause", "paused")
    job = sup.submit("block", {"marker": marker, "release": release}, retries=0)["id"]
    lock = sqlite3.connect(str(sup.store), timeout=10, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # from now on no commit of the supervisor goes through
    try:
        sup.call("resume", "paused")  # in memory at once; its write waits for the lock
        wait_for(lambda: file_lines(marker), 10, "the job to start while the store is locked")
        assert sup.ping()["state"] == "running", "the supervisor answers while the store is locked"
        sup.kill9()
        wait_for(lambda: not sup.session(), 10, "the workers to die with the supervisor")
    finally:
        lock.rollback()
        lock.close()
    at_kill = sup.db_job(job)
    assert at_kill["status"] == "pending" and at_kill["attempts"] == 0, at_kill
    start_serving(sup)
    sup.call("resume", "paused")  # the first resume was not committed either
    done = sup.wait_job(job)
    runs = len(file_lines(marker))
    assert done["status"] == "completed" and done["attempts"] == 1 and runs == 2, (
        f"job {job} (retries=0) ran {runs} times and ended {done['status']} with"
        f" {done['attempts']} of {done['max_attempts']} attempts")


# ---------------------------------------------------------------------------------------------
# 2. worker faults


def pool_of(sup: Supervisor, n: int, keep: int, gone: set[int]) -> set[int]:
    """Wait until exactly ``n`` workers run, ``keep`` among them and none of ``gone``."""
    def ready() -> set[int] | None:
        pids = sup.worker_pids()
        return pids if len(pids) == n and keep in pids and not pids & gone else None

    found: set[int] = wait_for(ready, 15, f"{n} workers with {keep}, without {sorted(gone)}")
    return found


@pytest.mark.timeout(90)
def test_workers_dying_leave_a_job_on_another_worker_untouched(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=3, extra_args=("--prefetch", "1"))
    first_pool = sup.wait_workers(3)
    bystander_marker, release = hq.path("bystander"), hq.path("release")
    bystander = sup.submit("block", {"marker": bystander_marker, "release": release, "seconds": 60},
                           retries=0)["id"]
    wait_for(lambda: file_lines(bystander_marker), 10, "the bystander job to start")
    keep = int(file_lines(bystander_marker)[0].split()[2])
    assert keep in first_pool
    victims: set[int] = set()

    def fault(task: str, args: dict[str, Any], check: Any, kill: bool = False) -> dict[str, Any]:
        job = sup.submit(task, args, retries=0)["id"]
        if kill:  # kill -9 the worker once the job runs
            marker = str(args["marker"])
            wait_for(lambda: file_lines(marker), 10, f"{task} to start")
            os.kill(int(file_lines(marker)[0].split()[2]), signal.SIGKILL)
        done = sup.wait_job(job, timeout=30)
        assert done["status"] == "failed", done
        assert done["attempts"] == 1 == done["max_attempts"]
        check(done["error"])
        pid = done["worker_pid"]
        assert pid != keep, f"{task} ran on the bystander's worker"
        if not is_alive(pid):
            victims.add(pid)
        # The pool is back to three; the bystander's worker is still there, its job running.
        pool_of(sup, 3, keep, victims)
        assert is_alive(keep)
        live = sup.get(bystander)
        assert (live["status"], live["worker_pid"], live["attempts"]) == ("running", keep, 1), live
        return done

    def lost(message: str) -> Any:
        def check(error: dict[str, Any]) -> None:
            assert error["type"] == "WorkerLost", error
            assert error["message"].startswith(message), error
        return check

    fault("exit_code", {"code": 3}, lost("worker exited with code 3"))
    fault("segfault", {}, lost("worker killed by signal SIGSEGV"))
    fault("block", {"marker": hq.path("killed"), "release": release}, lost("worker killed by signal SIGKILL"),
          kill=True)

    def out_of_memory(error: dict[str, Any]) -> None:
        # Either the task sees MemoryError (reported with its traceback), or the worker dies
        # of it (reported as a lost worker): both name the cause.
        if error["type"] == "MemoryError":
            assert "memhog" in error["traceback"] and "MemoryError" in error["traceback"], error
        else:
            assert error["type"] == "WorkerLost" and error["message"].startswith("worker "), error

    hog = fault("memhog", {"marker": hq.path("hog"), "headroom_mb": 64, "chunk_mb": 1}, out_of_memory)
    hog_pid = hog["worker_pid"]
    if is_alive(hog_pid):
        # It survived its MemoryError: what the job allocated was freed, and it still works.
        rss = psutil.Process(hog_pid).memory_info().rss
        assert rss < 200 * MIB, f"the worker still holds {rss / MIB:.0f} MiB after its job failed"
    assert len(victims) >= 3, f"three jobs killed their workers, dead: {victims}"

    # Every worker of the pool runs jobs (three at once: one per worker, with prefetch 1).
    jobs = [sup.submit("sleeper", {"seconds": 0.3})["id"] for _ in range(2)]
    for job in jobs:
        assert sup.wait_job(job)["status"] == "completed"

    open(release, "w").close()
    done = sup.wait_job(bystander)
    assert done["status"] == "completed", done
    assert done["attempts"] == 1 and done["worker_pid"] == keep
    assert done["result"] == {"released": True, "pid": keep}
    assert sup.get(bystander)["attempt_log"] == []
    assert len(file_lines(bystander_marker)) == 1, "the bystander job was started twice"


@pytest.mark.timeout(60)
def test_a_job_closing_stdout_fails_clearly_and_later_jobs_are_unaffected(hq: HQEnv) -> None:
    """A task that closes file descriptor 1 and prints fails with a clear error. The worker may
    live on or be replaced, but the damage must not reach later jobs: a later job's print
    must not land in a file that job opened (which gets the lowest free descriptor: 1)."""
    sup = hq.supervisor(workers=1)
    marker = hq.path("closer")
    job = sup.submit("close_stdout", {"marker": marker})["id"]
    done = sup.wait_job(job)
    assert done["status"] == "failed", done
    error = done["error"]
    if error["type"] == "OSError":
        assert "Bad file descriptor" in error["message"], error
    else:
        assert error["type"] == "WorkerLost", error
    closer = int(file_lines(marker)[0].split()[2])
    sup.wait_workers(1)

    # The next jobs run on the same worker if it survived (there is only one).
    for i in range(3):
        path = hq.path(f"out-{i}")
        later = sup.wait_job(sup.submit("print_to", {"path": path, "text": f"PRINTED-{i}"})["id"])
        assert later["status"] == "completed", later
        content = Path(path).read_text()
        assert content == "file content\n", (
            f"job {later['id']} on worker {later['worker_pid']} (the worker whose stdout job"
            f" {job} closed: {later['worker_pid'] == closer}) printed into its own file: {content!r}")


# ---------------------------------------------------------------------------------------------
# 3. drain under load


def busy_with_waiting(hq: HQEnv, sup: Supervisor, seconds: list[float], waiting: int,
                      release: str) -> tuple[list[int], list[int], str, str]:
    """Three long ``block`` jobs running (one per worker), then ``waiting`` short ``runlog``
    jobs queued behind them. Returns (long ids, waiting ids, marker, run log)."""
    marker, log = hq.path("long"), hq.path("runs.log")
    long = [sup.submit("block", {"marker": marker, "release": release, "seconds": s}, retries=0)["id"]
            for s in seconds]
    wait_for(lambda: len(file_lines(marker)) == len(long), 10, "the long jobs to run on every worker")
    queued = [j["id"] for j in sup.call(
        "submit_many", "jobs", task=f"{TASKS}.runlog",
        args=[{"log": log, "token": f"w{i}", "sleep": 0} for i in range(waiting)])]
    return long, queued, marker, log


def assert_nothing_started_after(sup: Supervisor, signalled_at: float, log: str) -> None:
    late = sup.db_query("SELECT id, started_at FROM jobs WHERE started_at > ?", (signalled_at + 0.05,))
    assert not late, f"jobs started after the signal: {[dict(r) for r in late][:5]}"
    assert file_lines(log) == [], f"queued jobs ran during the drain: {file_lines(log)[:5]}"


def assert_refused_at_once(sup: Supervisor) -> float:
    slowest = 0.0
    for op, fields in (("submit", {"args": {"a": 1, "b": 2}}),
                       ("submit_many", {"args": [{"a": 1, "b": 2}] * 3})):
        t = time.monotonic()
        reply = sup.request(op, task=f"{TASKS}.add", **fields)
        took = time.monotonic() - t
        assert error_code(reply) == "draining", reply
        assert took < 0.5, f"{op} took {took:.2f} s to be refused while draining"
        slowest = max(slowest, took)
    return slowest


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig, waiting", [(signal.SIGTERM, 200), (signal.SIGINT, 50)], ids=["TERM", "INT"])
def test_drain_under_load_starts_nothing_and_lets_running_jobs_finish(
        hq: HQEnv, capsys: pytest.CaptureFixture[str], sig: int, waiting: int) -> None:
    grace = 5.0
    sup = hq.supervisor(workers=3, grace=grace, extra_args=("--prefetch", "1"))
    long, queued, marker, log = busy_with_waiting(hq, sup, [1.0, 1.5, 2.0], waiting, hq.path("never"))

    signalled_at = time.time()
    sent = time.monotonic()
    sup.signal(sig)
    wait_for(lambda: sup.status()["state"] == "draining", 5, "status to say draining")
    assert sup.ping()["state"] == "draining"
    refused = assert_refused_at_once(sup)
    code = sup.wait_exit(grace + 3)
    took = time.monotonic() - sent
    assert code == 0, sup.log_text()[-2000:]
    assert took <= grace + 3

    for job in long:  # finished within the grace, by themselves
        row = sup.db_job(job)
        assert (row["status"], row["attempts"]) == ("completed", 1), row
        assert row["finished_at"] <= signalled_at + grace, row
        assert json.loads(row["result"])["released"] is False
    for job in queued:
        row = sup.db_job(job)
        assert (row["status"], row["attempts"], row["started_at"]) == ("pending", 0, None), row
    assert_nothing_started_after(sup, signalled_at, log)
    assert job_count(sup) == len(long) + len(queued), "a refused submit was stored"
    wait_for(lambda: not sup.session(), 5, "every worker to exit with the supervisor")

    start_serving(sup)
    wait_for(lambda: job_count(sup, "status = 'completed'") == len(long) + len(queued), 30,
             "the restarted supervisor to complete every queued job")
    assert Counter(line.split()[0] for line in file_lines(log)) == Counter(f"w{i}" for i in range(waiting))
    assert len(file_lines(marker)) == 3
    report(capsys, f"drain ({signal.Signals(sig).name}): exit 0 {took:.2f} s after the signal (grace {grace} s),"
                   f" submits refused in {refused * 1000:.1f} ms")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig, grace", [(signal.SIGTERM, 1.5), (signal.SIGQUIT, 30.0)], ids=["TERM", "QUIT"])
def test_stop_under_load_puts_unfinished_jobs_back_uncharged(
        hq: HQEnv, capsys: pytest.CaptureFixture[str], sig: int, grace: float) -> None:
    """Jobs longer than the grace (TERM), or any running job (QUIT: no grace), go back to
    pending with the attempt not charged; a restart completes everything."""
    sup = hq.supervisor(workers=3, grace=grace, extra_args=("--prefetch", "1"))
    release = hq.path("release")
    long, queued, marker, log = busy_with_waiting(hq, sup, [60.0] * 3, 200, release)

    signalled_at = time.time()
    sent = time.monotonic()
    sup.signal(sig)
    code = sup.wait_exit(grace + 3 if sig == signal.SIGTERM else 3)
    took = time.monotonic() - sent
    assert code == 0, sup.log_text()[-2000:]
    if sig == signal.SIGTERM:
        assert grace * 0.9 <= took <= grace + 3, f"exited {took:.2f} s after SIGTERM (grace {grace} s)"
    else:
        assert took < 3, f"SIGQUIT took {took:.2f} s"

    for job in long + queued:
        row = sup.db_job(job)
        assert (row["status"], row["attempts"], row["started_at"]) == ("pending", 0, None), row
    assert job_count(sup) == len(long) + len(queued)
    assert sup.db_query("SELECT COUNT(*) FROM attempts")[0][0] == 0, "a stopped attempt was recorded"
    assert_nothing_started_after(sup, signalled_at, log)
    wait_for(lambda: not sup.session(), 5, "every worker to exit with the supervisor")

    open(release, "w").close()
    start_serving(sup)
    wait_for(lambda: job_count(sup, "status = 'completed'") == len(long) + len(queued), 30,
             "the restarted supervisor to complete everything")
    for job in long:
        row = sup.db_job(job)
        assert row["attempts"] == 1 and json.loads(row["result"])["released"] is True, row
    assert len(file_lines(marker)) == 6, "each long job ran once before the stop and once after"
    assert sorted(line.split()[0] for line in file_lines(log)) == sorted(f"w{i}" for i in range(200))
    assert sup.stop() == 0
    report(capsys, f"stop ({signal.Signals(sig).name}) with 3 jobs past the grace and 200 queued:"
                   f" exit 0 after {took:.2f} s (grace {grace} s)")


# ---------------------------------------------------------------------------------------------
# 6. load


def load_run(hq: HQEnv, capsys: pytest.CaptureFixture[str], clients: int, seconds: float) -> None:
    sup = hq.supervisor(workers=2)
    proc = psutil.Process(sup.pid)
    rss_idle = proc.memory_info().rss
    began = time.monotonic()
    stop_at = began + seconds
    acked: list[list[tuple[int, int]]] = [[] for _ in range(clients)]  # (job id, expected result)
    errors: list[Any] = []

    def client(n: int) -> None:
        rng = random.Random(n)
        try:
            with Conn(sup.socket, timeout=60) as c:
                while time.monotonic() < stop_at:
                    if rng.random() < 0.8:
                        a, b = rng.randrange(10**6), rng.randrange(10**6)
                        reply = c.request("submit", task=f"{TASKS}.add", args={"a": a, "b": b})
                        if not reply.get("ok"):
                            errors.append(reply)
                            continue
                        jobs = [(reply["job"]["id"], a + b)]
                    else:
                        pairs = [(rng.randrange(10**6), rng.randrange(10**6)) for _ in range(3)]
                        reply = c.request("submit_many", task=f"{TASKS}.add",
                                          args=[{"a": a, "b": b} for a, b in pairs])
                        if not reply.get("ok"):
                            errors.append(reply)
                            continue
                        jobs = [(j["id"], a + b) for j, (a, b) in zip(reply["jobs"], pairs)]
                    acked[n].extend(jobs)
                    for job_id, expected in jobs:
                        done = c.request("wait", job=job_id, timeout=30, reply_timeout=40)
                        if not done.get("ok") or done["job"]["status"] != "completed" \
                                or done["job"]["result"] != expected:
                            errors.append(done)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    samples: list[tuple[float, int]] = []
    while any(t.is_alive() for t in threads) and time.monotonic() < stop_at + 60:
        samples.append((time.monotonic() - began, proc.memory_info().rss))
        threads[0].join(0.25)  # sample the supervisor's RSS four times a second
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a load client is stuck"
    rss_end = proc.memory_info().rss
    warm = min(2.0, seconds / 10)
    rss_start = next((rss for at, rss in samples if at >= warm), samples[-1][1])
    rss_max = max(rss for _, rss in samples)

    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    ids = [job_id for per in acked for job_id, _ in per]
    expected = {job_id: result for per in acked for job_id, result in per}
    assert len(ids) == len(set(ids)), "a job id was acknowledged twice"
    rows = {int(r["id"]): (r["status"], r["result"]) for r in sup.db_query("SELECT id, status, result FROM jobs")}
    assert set(rows) == set(ids), (
        f"lost: {sorted(set(ids) - set(rows))[:10]}, never acknowledged: {sorted(set(rows) - set(ids))[:10]}")
    wrong = [(i, rows[i]) for i in ids if rows[i] != ("completed", json.dumps(expected[i]))]
    assert not wrong, f"jobs not completed with their result: {wrong[:5]}"
    assert sup.integrity() == "ok"
    took = time.monotonic() - began
    report(capsys, (
        f"load: {clients} clients for {seconds:.0f} s: {len(ids)} jobs submitted and waited for"
        f" ({len(ids) / took:.0f}/s), 0 errors; supervisor RSS idle {rss_idle / MIB:.1f} MiB,"
        f" after {warm:.1f} s warm-up {rss_start / MIB:.1f} MiB, max {rss_max / MIB:.1f} MiB,"
        f" end {rss_end / MIB:.1f} MiB"))
    assert rss_end <= rss_start * 1.5 + 20 * MIB, (
        f"the supervisor grew from {rss_start / MIB:.1f} MiB to {rss_end / MIB:.1f} MiB")
    assert sup.stop() == 0


@pytest.mark.timeout(90)
def test_load_short(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    load_run(hq, capsys, clients=10, seconds=8)


@pytest.mark.torture
@pytest.mark.timeout(LOAD_SECONDS + 180)
def test_load(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    load_run(hq, capsys, clients=LOAD_CLIENTS, seconds=LOAD_SECONDS)
