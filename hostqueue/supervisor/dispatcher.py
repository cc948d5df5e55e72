"""Dispatch: which waiting job goes to which worker, when, and how it gets there.

Dispatch runs when something changed (a job became ready, a worker became idle
or is running out of work, a worker reported), never on a timer, except two
that exist only while they have something to wait for: the moment a
rate-limited lane may start again, and the moment a busy worker holding jobs
it has not started passes its expected time while another worker idles.

Prefetch. A worker is handed about ``max(PREFETCH_WINDOW, 2 x the recent commit
time)`` of work by its tasks' measured run times, at most ``workers.prefetch``
jobs: many fast jobs in one pipe message, a slow one alone. A job of a task
never measured counts as slow and is handed alone, and a worker holding one
is not topped up. Jobs of a lane under a limit (concurrency, rate) go only to
an idle worker, so that a held job never counts against a cap.

Fairness. No job waits behind another while a worker that could run it idles:
a worker whose jobs run past their expected time (``OVERDUE``) is topped up no
more, and when another worker idles with nothing ready, the jobs it holds but
has not started are taken back (the control channel's ``give_back``) and
handed out again. A worker runs the jobs it holds by priority, so a
higher-priority job never waits behind lower ones there.

Hand-over. A job reaches its worker only once its INSERT is committed (a job
submitted to an idle pool goes in the loop turn that commits it, before the
client's ack); handing it out writes nothing: it stays ``pending`` until its
task starts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

from hostqueue.core.outcome import given_back
from hostqueue.core.states import State, SupervisorState, WorkerState
from hostqueue.store.base import Store, StoreError
from hostqueue.supervisor.committer import GroupCommitter
from hostqueue.supervisor.jobs import Attempt, JobBook
from hostqueue.supervisor.pool import Pool, WorkerHandle
from hostqueue.supervisor.readyindex import Lane
from hostqueue.supervisor.shaping import Shaper
from hostqueue.supervisor.timers import EarliestTimer
from hostqueue.supervisor.background import spawn

log = logging.getLogger("hostqueue.supervisor")

# A worker is handed at most this much expected work at once: many fast jobs in
# one pipe message, but a slow job alone, so others stay free for idle workers
# (and for autoscale to see them wait).
PREFETCH_WINDOW = 0.005
# ... or, while commits take long (large submits), up to this much.
PREFETCH_WINDOW_MAX = 0.05
# A worker whose held jobs should have been done this long ago is overdue: its
# running job takes longer than its task usually does. It is topped up no
# more, and the jobs it has not started are taken back for an idle worker.
OVERDUE = 0.02
UNKNOWN = -1.0  # the expected run time of a task never measured
# A job expected to run longer than this (or never measured, or watched) has its
# worker tell its start at once; a faster one's start rides with its outcome,
# and the progress sampler sees one that runs long anyway (the board).
REPORT_START_AFTER = 0.002
# A worker handed jobs while it ran nothing must start one (or report) within this
# long; one that does not (stopped, hung before its job) is replaced, and the jobs
# it held go to other workers, uncharged: it never started them.
START_TIMEOUT = 3.0


@dataclass(slots=True)
class Plan:
    """What dispatch knows of one worker's queue."""

    busy_until: float = 0.0  # when the jobs it holds should be done (monotonic)
    expected: float = 0.0  # the measured run time of the jobs it holds, summed
    unknown: int = 0  # held jobs of tasks never measured: not topped up while any
    # Jobs picked for it whose rows are being read from the store: they count
    # toward prefetch; it stays busy and is not topped up until they arrive.
    fetching: int = 0
    taking_back: bool = False  # a give_back is on its way to it
    # When it was handed jobs while it held none (monotonic; 0: it has reported since).
    waiting_since: float = 0.0


class Dispatcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, book: JobBook, pool: Pool, shaper: Shaper,
                 committer: GroupCommitter, store: Store, paused: set[str],
                 state: Callable[[], SupervisorState], prefetch: Callable[[], int],
                 max_jobs: Callable[[], int | None], grow: Callable[[], None],
                 on_handed: Callable[[], None], watched: Callable[[int], bool],
                 on_ended: Callable[[int, str, float], None]) -> None:
        self.loop = loop
        self.book = book
        self.pool = pool
        self.shaper = shaper
        self.committer = committer
        self.store = store
        self.paused = paused  # the supervisor's set of paused queues ("*": all)
        self._state = state
        self._prefetch = prefetch
        self._max_jobs = max_jobs
        self._grow = grow  # autoscale: jobs wait and no worker is idle
        self._on_handed = on_handed  # the sampler starts while jobs are out
        self._watched = watched  # somebody watches the job's events
        self._on_ended = on_ended  # a job given back ended (aborted): counted and announced
        self.runtime: dict[str, float] = {}  # each task's recent run time (EWMA, s)
        self._plans: dict[int, Plan] = {}
        self._scheduled = False
        self._limit_wake = math.inf
        self._limit_timer = EarliestTimer(self.wake, time.monotonic)
        self._overdue_timer = EarliestTimer(self.wake, time.monotonic)
        self._start_timer = EarliestTimer(self._check_starts, time.monotonic)
        self._waiting = 0  # plans with waiting_since set: the start timer runs while any
        self._hungry: Callable[[], None] | None = None

    def on_hungry(self, callback: Callable[[], None]) -> None:
        """callback() after each dispatch: a store shared by several hosts claims
        released jobs then, if this host has room (cluster.py)."""
        self._hungry = callback
    # == when ======================================================================

    def wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def stop_timers(self) -> None:
        self._limit_timer.cancel()
        self._overdue_timer.cancel()
        self._start_timer.cancel()

    def plan(self, pid: int) -> Plan:
        plan = self._plans.get(pid)
        if plan is None:
            plan = self._plans[pid] = Plan()
        return plan

    def fetching(self, pid: int) -> bool:
        plan = self._plans.get(pid)
        return plan is not None and plan.fetching > 0

    def forget(self, pid: int) -> None:
        plan = self._plans.pop(pid, None)
        if plan is not None:
            self._started(plan)

    def _started(self, plan: Plan) -> None:
        """The plan's worker is no longer awaited to start a job; with none awaited the
        start timer stops (an idle supervisor wakes for nothing)."""
        if plan.waiting_since:
            plan.waiting_since = 0.0
            self._waiting -= 1
            if not self._waiting:
                self._start_timer.cancel()

    # == what ======================================================================

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._state() is not SupervisorState.RUNNING:
            return
        self._dispatch_ready()
        if self._hungry is not None:
            self._hungry()

    def _dispatch_ready(self) -> None:
        now_m = time.monotonic()
        if not self.book.ready_count:
            self._balance(now_m)
            return
        # A worker is handed about this much work ahead: enough to keep it busy
        # while its reports and the next hand-over cross the pipe.
        window = min(max(PREFETCH_WINDOW, 2 * self.committer.commit_latency), PREFETCH_WINDOW_MAX)
        prefetch = self._prefetch()
        book = self.book
        idle = self.pool.idle()
        # Busy workers running only measured, fast jobs, on time, are topped up too.
        refill = []
        for w in self.pool:
            if w.state is WorkerState.BUSY and w.connected:
                plan = self.plan(w.pid)
                if (not plan.fetching and not plan.unknown and not plan.taking_back
                        and now_m <= plan.busy_until < now_m + window
                        and book.holds(w.pid) < prefetch):
                    refill.append(w)
        if not idle and not refill:
            self._grow()
            return
        # The count is a hint for batch sizes; _next_job() is the truth.
        available = max(book.available(self.paused), 1)
        per_worker = max(1, min(prefetch, -(-available // (len(idle) + len(refill)))))
        now = time.time()
        self._limit_wake = math.inf
        max_jobs = self._max_jobs()
        runtime = self.runtime
        handed_any = False
        for worker in idle + refill:
            if not book.ready_count:
                break  # all taken: the other workers need not look (a lone job, usually)
            plan = self.plan(worker.pid)
            holds = book.holds(worker.pid) + plan.fetching
            budget = min(per_worker, prefetch - holds)
            if max_jobs is not None:  # recycle on time: no more than it may still run
                budget = min(budget, max_jobs - worker.jobs_done - holds)
            if budget <= 0:
                continue
            alone = holds == 0
            expected = plan.expected if holds else 0.0
            sent: list[Attempt] = []
            fetch: list[tuple[Lane, int, float, tuple[float, float, int]]] = []
            for _ in range(budget):
                picked = self._next_lane(now_m, alone)
                if picked is None:
                    break
                lane, order = picked
                job_id, a = book.hand(lane, worker.pid, now)
                run = runtime.get(lane[1], UNKNOWN)
                limited = self.shaper.limited(lane)
                if a is None:
                    fetch.append((lane, job_id, run, order))
                else:
                    a.expected, a.order = run, order
                    sent.append(a)
                if run == UNKNOWN:
                    plan.unknown += 1
                else:
                    plan.expected += run
                expected += window if run == UNKNOWN else run
                if run == UNKNOWN or limited or expected >= window:
                    break  # a slow, unmeasured or limited job goes alone
                alone = False
            if not sent and not fetch:
                break  # nothing may start now: the other workers need not look
            handed_any = True
            plan.busy_until = now_m + expected
            if not holds and not plan.waiting_since:
                plan.waiting_since = now_m
                self._waiting += 1
                self._start_timer.arm(now_m + START_TIMEOUT)
            worker.state = WorkerState.BUSY
            if fetch:
                plan.fetching += len(fetch)
                spawn(self._fetch_and_send(worker, fetch), "read jobs to dispatch")
            if sent:
                self._send(worker, sent)
        if self._limit_wake < math.inf:
            self._limit_timer.arm(self._limit_wake)  # a rate-limited lane may start then
        if handed_any:
            self._on_handed()
        if book.ready_count:
            self._grow()
        self._balance(now_m)

    def _next_lane(self, now_m: float, alone: bool) -> tuple[Lane, tuple[float, float, int]] | None:
        """The lane whose next job may start now, across lanes, under pauses and limits
        (a limited lane only for a worker that holds nothing: alone), with the job's
        order key: its worker runs the jobs it holds in that order."""
        paused = self.paused
        if "*" in paused:
            return None
        shaper = self.shaper
        book = self.book
        best_lane = None
        best_key: tuple[float, float, int] | None = None
        for lane in book.lanes():
            if lane[0] in paused:
                continue
            top = book.top(lane)
            if top is None:
                continue
            if shaper.limited(lane):
                if not alone:
                    continue
                free = shaper.free_at(lane, now_m)
                if free > now_m:
                    if free < self._limit_wake:
                        self._limit_wake = free
                    continue
            key = shaper.order_key(lane, top)
            if best_key is None or key < best_key:
                best_lane, best_key = lane, key
        if best_lane is None or best_key is None:
            return None
        shaper.started(best_lane, now_m)
        return best_lane, best_key

    # == fairness ==================================================================

    def _balance(self, now_m: float) -> None:
        """Workers idle with nothing ready for them: take back the jobs held, and not
        started, by workers that run past their expected time; arm a timer for the
        earliest that may do so later."""
        book = self.book
        # Nothing held beyond what runs (the usual case between jobs), or nobody idle.
        if book.handed <= book.running or not self._plans or not self.pool.any_idle():
            return
        earliest = math.inf
        for pid, plan in self._plans.items():
            if plan.taking_back or plan.fetching:
                continue
            worker = self.pool.get(pid)
            if worker is None or worker.state is not WorkerState.BUSY or not book.unstarted(pid):
                continue
            due = plan.busy_until + OVERDUE
            if now_m >= due:
                plan.taking_back = True
                worker.send_control({"t": "give_back"})
            elif due < earliest:
                earliest = due
        if earliest < math.inf:
            self._overdue_timer.arm(earliest)

    def _check_starts(self) -> None:
        """Workers handed jobs while they ran nothing, that since neither reported nor
        started one (the board shows none): stopped or hung. Each is replaced; what it
        held goes back, uncharged, to the other workers."""
        now_m = time.monotonic()
        earliest = math.inf
        for pid, plan in list(self._plans.items()):
            if not plan.waiting_since:
                continue
            worker = self.pool.get(pid)
            if worker is None or worker.exit_status is not None or not self.book.holds(pid):
                self._started(plan)
                continue
            if self.book.running_on(pid) is not None:
                self._started(plan)  # it started one (seen on the board)
                continue
            due = plan.waiting_since + START_TIMEOUT
            if now_m < due:
                earliest = min(earliest, due)
                continue
            self._started(plan)
            if worker.killed_for is None:
                log.warning(
                    "worker %d started none of the %d jobs it was handed %.1f s ago (stopped or"
                    " hung?): replacing it; they go to other workers, uncharged",
                    pid, self.book.holds(pid), now_m - due + START_TIMEOUT)
                worker.killed_for = "unresponsive"
                worker.kill_error = {
                    "type": "WorkerLost", "traceback": None,
                    "message": f"the worker started nothing and answered nothing for"
                               f" {START_TIMEOUT:g} s (stopped or hung?) and was replaced",
                }
                worker.kill(signal.SIGKILL)
        if earliest < math.inf:
            self._start_timer.arm(earliest)

    def released(self, worker: WorkerHandle, attempts: list[Attempt]) -> None:
        """These jobs left the worker (ended, returned): their limits are free and its
        queue shorter. Call once per report with every job it ended."""
        plan = self.plan(worker.pid)
        shaper_finished = self.shaper.finished
        for a in attempts:
            shaper_finished(a.lane)
            if a.expected == UNKNOWN:
                plan.unknown -= 1
            else:
                plan.expected -= a.expected
        if plan.expected < 1e-9:
            plan.expected = 0.0

    def reported(self, worker: WorkerHandle) -> None:
        """The worker sent a report: it is alive and on its way; its queue's expected
        end moves from now."""
        plan = self._plans.get(worker.pid)
        if plan is not None:
            plan.taking_back = False
            self._started(plan)
            plan.busy_until = time.monotonic() + plan.expected
        self.settle(worker)

    def settle(self, worker: WorkerHandle) -> bool:
        """A busy worker that holds nothing any more is idle. True when it became so."""
        if worker.state is WorkerState.BUSY and not self.book.holds(worker.pid) \
                and not self.fetching(worker.pid):
            worker.state = WorkerState.IDLE
            plan = self._plans.get(worker.pid)
            if plan is not None:
                plan.expected, plan.unknown = 0.0, 0
            self.wake()
            return True
        self.wake()
        return False

    def learn(self, task: str, took: float) -> None:
        """A measured run time of the task (its attempt's start to end in the worker)."""
        avg = self.runtime.get(task)
        self.runtime[task] = took if avg is None else avg * 0.8 + took * 0.2

    # == how =======================================================================

    def _send(self, worker: WorkerHandle, attempts: list[Attempt]) -> None:
        """Hand the jobs to their worker once their INSERTs are committed."""
        if len(attempts) == 1:
            newest = attempts[0].id
        else:  # the newest whose INSERT may still be on its way (claimed ones are stored)
            inserted = self.committer.inserted
            newest = max((a.id for a in attempts if not inserted(a.id)), default=attempts[0].id)
        if self.committer.inserted(newest):
            self._hand_over(worker, attempts)
        else:
            if len(attempts) == 1:
                self.committer.hold_new(newest, worker.pid)
            # The worker first: it runs the jobs while the commit's other callbacks
            # (the submits' replies) run here.
            self.committer.after_commit(lambda: self._hand_over(worker, attempts),
                                        [newest], first=True)

    def _hand_over(self, worker: WorkerHandle, attempts: list[Attempt]) -> None:
        live = [a for a in attempts if self.book.attempt(a.id) is a]
        if not live:
            return
        if worker.exit_status is not None or worker.state is WorkerState.RETIRING:
            # Retired (drain, scale-down, reload) or gone before they could be sent:
            # they never start there.
            self.give_back(worker, live)
            return
        watched = self._watched
        worker.send({"t": "run", "jobs": [
            a.message(a.expected == UNKNOWN or a.expected > REPORT_START_AFTER or watched(a.id))
            for a in live]})

    def released_unsent(self, a: Attempt) -> None:
        """A job handed but not sent whose submit failed: it never existed."""
        worker = self.pool.get(a.worker_pid)
        if worker is None:
            self.shaper.finished(a.lane)
            return
        self.released(worker, [a])
        self.settle(worker)

    def give_back(self, worker: WorkerHandle, attempts: list[Attempt]) -> None:
        """Jobs that never reached their worker: waiting again, uncharged (an aborted
        one ends)."""
        now = time.time()
        for a in attempts:
            d = given_back(a.abort_requested)
            self.book.end(a, d, now, None)
            if d.state is not State.PENDING:
                self._on_ended(a.id, d.state.value, now)
        self.released(worker, attempts)
        self.settle(worker)

    async def _fetch_and_send(self, worker: WorkerHandle,
                              fetch: list[tuple[Lane, int, float, tuple[float, float, int]]]) -> None:
        """Jobs without a cached payload (loaded at start, or beyond the cache): read, then send."""
        ids = [job_id for _, job_id, _, _ in fetch]
        rows = None
        try:
            if not self.committer.inserted(max(ids)):
                await self.committer.barrier()  # their rows are on their way to the store
            rows = await self.store.jobs_for_dispatch(ids)
        except StoreError as exc:
            log.error("cannot read jobs to dispatch: %s", exc)
        except Exception:  # noqa: BLE001 - the jobs must go back, whatever went wrong
            log.exception("error reading jobs to dispatch; they go back to the queue")
        plan = self.plan(worker.pid)
        plan.fetching -= len(ids)
        keep = rows is not None and worker.state is WorkerState.BUSY and worker.exit_status is None
        now = time.time()
        sendable = []
        for lane, job_id, run, order in fetch:
            row = rows.get(job_id) if rows is not None else None
            a = self.book.loaded(job_id, row, keep, now)
            if a is None:
                self.shaper.finished(lane)
                if run == UNKNOWN:
                    plan.unknown -= 1
                else:
                    plan.expected = max(0.0, plan.expected - run)
                continue
            a.expected, a.order = run, order
            sendable.append(a)
        if sendable:
            self._send(worker, sendable)
        self.settle(worker)

    def describe(self, pid: int) -> dict[str, Any]:
        plan = self._plans.get(pid)
        if plan is None:
            return {}
        return {"expected_s": round(max(0.0, plan.busy_until - time.monotonic()), 4),
                "taking_back": plan.taking_back}
