"""Outcomes: what a worker's reports and a worker's death do to the jobs it held.

A worker reports a job's start (``"s": "started"``; fast jobs' starts ride
with their outcomes) and each attempt's outcome. Its death ends the attempt of
the job it was running and gives back those it had not started. Each becomes a
decision of core/outcome.py, applied by the job book (the state change and its
guarded write); here the consequences follow: counters, the run-time
histogram, the dispatcher told what left the worker, and the events that
waiters and watchers hear (a final state only once it is committed).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable

from hostqueue.core import outcome
from hostqueue.core.outcome import Decision
from hostqueue.core.registry import TaskSpec
from hostqueue.core.states import Event, State
from hostqueue.supervisor.announce import Announcer
from hostqueue.supervisor.committer import GroupCommitter
from hostqueue.supervisor.dispatcher import Dispatcher
from hostqueue.supervisor.events import EventHub
from hostqueue.supervisor.jobs import Attempt, JobBook
from hostqueue.supervisor.metrics import Histogram
from hostqueue.supervisor.pool import WorkerHandle, describe_exit

log = logging.getLogger("hostqueue.supervisor")

ABORT_GRACE = 10.0  # a running job gets this long to honour an abort before its worker is replaced

# What each ending event adds to the counters (`ctl status`, /metrics).
COUNTED = {
    Event.SUCCEEDED: "completed", Event.FAILED: "failed", Event.ABORTED: "cancelled",
    Event.EXPIRED: "expired", Event.RETRIED: "retried", Event.INTERRUPTED: "interrupted",
    Event.RETURNED: "returned",
}


class Outcomes:
    def __init__(self, book: JobBook, dispatcher: Dispatcher, committer: GroupCommitter,
                 announcer: Announcer, events: EventHub, counters: dict[str, int],
                 runtime: Histogram, tasks: Callable[[], dict[str, TaskSpec]],
                 on_final: Callable[[str, float], None],
                 on_worker_done: Callable[[WorkerHandle], None]) -> None:
        self.book = book
        self.dispatcher = dispatcher
        self.committer = committer
        self.announcer = announcer
        self.events = events
        self.counters = counters
        self.runtime = runtime
        self._tasks = tasks
        self._on_final = on_final  # retention arms its timer
        self._on_worker_done = on_worker_done  # recycling checks the worker

    # == reports ==================================================================

    def on_report(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        """A worker's report: starts and outcomes of jobs it holds, in order."""
        if message.get("mem") is not None:
            worker.rss_now = message["mem"]
        now = time.time()
        book = self.book
        pid = worker.pid
        left: list[Attempt] = []
        wants = self.events.wants
        for o in message["o"]:
            a = book.attempt(o["id"])
            if a is None or a.worker_pid != pid:
                continue  # it ended otherwise meanwhile (taken back, expired)
            s = o["s"]
            st = o.get("st")
            if s == "started":
                if a.state is State.HELD:
                    book.start(a, st)
                    self._count("started")
                    if wants(a.id):
                        self._announce_started(a)
                continue
            if st is not None:
                if a.state is State.HELD:
                    book.started_unwritten(a, st)  # started and ended between two reports
                    self._count("started")
                    if wants(a.id):
                        self._announce_started(a)
                worker.jobs_done += 1
                if o.get("ft") is not None:
                    self.dispatcher.learn(a.task, max(0.0, o["ft"] - st))
            if o.get("p") is not None:
                a.progress, a.progress_message = o["p"], o.get("pm")
            a.cpu_seconds, a.peak_rss = o.get("cpu"), o.get("rss")
            d = outcome.after_report(o, a.attempt, a.max_attempts, a.abort_requested, now,
                                     self._backoff_of(a))
            self.apply(a, d, now, st)
            left.append(a)
        if left:
            self.dispatcher.released(worker, left)
        self.dispatcher.reported(worker)
        self._on_worker_done(worker)

    def board_started(self, a: Attempt, started_at: float) -> None:
        """The progress board shows a held job running whose start the worker could
        not report yet (its task holds the interpreter): running from then."""
        if a.state is State.HELD:
            self.book.start(a, started_at)
            self._count("started")
            if self.events.wants(a.id):
                self._announce_started(a)

    def apply(self, a: Attempt, d: Decision, now: float, attempt_started: float | None) -> None:
        """Apply a decision to a held or running job, with its consequences."""
        was_running = a.state is State.RUNNING
        ended = self.book.end(a, d, now, attempt_started)
        counted = COUNTED.get(d.event)
        if counted is not None:
            self._count(counted)
        if was_running:
            self.runtime.observe(max(0.0, now - (attempt_started or a.started_at or now)))
        if d.state is State.PENDING:
            if d.event is Event.RETRIED and self.events.wants(a.id):
                # Not final, told from what we know, once committed: in order with `started`
                # (whose start may still be on its way to the store).
                job = a.to_dict()
                job.update(status="pending", run_at=d.run_at, error=d.error, attempts=a.attempt)
                event = {"event": "retrying", "job_id": a.id, "job": job}
                self.committer.after_commit(
                    lambda: self.events.publish(event, a.queue, a.task, a.run_id), [a.id])
            return
        status = d.state.value
        self._on_final(status, now)
        if d.state is State.FAILED and d.error is not None:
            log.warning("job %d %s failed: %s: %s", a.id, a.task, d.error.get("type"),
                        d.error.get("message"))
        self.announcer.after_commit(a.id, status, ended.job() if ended is not None else None)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _announce_started(self, a: Attempt) -> None:
        job = a.to_dict()

        def publish() -> None:
            self.events.publish({"event": "started", "job_id": a.id, "job": job},
                                a.queue, a.task, a.run_id)

        # As the store has it: after its start (or end) is committed, before its end is told.
        self.committer.after_commit(publish, [a.id])

    def _backoff_of(self, a: Attempt) -> Callable[[], float]:
        return lambda: self.backoff(a)

    def backoff(self, a: Attempt) -> float:
        spec = self._tasks().get(a.task)
        if spec is None:
            return outcome.backoff_delay(a.attempt)
        return outcome.backoff_delay(a.attempt, spec.backoff_base, spec.backoff_factor,
                                     spec.backoff_cap)

    # == a worker's death ===========================================================

    def on_worker_exit(self, worker: WorkerHandle) -> None:
        """Its running job's attempt ends with the cause named; the jobs it had not
        started wait again, uncharged (or end, when aborted)."""
        status = worker.exit_status or 0
        cause = describe_exit(status)
        held = self.book.held_by(worker.pid)
        if not held:
            return
        now = time.time()
        ran = None
        for a in held.values():
            started = a.state is State.RUNNING or a.id == worker.running_job
            if started and a.state is State.HELD:
                self.book.started_unwritten(a, now)  # the board saw it start
                self._count("started")
            if started:
                ran = a
            d = outcome.after_worker_death(cause, worker.killed_for, worker.kill_error, started,
                                           a.attempt, a.max_attempts, a.abort_requested, now,
                                           self._backoff_of(a))
            self.apply(a, d, now, a.started_at)
        self.dispatcher.released(worker, list(held.values()))
        if ran is not None and worker.killed_for != "drain":
            log.error("worker %d died while running job %d: %s", worker.pid, ran.id, cause)

    # == aborts =======================================================================

    def request_abort(self, a: Attempt, workers: Callable[[int], WorkerHandle | None],
                      call_later: Callable[..., Any]) -> None:
        """Ask the worker holding the job to abort it: a running job sees ctx.aborted
        (and its worker is replaced if it ignores that for ABORT_GRACE); a held one
        ends before it starts."""
        if not self.book.request_abort(a):
            return
        worker = workers(a.worker_pid)
        if worker is not None:
            worker.send_control({"t": "abort", "id": a.id})
            call_later(ABORT_GRACE, self._abort_overdue, worker, a)

    def _abort_overdue(self, worker: WorkerHandle, a: Attempt) -> None:
        """Only the job that was asked to abort, and only while it runs, costs its
        worker: a held one ends as it reaches its start."""
        if self.book.attempt(a.id) is not a or a.state is not State.RUNNING:
            return
        if worker.exit_status is None and worker.killed_for is None:
            log.warning("job %d ignored its abort for %.0f s: replacing worker %d",
                        a.id, ABORT_GRACE, worker.pid)
            worker.killed_for = "abort"
            worker.kill(signal.SIGKILL)


def exit_kind(worker: WorkerHandle) -> tuple[bool, bool, str]:
    """(clean, boot error, cause) of an exited worker."""
    from hostqueue.worker.main import EXIT_BOOT_ERROR

    status = worker.exit_status or 0
    clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    boot = os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR
    return clean, boot, describe_exit(status)
