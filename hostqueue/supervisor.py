"""The supervisor: owns the store, the worker pool, the progress board and the control socket.

Data flow of one job::

    client --submit--> control --> Actions.submit_jobs: INSERT into the write batch,
                                     and the job enters the ready index at once
                                   Dispatch._dispatch (an event, never a poll): a
                                     worker with room? its claim (UPDATE running)
                                     joins the batch, after the INSERT
                                   committer: one transaction for the turn's writes
    client <--ack------------------- after COMMIT; the claimed jobs --pipe--> worker
                                     board (shared memory) <-- ctx.progress() in the worker
                                   Outcomes._on_outcomes <--pipe-- {"t": "done", ...}
                                     committer: UPDATE completed | retry | failed
    client <--events/wait----------- after COMMIT, to waiters and watchers

This module holds the loop, signals, the pool and timers; dispatch.py and
outcomes.py hold the two halves of a job's way through it, as mixins of
``Supervisor``. Everything happens on one uvloop event loop. Signal handlers
only record the signal; ``_handle_signals`` acts on it in the loop. Timers
exist only for work that is due (delayed jobs, deadlines, retries, grace
periods) or while jobs run (the progress sampler).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import math
import os
import signal
import time
from typing import Any, Callable

from . import __version__, registry, sdnotify, settings
from .board import Board
from .committer import GroupCommitter
from .dispatch import Dispatch
from .errors import ProtocolError
from .events import EventHub
from .pool import RunningJob, Spawner, WorkerHandle, describe_exit
from .actions import ABORT_GRACE, Actions
from .announce import Announcer
from .autoscale import PoolSizer
from .logs import setup_logging
from .metrics import Histogram, MetricsServer, render
from .outcomes import Outcomes, error_json, lost_error
from .retention import Retention
from .runcount import RunningCount
from .sampler import ProgressSampler
from .reaper import ZombieReaper, block_sigchld
from .schedules import Scheduler
from .shaping import Shaper, ShapingConfig
from .readyindex import Lane, Payload, ReadyIndex, TimedHeap
from .settings import SupervisorConfig
from .states import JobStatus, SupervisorState, WorkerState
from .store import Store, StoreError, StoreLock, StoreLocked
from .timers import EarliestTimer
from .worker import EXIT_BOOT_ERROR

log = logging.getLogger("hostqueue.supervisor")

# `stats` reads the due time of at most this many scheduled jobs by id; with
# more, it reads every pending row's (as slow as the pending set is large).
SCHEDULED_BY_ID = 100_000

SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP,
)


class Supervisor(Dispatch, Outcomes):
    def __init__(self, config: SupervisorConfig, embedded: bool = False) -> None:
        self.config = config
        # Embedded in someone else's program (hostqueue.Supervisor): no signal
        # handlers, no process title, no sd_notify, no PID-1 duties.
        self.embedded = embedded
        self.state = SupervisorState.STARTING
        self.started = time.time()
        self.store = Store(config.store, config.durability)
        self.lock = StoreLock(config.store)
        self.tasks: dict[str, registry.TaskSpec] = {}
        self.ready = ReadyIndex()
        self.delayed = TimedHeap()
        self.deadlines = TimedHeap()
        self.payloads: dict[int, Payload] = {}
        self.keys: dict[str, int] = {}
        self.running: dict[int, RunningJob] = {}
        self.claiming: set[int] = set()
        self.claim_aborts: set[int] = set()
        self.recent_finals: collections.OrderedDict[int, str] = collections.OrderedDict()
        # (RunningJob, status, result, error, finished_at) of jobs just ended: see outcomes.py
        self.recent_jobs: collections.OrderedDict[int, tuple[Any, ...]] = collections.OrderedDict()
        self.workers: dict[int, WorkerHandle] = {}
        self.target = 0
        self.paused: set[str] = set()
        self.events = EventHub()
        self.waiters: dict[int, list[Callable[[dict[str, Any]], None]]] = {}
        self.next_id = 1
        self.signal_queue: collections.deque[int] = collections.deque()
        self.counters = collections.Counter[str]()
        self.spawn_failures = 0
        self.spawn_blocked_until = 0.0
        self.pool_error: str | None = None
        self._dispatch_scheduled = False
        # One loop timer each for the earliest delayed job, deadline and rate-limit release.
        self._delay_timer = EarliestTimer(self._delay_due)
        self._deadline_timer = EarliestTimer(self._deadline_due)
        self._limit_timer = EarliestTimer(self._wake_dispatch, time.monotonic)
        self._spawn_timer: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._limit_wake = math.inf
        self._title = ""
        self._title_pending: asyncio.TimerHandle | None = None
        self._trimming = False
        self._title_prefix = f"hostqueue supervisor {os.path.abspath(config.store)}"
        self.loop: asyncio.AbstractEventLoop
        self.committer: GroupCommitter
        self.board: Board
        self.spawner: Spawner
        self.control: Any = None
        self.stopped: asyncio.Future[int]
        self.notifier = sdnotify.Notifier(None) if embedded else sdnotify.Notifier.from_environment()
        self.actions = Actions(self)
        self.ready_event = asyncio.Event()  # set once the socket answers and workers start
        self.shaper = Shaper(ShapingConfig.parse(config.queues, config.limits))
        self.retention = config.retention()
        self.autoscale = config.workers_min is not None
        self.scheduler = Scheduler(self)
        self.reaper: ZombieReaper | None = None
        self.runtime = Histogram()
        self.task_runtime: dict[str, float] = {}  # moving average of each task's run time
        self.metrics_server: MetricsServer | None = None
        self.retention_sweeper = Retention(self)
        self.sampler = ProgressSampler(self)
        self.announcer = Announcer(self)
        self.sizer = PoolSizer(self)

    # == start and stop =========================================================

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stopped = self.loop.create_future()

        try:
            self.lock.acquire()
        except StoreLocked as exc:
            log.error("%s", exc)
            return 1
        try:
            return await self._run_locked()
        finally:
            self.lock.release()

    async def _run_locked(self) -> int:
        from .control import ControlServer

        try:
            self.tasks = registry.load_task_modules(self.config.tasks)
        except registry.TaskModuleError as exc:
            log.error("%s", exc)
            return 2
        try:
            await self.store.open()
        except StoreError as exc:
            log.error("%s", exc)
            return 1
        self.running_count = RunningCount(self.loop)
        self.committer = GroupCommitter(
            self.store, self.loop, lambda: len(self.running) + self.ready.count,
            on_commit=self.running_count.committed)
        self.running_count.committer = self.committer
        try:
            await self._recover()
        except StoreError as exc:
            log.error("cannot start on this store: %s", exc)
            await self.store.close()
            return 1
        self.board = Board()
        self.spawner = Spawner(
            self.loop, self.board, self._on_worker_message, self._on_worker_exit,
            self.config.log_level, self.config.log_format,
        )
        self.control = ControlServer(self, self.config.socket_path, self.config.max_line)
        try:
            await self.control.start(
                self.config.socket_group, [] if self.embedded else sdnotify.listen_fds(), self.config.socket_mode
            )
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.config.socket_path, exc)
            await self.store.close()
            self.board.close()
            return 1
        for sig in () if self.embedded else SIGNALS:
            self.loop.add_signal_handler(sig, self._record_signal, sig)
        if self.config.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics_text, self.config.metrics_host, self.config.metrics_port)
            try:
                await self.metrics_server.start()
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d: %s", self.config.metrics_host, self.config.metrics_port, exc)
                self.metrics_server = None
        if os.getpid() == 1 and not self.embedded:
            self.reaper = ZombieReaper(self.loop, lambda pid: pid in self.workers)
            self.reaper.start()
        self.state = SupervisorState.RUNNING
        self._manage_workers()
        self._arm_delay_timer()
        self._arm_deadline_timer()
        self.loop.create_task(self.retention_sweeper.rearm())
        await self.scheduler.start(Scheduler.configured(self.config.schedules, self.tasks), time.time())
        self._wake_dispatch()
        self._update_title()
        self.ready_event.set()
        log.info(
            "hostqueue %s supervisor %d serving %s on %s with %d workers (%d tasks, %d jobs ready)",
            __version__, os.getpid(), self.config.store, self.config.socket_path, self.target,
            len(self.tasks), len(self.ready),
        )
        self.notifier.notify(f"READY=1\nSTATUS=serving with {self.target} workers\nMAINPID={os.getpid()}")
        interval = sdnotify.watchdog_interval()
        if interval is not None and self.notifier.enabled:
            self._watchdog(interval)
        try:
            code = await self.stopped
        finally:
            for sig in () if self.embedded else SIGNALS:
                self.loop.remove_signal_handler(sig)
            await self.control.stop()
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            await self.committer.wait_idle()
            await self.store.close()
            self.board.close()
        log.info("supervisor %d stopped", os.getpid())
        return code

    async def _recover(self) -> None:
        """Before any new work: jobs left running by a dead supervisor go back, and the
        ready index, timers and keys are rebuilt from the store."""
        now = time.time()
        requeued, failed = await self.store.recover_interrupted(now)
        if requeued or failed:
            log.warning(
                "recovered %d jobs interrupted by the last stop (%d requeued, %d failed: no attempt left)",
                requeued + failed, requeued, failed,
            )
        self.next_id = await self.store.last_job_id() + 1
        settings = await self.store.load_settings()
        if self.config.workers is not None:
            self.target = self.config.workers
        else:
            self.target = int(settings.get("workers", os.cpu_count() or 2))
        if self.autoscale:
            assert self.config.workers_min is not None and self.config.workers_max is not None
            self.target = min(max(self.target, self.config.workers_min), self.config.workers_max)
        self.paused = set(settings.get("paused", []))
        pending = await self.store.load_pending(now)
        self.ready.bulk_load(pending.ready)
        for lane, priority, job_id in pending.unordered:
            self.ready.push(lane, priority, job_id)
        self.delayed.bulk_load(pending.delayed)
        self.deadlines.bulk_load(pending.deadlines)
        self.keys = pending.keys
        del pending

    async def count_by_state(self, run_id: str | None = None) -> dict[str, Any]:
        """The store's counts by state and queue, once our writes so far are committed."""
        await self.committer.barrier()
        now = time.time()
        timed = self.delayed.members
        later = ([job_id for job_id, when in timed.items() if when > now]
                 if run_id is None and len(timed) <= SCHEDULED_BY_ID else None)
        running = self.running_count.in_snapshot if run_id is None else None
        return await self.store.count_by_state(now, run_id, later, running)

    async def metrics_text(self) -> str:
        stats = await self.count_by_state()
        return render(self, stats, await self.store.file_size())

    def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: a stuck loop stops pinging and systemd acts.
        (A timer that exists only because the operator asked for the watchdog.)"""
        self.notifier.notify("WATCHDOG=1")
        if not self.stopped.done():
            self.loop.call_later(interval, self._watchdog, interval)

    def _record_signal(self, signum: int) -> None:
        # Only record; the loop acts on it (no work in handler context).
        self.signal_queue.append(signum)
        if len(self.signal_queue) == 1:
            self.loop.call_soon(self._handle_signals)

    def _handle_signals(self) -> None:
        while self.signal_queue:
            signum = self.signal_queue.popleft()
            name = signal.Signals(signum).name
            handler = getattr(self, "handle_" + name[3:].lower(), None)
            log.info("received %s", name)
            if handler is not None:
                handler()

    def handle_term(self) -> None:
        """Graceful drain: no new job starts; running jobs get the grace period."""
        self.begin_drain()

    def handle_int(self) -> None:
        """Like TERM."""
        self.begin_drain()

    def handle_quit(self) -> None:
        """Fast stop: stop workers now, put their jobs back to pending, exit 0."""
        self.begin_drain(grace=0.0)

    def handle_ttin(self) -> None:
        """One worker more."""
        self.scale(min(self.target + 1, 256))

    def handle_ttou(self) -> None:
        """One worker fewer (a retiring worker finishes its job first)."""
        self.scale(max(self.target - 1, 0))

    def handle_hup(self) -> None:
        """Reload: re-import task modules, replace every worker with a fresh one."""
        try:
            self.reload()
        except ProtocolError as exc:
            log.error("reload refused: %s", exc.message)

    def begin_drain(self, grace: float | None = None) -> None:
        grace = self.config.grace if grace is None else grace
        if self.state is SupervisorState.DRAINING:
            if grace == 0.0:
                self._grace_expired()
            return
        if self.state is not SupervisorState.RUNNING:
            return
        self.state = SupervisorState.DRAINING
        extend = int((grace + 10) * 1e6)
        self.notifier.notify(f"STOPPING=1\nSTATUS=draining: {len(self.running)} jobs running\nEXTEND_TIMEOUT_USEC={extend}")
        busy = sum(1 for w in self.workers.values() if w.jobs)
        log.info("draining: %d jobs running on %d workers, grace %.1f s", len(self.running), busy, grace)
        self.scheduler.stop()
        for timer in (self._delay_timer, self._deadline_timer, self._limit_timer,
                      self.retention_sweeper.timer, self.sizer.idle_timer):
            timer.cancel()
        if self._spawn_timer is not None:
            self._spawn_timer.cancel()
        for worker in list(self.workers.values()):
            self._retire(worker, drop_queued=True)
        if grace <= 0:
            self._grace_expired()
        else:
            self._grace_timer = self.loop.call_later(grace, self._grace_expired)
        self._check_drained()
        self._update_title()

    def _grace_expired(self) -> None:
        for worker in self.workers.values():
            if worker.exit_status is None:
                if worker.jobs:
                    log.warning(
                        "grace period over: stopping worker %d; its %d jobs go back to pending",
                        worker.pid, len(worker.jobs),
                    )
                worker.killed_for = "drain"
                worker.kill(signal.SIGKILL)
        self._check_drained()

    def _check_drained(self) -> None:
        if self.state is SupervisorState.DRAINING and not self.workers and not self.stopped.done():
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            self.sampler.stop()
            self.state = SupervisorState.STOPPED
            self.stopped.set_result(0)

    # == the pool ================================================================

    def scale(self, n: int, manual: bool = True) -> int:
        """Set the pool's target size; a manual size turns autoscale off until reload."""
        previous = self.target
        if manual and self.autoscale:
            self.autoscale = False
            log.info("autoscale off until reload: the pool size was set by hand")
        self.target = n
        self.committer.add("save_setting", Store.setting_params("workers", n))
        if n != previous:
            log.info("scaling from %d to %d workers", previous, n)
        self._manage_workers()
        return previous

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration and task modules, then replace every worker."""
        try:
            config = settings.reread(self.config)
        except settings.SettingsError as exc:
            raise ProtocolError("bad_request", f"reload refused, the running configuration stays: {exc}") from None
        for name in ("store", "socket", "durability", "max_line"):
            if getattr(config, name) != getattr(self.config, name):
                log.warning("reload: '%s' changed; it takes effect at the next start", name)
                setattr(config, name, getattr(self.config, name))
        try:
            tasks = registry.load_task_modules(config.tasks)
            schedules = Scheduler.configured(config.schedules, tasks)
        except registry.TaskModuleError as exc:
            raise ProtocolError("bad_request", f"reload refused, the running tasks stay: {exc}") from None
        except ValueError as exc:
            raise ProtocolError("bad_request", f"reload refused, the running configuration stays: {exc}") from None
        self.notifier.notify("RELOADING=1")
        self.config = config
        self.retention = config.retention()
        self.tasks = tasks
        self.shaper.apply(ShapingConfig.parse(config.queues, config.limits))
        self.shaper.recount((rj.queue, rj.task) for rj in self.running.values())
        self.autoscale = config.workers_min is not None
        if self.autoscale:
            assert config.workers_min is not None and config.workers_max is not None
            self.target = min(max(self.target, config.workers_min), config.workers_max)
        # The pool keeps its size (scaled at run time, perhaps) unless the file names one.
        file_workers = settings.read_config_file(config.config_path).get("workers") if config.config_path else None
        if file_workers is not None and file_workers != self.target:
            self.target = file_workers
            self.committer.add("save_setting", Store.setting_params("workers", self.target))
        old = [w for w in self.workers.values() if w.state is not WorkerState.RETIRING]
        for worker in old:
            self._retire(worker, drop_queued=True)
        self.spawn_failures = 0
        self.spawn_blocked_until = 0.0
        self.pool_error = None
        self._manage_workers()
        self.retention_sweeper.cancel()
        self.loop.create_task(self.retention_sweeper.rearm())
        self.loop.create_task(self.scheduler.start(schedules, time.time()))
        log.info("reloaded: %d tasks, replacing %d workers", len(tasks), len(old))
        self.notifier.notify("READY=1")
        return {"workers": self.target, "tasks": sorted(tasks)}

    def _live_workers(self) -> list[WorkerHandle]:
        return [
            w for w in self.workers.values()
            if w.state in (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)
        ]

    def _manage_workers(self) -> None:
        """Converge the pool to the target size."""
        if self.state is not SupervisorState.RUNNING:
            return
        live = self._live_workers()
        excess = len(live) - self.target
        if excess > 0:
            order = {WorkerState.IDLE: 0, WorkerState.STARTING: 1, WorkerState.BUSY: 2}
            live.sort(key=lambda w: (order[w.state], len(w.jobs)))
            for worker in live[:excess]:
                self._retire(worker, drop_queued=True)
        elif excess < 0:
            now = time.monotonic()
            if now < self.spawn_blocked_until:
                if self._spawn_timer is None:
                    self._spawn_timer = self.loop.call_later(
                        self.spawn_blocked_until - now, self._spawn_timer_fired
                    )
                return
            for _ in range(-excess):
                try:
                    worker = self.spawner.spawn_worker(tuple(self.config.tasks))
                except OSError as exc:
                    log.error("cannot start a worker: %s", exc)
                    self._note_spawn_failure(str(exc))
                    break
                self.workers[worker.pid] = worker
        self._update_title()

    def _spawn_timer_fired(self) -> None:
        self._spawn_timer = None
        self._manage_workers()

    def _note_spawn_failure(self, reason: str) -> None:
        self.spawn_failures += 1
        delay = min(30.0, 0.25 * 2 ** (self.spawn_failures - 1))
        self.spawn_blocked_until = time.monotonic() + delay
        self.pool_error = f"{reason}; next start in {delay:.1f} s"

    def _retire(self, worker: WorkerHandle, drop_queued: bool) -> None:
        if worker.state in (WorkerState.RETIRING, WorkerState.EXITED):
            return
        worker.state = WorkerState.RETIRING
        if worker.transport is None:
            # Not connected yet: nothing it holds; stop it with a polite signal.
            worker.kill(signal.SIGTERM)
        else:
            worker.ask_to_stop(drop_queued)

    def _on_worker_message(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "done":
            self._on_outcomes(worker, message)
        elif kind == "ready":
            if worker.state is WorkerState.STARTING:
                worker.state = WorkerState.IDLE
                self.sizer.became_idle(worker)
                self.spawn_failures = 0
                self.pool_error = None
                self._wake_dispatch()
                self._update_title()
            elif worker.state is WorkerState.RETIRING:
                worker.ask_to_stop(drop_queued=True)

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        self.workers.pop(worker.pid, None)
        status = worker.exit_status or 0
        cause = describe_exit(status)
        killed_for = worker.killed_for
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if worker.jobs:
            now = time.time()
            for rj in list(worker.jobs.values()):
                self.running.pop(rj.id, None)
                self._job_left_worker(rj)
                started = rj.id == worker.running_job
                if killed_for == "drain" or not started:
                    self._requeue_uncharged(rj)
                elif killed_for == "abort" or rj.abort_requested:
                    self._finish(rj, JobStatus.CANCELLED, None, lost_error(f"aborted; {cause}"), now)
                elif killed_for == "timeout":
                    self._fail_attempt(rj, worker.kill_error or lost_error(cause), now)
                else:
                    self._fail_attempt(rj, lost_error(cause), now)
            if killed_for != "drain":
                log.error("worker %d died while running job %d: %s", worker.pid, worker.running_job, cause)
            worker.jobs.clear()
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR:
            log.error("worker %d could not import the task modules; see its log above", worker.pid)
            self._note_spawn_failure("workers cannot import the task modules")
        elif not clean and killed_for is None:
            log.warning("worker %d exited: %s", worker.pid, cause)
            if worker.state_at_exit is WorkerState.STARTING:
                self._note_spawn_failure(f"a worker died at start: {cause}")
        self._update_title()
        if self.state is SupervisorState.DRAINING:
            self._check_drained()
        else:
            self._manage_workers()
            self._wake_dispatch()

    # == timers ===================================================================

    def _arm_delay_timer(self) -> None:
        due = self.delayed.next_due()
        if due is not None and self.state is SupervisorState.RUNNING:
            self._delay_timer.arm(due)

    def _delay_due(self) -> None:
        due = self.delayed.pop_due(time.time())
        if due:
            missing = [i for i in due if i not in self.payloads]
            for job_id in due:
                p = self.payloads.get(job_id)
                if p is not None:
                    self.ready.push((p.queue, p.task), p.priority, job_id)
            if missing:
                self.loop.create_task(self._promote_unknown(missing))
            self._wake_dispatch()
        self._arm_delay_timer()

    async def _promote_unknown(self, ids: list[int]) -> None:
        """Delayed jobs loaded at start carry no payload: read queue and priority once."""
        jobs = await self.store.get_jobs(ids)
        for job_id in ids:
            job = jobs.get(job_id)
            if (
                job is None or job["status"] != JobStatus.PENDING.value
                or job_id in self.running or job_id in self.recent_finals
            ):
                continue
            self.ready.push((job["queue"], job["task"]), job["priority"], job_id)
        self._wake_dispatch()

    def _arm_deadline_timer(self) -> None:
        due = self.deadlines.next_due()
        if due is not None and self.state is SupervisorState.RUNNING:
            self._deadline_timer.arm(due)

    def _deadline_due(self) -> None:
        now = time.time()
        for job_id in self.deadlines.pop_due(now):
            if job_id in self.claiming or job_id in self.running:
                continue  # it is starting: the deadline was met
            self._cancel_pending(job_id, JobStatus.EXPIRED, now,
                                 {"type": "Expired", "message": "deadline passed before the job could start", "traceback": None})
        self._arm_deadline_timer()

    def _cancel_pending(
        self, job_id: int, status: JobStatus, now: float, error: dict[str, Any] | None,
        lane: Lane | None = None,
    ) -> None:
        """A pending job ends without running (abort, deadline)."""
        payload = self.payloads.get(job_id)
        if lane is None and payload is not None:
            lane = (payload.queue, payload.task)
        # It is either delayed or ready (the caller checked it is not running).
        if not self.delayed.discard(job_id):
            self.ready.discard(job_id, lane)
        self.deadlines.discard(job_id)
        key = payload.key if payload else next((k for k, v in self.keys.items() if v == job_id), None)
        self.committer.add("cancel_pending", (status.value, now, error_json(error), job_id))
        self._forget(job_id, key, status.value, now)
        self.counters[status.value] += 1
        self.announcer.after_commit(job_id, status.value)

    def _withdraw(self, job_id: int, lane: Lane) -> None:
        """A job whose submit failed to commit: it never existed. It may be waiting,
        or claimed with its hand-over waiting for a commit (which will skip it)."""
        self.payloads.pop(job_id, None)
        self.deadlines.discard(job_id)
        self.running_count.withdrawn(job_id)
        if job_id in self.claiming:
            return  # its claim is being read from the store: it finds no row, and drops it
        rj = self.running.pop(job_id, None)
        if rj is None:
            if not self.delayed.discard(job_id):
                self.ready.discard(job_id, lane)
            return
        worker = self.workers.get(rj.worker_pid)
        if worker is not None and worker.jobs.pop(job_id, None) is not None:
            self._job_left_worker(rj)
            if not worker.jobs and not worker.fetching and worker.state is WorkerState.BUSY:
                worker.state = WorkerState.IDLE
                self.sizer.became_idle(worker)

    def trim_memory_soon(self) -> None:
        """Return freed heap to the system once large submits have gone through: a
        million submitted jobs otherwise leave ~25 MB of free but fragmented heap."""
        if not self._trimming:
            self._trimming = True
            self.loop.create_task(self._trim_memory())

    async def _trim_memory(self) -> None:
        try:
            await asyncio.sleep(TRIM_DELAY)  # the replies of a burst of submits go out first
            await self.committer.wait_idle()
            malloc_trim()
        finally:
            self._trimming = False

    def _update_title(self) -> None:
        """The title (and systemd's STATUS) follow within TITLE_DELAY: a burst of fast
        jobs changes "busy" twice per job, and one update covers them all."""
        if self._title_pending is None and not self.embedded:
            self._title_pending = self.loop.call_later(TITLE_DELAY, self._apply_title)

    def _apply_title(self) -> None:
        self._title_pending = None
        busy = sum(1 for w in self.workers.values() if w.jobs)
        state = "" if self.state is SupervisorState.RUNNING else f", {self.state.value}"
        title = f"{self._title_prefix} [{len(self.workers)} workers, {busy} busy{state}]"
        if title != self._title:
            self._title = title
            set_title(title)
            if self.notifier.enabled:
                self.notifier.notify(
                    f"STATUS={len(self.workers)} workers, {busy} busy, {self.ready.count} jobs ready{state}"
                )

    def _abort_overdue(self, worker: WorkerHandle, job_id: int) -> None:
        if job_id in worker.jobs and worker.exit_status is None:
            log.warning("job %d ignored its abort for %.0f s: replacing worker %d", job_id, ABORT_GRACE, worker.pid)
            worker.killed_for = "abort"
            worker.kill(signal.SIGKILL)


TRIM_DELAY = 0.2
TITLE_DELAY = 0.1
_LIBC = ctypes.CDLL(None)


def malloc_trim() -> None:
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass


def set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:  # pragma: no cover
        pass


def raise_fd_limit(wanted: int = 65536) -> None:
    """Thousands of clients, plus two descriptors per worker, need more than the usual 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)


def run_supervisor(config: SupervisorConfig) -> int:
    """Run a supervisor until it stops; return the process exit code."""
    setup_logging(config.log_level, config.log_format)
    raise_fd_limit()
    import uvloop

    if os.getpid() == 1:
        block_sigchld()  # before any thread starts: see reaper.py
    supervisor = Supervisor(config)
    set_title(f"hostqueue supervisor {os.path.abspath(config.store)} [starting]")
    return int(uvloop.run(supervisor.run()))
