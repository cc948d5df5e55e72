"""hostqueue's side of the benchmark: a real supervisor (`python -m hostqueue run`)
on a temporary store with the default durable settings, driven over its socket
by the benchmark's own protocol client (hqsocket.py), as a user's program would.

Only the CLI and the socket protocol (and, read-only, the store's jobs table)
are used: nothing of hostqueue is imported here, so that any checkout can be
measured whatever its module layout, and two checkouts side by side
(bench.py --against) with the same client code. The supervisor and its workers
import hostqueue from the checkout given (PYTHONPATH); Supervisor.start checks
that they did.

Every figure is taken by ``measure_round``; bench.py repeats rounds and prints
the medians. A functional failure (a job lost, failed or never answered) raises
BenchError: the benchmark then exits non-zero, which is what the quick mode
(and tests/test_bench.py) checks. Times never fail anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
from common import BenchError, idle_usage, latency_figures, rss_mb, wait_until
from hqsocket import Client

# The task module of every supervisor: public API only (hostqueue.task).
TASKS = '''
import time

import hostqueue

@hostqueue.task
def noop(ctx):
    return True

@hostqueue.task
def work(ctx, i, slow=0.0):
    if slow:
        time.sleep(slow)
    return i

@hostqueue.task
def where(ctx):
    return hostqueue.__file__
'''
TASK = "benchtasks.noop"
WORK_TASK = "benchtasks.work"  # sleeps `slow` seconds (fast jobs beside a slow one)
CHUNK = 1000  # jobs per submit_many request
SETTLE = 1.0  # seconds after a fill before its memory is measured
DRAIN_SECONDS = 5.0  # the pending jobs draining after the restart: RSS sampled this long
FILL_CHUNK = 10_000  # jobs per submit_many request when filling the deep queue


@dataclass
class Sizes:
    """How much work each figure does (the quick mode shrinks all of it)."""

    jobs: int = 20_000  # end to end, bulk enqueue, each scaling point
    # Bulk enqueue: 20,000 jobs take 60-70 ms at 300,000 jobs/s, a window that one
    # checkpoint or vCPU stall moves by 30%: the figure is the median of this many.
    bursts: int = 5
    one_by_one: int = 3_000  # sequential submits (each waits for its ack)
    latency: int = 300
    # At depth, latency is compared with an empty store's, job by job: the p99 of
    # 300 samples is their third worst and moved by +-25% between runs, depth or not.
    depth_latency: int = 1_000
    scaling: tuple[int, ...] = (1, 2, 4, 8)
    scale_to: int = 16
    depth: int = 1_000_000
    idle: float = 10.0
    warmup: int = 500


QUICK = Sizes(jobs=2_000, bursts=1, one_by_one=300, latency=50, depth_latency=50, scaling=(1, 2), scale_to=4,
              depth=20_000, idle=1.0, warmup=100)


# Checkouts whose workers were seen to import hostqueue from them (once per process).
_CHECKED: set[str] = set()
# bench.py --store URL: supervisors use this PostgreSQL server, each on a fresh schema
# of its own (dropped when it closes) instead of a SQLite file.
PG_URL: str | None = None
_schemas = 0


class PgReader:
    """The few calls of sqlite3's connection the benchmark uses (execute with ``?``
    placeholders, fetchone, close), on one PostgreSQL connection."""

    def __init__(self, url: str, schema: str) -> None:
        import asyncio

        import asyncpg

        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(
            asyncpg.connect(url, timeout=10, server_settings={"search_path": schema}))

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> "PgReader":
        parts = sql.split("?")
        text = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
        self.rows = self.loop.run_until_complete(self.conn.fetch(text, *params))
        return self

    def fetchone(self) -> Any:
        return tuple(self.rows[0]) if self.rows else None

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


def pg_safe(url: str) -> str:
    """The URL without its password, for reports."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                     + (f":{parts.port}" if parts.port else "")))


