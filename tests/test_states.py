"""The transition table (core/states.py), the decisions (core/outcome.py), and the
job book (supervisor/jobs.py) driven against a real SQLite store.

1. ``BookMachine``: a hypothesis state machine that drives the real ``JobBook``
   with a real ``SQLiteStore`` on a temporary file. The book's writes gather in a
   ``WriteBatch`` that is committed at points the test picks, or thrown away by a
   crash, after which a new book is rebuilt from the store exactly as
   ``Supervisor._recover`` does. A small model (job id -> state, attempts,
   interruptions in a row, abort flag), moved only by ``transition()`` and the
   decisions, is checked against the book after every step and against the store
   after every commit, crash and clean restart.
2. The table itself: every edge, some illegal ones, reachability, final states.
3. The decisions of core/outcome.py.

The bugs found on the way have tests of their own at the end: regression tests, the
model following the fixed behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hostqueue.core import outcome
from hostqueue.core.outcome import (
    Decision, after_crash, after_report, after_worker_death, aborted_before_start, error,
    expired_error, given_back,
)
from hostqueue.core.states import (
    FINAL, MAX_INTERRUPTIONS, REACHABLE, TRANSITIONS, Event, JobStatus, State,
    TransitionError, stored, transition,
)
from hostqueue.store.batch import WriteBatch
from hostqueue.store.sqlite import SQLiteStore
from hostqueue.supervisor.jobs import Attempt, JobBook
from hostqueue.supervisor.readyindex import Payload, unpack_id

# Hypothesis keeps caches in ./.hypothesis even without an example database: keep
# them out of the repository (as test_fuzz.py does).
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "hostqueue-hypothesis")

S, E = State, Event
Lane = tuple[str, str]

NOW0 = 1_700_000_000.0
LANES: list[Lane] = [("default", "t.a"), ("other", "t.b")]
OUTCOMES = ["ok", "error", "permanent", "retry", "aborted", "returned", "expired"]
RAN = ["ok", "error", "permanent", "retry", "aborted"]  # outcomes of an attempt that started
CAUSE = "worker killed by signal SIGKILL"
KEYS = ["k1", "k2"]
UNFINISHED = (S.PENDING, S.HELD, S.RUNNING)


def no_backoff() -> float:
    return 2.0


# =============================================================================================
# 1. the job book against a real store
# =============================================================================================


@dataclasses.dataclass
class MJob:
    """The model of one job. ``attempts`` is what the store's column holds once the
    writes so far are committed: attempts charged while it waits or is held, the
    attempt's number while it runs, the last attempt's number once it ended after
    one started."""

    id: int
    lane: Lane
    priority: int
    max_attempts: int
    key: str | None
    deadline: float | None
    state: State = S.PENDING
    attempts: int = 0
    interruptions: int = 0  # by the supervisor's death, in a row
    abort_stored: bool = False  # abort_requested as the store has it
    abort_live: bool = False  # abort_requested as the book's attempt has it (held, running)
    pid: int | None = None
    fetching: bool = False  # held, its row being read (hand() returned no attempt)
    fetch_abort: bool = False  # aborted while its row was read (written at once, too)
    # Interrupted by a drain's kill while it ran with its abort requested: it waits with
    # its row in memory, and the book's next attempt of it has no abort (the store has
    # it). Harmless: a drain's kill happens only as the supervisor stops, and the abort
    # is read back with the row at its next start.
    drained_abort: bool = False
    # Its deadline came due while it was held and its row was being read (the book
    # keeps it for the end of the read: a job that goes back expires then).
    deadline_fired: bool = False
    progress: float | None = None  # as the store keeps it: the last reported with an end
    progress_message: str | None = None
    attempt_progress: tuple[float | None, str | None] = (None, None)  # this attempt's, reported

    def attempt_no(self) -> int:
        """The number of the attempt a held or running job is on."""
        return self.attempts + 1 if self.state is S.HELD else self.attempts


def model_decision(m: MJob, d: Decision) -> None:
    """A decision on a held or running job, as the table and the decision say (what
    its attempt reported of its progress is written with a retry or an end)."""
    progress, message = m.attempt_progress
    was = m.state
    to = transition(was, d.event, d.state)
    n = m.attempt_no()
    # An attempt that did not start, or that the supervisor stopped, is not charged.
    if was is S.HELD or d.event in (E.RETURNED, E.INTERRUPTED, E.RECOVERED):
        assert not d.charged, f"{d} charges job {m.id} ({was.value}) for an attempt"
    if to is S.PENDING:  # waits again: retried (charged), returned, interrupted (not)
        m.attempts = n if d.charged else n - 1
        if d.event is E.RETRIED:
            m.interruptions = 0  # an attempt that ended breaks a row of interruptions
            keep_progress(m, progress, message)
    elif was is S.RUNNING:  # ended after its attempt started: that attempt counts
        m.attempts = n
        m.interruptions = 0
        keep_progress(m, progress, message)
    # (ended while held: aborted or expired before it started, nothing charged)
    if to is S.PENDING and m.abort_live:
        # A job whose abort was requested waits again only when a drain's kill
        # interrupted it; given back unstarted (returned, its worker dead, never sent)
        # it ends cancelled (outcome.given_back), and an attempt that ended with its
        # abort requested ends cancelled too.
        assert d.event is E.INTERRUPTED, f"job {m.id} aborted, but {d} makes it wait again"
        assert m.abort_stored, m
        m.drained_abort = True
    m.state = to
    m.pid = None
    m.attempt_progress = (None, None)
    m.abort_live = False  # its attempt is gone; the store keeps abort_stored


def keep_progress(m: MJob, progress: float | None, message: str | None) -> None:
    """The store keeps an earlier attempt's progress (and message) where this one
    reported none."""
    if progress is not None:
        m.progress = progress
        if message is not None:
            m.progress_message = message


def model_start(m: MJob) -> None:
    m.state = transition(m.state, E.STARTED)
    m.attempts += 1


def model_recover(m: MJob) -> MJob:
    """What a crash leaves of a job as committed: a job not started is untouched; one
    running runs again uncharged, or ends failed at its MAX_INTERRUPTIONS-th
    interruption in a row. (Computed here, not by after_crash.)"""
    r = dataclasses.replace(m, pid=None, fetching=False, fetch_abort=False, abort_live=False,
                            attempt_progress=(None, None), drained_abort=False,
                            deadline_fired=False)
    if m.state is S.HELD:
        r.state = transition(S.HELD, E.RETURNED)  # its hand was never written
    elif m.state is S.RUNNING:
        r.interruptions = m.interruptions + 1
        if r.interruptions >= MAX_INTERRUPTIONS:
            r.state = transition(S.RUNNING, E.RECOVERED, S.FAILED)
        else:
            r.state = transition(S.RUNNING, E.RECOVERED, S.PENDING)
            r.attempts = m.attempts - 1
    return r


def snapshot(jobs: dict[int, MJob]) -> dict[int, MJob]:
    return {i: dataclasses.replace(m) for i, m in jobs.items()}


class BookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="hq-states-")
        self.path = os.path.join(self.dir, "q.db")
        self.loop = asyncio.new_event_loop()
        self.now = NOW0
        self.pids = iter(range(1000, 10_000_000))
        self.workers = [next(self.pids), next(self.pids)]
        self.live: dict[int, MJob] = {}  # as the book has them
        self.committed: dict[int, MJob] = {}  # as the store has them
        self.fetches: list[int] = []
        # Delayed jobs come due without their rows in memory, whose rows are being read
        # (Supervisor._promote_unknown): the reads in flight, and the jobs still waiting
        # for one (JobBook._promoting).
        self.promote_reads: list[list[int]] = []
        self.promoting: set[int] = set()
        self.batch = WriteBatch()
        self.store = self._open_store()
        self.next_id = 1
        self.book = self._new_book()

    # -- plumbing -------------------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _open_store(self) -> SQLiteStore:
        store = SQLiteStore(self.path)
        self.run(store.open())
        return store

    def _new_book(self) -> JobBook:
        self.batch = WriteBatch()
        return JobBook(self._write, lambda job_id, queue: None, lambda run_at, deadline: None)

    def _write(self, kind: str, params: tuple[Any, ...]) -> None:
        self.batch.add(kind, params)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            if pending:  # a checkpoint the store started
                self.run(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _commit(self, max_rows: int | None = None, inline: bool = False) -> None:
        """The group commit (committer.py): every write so far, in one transaction or,
        split() by new rows as its flush loop does, in several; with inline, a small
        one through apply_now(), as on the loop's thread."""
        batch, self.batch = self.batch, WriteBatch()
        while True:
            rest = batch.split(max_rows) if max_rows is not None else WriteBatch()
            if not (inline and self.run(self._apply_now(batch))):
                self.run(self.store.apply(batch))
            refused = self.store.refused_transitions()
            assert refused == 0, f"{refused} guarded transitions found their job in another state"
            if not len(rest):
                break
            batch = rest
        self.committed = snapshot(self.live)
        self._check_store(self.committed)

    async def _apply_now(self, batch: WriteBatch) -> bool:
        return self.store.can_apply_now(len(batch)) and self.store.apply_now(batch)

    def _recover(self) -> tuple[int, int]:
        """Supervisor._recover: running jobs decided by after_crash, then the pending set
        loaded into a new book."""
        now = self.now

        def decide(job: Any) -> tuple[str, Any]:
            d = outcome.after_crash(job.interruptions, now)
            return (d.state.value if d.state is State.FAILED else "pending"), d.error

        counts: tuple[int, int] = self.run(self.store.recover_interrupted(now, decide))
        self.next_id = self.run(self.store.last_job_id()) + 1
        self.book = self._new_book()
        self.book.load(self.run(self.store.load_pending(now)))
        self.workers = [next(self.pids), next(self.pids)]  # the old ones left with their supervisor
        self.fetches = []
        self.promote_reads, self.promoting = [], set()  # their answers would reach no one
        return counts

    def _restart(self) -> tuple[int, int]:
        self.run(self.store.close())
        self.store = self._open_store()
        return self._recover()

    def _check_store(self, model: dict[int, MJob]) -> None:
        """The store holds every job of the model, as the model has it, and no other."""
        ids = sorted(model)
        jobs = self.run(self.store.get_jobs(ids)) if ids else {}
        lost = set(ids) - set(jobs)
        assert not lost, f"jobs lost from the store: {sorted(lost)}"
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            extra = dict(conn.execute("SELECT id, interruptions FROM jobs").fetchall())
        finally:
            conn.close()
        assert set(extra) == set(ids), f"rows the model does not know: {sorted(set(extra) - set(ids))}"
        reachable = {stored(s) for s in REACHABLE}
        for job_id, m in model.items():
            job = jobs[job_id]
            where = f"job {job_id} (model {m})"
            assert job["status"] in reachable, where
            assert job["status"] == stored(m.state), f"{where}: store has {job['status']}"
            assert job["attempts"] == m.attempts, f"{where}: store has attempts {job['attempts']}"
            assert job["max_attempts"] == m.max_attempts, where
            assert 0 <= job["attempts"] <= job["max_attempts"], where
            if job["status"] == "pending":
                assert job["attempts"] < job["max_attempts"], f"{where}: waits with no attempt left"
            assert extra[job_id] == m.interruptions, f"{where}: store has interruptions {extra[job_id]}"
            assert job["abort_requested"] == m.abort_stored, where
            assert job["key"] == m.key, where
            assert (job["progress"], job["progress_message"]) == (m.progress, m.progress_message), where

    def _ready_ids(self) -> collections.Counter[int]:
        """The ids the ready index will hand out (its entries less those discarded)."""
        ready = self.book.ready_index
        entries: collections.Counter[int] = collections.Counter()
        for q in ready.lanes.values():
            for fifo in q.fifos.values():
                entries.update(fifo.ids[fifo.head:])
                entries.update(fifo.side)
        for job_id, n in ready.removed.items():
            assert entries[job_id] >= n, f"job {job_id} discarded from the ready index it is not in"
        entries.subtract(ready.removed)
        return +entries

    def _attempt(self, m: MJob) -> Attempt:
        a = self.book.attempt(m.id)
        assert a is not None, f"job {m.id} is {m.state.value} in the model, the book has no attempt"
        return a

    def _held_or_running(self) -> list[int]:
        return sorted(i for i, m in self.live.items() if m.state in (S.HELD, S.RUNNING) and not m.fetching)

    def _report(self, m: MJob, report: dict[str, Any]) -> None:
        """Outcomes.on_report for one job's outcome."""
        a = self._attempt(m)
        st_ = report.get("st")
        if st_ is not None and a.state is S.HELD:
            self.book.started_unwritten(a, st_)  # started and ended between two reports
            model_start(m)
        if report.get("p") is not None:
            a.progress, a.progress_message = report["p"], report.get("pm")
            m.attempt_progress = (report["p"], report.get("pm"))
        a.cpu_seconds, a.peak_rss = report.get("cpu"), report.get("rss")
        d = after_report(report, m.attempt_no(), m.max_attempts, m.abort_live, self.now, no_backoff)
        try:
            transition(m.state, d.event, d.state)
        except TransitionError:
            # A message the table refuses (a late or bogus one): the book refuses it too,
            # and nothing moves or is written.
            size, was = len(self.batch), a.state
            with pytest.raises(TransitionError):
                self.book.end(a, d, self.now, st_)
            assert len(self.batch) == size and a.state is was and self.book.attempt(m.id) is a
            event("report refused by the table")
            return
        self.book.end(a, d, self.now, st_)
        event(f"report: {m.state.value} -> {d.event.value}"
              + (" (returned, its abort requested)" if st_ is None and report["s"] == "returned"
                 and d.event is E.ABORTED else ""))
        model_decision(m, d)

    # -- rules ----------------------------------------------------------------------------------

    @rule(n=st.integers(1, 3), lane=st.sampled_from(LANES), priority=st.sampled_from([0, 5]),
          retries=st.integers(0, 2), delay=st.sampled_from([0.0, 0.0, 3.0, 30.0]),
          deadline=st.sampled_from([None, None, 2.0, 10.0, 60.0]),
          key=st.sampled_from([None, None, *KEYS]))
    def submit(self, n: int, lane: Lane, priority: int, retries: int, delay: float,
               deadline: float | None, key: str | None) -> None:
        """Actions.submit_jobs: the book first, then the INSERT in the batch."""
        if key is not None:
            n = 1  # submit_many takes no key
            owner = self.book.key_owner(key)
            if owner is not None:  # op_submit answers with the owner and adds nothing
                assert self.live[owner].key == key and self.live[owner].state in UNFINISHED
                return
        queue, task = lane
        now = self.now
        first = self.next_id
        self.next_id += n
        ids = range(first, first + n)
        max_attempts = retries + 1
        run_at = now + delay
        dl = now + deadline if deadline is not None else None
        texts = [orjson.dumps({"n": i}).decode() for i in ids]
        params = (first, task, queue, max_attempts, priority, key, None, now, run_at, dl, None,
                  orjson.dumps(texts).decode())
        payloads = [Payload(task, queue, t, 0, max_attempts, None, priority, None, key, now, run_at, dl)
                    for t in texts]
        transition(None, E.SUBMITTED)
        self.book.submitted(ids, lane, priority, run_at, dl, key, now, payloads)
        self.batch.add_submit(first, n, params, [], lambda: None, lambda exc: None)
        for job_id in ids:
            self.live[job_id] = MJob(job_id, lane, priority, max_attempts, key, dl,
                                     state=transition(None, E.SUBMITTED))

    def _hand(self, lane: Lane, pid: int) -> int:
        """The dispatcher: top() of a lane, then hand() its job to a worker."""
        expected = unpack_id(self.book.top(lane))  # type: ignore[arg-type]
        job_id, a = self.book.hand(lane, pid, self.now)
        assert job_id == expected
        m = self.live[job_id]
        assert m.state is S.PENDING and m.lane == lane, f"handed job {job_id} is {m}"
        m.state = transition(m.state, E.HANDED)
        m.pid = pid
        m.attempt_progress = (None, None)
        if a is None:  # not in memory: its row is read first
            event("hand: row read first")
            m.fetching = True
            self.fetches.append(job_id)
        else:
            # A waiting job whose row is in memory has no abort pending (an abort of a
            # waiting job cancels it at once), but for one a drain's kill interrupted.
            assert not m.abort_stored or m.drained_abort, f"handed without its abort: {m}"
            if m.abort_stored:
                event("hand: drained with its abort pending")
            m.abort_live = False
        return job_id

    def _fetch(self, job_id: int, read_fails: bool) -> None:
        """Dispatcher: a barrier, the row read, loaded() (back to waiting when the read
        failed or the worker is gone)."""
        self.fetches.remove(job_id)
        self._commit()
        rows = None if read_fails else self.run(self.store.jobs_for_dispatch([job_id]))
        m = self.live[job_id]
        keep = rows is not None and m.pid in self.workers
        a = self.book.loaded(job_id, rows.get(job_id) if rows is not None else None, keep, self.now)
        m.fetching = False
        assert m.abort_stored or not m.fetch_abort, m  # an abort meanwhile was written
        if keep:
            assert a is not None and a.worker_pid == m.pid
            m.abort_live = m.abort_stored  # from its row (and from memory, if meanwhile)
            if m.fetch_abort:
                event("fetch: aborted meanwhile, kept")
        else:
            # It waits again, not in memory; its row keeps its abort (abort_stored), for
            # its next attempt. (A held job whose abort was requested ends when it
            # comes back; this one never had an attempt.)
            assert a is None
            event("fetch: aborted meanwhile, not kept" if m.fetch_abort else "fetch: not kept")
            m.state = transition(m.state, E.RETURNED)
            m.pid = None
            m.abort_live = False
            if m.deadline_fired:
                assert m.deadline is not None and self.book.next_deadline_due() is not None, (
                    f"job {job_id} waits again past its deadline with none timed")
                event("fetch: not kept after its deadline came due (expires next)")
        m.fetch_abort = m.deadline_fired = False

    def _startable(self) -> list[int]:
        """Held jobs whose worker runs nothing (a worker runs one job at a time)."""
        return [i for i in self._held_or_running() if self.live[i].state is S.HELD
                and self.book.running_on(self.live[i].pid) is None]  # type: ignore[arg-type]

    def _start(self, m: MJob) -> None:
        self.book.start(self._attempt(m), self.now)
        model_start(m)

    @precondition(lambda self: self.book.ready_count > 0)
    @rule(data=st.data(), n=st.integers(1, 3),
          then=st.sampled_from(["wait", "start", "run", "run"]),
          read_later=st.sampled_from([False, False, True]))
    def hand(self, data: st.DataObject, n: int, then: str, read_later: bool) -> None:
        """The dispatcher gives a worker up to n jobs, each the top of a lane; then the
        worker may start the next one (it reports the start), or run it through (its
        start rides with its outcome, as a fast job's does). The rows of jobs not in
        memory are read at once, but with then "wait" or read_later (fetch_done)."""
        pid = data.draw(st.sampled_from(self.workers), label="pid")
        for _ in range(n):
            lanes = sorted(lane for lane in self.book.lanes() if self.book.top(lane) is not None)
            if not lanes:
                break
            job_id = self._hand(data.draw(st.sampled_from(lanes), label="lane"), pid)
            if then != "wait" and not read_later and self.live[job_id].fetching:
                self._fetch(job_id, read_fails=False)  # its row is read at once
        held = [self.live[i] for i in self._startable() if self.live[i].pid == pid]
        if then == "wait" or not held:
            return
        m = min(held, key=lambda m: (-m.priority, m.id))  # the worker's queue order
        if then == "start":
            self._start(m)
        else:
            self._outcome(m, data.draw(st.sampled_from(RAN), label="s"), True)

    @precondition(lambda self: self.fetches)
    @rule(data=st.data(), read_fails=st.sampled_from([False, False, True]))
    def fetch_done(self, data: st.DataObject, read_fails: bool) -> None:
        self._fetch(data.draw(st.sampled_from(self.fetches), label="fetched"), read_fails)

    @precondition(lambda self: self._startable())
    @rule()
    def start(self) -> None:
        """Each worker that runs nothing starts the next job it holds (its queue's
        order: priority, then id) and reports that start."""
        for pid in list(self.workers):
            held = [self.live[i] for i in self._startable() if self.live[i].pid == pid]
            if held:
                self._start(min(held, key=lambda m: (-m.priority, m.id)))

    @precondition(lambda self: self._held_or_running())
    @rule(data=st.data(), s=st.sampled_from(OUTCOMES), with_st=st.sampled_from([True, True, False]),
          delay=st.sampled_from([None, 0.0, 5.0]), p=st.sampled_from([None, 0.5]),
          pm=st.sampled_from([None, "half"]), cpu=st.sampled_from([None, 0.25]),
          rss=st.sampled_from([None, 1 << 20]))
    def report(self, data: st.DataObject, s: str, with_st: bool, delay: float | None,
               p: float | None, pm: str | None, cpu: float | None, rss: int | None) -> None:
        """A worker reports how an attempt ended (with "st": it started, maybe just
        now), or that it ended or gave back a held job without starting it."""
        m = self.live[data.draw(st.sampled_from(self._held_or_running()), label="reported")]
        self._outcome(m, s, with_st, delay, p, pm, cpu, rss)

    def _outcome(self, m: MJob, s: str, with_st: bool, delay: float | None = None,
                 p: float | None = None, pm: str | None = None, cpu: float | None = None,
                 rss: int | None = None) -> None:
        if m.state is S.HELD:  # it starts now only if its worker runs nothing
            with_st = with_st and self.book.running_on(m.pid) is None  # type: ignore[arg-type]
            if s in ("returned", "expired"):
                with_st = False  # a worker gives back or expires only a job it did not start
        # (on a running job, returned and expired are refused by the table)
        report: dict[str, Any] = {"id": m.id, "s": s, "p": p, "pm": pm, "cpu": cpu, "rss": rss}
        if with_st:
            report["st"] = self.now
        if s == "ok":
            report["r"] = "42"
        elif s in ("error", "permanent", "retry", "aborted"):
            report["e"] = error("ValueError", "boom")
            if s == "retry" and delay is not None:
                report["d"] = delay
        self._report(m, report)

    def _holders(self) -> list[int]:
        """Workers that hold jobs (or wait for the rows of jobs handed to them)."""
        return [p for p in self.workers
                if self.book.holds(p) or any(self.live[i].pid == p for i in self.fetches)]

    @precondition(lambda self: self._holders())
    @rule(data=st.data(), killed_for=st.sampled_from([None, "drain", "abort", "timeout"]))
    def worker_dies(self, data: st.DataObject, killed_for: str | None) -> None:
        """Outcomes.on_worker_exit: its running job's attempt ends, held ones go back."""
        pid = data.draw(st.sampled_from(self._holders()), label="pid")
        held = self.book.held_by(pid)
        assert set(held) == {i for i, m in self.live.items() if m.pid == pid and not m.fetching}
        running_job = None  # the job the board saw start, its start not reported yet
        if held and self.book.running_on(pid) is None and data.draw(st.booleans(), label="board"):
            running_job = data.draw(st.sampled_from(sorted(held)), label="running_job")
        kill_error = error("TimeLimitExceeded", "took too long") if killed_for == "timeout" else None
        for a in held.values():
            m = self.live[a.id]
            started = a.state is S.RUNNING or a.id == running_job
            if started and a.state is S.HELD:
                self.book.started_unwritten(a, self.now)
                model_start(m)
            d = after_worker_death(CAUSE, killed_for, kill_error, started, m.attempt_no(),
                                   m.max_attempts, m.abort_live, self.now, no_backoff)
            self.book.end(a, d, self.now, a.started_at)
            event(f"worker death: {m.state.value} -> {d.event.value}")
            model_decision(m, d)
        self.workers[self.workers.index(pid)] = next(self.pids)  # the pool replaces it

    @precondition(lambda self: any(m.state in UNFINISHED for m in self.live.values()))
    @rule(data=st.data(), then_outcome=st.booleans(),
          ended_too=st.sampled_from([False, False, True]),
          race=st.sampled_from([None, None, "held", "fetching", "promoting"]))
    def abort(self, data: st.DataObject, then_outcome: bool, ended_too: bool,
              race: str | None) -> None:
        """Actions.abort_jobs: a barrier and a read, then by where the job is (an ended
        job: nothing to abort). With race, a job in a window of its own, if any: held
        (its worker may give it back as the abort arrives), or its row being read, as it
        was handed (fetching) or came due (promoting)."""
        ids = sorted(i for i, m in self.live.items() if ended_too or m.state in UNFINISHED)
        held = [i for i in self._held_or_running() if self.live[i].state is S.HELD]
        if race == "held" and held:
            ids = held
        elif race == "fetching" and self.fetches:
            ids = sorted(self.fetches)
        elif race == "promoting" and self.promoting:
            ids = sorted(self.promoting)
        job_id = data.draw(st.sampled_from(ids), label="aborted")
        m = self.live[job_id]
        self._commit()
        job = self.run(self.store.get_jobs([job_id]))[job_id]
        book = self.book
        state = book.state(job_id)
        if book.is_fetching(job_id):
            assert m.fetching and state is S.HELD
            size = len(self.batch)
            book.abort_while_fetching(job_id)  # kept for its attempt, and written
            event("abort: while its row is read")
            assert len(self.batch) == size + (0 if m.fetch_abort else 1)
            m.fetch_abort = m.abort_stored = True
        elif state in (S.HELD, S.RUNNING):
            assert state is m.state
            a = self._attempt(m)
            if book.request_abort(a):
                assert not m.abort_live
                m.abort_live = m.abort_stored = True
            else:
                assert m.abort_live
            if then_outcome:  # the worker honours it (or gave the held job back meanwhile)
                if m.state is S.HELD:
                    if data.draw(st.booleans(), label="crossed"):
                        self._report(m, {"id": job_id, "s": "returned"})
                    else:
                        self._report(m, {"id": job_id, "s": "aborted", "e": aborted_before_start()})
                else:
                    s = data.draw(st.sampled_from(["aborted", "ok", "error"]), label="s")
                    self._report(m, {"id": job_id, "s": s, "st": self.now, "r": "1"})
        elif book.recent_final(job_id) is not None or job["status"] not in ("pending", "running"):
            assert m.state in FINAL, f"job {job_id}: nothing to abort, but the model has {m}"
        else:
            assert job["status"] == "pending" and m.state is S.PENDING, f"{job} / {m}"
            if job_id in self.promoting:  # come due, its row being read for promote()
                assert state is S.PENDING
                self.promoting.discard(job_id)
                event("abort: waiting job cancelled before its promote")
            status = book.cancel_waiting(job_id, E.ABORTED, self.now, aborted_before_start(),
                                         lane=(job["queue"], job["task"]))
            event("abort: waiting job cancelled")
            m.state = transition(m.state, E.ABORTED)
            assert status == stored(m.state)

    @precondition(lambda self: self.book.next_delay_due() is not None
                  or self.book.next_deadline_due() is not None)
    @rule(dt=st.sampled_from([1.0, 5.0, 20.0, 70.0]), give_back=st.booleans(),
          read_now=st.sampled_from([True, False, False]))
    def tick(self, dt: float, give_back: bool, read_now: bool) -> None:
        """Time passes: Supervisor._delay_due (its rows read by _promote_unknown at once,
        or later: promote_read) and _deadline_due."""
        self.now += dt
        now = self.now
        book = self.book
        missing = book.ready_delayed(now)
        if missing:
            for job_id in missing:
                m = self.live[job_id]
                assert m.state is S.PENDING and book.state(job_id) is S.PENDING, m
                assert job_id not in self.promoting, m
            self.promoting.update(missing)
            self.promote_reads.append(missing)
            if read_now:
                self._promote_read(len(self.promote_reads) - 1, read_fails=False)
        due = book.due_deadlines(now)
        while due:  # a job given back waits again with its deadline: the timer fires again
            for job_id in due:
                m = self.live[job_id]
                state = book.state(job_id)
                if state is None:
                    # Not in memory: Supervisor._deadline_due takes a job it does not
                    # know, and that has not just ended, for a waiting one.
                    assert book.recent_final(job_id) is None and m.state is S.PENDING, m
                    assert book.attempts_ran(job_id) is None
                    state = S.PENDING
                    event("deadline: waiting, not in memory")
                if state is S.PENDING:
                    assert m.state is S.PENDING and m.deadline is not None and m.deadline <= now, m
                    ran = book.attempts_ran(job_id)
                    assert ran is None or ran == m.attempts, (ran, m)
                    err = (expired_error(ran) if ran is not None
                           else error("Expired", "deadline passed before the job could start"))
                    if job_id in self.promoting:
                        self.promoting.discard(job_id)
                        event("deadline: expired before its promote")
                    status = book.cancel_waiting(job_id, E.EXPIRED, now, err)
                    event("deadline: expired waiting")
                    m.state = transition(m.state, E.EXPIRED)
                    assert status == stored(m.state)
                else:  # (a running job's deadline was met: dropped at its start)
                    assert state is S.HELD and m.state is S.HELD, (state, m)
                    if m.fetching:  # no attempt yet: kept for the read's end
                        book.deadline_while_fetching(job_id, now)
                        m.deadline_fired = True
                        event("deadline: held, its row being read")
                    elif give_back:
                        self._report(m, {"id": job_id, "s": "returned"})  # its worker gives it back
            due = book.due_deadlines(now)
        # No waiting job is left past its deadline.
        late = [m for m in self.live.values() if m.state is S.PENDING and m.deadline is not None
                and m.deadline <= now]
        assert not late, f"waiting past their deadlines: {late}"

    @precondition(lambda self: self.promote_reads)
    @rule(data=st.data(), read_fails=st.sampled_from([False, False, False, True]))
    def promote_read(self, data: st.DataObject, read_fails: bool) -> None:
        i = data.draw(st.integers(0, len(self.promote_reads) - 1), label="read")
        self._promote_read(i, read_fails)

    def _promote_read(self, i: int, read_fails: bool) -> None:
        """Supervisor._promote_unknown: the rows of delayed jobs come due (no barrier),
        promote() by what they say; when the read fails, delay_again()."""
        ids = self.promote_reads.pop(i)
        book = self.book
        if read_fails:
            book.delay_again(ids, self.now + 1.0)
            for job_id in ids:
                if job_id in self.promoting:
                    self.promoting.discard(job_id)
                    assert self.live[job_id].state is S.PENDING
                    event("promote: read failed, delayed again")
            return
        jobs = self.run(self.store.get_jobs(ids))
        for job_id in ids:
            job = jobs.get(job_id)
            if job is not None and job["status"] == "pending":
                book.promote(job_id, (job["queue"], job["task"]), job["priority"])
            else:
                book.promote(job_id, None, 0)
            if job_id in self.promoting:
                self.promoting.discard(job_id)
                assert self.live[job_id].state is S.PENDING and job is not None \
                    and job["status"] == "pending", (self.live[job_id], job)
            else:
                event("promote: ended meanwhile, ignored")

    @precondition(lambda self: any(m.state in FINAL for m in self.live.values()))
    @rule(data=st.data())
    def revive(self, data: st.DataObject) -> None:
        """Actions.retry_job: read after a barrier, revive, a barrier, make_ready."""
        job_id = data.draw(st.sampled_from(sorted(i for i, m in self.live.items() if m.state in FINAL)),
                           label="revived")
        m = self.live[job_id]
        self._commit()
        job = self.run(self.store.get_jobs([job_id]))[job_id]
        assert job["status"] == stored(m.state)
        if m.state is S.COMPLETED:  # not revivable: the table refuses it, nothing is written
            size = len(self.batch)
            with pytest.raises(TransitionError):
                self.book.revive(job, self.now)
            assert len(self.batch) == size
            return
        if job["key"] is not None and self.book.key_owner(job["key"]) is not None:
            return  # invalid_state: another job with its key is unfinished
        self.book.revive(job, self.now)
        event(f"revived from {job['status']}")
        m.state = transition(m.state, E.REVIVED)
        m.attempts = m.interruptions = 0
        m.abort_stored = m.abort_live = m.drained_abort = False
        m.progress = m.progress_message = None
        self._commit()
        self.book.make_ready(job_id, (job["queue"], job["task"]), job["priority"])

    @precondition(lambda self: len(self.batch) > 0)
    @rule(max_rows=st.sampled_from([None, None, 1, 2]), inline=st.booleans())
    def commit(self, max_rows: int | None, inline: bool) -> None:
        self._commit(max_rows, inline)

    @precondition(lambda self: self.live)
    @rule(while_running=st.booleans(), downtime=st.sampled_from([0.0, 0.0, 5.0, 70.0]))
    def crash(self, while_running: bool, downtime: float) -> None:
        """The supervisor dies: the uncommitted batch and the whole book are gone; a new
        one is rebuilt from the store. With while_running, each worker was running a
        job (handed and started if need be) and those starts were committed."""
        if while_running:
            for pid in self.workers:
                if self.book.running_on(pid) is not None:
                    continue
                held = [i for i in self._startable() if self.live[i].pid == pid]
                if not held and self.book.ready_count > 0:
                    lane = sorted(lane for lane in self.book.lanes() if self.book.top(lane) is not None)[0]
                    job_id = self._hand(lane, pid)
                    if self.live[job_id].fetching:
                        self._fetch(job_id, read_fails=False)
                    held = [job_id]
                if held:
                    self._start(self.live[held[0]])
            self._commit()
        before = self.committed
        self.batch = WriteBatch()  # never written
        self.now += downtime
        requeued, failed = self._restart()
        self.live = {i: model_recover(m) for i, m in before.items()}
        running = [i for i, m in before.items() if m.state is S.RUNNING]
        assert requeued + failed == len(running)
        event(f"crash: {requeued} requeued, {failed} failed")
        assert failed == sum(1 for i in running if self.live[i].state is S.FAILED)
        for job_id, m in before.items():
            after = self.live[job_id]
            if m.state in (S.PENDING, S.HELD):  # not started: never charged, never failed
                assert after.state is S.PENDING and after.attempts == m.attempts
        self.committed = snapshot(self.live)
        self._check_store(self.live)

    @precondition(lambda self: self.book.handed or self.fetches)
    @rule(grace_ends=st.booleans(), downtime=st.sampled_from([0.0, 0.0, 5.0, 70.0]))
    def drain(self, grace_ends: bool, downtime: float) -> None:
        """A clean stop (every write committed) and a start on the same store: nothing
        is running, nothing is lost or charged. Its workers give back the jobs they
        have not started and finish the running ones, or are killed for the drain
        when its grace period ends (running ones interrupted, uncharged)."""
        for pid in list(self.workers):
            for a in self.book.held_by(pid).values():
                m = self.live[a.id]
                if not grace_ends:
                    self._report(m, {"id": a.id, "s": "returned"} if a.state is S.HELD
                                 else {"id": a.id, "s": "ok", "st": a.started_at, "r": "1"})
                    continue
                d = after_worker_death(CAUSE, "drain", None, a.state is S.RUNNING, m.attempt_no(),
                                       m.max_attempts, m.abort_live, self.now, no_backoff)
                self.book.end(a, d, self.now, a.started_at)
                model_decision(m, d)
        for job_id in self.fetches:
            assert self.book.loaded(job_id, None, False, self.now) is None
            m = self.live[job_id]
            m.state = transition(m.state, E.RETURNED)
            m.pid, m.fetching, m.fetch_abort, m.abort_live = None, False, False, False
            m.deadline_fired = False  # (lost, but the restart below reads it back)
        self.fetches = []
        self._commit()
        before = snapshot(self.live)
        self.now += downtime
        assert self._restart() == (0, 0), "a clean stop left jobs running"
        # The new book has every waiting job's deadline, and no payload.
        self.live = {i: dataclasses.replace(m, drained_abort=False)
                     for i, m in before.items()}
        self.committed = snapshot(self.live)
        self._check_store(self.live)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def model_is_sane(self) -> None:
        for m in self.live.values():
            assert m.state in REACHABLE, m
            assert 0 <= m.attempts <= m.max_attempts, m
            if m.state in (S.PENDING, S.HELD):
                assert m.attempts < m.max_attempts, f"waits with no attempt left: {m}"
            if m.state is S.RUNNING:
                assert m.attempts >= 1, m
            assert m.interruptions < MAX_INTERRUPTIONS or m.state in FINAL, m

    @invariant()
    def book_matches_model(self) -> None:
        book = self.book
        live = self.live
        pending = {i for i, m in live.items() if m.state is S.PENDING}
        ready = self._ready_ids()
        assert all(n == 1 for n in ready.values()), f"in the ready index twice: {ready}"
        assert book.ready_count == len(ready), (book.ready_count, sorted(ready))
        delayed = set(book.scheduled(float("-inf"), 1 << 30) or ())  # every timed job
        promoting = self.promoting  # come due, their rows being read (promote())
        assert not (set(ready) & delayed), f"both ready and delayed: {set(ready) & delayed}"
        assert not (promoting & (set(ready) | delayed)), f"promoting, yet waiting: {promoting}"
        waiting = set(ready) | delayed | promoting
        assert waiting == pending, (
            f"waiting in the book {sorted(waiting)}, in the model {sorted(pending)}")
        for job_id in promoting:
            assert book.state(job_id) is S.PENDING, live[job_id]
        for job_id, m in live.items():  # rows in memory: of waiting jobs, as the model has them
            ran = book.attempts_ran(job_id)
            assert ran is None or (m.state is S.PENDING and ran == m.attempts), (ran, m)
        active = {a.id: a for a in book.active()}
        assert set(active) == {i for i, m in live.items()
                               if m.state in (S.HELD, S.RUNNING) and not m.fetching}
        for job_id, a in active.items():
            m = live[job_id]
            assert a.state is m.state and a.state in REACHABLE, (a.state, m)
            assert a.attempt == m.attempt_no(), (a.attempt, m)
            assert a.attempt <= a.max_attempts == m.max_attempts
            assert a.worker_pid == m.pid and a.worker_pid in self.workers, (a.worker_pid, m)
            assert a.abort_requested == m.abort_live, (a.abort_requested, m)
        assert book.running == sum(1 for m in live.values() if m.state is S.RUNNING)
        for job_id, m in live.items():
            assert book.is_fetching(job_id) == m.fetching, m
            state = book.state(job_id)
            assert state is None or state in REACHABLE
            if m.state in (S.HELD, S.RUNNING):
                assert state is m.state, (state, m)
            elif m.state is S.PENDING:
                assert state in (S.PENDING, None), (state, m)  # ready, known by id only: None
            else:
                assert state is None, (state, m)
            # A waiting job's deadline is timed, to expire it.
            if m.state is S.PENDING and m.deadline is not None:
                assert m.id in book._deadlines, (
                    f"job {m.id} waits with its deadline untimed: {m}")
        keys = {m.key: i for i, m in live.items() if m.key is not None and m.state in UNFINISHED}
        owners = {k: book.key_owner(k) for k in KEYS if book.key_owner(k) is not None}
        assert owners == keys, (owners, keys)


