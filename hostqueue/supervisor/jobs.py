"""The job book: every unfinished job this supervisor knows, by state, and the one
place where a job changes state.

A job is waiting (``PENDING``: in the ready index, or timed for later), held by
a worker that has not started it (``HELD``), or running (``RUNNING``). Every
move goes through a method of the book (submitted, hand, start, end,
cancel_waiting, revive), which asks the transition table (core/states.py) and
adds the store write of that transition, guarded by the state it leaves, to
the group commit. Nothing else in the supervisor changes a job's state or
writes one.

What the book owns: the ready index (ready jobs by lane, priority and id), the
timed heaps (delayed jobs, deadlines), the payload cache (rows of pending jobs,
so dispatch reads nothing), the attempts handed to workers (held and running,
by job and by worker), the unfinished idempotency keys, and the recently ended
jobs (to answer races and `wait`s without a read).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import orjson

from hostqueue.core.outcome import Decision
from hostqueue.core.states import Event, State, stored, transition
from hostqueue.store.base import DispatchRow, PendingSet
from hostqueue.supervisor.readyindex import (
    PAYLOAD_CACHE, Lane, Payload, ReadyIndex, TimedHeap, unpack_id,
)

log = logging.getLogger("hostqueue.supervisor")

RECENT_FINALS = 20_000  # final states remembered to answer races without a read
# Jobs just ended, whole: a `wait` that arrives right after its job ended (the
# usual case for a fast job) answers from memory, not from a read.
RECENT_JOBS = 1024
RECENT_JOB_BYTES = 16 * 1024  # larger args and results are read back instead

Write = Callable[[str, tuple[Any, ...]], None]


def error_json(error: dict[str, Any] | None) -> str | None:
    return orjson.dumps(error).decode() if error is not None else None


@dataclass(slots=True, eq=False)
class Attempt:
    """A job handed to a worker: held (not started) or running, and this attempt of it."""

    id: int
    task: str
    queue: str
    args: str
    attempt: int  # this attempt's number (1 for the first)
    max_attempts: int
    timeout: float | None
    priority: int
    run_id: str | None
    key: str | None
    created_at: float
    run_at: float
    deadline: float | None
    worker_pid: int
    handed_at: float
    state: State = State.HELD
    started_at: float | None = None
    start_written: bool = False  # its start is in the store (or in the batch on its way)
    abort_requested: bool = False
    progress: float | None = None
    progress_message: str | None = None
    progress_dirty: bool = False
    board_seq: int = -1
    cpu_seconds: float | None = None
    peak_rss: int | None = None
    expected: float = 0.0  # its task's run time as dispatch counted it (-1: unknown)
    # Dispatch's order key when it was handed: its worker runs the jobs it holds in
    # this order (priority, queue order, weights), so a job handed later that goes
    # first never waits behind those handed before it.
    order: tuple[float, float, int] = (0.0, 0.0, 0)

    @property
    def lane(self) -> Lane:
        return (self.queue, self.task)

    def to_dict(self) -> dict[str, Any]:
        """The job as clients see it now: a held job is pending, with no start."""
        running = self.state is State.RUNNING
        return {
            "id": self.id, "task": self.task, "queue": self.queue, "status": stored(self.state),
            "args": orjson.loads(self.args), "result": None, "error": None,
            "attempts": self.attempt if running else self.attempt - 1,
            "max_attempts": self.max_attempts, "priority": self.priority,
            "progress": self.progress, "progress_message": self.progress_message,
            "key": self.key, "run_id": self.run_id, "created_at": self.created_at,
            "started_at": self.started_at if running else None, "finished_at": None,
            "run_at": self.run_at, "deadline": self.deadline, "timeout": self.timeout,
            "abort_requested": self.abort_requested,
            "worker_pid": self.worker_pid if running else None,
            "cpu_seconds": None, "peak_rss": None,
        }

    def message(self, report_start: bool) -> dict[str, Any]:
        """What its worker gets on the pipe; with report_start, the worker tells its
        start at once (else with its outcome)."""
        return {"id": self.id, "task": self.task, "args": self.args, "attempt": self.attempt,
                "max_attempts": self.max_attempts, "timeout": self.timeout,
                "abort": self.abort_requested, "dl": self.deadline,
                "o": (self.order[0], self.order[1], -self.priority, self.id),
                "rs": report_start}


@dataclass(slots=True)
class Ended:
    """A job that just ended, whole, as its final write leaves it in the store."""

    attempt: Attempt
    status: str
    result: str | None
    error: dict[str, Any] | None
    finished_at: float

    def job(self) -> dict[str, Any]:
        a = self.attempt
        job = a.to_dict()
        job.update(status=self.status, finished_at=self.finished_at, error=self.error,
                   result=orjson.loads(self.result) if self.result is not None else None,
                   attempts=a.attempt, started_at=a.started_at, worker_pid=a.worker_pid,
                   cpu_seconds=a.cpu_seconds, peak_rss=a.peak_rss)
        return job


class JobBook:
    def __init__(self, write: Write, on_start_written: Callable[[int, str], None],
                 on_wait: Callable[[float, float | None], None]) -> None:
        self._write = write  # adds a write to the group commit
        self._on_start_written = on_start_written  # running counts (runcount.py)
        # A job waits (again) from run_at, bounded by a deadline: timers and dispatch.
        self._on_wait = on_wait
        self._ready = ReadyIndex()
        self._delayed = TimedHeap()
        self._deadlines = TimedHeap()
        self._payloads: dict[int, Payload] = {}
        self._keys: dict[str, int] = {}
        self._active: dict[int, Attempt] = {}
        self._by_worker: dict[int, dict[int, Attempt]] = {}
        self._running = 0
        # Held jobs whose rows are being read from the store (no payload in memory):
        # job id -> (worker pid, lane, packed ready key); and aborts asked for meanwhile.
        self._fetching: dict[int, tuple[int, Lane, int]] = {}
        self._fetch_aborts: set[int] = set()
        # Deadlines that came due while the row was read: kept, for a job that goes back.
        self._fetch_late: dict[int, float] = {}
        # Delayed jobs come due whose rows are being read to learn their lane (promote()).
        self._promoting: set[int] = set()
        self.recent_finals: collections.OrderedDict[int, str] = collections.OrderedDict()
        self.recent_jobs: collections.OrderedDict[int, Ended] = collections.OrderedDict()

    # == what it knows ============================================================

    def state(self, job_id: int) -> State | None:
        """The job's state if it is unfinished and known to this book, else None."""
        a = self._active.get(job_id)
        if a is not None:
            return a.state
        if job_id in self._fetching:
            return State.HELD
        if job_id in self._payloads or job_id in self._delayed or job_id in self._promoting:
            return State.PENDING
        return None

    def attempt(self, job_id: int) -> Attempt | None:
        return self._active.get(job_id)

    def is_fetching(self, job_id: int) -> bool:
        return job_id in self._fetching

    def held_by(self, pid: int) -> dict[int, Attempt]:
        """The jobs this worker holds (a copy): held and running."""
        return dict(self._by_worker.get(pid, {}))

    def holds(self, pid: int) -> int:
        jobs = self._by_worker.get(pid)
        return len(jobs) if jobs else 0

    def unstarted(self, pid: int) -> int:
        jobs = self._by_worker.get(pid)
        return sum(1 for a in jobs.values() if a.state is State.HELD) if jobs else 0

    def running_on(self, pid: int) -> Attempt | None:
        jobs = self._by_worker.get(pid)
        if jobs:
            for a in jobs.values():
                if a.state is State.RUNNING:
                    return a
        return None

    def active(self) -> Iterator[Attempt]:
        return iter(self._active.values())

    @property
    def running(self) -> int:
        """Jobs whose task has started and not ended."""
        return self._running

    @property
    def handed(self) -> int:
        """Jobs held or running in workers (those being read for them included)."""
        return len(self._active) + len(self._fetching)

    @property
    def ready_count(self) -> int:
        """Jobs ready to start now (some may be held back by pauses or limits)."""
        return self._ready.count

    @property
    def ready_index(self) -> ReadyIndex:
        """The ready jobs, for reading only (tests, diagnostics)."""
        return self._ready

    def available(self, paused: set[str]) -> int:
        return self._ready.available(paused)

    def waiting_by_queue(self) -> dict[str, int]:
        return self._ready.waiting_by_queue()

    def key_owner(self, key: str) -> int | None:
        return self._keys.get(key)

    def load(self, pending: PendingSet) -> None:
        """At start: every pending job of the store (recovered ones included)."""
        self._ready.bulk_load(pending.ready)
        for lane, priority, job_id in pending.unordered:
            self._ready.push(lane, priority, job_id)
        self._delayed.bulk_load(pending.delayed)
        self._deadlines.bulk_load(pending.deadlines)
        self._keys.update(pending.keys)

    def scheduled(self, now: float, at_most: int) -> list[int] | None:
        """The ids of jobs due later than now (None when more than at_most are timed)."""
        timed = self._delayed.members
        if len(timed) > at_most:
            return None
        return [job_id for job_id, when in timed.items() if when > now]

    def next_delay_due(self) -> float | None:
        return self._delayed.next_due()

    def next_deadline_due(self) -> float | None:
        return self._deadlines.next_due()

    def attempts_ran(self, job_id: int) -> int | None:
        """How many attempts a waiting job has used, if its row is in memory."""
        p = self._payloads.get(job_id)
        return p.attempts if p is not None else None

    def recent_final(self, job_id: int) -> str | None:
        return self.recent_finals.get(job_id)

    def recent_job(self, job_id: int) -> Ended | None:
        return self.recent_jobs.get(job_id)

    def unfinished(self, job_id: int) -> bool:
        """Known from memory not to have ended: its end will be announced."""
        return job_id not in self.recent_finals and (
            job_id in self._active or job_id in self._fetching or job_id in self._payloads
        )

    # == submit ===================================================================

    def submitted(self, ids: range, lane: Lane, priority: int, run_at: float,
                  deadline: float | None, key: str | None, now: float,
                  payloads: list[Payload] | None) -> None:
        """New jobs (their INSERT is in the batch): waiting from now on."""
        transition(None, Event.SUBMITTED)  # the same edge for every job of a submit
        if key is not None:
            self._keys[key] = ids[0]
        if payloads is not None:
            self._payloads.update(zip(ids, payloads))
        ready = run_at <= now
        for job_id in ids:
            if deadline is not None:
                self._deadlines.push(deadline, job_id)
            if ready:
                self._ready.push(lane, priority, job_id)
            else:
                self._delayed.push(run_at, job_id)
        self._on_wait(run_at, deadline)

    def claimed(self, rows: list[DispatchRow], now: float) -> list[int]:
        """Jobs this host claimed from the store (released by a submit on any host, or
        by a host gone silent): waiting here from now on. Returns those whose abort
        was asked meanwhile (the caller ends them)."""
        aborted = []
        earliest: float | None = None
        for r in rows:
            if r.key is not None:
                self._keys[r.key] = r.id
            self._payloads[r.id] = Payload(
                r.task, r.queue, r.args, r.attempts, r.max_attempts, r.timeout, r.priority,
                r.run_id, r.key, r.created_at, r.run_at, r.deadline)
            if r.deadline is not None:
                self._deadlines.push(r.deadline, r.id)
                if earliest is None or r.deadline < earliest:
                    earliest = r.deadline
            self._ready.push((r.queue, r.task), r.priority, r.id)
            if r.abort_requested:
                aborted.append(r.id)
        self._on_wait(0.0, earliest)
        return aborted

    def release_ready(self, committed: Callable[[int], bool], keep: int = 0) -> list[int]:
        """The waiting jobs whose rows are committed (committed(id)): the delayed ones,
        and the ready ones beyond the ``keep`` first in dispatch order, out of this
        book. A host that drains, or that learns it is no longer alone, gives them
        to the other hosts (its caller releases them in the store)."""
        ids = []
        for job_id in list(self._delayed.members):
            if committed(job_id):
                self._delayed.discard(job_id)
                ids.append(job_id)
        popped: list[tuple[int, Lane]] = []
        for lane in list(self._ready.lanes):
            while self._ready.top(lane) is not None:
                popped.append((self._ready.pop(lane), lane))
        popped.sort()
        for i, (packed, lane) in enumerate(popped):
            if i < keep or not committed(unpack_id(packed)):
                self._ready.push_back(lane, packed)  # stays (its INSERT is on its way)
            else:
                ids.append(unpack_id(packed))
        gone = set(ids)
        for job_id in ids:
            self._payloads.pop(job_id, None)
            self._deadlines.discard(job_id)
        for key in [k for k, v in self._keys.items() if v in gone]:
            del self._keys[key]
        return ids

    def withdraw(self, ids: range, lane: Lane, key: str | None) -> list[Attempt]:
        """A submit that failed to commit: its jobs never existed. Returns those that
        were handed to a worker already (not sent yet: they wait for that commit)."""
        if key is not None and self._keys.get(key) == ids[0]:
            del self._keys[key]
        handed = []
        for job_id in ids:
            self._payloads.pop(job_id, None)
            self._deadlines.discard(job_id)
            if self._fetching.pop(job_id, None) is not None:
                continue
            a = self._active.get(job_id)
            if a is not None:
                self._drop(a)
                handed.append(a)
            elif not self._delayed.discard(job_id):
                self._ready.discard(job_id, lane)
        return handed

    def cache_allows(self, queue: str, paused: set[str]) -> bool:
        """Whether new jobs of this queue keep their rows in memory. A paused queue's
        jobs are read back when it resumes: a million kept here cost ~300 bytes each."""
        return len(self._payloads) < PAYLOAD_CACHE and queue not in paused and "*" not in paused

    # == waiting jobs ===============================================================

    def lanes(self) -> Iterator[Lane]:
        return iter(list(self._ready.lanes))

    def top(self, lane: Lane) -> int | None:
        return self._ready.top(lane)

    def hand(self, lane: Lane, pid: int, now: float) -> tuple[int, Attempt | None]:
        """Give the lane's next ready job to worker pid (pending -> held). Returns the
        job's id and its attempt; None when its row must be read first (loaded())."""
        packed = self._ready.pop(lane)
        job_id = unpack_id(packed)
        transition(State.PENDING, Event.HANDED)
        p = self._payloads.pop(job_id, None)
        if p is None:
            self._fetching[job_id] = (pid, lane, packed)
            return job_id, None
        return job_id, self._attach(job_id, p, pid, now)

    def _attach(self, job_id: int, p: Payload, pid: int, now: float) -> Attempt:
        a = Attempt(job_id, p.task, p.queue, p.args, p.attempts + 1, p.max_attempts, p.timeout,
                    p.priority, p.run_id, p.key, p.created_at, p.run_at, p.deadline, pid, now)
        self._active[job_id] = a
        self._by_worker.setdefault(pid, {})[job_id] = a
        return a

    def loaded(self, job_id: int, row: DispatchRow | None, keep: bool, now: float) -> Attempt | None:
        """The row of a job handed while not in memory has been read (row None: it
        ended or vanished meanwhile). With keep, the job stays with its worker;
        else (the read failed, the worker went) it waits again. Returns its
        attempt when it stays."""
        fetched = self._fetching.pop(job_id, None)
        aborted = job_id in self._fetch_aborts
        self._fetch_aborts.discard(job_id)
        late = self._fetch_late.pop(job_id, None)
        if fetched is None or job_id in self.recent_finals:
            return None
        pid, lane, packed = fetched
        if not keep:
            transition(State.HELD, Event.RETURNED)
            self._ready.push_back(lane, packed)
            if late is not None and job_id not in self._deadlines:
                self._deadlines.push(late, job_id)  # it waits again: it expires now
            self._on_wait(0.0, late)
            return None
        if row is None:
            return None
        p = Payload(row.task, row.queue, row.args, row.attempts, row.max_attempts, row.timeout,
                    row.priority, row.run_id, row.key, row.created_at, row.run_at, row.deadline)
        a = self._attach(job_id, p, pid, now)
        a.abort_requested = row.abort_requested or aborted
        return a

    def cancel_waiting(self, job_id: int, event: Event, now: float, error: dict[str, Any] | None,
                       lane: Lane | None = None) -> str:
        """A waiting job ends without running (abort, deadline). Returns its new status."""
        to = transition(State.PENDING, event)
        payload = self._payloads.pop(job_id, None)
        if lane is None and payload is not None:
            lane = (payload.queue, payload.task)
        if job_id in self._promoting:
            self._promoting.discard(job_id)
        elif not self._delayed.discard(job_id):
            self._ready.discard(job_id, lane)
        self._deadlines.discard(job_id)
        key = payload.key if payload else next((k for k, v in self._keys.items() if v == job_id), None)
        status = stored(to)
        self._write("cancel_pending", (status, now, error_json(error), "pending", job_id))
        self._forget(job_id, key, status)
        return status

    def deadline_while_fetching(self, job_id: int, deadline: float) -> None:
        """A held job's deadline came due while its row is read: its worker will not
        start it late; if it comes back instead, it expires then."""
        if job_id in self._fetching:
            self._fetch_late[job_id] = deadline

    def abort_while_fetching(self, job_id: int) -> None:
        """An abort of a held job whose row is being read: carried to its attempt when
        the row arrives, and written, so that it holds however the read ends."""
        if job_id not in self._fetch_aborts:
            self._fetch_aborts.add(job_id)
            self._write("request_abort", (job_id,))

    def ready_delayed(self, now: float) -> list[int]:
        """Delayed jobs now due move to the ready index; returns those whose lane is
        not known from memory (their rows must be read: promote())."""
        missing = []
        for job_id in self._delayed.pop_due(now):
            p = self._payloads.get(job_id)
            if p is None:
                missing.append(job_id)
                self._promoting.add(job_id)
            else:
                self._ready.push((p.queue, p.task), p.priority, job_id)
        return missing

    def promote(self, job_id: int, lane: Lane | None, priority: int) -> None:
        """A due delayed job read from the store: ready, unless it ended meanwhile (lane
        None: its row is gone)."""
        if job_id not in self._promoting:
            return  # aborted or expired meanwhile
        self._promoting.discard(job_id)
        if lane is not None and job_id not in self.recent_finals:
            self._ready.push(lane, priority, job_id)

    def delay_again(self, ids: list[int], when: float) -> None:
        """Due delayed jobs whose rows could not be read: due again at ``when``."""
        for job_id in ids:
            if job_id in self._promoting:
                self._promoting.discard(job_id)
                self._delayed.push(when, job_id)
        self._on_wait(when, None)

    def due_deadlines(self, now: float) -> list[int]:
        return self._deadlines.pop_due(now)

    # == held and running ==========================================================

    def start(self, a: Attempt, started_at: float) -> None:
        """Its task started (held -> running): written to the store."""
        a.state = transition(a.state, Event.STARTED)
        a.started_at = started_at
        self._running += 1
        self._deadlines.discard(a.id)  # met
        self._write("start", (a.attempt, started_at, a.worker_pid, "pending", a.id))
        a.start_written = True
        self._on_start_written(a.id, a.queue)

    def started_unwritten(self, a: Attempt, started_at: float) -> None:
        """Its task started and already ended (one report for both): the end's write
        carries the start (held -> running -> ...)."""
        a.state = transition(a.state, Event.STARTED)
        a.started_at = started_at
        self._running += 1
        self._deadlines.discard(a.id)

    def end(self, a: Attempt, d: Decision, now: float, attempt_started: float | None) -> Ended | None:
        """Apply a decision on a held or running job. Returns the job whole when it
        ended and is worth keeping in memory (a `wait` just after reads no row)."""
        was = a.state
        to = a.state = transition(was, d.event, d.state)
        self._drop(a)
        if was is State.RUNNING:
            self._running -= 1
        guard = "running" if a.start_written else "pending"
        started = a.started_at
        if to is State.PENDING:  # back to waiting: retried, returned, interrupted
            attempts = a.attempt if d.charged else a.attempt - 1
            run_at = d.run_at if d.run_at is not None else a.run_at
            if d.event is Event.RETRIED:
                self._write("retry_later", (run_at, error_json(d.error), attempts, a.progress,
                                            a.progress_message, guard, a.id))
                self._log_attempt(a, "retrying", d.error, attempt_started, now)
            elif d.event is Event.INTERRUPTED:  # stopped by the supervisor: as if not run
                self._write("requeue", (attempts, run_at, guard, a.id))
            # RETURNED (never started): nothing changed in the store
            self._wait_again(a, attempts, run_at, now)
            return None
        status = stored(to)
        if was is State.HELD:  # ended before it started: aborted or expired while held
            self._write("cancel_pending", (status, now, error_json(d.error), "pending", a.id))
            self._forget(a.id, a.key, status)
            return None
        self._write("finish", (status, d.result, error_json(d.error), now, a.progress,
                               a.progress_message, a.cpu_seconds, a.peak_rss, a.attempt,
                               started, a.worker_pid, guard, a.id))
        # The attempt log keeps every failed attempt, and the last one of a job that
        # needed several; a job done at the first try has its figures on its row.
        if d.error is not None or a.attempt > 1:
            self._log_attempt(a, status, d.error, attempt_started, now)
        self._forget(a.id, a.key, status)
        ended = Ended(a, status, d.result, d.error, now)
        # The store keeps an earlier attempt's progress when this one reported none:
        # only then is the row worth reading back.
        if (a.progress is not None or a.attempt == 1) and \
                len(a.args) + len(d.result or "") <= RECENT_JOB_BYTES:
            recent = self.recent_jobs
            recent[a.id] = ended
            if len(recent) > RECENT_JOBS:
                recent.popitem(last=False)
        return ended

    def request_abort(self, a: Attempt) -> bool:
        """Mark a held or running job aborted; False if it was already."""
        if a.abort_requested:
            return False
        a.abort_requested = True
        self._write("request_abort", (a.id,))
        return True

    def record_progress(self, a: Attempt) -> None:
        if a.progress_dirty and a.state is State.RUNNING:
            a.progress_dirty = False
            self._write("record_progress", (a.progress, a.progress_message, a.id))

    def revive(self, job: dict[str, Any], now: float, written: bool = False) -> None:
        """An operator's retry of an ended job (failed, cancelled, expired -> pending);
        written: its store write was made already (several hosts: store.revive)."""
        transition(State(job["status"]), Event.REVIVED)
        job_id = job["id"]
        if not written:
            self._write("revive", (now, job["status"], job_id))
        self.recent_finals.pop(job_id, None)
        self.recent_jobs.pop(job_id, None)
        if job["key"] is not None:
            self._keys[job["key"]] = job_id
        self._payloads[job_id] = Payload(
            job["task"], job["queue"], orjson.dumps(job["args"]).decode(), 0, job["max_attempts"],
            job["timeout"], job["priority"], job["run_id"], job["key"], job["created_at"], now,
            job["deadline"],
        )
        if job["deadline"] is not None and job_id not in self._deadlines:
            self._deadlines.push(job["deadline"], job_id)

    def make_ready(self, job_id: int, lane: Lane, priority: int) -> None:
        """A revived job, once its write committed: ready to run."""
        if self.state(job_id) is State.PENDING:
            self._ready.push(lane, priority, job_id)
            p = self._payloads.get(job_id)
            self._on_wait(0.0, p.deadline if p is not None else None)

    # == inside ======================================================================

    def _drop(self, a: Attempt) -> None:
        self._active.pop(a.id, None)
        jobs = self._by_worker.get(a.worker_pid)
        if jobs is not None:
            jobs.pop(a.id, None)
            if not jobs:
                del self._by_worker[a.worker_pid]

    def _wait_again(self, a: Attempt, attempts: int, run_at: float, now: float) -> None:
        self._payloads[a.id] = Payload(
            a.task, a.queue, a.args, attempts, a.max_attempts, a.timeout, a.priority,
            a.run_id, a.key, a.created_at, run_at, a.deadline,
        )
        if a.deadline is not None and a.id not in self._deadlines:
            self._deadlines.push(a.deadline, a.id)
        if run_at <= now:
            self._ready.push(a.lane, a.priority, a.id)
        else:
            self._delayed.push(run_at, a.id)
        self._on_wait(run_at, a.deadline)

    def _log_attempt(self, a: Attempt, status: str, error: dict[str, Any] | None,
                     attempt_started: float | None, now: float) -> None:
        self._write("record_attempt", (a.id, a.attempt, status, error_json(error), a.worker_pid,
                                       attempt_started or a.started_at or a.handed_at, now,
                                       a.cpu_seconds, a.peak_rss))

    def _forget(self, job_id: int, key: str | None, status: str) -> None:
        if key is not None and self._keys.get(key) == job_id:
            del self._keys[key]
        self._payloads.pop(job_id, None)
        self._deadlines.discard(job_id)
        finals = self.recent_finals
        finals[job_id] = status
        if len(finals) > RECENT_FINALS:
            finals.popitem(last=False)

    def forget_deleted(self, job_id: int) -> None:
        """Retention deleted it: a `wait` must read not_found, as `get` does."""
        self.recent_jobs.pop(job_id, None)