def pg_execute(url: str, sql: str) -> None:
    """One statement on the PostgreSQL server (asyncpg; the bench imports nothing of hostqueue)."""
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


class Supervisor:
    """One `hostqueue run` process on a store in a temporary directory."""

    def __init__(self, source: str, workers: int, workdir: str | None = None) -> None:
        self.source = source
        self.workers = workers
        self.own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="hqbench-", dir="/tmp")
        with open(os.path.join(self.dir, "benchtasks.py"), "w") as f:
            f.write(TASKS)
        self.store = os.path.join(self.dir, "bench.db")
        self.pg_schema: str | None = None
        if PG_URL is not None:
            global _schemas
            _schemas += 1
            self.store = PG_URL
            self.pg_schema = f"hqbench_{os.getpid()}_{_schemas}"
            pg_execute(PG_URL, f"DROP SCHEMA IF EXISTS {self.pg_schema} CASCADE")
        self.socket = os.path.join(self.dir, "bench.sock")
        self.log = open(os.path.join(self.dir, "supervisor.log"), "ab")  # noqa: SIM115 - kept open for the process
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: Any = None

    # -- start and stop

    def start(self, timeout: float = 120.0) -> float:
        """Start the supervisor; return the seconds until its workers were all idle."""
        env = dict(os.environ, PYTHONPATH=self.source + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hostqueue", "run", "--store", self.store, "--socket", self.socket,
             "--workers", str(self.workers), "--tasks", os.path.join(self.dir, "benchtasks.py"),
             "--log-level", "warning"] + (["--pg-schema", self.pg_schema] if self.pg_schema else []),
            cwd=self.dir, env=env, start_new_session=True, stdout=self.log, stderr=self.log,
        )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"the supervisor exited with code {self.proc.returncode}; "
                                 f"its log:\n{self.log_tail()}")
            try:
                with Client(self.socket, timeout=5) as c:
                    return self._idle_count(c.status()) >= self.workers
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_until(up, timeout, "the supervisor to start", interval=0.01)
        took = time.perf_counter() - t0
        self.client = Client(self.socket, timeout=120)
        self.client.connect()
        if self.source not in _CHECKED:
            self.check_source()
        return took

    def check_source(self) -> None:
        """That the workers run the hostqueue of self.source (PYTHONPATH comes first,
        before an installed or editable hostqueue), by one job of the task `where`.
        The job goes to a queue of its own, out of every figure's way."""
        job = self.client.submit("benchtasks.where", queue="bench-where", wait=60).job
        want = os.path.join(os.path.realpath(self.source), "hostqueue") + os.sep
        got = job.get("result")
        if job["status"] != "completed" or not isinstance(got, str) \
                or not os.path.realpath(got).startswith(want):
            raise BenchError(f"the workers do not run the hostqueue of {self.source}:"
                             f" job 'where' ended {job['status']} with {got!r} {job.get('error')!r}")
        _CHECKED.add(self.source)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                stack = py_spy_dump(self.proc.pid)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise BenchError("the supervisor did not stop within 60 s of SIGTERM;"
                                 f" its threads then:\n{stack}") from None
            if self.proc.returncode != 0:
                raise BenchError(f"the supervisor exited with code {self.proc.returncode} on SIGTERM;"
                                 f" its log:\n{self.log_tail()}")
        self.proc = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()
            if self.own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            if self.pg_schema and PG_URL is not None:
                pg_execute(PG_URL, f"DROP SCHEMA IF EXISTS {self.pg_schema} CASCADE")

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(os.path.join(self.dir, "supervisor.log"), "rb") as f:
            data = f.read()
        return data[-n:].decode(errors="replace")

    def check_log(self) -> None:
        """Errors in the supervisor's log are functional failures of the run."""
        text = self.log_tail(200_000)
        bad = [line for line in text.splitlines()
               if " ERROR " in line or "Traceback" in line or " CRITICAL " in line]
        if bad:
            raise BenchError("the supervisor logged errors:\n" + "\n".join(bad[:20]))

    # -- helpers

    @staticmethod
    def _idle_count(status: dict[str, Any]) -> int:
        return sum(1 for w in status["workers"] if w["state"] == "idle")

    def wait_pool(self, n: int, timeout: float = 60.0) -> None:
        """Until the pool is exactly n idle workers."""
        def ready() -> bool:
            ws = self.client.status()["workers"]
            return len(ws) == n and all(w["state"] == "idle" for w in ws)

        wait_until(ready, timeout, f"{n} idle workers", interval=0.01)

    def processes(self) -> tuple[psutil.Process, list[psutil.Process]]:
        assert self.proc is not None
        sup = psutil.Process(self.proc.pid)
        return sup, sup.children(recursive=True)

    def db(self) -> Any:
        """A read-only view of the store: the SQLite file, or (--store URL) the schema."""
        if self.pg_schema is not None and PG_URL is not None:
            return PgReader(PG_URL, self.pg_schema)
        return sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=30)