TestJobBookAgainstStore = BookMachine.TestCase
TestJobBookAgainstStore.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, database=None,
    derandomize=not os.environ.get("HQ_STATES_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# ~30 s when it passes; a failure is shrunk to a short example, which can take minutes
# (a timeout during the shrink shows as a second, spurious failure).
TestJobBookAgainstStore = pytest.mark.timeout(600)(TestJobBookAgainstStore)


# =============================================================================================
# 2. the table
# =============================================================================================


@pytest.mark.timeout(10)
def test_every_edge_of_the_table_is_accepted() -> None:
    for (state, event), targets in TRANSITIONS.items():
        assert targets, (state, event)
        for to in targets:
            assert transition(state, event, to) is to
        if len(targets) == 1:
            assert transition(state, event) is next(iter(targets))
        else:  # several targets: the caller must pick one
            with pytest.raises(TransitionError):
                transition(state, event)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("state, event, to", [
    (S.COMPLETED, E.STARTED, None),
    (S.PENDING, E.SUCCEEDED, None),
    (S.RUNNING, E.HANDED, None),
    (S.HELD, E.REVIVED, None),
    (S.COMPLETED, E.REVIVED, None),
    (S.RUNNING, E.RETURNED, None),
    (S.RUNNING, E.EXPIRED, None),
    (S.HELD, E.SUCCEEDED, None),
    (None, E.STARTED, None),
    (S.PENDING, E.SUBMITTED, None),
    (S.RUNNING, E.RECOVERED, S.HELD),  # an edge, not to that state
    (S.PENDING, E.HANDED, S.RUNNING),
])
def test_illegal_edges_raise(state: State | None, event: Event, to: State | None) -> None:
    with pytest.raises(TransitionError):
        transition(state, event, to)


@pytest.mark.timeout(10)
def test_every_state_is_reachable_from_submitted() -> None:
    seen: set[State] = set()
    todo: list[State | None] = [None]
    while todo:
        state = todo.pop()
        for (frm, _event), targets in TRANSITIONS.items():
            if frm is state:
                for to in targets - seen:
                    seen.add(to)
                    todo.append(to)
    assert {s for s in State if s not in FINAL} <= seen
    assert seen == set(State) == REACHABLE
    assert transition(None, E.SUBMITTED) is S.PENDING


@pytest.mark.timeout(10)
def test_final_states_lead_on_only_through_revived() -> None:
    assert FINAL == {S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED}
    for (state, event), targets in TRANSITIONS.items():
        if state in FINAL:
            assert event is E.REVIVED and targets == {S.PENDING}, (state, event)
    for state in FINAL:  # and every ended state but completed can be revived
        assert ((state, E.REVIVED) in TRANSITIONS) == (state is not S.COMPLETED)
    for state in (None, S.PENDING, S.HELD, S.RUNNING):
        assert (state, E.REVIVED) not in TRANSITIONS


@pytest.mark.timeout(10)
def test_stored_status() -> None:
    assert stored(S.HELD) == "pending"
    for state in State:
        assert stored(state) in {s.value for s in JobStatus}
        if state is not S.HELD:
            assert stored(state) == state.value


# =============================================================================================
# 3. the decisions
# =============================================================================================

NOW = 1000.0


def never() -> float:
    raise AssertionError("backoff asked for although the report named its delay")


@pytest.mark.timeout(10)
def test_ok_after_an_abort_request_is_cancelled_with_its_result_kept() -> None:
    d = after_report({"id": 1, "s": "ok", "st": NOW - 1, "r": "42"}, 1, 3, True, NOW, no_backoff)
    assert (d.event, d.state, d.result) == (E.ABORTED, S.CANCELLED, "42")
    assert d.error is not None and d.error["type"] == "Aborted"
    d = after_report({"id": 1, "s": "ok", "st": NOW - 1, "r": "42"}, 1, 3, False, NOW, no_backoff)
    assert (d.event, d.state, d.result, d.error) == (E.SUCCEEDED, S.COMPLETED, "42", None)


@pytest.mark.timeout(10)
def test_aborted_before_its_start_is_cancelled_uncharged() -> None:
    d = after_report({"id": 1, "s": "aborted"}, 2, 3, True, NOW, no_backoff)
    assert (d.event, d.state, d.charged) == (E.ABORTED, S.CANCELLED, False)
    assert d.error == aborted_before_start()
    transition(S.HELD, d.event, d.state)  # a held job's edge
    # and any other report without a start ends it so
    d = after_report({"id": 1, "s": "error"}, 1, 3, False, NOW, no_backoff)
    assert (d.event, d.state, d.charged) == (E.ABORTED, S.CANCELLED, False)


@pytest.mark.timeout(10)
def test_a_held_job_given_back_waits_again_unless_aborted() -> None:
    """outcome.given_back, for a held job's worker's "returned" report, its worker's
    death before its start, and a job the dispatcher could not send."""
    d = given_back(False)
    assert (d.event, d.state, d.charged, d.error) == (E.RETURNED, S.PENDING, False, None)
    transition(S.HELD, d.event, d.state)
    d = given_back(True)
    assert (d.event, d.state, d.charged) == (E.ABORTED, S.CANCELLED, False)
    assert d.error == aborted_before_start()
    transition(S.HELD, d.event, d.state)
    for abort in (False, True):
        d = given_back(abort)
        assert after_report({"id": 1, "s": "returned"}, 2, 3, abort, NOW, never) == d
        assert after_worker_death(CAUSE, None, None, False, 2, 3, abort, NOW, never) == d


@pytest.mark.timeout(10)
def test_error_on_the_last_attempt_fails_and_before_it_retries() -> None:
    err = error("ValueError", "boom")
    d = after_report({"id": 1, "s": "error", "st": NOW, "e": err}, 3, 3, False, NOW, no_backoff)
    assert (d.event, d.state, d.error, d.charged) == (E.FAILED, S.FAILED, err, True)
    d = after_report({"id": 1, "s": "error", "st": NOW, "e": err}, 2, 3, False, NOW, no_backoff)
    assert (d.event, d.state, d.run_at) == (E.RETRIED, S.PENDING, NOW + no_backoff())
    d = after_report({"id": 1, "s": "permanent", "st": NOW, "e": err}, 1, 3, False, NOW, no_backoff)
    assert (d.event, d.state) == (E.FAILED, S.FAILED)


@pytest.mark.timeout(10)
def test_retry_with_a_delay_runs_again_at_now_plus_delay() -> None:
    d = after_report({"id": 1, "s": "retry", "st": NOW, "d": 7.5}, 1, 3, False, NOW, never)
    assert (d.event, d.state, d.run_at, d.charged) == (E.RETRIED, S.PENDING, NOW + 7.5, True)
    d = after_report({"id": 1, "s": "retry", "st": NOW}, 1, 3, False, NOW, lambda: 4.0)
    assert d.run_at == NOW + 4.0
    d = after_report({"id": 1, "s": "retry", "st": NOW, "d": 7.5}, 3, 3, False, NOW, never)
    assert (d.event, d.state) == (E.FAILED, S.FAILED)  # no attempt left


@pytest.mark.timeout(10)
def test_worker_death_before_the_start_returns_the_job_uncharged() -> None:
    for killed_for in (None, "drain", "abort", "timeout"):
        d = after_worker_death(CAUSE, killed_for, None, False, 1, 3, False, NOW, never)
        assert (d.event, d.state, d.charged) == (E.RETURNED, S.PENDING, False), killed_for
        transition(S.HELD, d.event, d.state)
    d = after_worker_death(CAUSE, None, None, False, 1, 3, True, NOW, never)  # aborted meanwhile
    assert (d.event, d.state, d.charged) == (E.ABORTED, S.CANCELLED, False)


@pytest.mark.timeout(10)
def test_drain_while_running_interrupts_uncharged() -> None:
    d = after_worker_death(CAUSE, "drain", None, True, 3, 3, False, NOW, never)
    assert (d.event, d.state, d.charged, d.run_at) == (E.INTERRUPTED, S.PENDING, False, NOW)
    transition(S.RUNNING, d.event, d.state)
    d = after_worker_death(CAUSE, None, None, True, 3, 3, False, NOW, never)  # a crash: charged
    assert (d.event, d.state, d.charged) == (E.FAILED, S.FAILED, True)
    assert d.error is not None and d.error["type"] == "WorkerLost"
    limit = error("TimeLimitExceeded", "took too long")
    d = after_worker_death(CAUSE, "timeout", limit, True, 1, 2, False, NOW, lambda: 1.0)
    assert (d.event, d.state, d.error, d.run_at) == (E.RETRIED, S.PENDING, limit, NOW + 1.0)
    d = after_worker_death(CAUSE, "abort", None, True, 1, 2, False, NOW, never)
    assert (d.event, d.state) == (E.ABORTED, S.CANCELLED)


@pytest.mark.timeout(10)
def test_after_crash_runs_again_uncharged_until_the_third_interruption() -> None:
    for interruptions in (0, 1):
        d = after_crash(interruptions, NOW)
        assert (d.event, d.state, d.charged, d.run_at) == (E.RECOVERED, S.PENDING, False, NOW)
        transition(S.RUNNING, d.event, d.state)
    d = after_crash(2, NOW)
    assert (d.event, d.state, d.charged) == (E.RECOVERED, S.FAILED, False)
    assert d.error is not None and "interrupted 3 times" in d.error["message"]
    assert MAX_INTERRUPTIONS == 3
    transition(S.RUNNING, d.event, d.state)


@pytest.mark.timeout(10)
def test_every_decision_is_an_edge_of_the_table() -> None:
    """Whatever a worker reports (a started attempt's outcome, or a held job's), the
    decision is an edge from where the job is."""
    for s in OUTCOMES:
        for started in (False, True):
            if started and s in ("returned", "expired"):
                continue  # a worker gives back or expires only a job it has not started
            for abort in (False, True):
                for attempt, max_attempts in ((1, 1), (1, 3), (3, 3)):
                    report: dict[str, Any] = {"id": 1, "s": s}
                    if started:
                        report["st"] = NOW
                    d = after_report(report, attempt, max_attempts, abort, NOW, no_backoff)
                    transition(S.RUNNING if started else S.HELD, d.event, d.state)
                    if d.state is S.PENDING:
                        assert d.charged == (d.event is E.RETRIED)
                        assert not abort, f"{report}: an aborted job waits again ({d})"
    for killed_for in (None, "drain", "abort", "timeout"):
        for started in (False, True):
            for abort in (False, True):
                d = after_worker_death(CAUSE, killed_for, None, started, 1, 2, abort, NOW, no_backoff)
                transition(S.RUNNING if started else S.HELD, d.event, d.state)
                if d.state is S.PENDING and abort:  # only a drain's kill of a running job
                    assert (d.event, killed_for, started) == (E.INTERRUPTED, "drain", True), d


# =============================================================================================
# bugs found: regression tests (each failed before its fix)
# =============================================================================================


class Rig:
    """A book and a real store, as the machine above has them, for a scripted case."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.path = path
        self.now = NOW0
        self.batch = WriteBatch()
        self.store = SQLiteStore(path)
        self.run(self.store.open())
        self.book = JobBook(lambda kind, params: self.batch.add(kind, params),
                            lambda job_id, queue: None, lambda run_at, deadline: None)
        self.next_id = 1

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    def commit(self) -> None:
        batch, self.batch = self.batch, WriteBatch()
        self.run(self.store.apply(batch))
        assert self.store.refused_transitions() == 0

    def submit(self, lane: Lane = LANES[0], delay: float = 0.0, deadline: float | None = None,
               cached: bool = True) -> int:
        """Actions.submit_jobs of one job; not cached: its row is not kept in memory (its
        queue is paused, or PAYLOAD_CACHE rows are kept already)."""
        job_id = self.next_id
        self.next_id += 1
        queue, task = lane
        run_at = self.now + delay
        text = orjson.dumps({"n": job_id}).decode()
        params = (job_id, task, queue, 3, 0, None, None, self.now, run_at, deadline, None,
                  orjson.dumps([text]).decode())
        payloads = [Payload(task, queue, text, 0, 3, None, 0, None, None, self.now, run_at, deadline)]
        self.book.submitted(range(job_id, job_id + 1), lane, 0, run_at, deadline, None, self.now,
                            payloads if cached else None)
        self.batch.add_submit(job_id, 1, params, [], lambda: None, lambda exc: None)
        return job_id

    def restart(self) -> None:
        """A clean restart: Supervisor._recover into a new book."""
        self.commit()
        self.run(self.store.close())
        self.store = SQLiteStore(self.path)
        self.run(self.store.open())
        now = self.now
        self.run(self.store.recover_interrupted(
            now, lambda job: ("pending", after_crash(job.interruptions, now).error)))
        self.batch = WriteBatch()
        self.book = JobBook(lambda kind, params: self.batch.add(kind, params),
                            lambda job_id, queue: None, lambda run_at, deadline: None)
        self.book.load(self.run(self.store.load_pending(now)))

    def hand(self, pid: int, lane: Lane = LANES[0]) -> tuple[int, Attempt | None]:
        assert self.book.top(lane) is not None
        return self.book.hand(lane, pid, self.now)

    def fetch(self, job_id: int, keep: bool) -> Attempt | None:
        """The dispatcher's read of a job handed while not in memory."""
        self.commit()
        rows = self.run(self.store.jobs_for_dispatch([job_id]))
        return self.book.loaded(job_id, rows.get(job_id), keep, self.now)

    def deadline_due(self) -> list[int]:
        """Supervisor._deadline_due (main.py), for the jobs waiting (a job the book does
        not know and that has not just ended is one whose row is not in memory): those
        it expired."""
        expired = []
        for job_id in self.book.due_deadlines(self.now):
            state = self.book.state(job_id)
            if state is None and self.book.recent_final(job_id) is None:
                state = State.PENDING
            if state is State.PENDING:
                ran = self.book.attempts_ran(job_id)
                err = (expired_error(ran) if ran is not None
                       else error("Expired", "deadline passed before the job could start"))
                self.book.cancel_waiting(job_id, Event.EXPIRED, self.now, err)
                expired.append(job_id)
            elif state is State.HELD and self.book.attempt(job_id) is None:
                self.book.deadline_while_fetching(job_id, self.now)
        return expired

    def job(self, job_id: int) -> dict[str, Any]:
        """The job's row, every write so far committed."""
        self.commit()
        return dict(self.run(self.store.get_jobs([job_id]))[job_id])

    def status(self, job_id: int) -> str:
        return str(self.job(job_id)["status"])


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    r = Rig(str(tmp_path / "q.db"))
    yield r
    r.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("how", ["returned", "worker died", "never sent"])
def test_abort_of_a_held_job_survives_its_worker_giving_it_back(rig: Rig, how: str) -> None:
    """Fixed bug: a held job whose abort was requested, then given back unstarted (the
    worker's 'returned' report crossed the abort, its worker died before its start, or
    the dispatcher could not send it) waited again with its abort forgotten, and the
    next worker ran it. It now ends cancelled, uncharged (outcome.given_back)."""
    job_id = rig.submit()
    _, a = rig.hand(pid=1)
    assert a is not None
    assert rig.book.request_abort(a)
    if how == "returned":
        d = after_report({"id": job_id, "s": "returned"}, a.attempt, a.max_attempts,
                         a.abort_requested, rig.now, no_backoff)
    elif how == "worker died":
        d = after_worker_death(CAUSE, None, None, False, a.attempt, a.max_attempts,
                               a.abort_requested, rig.now, no_backoff)
    else:  # Dispatcher.give_back
        d = given_back(a.abort_requested)
    assert (d.event, d.state, d.charged) == (E.ABORTED, S.CANCELLED, False)
    rig.book.end(a, d, rig.now, None)
    assert rig.book.state(job_id) is None and rig.book.recent_final(job_id) == "cancelled"
    assert rig.book.ready_count == 0
    job = rig.job(job_id)
    assert (job["status"], job["attempts"]) == ("cancelled", 0)
    assert job["error"] == aborted_before_start()


@pytest.mark.timeout(20)
def test_abort_while_fetching_survives_the_job_going_back(rig: Rig) -> None:
    """Fixed bug: an abort of a job handed while its row was read
    (JobBook.abort_while_fetching) was kept only in memory; when the read ended without
    keeping the job, the job waited again with no trace of it, and ran later. It is
    now written at once: the job waits, its row says abort_requested, and its next
    attempt has it."""
    job_id = rig.submit()
    rig.restart()  # now no row is in memory: hand() must read it
    got, a = rig.hand(pid=1)
    assert got == job_id and a is None and rig.book.is_fetching(job_id)
    rig.book.abort_while_fetching(job_id)  # Actions.abort_jobs, as the client is answered
    rig.book.abort_while_fetching(job_id)  # a second abort writes nothing more
    assert [kind for kind, _ in rig.batch.all_ops()] == ["request_abort"]
    assert rig.fetch(job_id, keep=False) is None  # its worker exited meanwhile
    assert rig.book.state(job_id) is None and rig.book.ready_count == 1  # waits, not in memory
    job = rig.job(job_id)
    assert (job["status"], job["abort_requested"], job["attempts"]) == ("pending", True, 0)
    _, a = rig.hand(pid=2)
    assert a is None
    a = rig.fetch(job_id, keep=True)
    assert a is not None
    assert a.abort_requested, "the aborted job is handed out again without its abort"
    # and its worker ends it before it starts
    d = after_report({"id": job_id, "s": "aborted", "e": aborted_before_start()}, a.attempt,
                     a.max_attempts, a.abort_requested, rig.now, no_backoff)
    rig.book.end(a, d, rig.now, None)
    assert rig.status(job_id) == "cancelled"


@pytest.mark.timeout(20)
def test_abort_while_fetching_kept_reaches_the_attempt_and_the_store(rig: Rig) -> None:
    """The same abort, when the read keeps the job: its attempt has it, and so does
    its row (whether the read saw the write or not)."""
    job_id = rig.submit()
    rig.restart()
    _, a = rig.hand(pid=1)
    assert a is None
    rig.book.abort_while_fetching(job_id)
    rows = rig.run(rig.store.jobs_for_dispatch([job_id]))  # read before the abort's commit
    assert not rows[job_id].abort_requested
    a = rig.book.loaded(job_id, rows[job_id], True, rig.now)
    assert a is not None and a.abort_requested
    assert rig.job(job_id)["abort_requested"] is True


@pytest.mark.timeout(20)
@pytest.mark.parametrize("how", ["loaded at start", "submitted to a paused queue"])
def test_deadline_of_a_job_not_in_memory_expires_it(rig: Rig, how: str) -> None:
    """Fixed bug: the deadline timer never expired a ready job whose row is not in
    memory (JobBook.state() None): Supervisor._deadline_due now takes a job it does
    not know, and that has not just ended, for a waiting one."""
    job_id = rig.submit(deadline=rig.now + 10, cached=how == "loaded at start")
    if how == "loaded at start":
        rig.restart()
    assert rig.book.state(job_id) is None and rig.book.attempts_ran(job_id) is None
    rig.now += 20
    assert rig.deadline_due() == [job_id]
    assert rig.book.ready_count == 0 and rig.book.state(job_id) is None
    job = rig.job(job_id)
    assert job["status"] == "expired"
    assert job["error"] == error("Expired", "deadline passed before the job could start")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("ends", ["aborted", "expired"])
def test_abort_between_coming_due_and_promote_keeps_the_ready_index_exact(rig: Rig,
                                                                         ends: str) -> None:
    """Fixed bug: a delayed job loaded at start comes due without a payload, and its row
    is read (main.py _promote_unknown) before promote() makes it ready; an abort (or
    its deadline) in that window discarded it from a ready index it was not in, and the
    stale mark later swallowed it once revived. The book now keeps such jobs in
    JobBook._promoting (state() PENDING) until promote()."""
    lane = LANES[0]
    job_id = rig.submit(lane, delay=5.0, deadline=rig.now + 8.0)
    rig.restart()
    rig.now += 10
    assert rig.book.ready_delayed(rig.now) == [job_id]  # its row is read next
    assert rig.book.state(job_id) is S.PENDING and rig.book.ready_count == 0
    if ends == "aborted":
        # Actions.abort_jobs meanwhile: a barrier, the row read, then by the book's state.
        job = rig.run(rig.store.get_jobs([job_id]))[job_id]
        assert job["status"] == "pending"
        rig.book.cancel_waiting(job_id, Event.ABORTED, rig.now, aborted_before_start(), lane=lane)
    else:
        assert rig.deadline_due() == [job_id]
    assert rig.book.state(job_id) is None and rig.book.ready_count == 0
    rig.book.promote(job_id, lane, 0)  # the read's answer (pending, read before): ignored
    assert rig.book.ready_count == 0 and rig.book.top(lane) is None
    assert rig.status(job_id) == ("cancelled" if ends == "aborted" else "expired")
    # An operator retries it (Actions.retry_job): it must become ready to run.
    job = rig.run(rig.store.get_jobs([job_id]))[job_id]
    rig.book.revive(job, rig.now)
    rig.commit()
    rig.book.make_ready(job_id, lane, 0)
    top = rig.book.top(lane)
    assert top is not None and unpack_id(top) == job_id, "the revived job is not in the ready index"
    assert rig.book.ready_count == 1


@pytest.mark.timeout(20)
def test_promote_of_a_job_whose_row_is_gone_or_unread(rig: Rig) -> None:
    """promote(job_id, None, 0) drops a job come due whose row is gone (or not
    pending); delay_again() times again those whose rows could not be read."""
    lane = LANES[0]
    gone = rig.submit(lane, delay=5.0)
    unread = rig.submit(lane, delay=5.0)
    rig.restart()
    rig.now += 10
    assert rig.book.ready_delayed(rig.now) == [gone, unread]
    rig.book.promote(gone, None, 0)
    assert rig.book.state(gone) is None and rig.book.ready_count == 0
    rig.book.delay_again([unread], rig.now + 1.0)
    assert rig.book.state(unread) is S.PENDING and rig.book.next_delay_due() == rig.now + 1.0
    rig.book.promote(unread, lane, 0)  # a late answer: it is delayed again, not promoting
    assert rig.book.ready_count == 0
    assert rig.book.ready_delayed(rig.now) == []
    rig.now += 1.0
    assert rig.book.ready_delayed(rig.now) == [unread]
    rig.book.promote(unread, lane, 0)
    top = rig.book.top(lane)
    assert top is not None and unpack_id(top) == unread and rig.book.ready_count == 1


@pytest.mark.timeout(20)
def test_deadline_while_its_row_is_read_is_kept_when_the_job_goes_back(rig: Rig) -> None:
    job_id = rig.submit(deadline=rig.now + 10)
    rig.restart()  # now no row is in memory: hand() must read it
    got, a = rig.hand(pid=1)
    assert got == job_id and a is None and rig.book.is_fetching(job_id)
    rig.now += 20
    assert rig.deadline_due() == []  # held: the dispatcher's read goes on
    assert rig.fetch(job_id, keep=False) is None  # its worker exited meanwhile
    assert rig.book.state(job_id) is None and rig.book.ready_count == 1  # waits again
    assert rig.book.next_deadline_due() is not None, "it waits with no deadline timed"
    assert rig.deadline_due() == [job_id]
    assert rig.status(job_id) == "expired"