def py_spy_dump(pid: int) -> str:
    """The Python stacks of a process, if py-spy is installed (for error reports)."""
    if shutil.which("py-spy") is None:
        return "(py-spy is not installed)"
    try:
        return subprocess.run(["py-spy", "dump", "-p", str(pid)], check=False, capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(py-spy dump failed: {exc})"


# -- one figure each ---------------------------------------------------------------


def submit_bulk(sup: Supervisor, n: int, queue: str | None = None, run_id: str | None = None,
                chunk: int = CHUNK, window: int = 32) -> tuple[int, int, float]:
    """n jobs by submit_many in chunks, at most `window` requests in flight;
    (first id, last id, seconds to the last ack)."""
    c = sup.client
    fields: dict[str, Any] = {}
    if queue:
        fields["queue"] = queue
    if run_id:
        fields["run_id"] = run_id
    t0 = time.perf_counter()
    sizes = [min(chunk, n - i) for i in range(0, n, chunk)]
    inflight: list[int] = []
    first = last = -1
    count = 0

    def take() -> None:
        nonlocal first, last, count
        ids = c.receive(inflight.pop(0))["ids"]
        if first < 0:
            first = ids[0]
        last = ids[-1]
        count += len(ids)

    for size in sizes:
        if len(inflight) >= window:
            take()
        # The ids alone come back (reply="ids"), as a batch producer would ask.
        inflight.append(c.send("submit_many", task=TASK, args=[{}] * size, reply="ids", **fields))
    while inflight:
        take()
    took = time.perf_counter() - t0
    if count != n or last - first + 1 != n:
        raise BenchError(f"submit_many acknowledged {count} jobs ({first}..{last}) of {n}")
    return first, last, took


def submit_pipelined(sup: Supervisor, n: int, queue: str | None = None) -> tuple[int, int, float]:
    """n single submits sent without waiting for each ack; (first id, last id, seconds)."""
    c = sup.client
    fields = {"queue": queue} if queue else {}
    t0 = time.perf_counter()
    rids = [c.send("submit", task=TASK, **fields) for _ in range(n)]
    ids = [c.receive(rid)["job"]["id"] for rid in rids]
    took = time.perf_counter() - t0
    if len(set(ids)) != n or max(ids) - min(ids) + 1 != n:
        raise BenchError(f"pipelined submits acknowledged {len(set(ids))} distinct jobs of {n}")
    return min(ids), max(ids), took


class Capped(Exception):
    """A measurement ran past its time budget: the rate so far is the figure."""

    def __init__(self, done: int, n: int, last_finished: float | None) -> None:
        super().__init__(f"{done} of {n} jobs completed within the time budget")
        self.done = done
        self.n = n
        self.last_finished = last_finished


def wait_done(sup: Supervisor, first: int, last: int, budget: float = 300.0) -> float:
    """Wait until jobs first..last are all completed; return the last finished_at.

    Capped if they are still progressing when the budget runs out; BenchError if
    any ended otherwise than completed."""
    c = sup.client
    n = last - first + 1
    deadline = time.monotonic() + budget
    open_id: int | None = last
    db = sup.db()
    try:
        while True:
            if open_id is not None:
                try:
                    c.wait(open_id, timeout=max(0.05, min(5.0, deadline - time.monotonic())))
                except TimeoutError:
                    pass
            done, bad, newest, open_id = db.execute(
                "SELECT SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END),"
                " SUM(CASE WHEN status NOT IN ('completed', 'pending', 'running') THEN 1 ELSE 0 END),"
                " MAX(finished_at), MAX(CASE WHEN status IN ('pending', 'running') THEN id END)"
                " FROM jobs WHERE id BETWEEN ? AND ?", (first, last),
            ).fetchone()
            if bad:
                row = db.execute("SELECT id, status, error FROM jobs WHERE id BETWEEN ? AND ?"
                                 " AND status NOT IN ('completed', 'pending', 'running') LIMIT 1",
                                 (first, last)).fetchone()
                raise BenchError(f"{bad} of {n} jobs did not complete, e.g. job {row[0]}: {row[1]} {row[2]}")
            if done == n:
                return float(newest)
            if time.monotonic() > deadline:
                raise Capped(done or 0, n, newest)
    finally:
        db.close()


def _e2e(sup: Supervisor, n: int, submit: Callable[[], tuple[int, int, float]], name: str,
         budget: float) -> dict[str, float]:
    t0 = time.time()
    first, last, ack = submit()
    try:
        end = wait_done(sup, first, last, budget)
    except Capped as cap:
        return {name: cap.done / (time.time() - t0), f"{name}_ack": n / ack, f"{name}_capped": 1.0}
    return {name: n / (end - t0), f"{name}_ack": n / ack}


def end_to_end_bulk(sup: Supervisor, n: int, queue: str | None = None,
                    budget: float = 120.0) -> dict[str, float]:
    """From the first submit_many to the last job's completion, jobs/s."""
    return _e2e(sup, n, lambda: submit_bulk(sup, n, queue=queue), "e2e_bulk", budget)


def end_to_end_pipelined(sup: Supervisor, n: int, queue: str | None = None,
                         budget: float = 120.0) -> dict[str, float]:
    """From the first of n pipelined single submits to the last completion, jobs/s."""
    return _e2e(sup, n, lambda: submit_pipelined(sup, n, queue=queue), "e2e_one", budget)


def enqueue_rates(sup: Supervisor, one: int, bulk: int, queue: str = "enqueue",
                  run_after: bool = True, budget: float = 120.0, bursts: int = 1) -> dict[str, float]:
    """Enqueue alone: sequential submits (each waits for its ack), then `bursts`
    times submit_many of `bulk` jobs (the median burst is the figure), into a
    paused queue so that nothing runs meanwhile. With run_after, what was enqueued
    runs (the queue resumed, then paused again) before each further burst and at
    the end, so that the jobs neither stay behind later figures nor pile up into a
    larger burst than the peers'; without, they stay pending."""
    c = sup.client
    c.pause(queue)
    t0 = time.perf_counter()
    first = last = c.submit(TASK, queue=queue).id
    for _ in range(one - 1):
        last = c.submit(TASK, queue=queue).id
    one_rate = one / (time.perf_counter() - t0)

    def run_enqueued() -> bool:
        c.resume(queue)
        try:
            wait_done(sup, first, last, budget)
        except Capped:
            c.pause(queue)  # they stay pending, behind what follows
            return False
        return True

    rates = []
    for burst in range(bursts):
        if run_after and burst and not run_enqueued():
            run_after = False
        c.pause(queue)
        _, last, took = submit_bulk(sup, bulk, queue=queue)
        rates.append(bulk / took)
    if run_after:
        run_enqueued()
    return {"enqueue_one": one_rate, "enqueue_bulk": statistics.median(rates)}


def latency(sup: Supervisor, n: int, queue: str | None = None, budget: float = 60.0,
            one_request: bool = False) -> dict[str, float]:
    """Submit one job, wait for its result, n times in a row (after 20 to warm up):
    `submit` then `wait` (two requests, figures lat_*), or with one_request a
    `submit` with `wait` (figures lat1_*)."""
    return latency_interleaved([sup], n, queue, budget, one_request)[0]


def latency_interleaved(sups: list[Supervisor], n: int, queue: str | None = None,
                        budget: float = 60.0, one_request: bool = False) -> list[dict[str, float]]:
    """latency() on several supervisors at once, one job on each in turn: the
    machine's drift, minute to minute, then falls on all of them alike. The turn
    starts with each supervisor in rotation: the one measured right after
    another's job shares the machine with that supervisor's work after its reply."""
    fields: dict[str, Any] = {"queue": queue} if queue else {}
    if one_request:
        fields["wait"] = max(30.0, budget)
    samples: list[list[float]] = [[] for _ in sups]
    deadline = time.monotonic() + budget
    pairs = list(zip(sups, samples))
    for i in range(20 + n):
        k = i % len(pairs)
        for sup, taken in pairs[k:] + pairs[:k]:
            c = sup.client
            t0 = time.perf_counter()
            job = c.submit(TASK, **fields)
            done = job.job if one_request else c.wait(job.id, timeout=max(30.0, budget))
            if i >= 20:
                taken.append(time.perf_counter() - t0)
            if done["status"] != "completed" or done["result"] is not True:
                raise BenchError(f"job {job.id} ended {done['status']} with result {done['result']!r}")
        if time.monotonic() > deadline and len(samples[0]) >= 10:
            break
    out = []
    for taken in samples:
        figures = latency_figures(taken, n)
        out.append({"lat1" + k[3:]: v for k, v in figures.items()} if one_request else figures)
    return out


def memory(sup: Supervisor) -> dict[str, float]:
    s, workers = sup.processes()
    per = sorted(rss_mb([w]) for w in workers)
    sup_rss = rss_mb([s])
    return {"rss_supervisor": sup_rss, "rss_workers": sum(per), "rss_total": sup_rss + sum(per),
            "rss_worker": per[len(per) // 2] if per else 0.0}


def idle(sup: Supervisor, seconds: float) -> dict[str, float]:
    time.sleep(min(2.0, seconds))  # let the last commit, sampler and timers settle
    s, workers = sup.processes()
    return idle_usage([s] + workers, seconds)


def scaling(sup: Supervisor, counts: tuple[int, ...], n: int, back_to: int) -> dict[str, float]:
    """End to end (bulk) with each pool size."""
    out = {}
    for w in counts:
        sup.client.scale(w)
        sup.wait_pool(w)
        out[f"scale_{w}"] = end_to_end_bulk(sup, n)["e2e_bulk"]
    sup.client.scale(back_to)
    sup.wait_pool(back_to)
    return out


def scale_up_time(sup: Supervisor, to: int, back_to: int) -> dict[str, float]:
    """Seconds from `scale` to `to` until status shows that many idle workers, from 1."""
    c = sup.client
    c.scale(1)
    sup.wait_pool(1)
    time.sleep(0.2)
    t0 = time.perf_counter()
    c.scale(to)
    sup.wait_pool(to, timeout=120)
    took = time.perf_counter() - t0
    c.scale(back_to)
    sup.wait_pool(back_to)
    return {"scale_up": took}


# Fast jobs beside one slow job (slow_wait): the scenario's sizes.
SLOW_WORKERS = 2
SLOW_TEACH = 2_000  # fast jobs run first, so that the supervisor knows the task as fast
SLOW_JOBS = 200  # then one submit_many of this many,
SLOW_INDEX = 5  # of which the job with i == SLOW_INDEX sleeps
SLOW_SECONDS = 2.0  # this long, and every other one not at all


def slow_wait(source: str, log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """Fast jobs beside one slow one, on a fresh supervisor with 2 workers: with a
    worker free, no fast job should wait behind the slow one.

    The task `work` runs SLOW_TEACH times (all fast) to completion; then one
    submit_many of SLOW_JOBS jobs, job i == SLOW_INDEX sleeping SLOW_SECONDS. Figures
    from the jobs' own times (the `wait` replies: created_at, started_at,
    finished_at, Unix seconds of the supervisor): slow_wait, the longest
    finished_at - created_at of the fast jobs (ms); slow_wait_p50, their median;
    slow_late, how many fast jobs finished over 1 s after the slow one started;
    slow_job, the slow job's own created-to-finished (ms)."""
    sup = Supervisor(source, SLOW_WORKERS)
    try:
        sup.start()
        c = sup.client
        log(f"fast jobs beside a slow one: teaching ({SLOW_TEACH:,} fast jobs)")
        ids: list[int] = []
        for k in range(0, SLOW_TEACH, CHUNK):
            ids += c.submit_many_ids(WORK_TASK, [{"i": i} for i in range(k, min(k + CHUNK, SLOW_TEACH))])
        if len(ids) != SLOW_TEACH or ids[-1] - ids[0] + 1 != SLOW_TEACH:
            raise BenchError(f"submit_many acknowledged {len(ids)} jobs of {SLOW_TEACH}")
        wait_done(sup, ids[0], ids[-1], budget=60.0)
        log(f"fast jobs beside a slow one: {SLOW_JOBS} jobs, one of {SLOW_SECONDS:g} s")
        args = [{"i": i, "slow": SLOW_SECONDS if i == SLOW_INDEX else 0.0} for i in range(SLOW_JOBS)]
        ids = c.submit_many_ids(WORK_TASK, args)
        if len(ids) != SLOW_JOBS:
            raise BenchError(f"submit_many acknowledged {len(ids)} jobs of {SLOW_JOBS}")
        rids = [c.send("wait", job=j, timeout=60) for j in ids]
        jobs = [c.receive(r, timeout=90)["job"] for r in rids]
        for a, job in zip(args, jobs):
            if job["status"] != "completed" or job["result"] != a["i"]:
                raise BenchError(f"job {job['id']} (i={a['i']}) ended {job['status']} with"
                                 f" result {job['result']!r}, error {job.get('error')!r}")
        slow = jobs[SLOW_INDEX]
        fast = [j for k, j in enumerate(jobs) if k != SLOW_INDEX]
        waits = sorted((j["finished_at"] - j["created_at"]) * 1000 for j in fast)
        late = sum(1 for j in fast if j["finished_at"] > slow["started_at"] + 1.0)
        sup.check_log()
        sup.stop()
    except BenchError as exc:
        raise BenchError(f"{exc}\nsupervisor log (fast jobs beside a slow one):\n{sup.log_tail()}") from None
    finally:
        sup.close()
    return {"slow_wait": waits[-1], "slow_wait_p50": statistics.median(waits), "slow_late": float(late),
            "slow_job": (slow["finished_at"] - slow["created_at"]) * 1000}


def fill_deep(sup: Supervisor, n: int) -> float:
    """n pending jobs in the paused queue 'deep', by submit_many over the socket; jobs/s."""
    sup.client.pause("deep")
    _, _, took = submit_bulk(sup, n, queue="deep", chunk=FILL_CHUNK, window=4)
    return n / took


def drain(sup: Supervisor, queue: str, seconds: float) -> dict[str, float]:
    """Resume the paused queue and sample the supervisor's RSS while its jobs run:
    after a restart, none of their rows is in memory, and each batch is read from
    the store before it is handed out. Jobs/s, and the highest RSS."""
    s, _ = sup.processes()
    db = sup.db()
    try:
        def done() -> int:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE finished_at IS NOT NULL AND status = 'completed'"
                              " AND queue = ?",
                              (queue,)).fetchone()[0]

        before, highest = done(), rss_mb([s])
        t0 = time.perf_counter()
        sup.client.resume(queue)
        while time.perf_counter() - t0 < seconds:
            time.sleep(0.1)
            highest = max(highest, rss_mb([s]))
        took = time.perf_counter() - t0
        return {"drain_rate": (done() - before) / took, "drain_rss_supervisor": highest,
                "drain_seconds": took}
    finally:
        db.close()


def check_deep(sup: Supervisor, n: int) -> None:
    db = sup.db()
    try:
        (pending,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE queue = 'deep' AND status = 'pending'").fetchone()
    finally:
        db.close()
    if pending != n:
        raise BenchError(f"the deep queue holds {pending} pending jobs, not {n}")


# -- rounds -----------------------------------------------------------------------


def measure_round(source: str, workers: int, sizes: Sizes, idle_seconds: float,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """Every figure of an empty store once, on a fresh supervisor (the idle one when
    idle_seconds is not 0), then slow_wait on another fresh one."""
    out: dict[str, float] = {}
    sup = Supervisor(source, workers)
    try:
        out["start"] = sup.start()
        first, last, _ = submit_bulk(sup, sizes.warmup)
        wait_done(sup, first, last)
        log("enqueue")
        out.update(enqueue_rates(sup, sizes.one_by_one, sizes.jobs, bursts=sizes.bursts))
        log("end to end")
        out.update(end_to_end_bulk(sup, sizes.jobs))
        out.update(end_to_end_pipelined(sup, sizes.jobs))
        log("latency")
        out.update(latency(sup, sizes.latency))
        out.update(latency(sup, sizes.latency, one_request=True))
        out.update(memory(sup))
        if idle_seconds:
            log(f"idle {idle_seconds:g} s")
            out.update(idle(sup, idle_seconds))
        log("pool sizes")
        out.update(scaling(sup, sizes.scaling, sizes.jobs, workers))
        out.update(scale_up_time(sup, sizes.scale_to, workers))
        sup.check_log()
        sup.stop()
    except BenchError as exc:
        raise BenchError(f"{exc}\nsupervisor log:\n{sup.log_tail()}") from None
    finally:
        sup.close()
    out.update(slow_wait(source, log))
    return out


def measure_depth(source: str, workers: int, sizes: Sizes, runs: int,
                  log: Callable[[str], None] = lambda s: None) -> list[dict[str, float]]:
    """The figures with sizes.depth jobs pending in a paused queue, `runs` times on one
    supervisor filled over its socket, then `runs` times again after a restart (the
    pending set then comes from the store). One dict per run, keys deep_* and restart_*.

    Each figure but memory is paired with the same figure taken on a second
    supervisor with an empty store (keys ref_deep_*, ref_restart_*), just before,
    or for latency job by job in turn: this machine drifts by 20-30% within an
    hour, and the pair compares the depth, not the hour."""
    results: list[dict[str, float]] = [{} for _ in range(runs)]
    capped: set[str] = set()
    sup = Supervisor(source, workers)
    ref = Supervisor(source, workers)

    def take(i: int, prefix: str, figures: dict[str, float]) -> None:
        for k, v in figures.items():
            results[i][f"{prefix}_{k}"] = v
            if k.endswith("_capped"):
                capped.add(k[: -len("_capped")])

    def paired(i: int, prefix: str, measure: Callable[[Supervisor], dict[str, float]],
               queue: str | None = None) -> None:
        """The figure on both supervisors, the reference first in even runs and
        second in odd ones. A capped reference run is left out (and its queue
        paused, so that its jobs do not compete with the next figure)."""
        for s in ((ref, sup) if i % 2 == 0 else (sup, ref)):
            figures = measure(s)
            if s is sup:
                take(i, prefix, figures)
            elif any(k.endswith("_capped") for k in figures):
                if queue is not None:
                    ref.client.pause(queue)
            else:
                take(i, "ref_" + prefix, figures)

    def paired_latency(i: int, prefix: str, q: str, one_request: bool) -> None:
        """Job by job in turn on both supervisors: latency drifts faster than a run."""
        at_ref, at_depth = latency_interleaved([ref, sup], sizes.depth_latency, queue=q, budget=30.0,
                                               one_request=one_request)
        take(i, "ref_" + prefix, {k: v for k, v in at_ref.items() if not k.endswith("_capped")})
        take(i, prefix, at_depth)

    try:
        sup.start()
        ref.start()
        log(f"filling {sizes.depth:,} pending jobs")
        t0 = time.perf_counter()
        results[0]["depth"] = float(sizes.depth)
        results[0]["deep_fill"] = fill_deep(sup, sizes.depth)
        results[0]["deep_fill_seconds"] = time.perf_counter() - t0
        # The supervisor gives freed heap back 0.2 s after large submits: measure the
        # steady state, not the moment the last reply was written.
        time.sleep(SETTLE)
        take(0, "deep", {"rss_after_fill": memory(sup)["rss_supervisor"]})
        budget_e2e = max(15.0, sizes.jobs / 1300)
        for i in range(runs):
            log(f"at depth, run {i + 1}/{runs}")
            q = f"m{i}"  # a fresh queue each run: jobs left by a capped run stay paused
            # The reference runs what it enqueued: its store stays without a backlog.
            paired(i, "deep", lambda s: enqueue_rates(s, sizes.one_by_one, sizes.jobs, queue=q + "e",
                                                      run_after=s is ref, bursts=sizes.bursts))
            # A figure that ran out of time in the first run is not taken again; its
            # unfinished jobs are paused so that they do not hold up the next figure.
            if "e2e_bulk" not in capped:
                paired(i, "deep", lambda s: end_to_end_bulk(s, sizes.jobs, queue=q + "b", budget=budget_e2e),
                       q + "b")
                if "e2e_bulk" in capped:
                    sup.client.pause(q + "b")
            if "e2e_one" not in capped:
                paired(i, "deep", lambda s: end_to_end_pipelined(s, sizes.jobs, queue=q + "p",
                                                                 budget=budget_e2e), q + "p")
                if "e2e_one" in capped:
                    sup.client.pause(q + "p")
            if "lat" not in capped:
                paired_latency(i, "deep", q + "l", one_request=False)
                paired_latency(i, "deep", q + "l", one_request=True)
            take(i, "deep", memory(sup))
        sup.check_log()
        log("restart with the pending jobs")
        sup.stop()
        results[0]["restart_start"] = sup.start()
        check_deep(sup, sizes.depth)
        for i in range(runs):
            log(f"after restart, run {i + 1}/{runs}")
            q = f"r{i}"
            paired(i, "restart", lambda s: end_to_end_bulk(s, sizes.jobs, queue=q + "b", budget=budget_e2e),
                   q + "b")
            paired_latency(i, "restart", q + "l", one_request=False)
            paired_latency(i, "restart", q + "l", one_request=True)
            take(i, "restart", memory(sup))
        log(f"idle {min(sizes.idle, 5.0):g} s at depth")
        take(0, "deep", idle(sup, min(sizes.idle, 5.0)))
        log("the pending jobs drain")
        results[0].update(drain(sup, "deep", DRAIN_SECONDS if sizes.depth >= 100_000 else 1.0))
        sup.check_log()
        ref.check_log()
        sup.stop()
        ref.stop()
    except BenchError as exc:
        raise BenchError(f"{exc}\nsupervisor log:\n{sup.log_tail()}\n"
                         f"the empty-store supervisor's log:\n{ref.log_tail()}") from None
    finally:
        sup.close()
        ref.close()
    return results
