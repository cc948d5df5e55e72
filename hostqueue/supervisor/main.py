"""The supervisor: its loop, lifecycle and signals, and the parts it wires together.

Data flow of one job::

    client --submit--> control --> Actions.submit_jobs: INSERT into the write batch,
                                     and the job waits in the job book's ready index
                                   Dispatcher (an event, never a poll): a worker with
                                     room gets it (pending -> held, nothing written)
                                   committer: one transaction for the turn's writes
    client <--ack------------------- after COMMIT; the held jobs --pipe--> worker
                                   worker: {"s": "started"} --> JobBook.start (running)
                                     board (shared memory) <-- ctx.progress()
                                   Outcomes <--pipe-- {"t": "done", "o": [...]}
                                     JobBook.end: UPDATE completed | retry | failed
    client <--events/wait----------- after COMMIT, from the announcer

The parts, each owning its state (docs/architecture.md has the table): the
store (store/), the group committer, the job book (jobs.py: every job's state
and every transition), the pool (pool.py: worker processes), the dispatcher
(dispatcher.py: who gets which job), outcomes (outcomes.py: reports and deaths
of workers), the announcer, the progress sampler, retention, schedules and the
pool sizer. This module creates them, starts and stops them, turns signals
into actions, and keeps the timers for delayed jobs and deadlines.

Everything happens on one uvloop event loop. Signal handlers only record the
signal; ``_handle_signals`` acts on it in the loop. Timers exist only for work
that is due (delayed jobs, deadlines, retries, grace periods) or while jobs are
out (the progress sampler).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import signal
import sys
import time
from typing import Any

from hostqueue import __version__
from hostqueue.core import outcome, registry, settings
from hostqueue.core.board import Board
from hostqueue.core.errors import ProtocolError
from hostqueue.core.logs import setup_logging
from hostqueue.core.settings import SupervisorConfig
from hostqueue.core.states import Event, State, SupervisorState, WorkerState
from hostqueue.store import StoreError, StoreLocked, display_name, open_store, store_lock
from hostqueue.store.base import Interrupted, SharedStore
from hostqueue.supervisor import sdnotify
from hostqueue.supervisor.actions import Actions
from hostqueue.supervisor.announce import Announcer
from hostqueue.supervisor.autoscale import PoolSizer
from hostqueue.supervisor.background import spawn
from hostqueue.supervisor.cluster import Cluster
from hostqueue.supervisor.committer import GroupCommitter
from hostqueue.supervisor.dispatcher import Dispatcher
from hostqueue.supervisor.events import EventHub
from hostqueue.supervisor.jobs import JobBook
from hostqueue.supervisor.metrics import Histogram, MetricsServer, render
from hostqueue.supervisor.outcomes import Outcomes, exit_kind
from hostqueue.supervisor.pool import Pool, Spawner, WorkerHandle
from hostqueue.supervisor.reaper import ZombieReaper, block_sigchld
from hostqueue.supervisor.retention import Retention
from hostqueue.supervisor.runcount import RunningCount
from hostqueue.supervisor.sampler import ProgressSampler
from hostqueue.supervisor.schedules import Scheduler
from hostqueue.supervisor.shaping import Shaper, ShapingConfig
from hostqueue.supervisor.timers import EarliestTimer

log = logging.getLogger("hostqueue.supervisor")

# `stats` reads the due time of at most this many scheduled jobs by id; with
# more, it reads every pending row's (as slow as the pending set is large).
SCHEDULED_BY_ID = 100_000

SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP,
)


class Supervisor:
    def __init__(self, config: SupervisorConfig, embedded: bool = False) -> None:
        self.config = config
        # Embedded in someone else's program (hostqueue.Supervisor): no signal
        # handlers, no process title, no sd_notify, no PID-1 duties.
        self.embedded = embedded
        self.state = SupervisorState.STARTING
        self.started = time.time()
        self.store = open_store(config.store, config.durability, config.socket_group,
                                config.store_check != "off", config.pg_schema)
        self.lock = store_lock(config.store)
        self.tasks: dict[str, registry.TaskSpec] = {}
        self.paused: set[str] = set()
        self.events = EventHub()
        self.next_id = 1
        self.signal_queue: collections.deque[int] = collections.deque()
        self.counters: dict[str, int] = collections.Counter()
        self.autoscale = config.workers_min is not None
        self.shaper = Shaper(ShapingConfig.parse(config.queues, config.limits))
        self.runtime = Histogram()
        self.notifier = sdnotify.Notifier(None) if embedded else sdnotify.Notifier.from_environment()
        self.ready_event = asyncio.Event()  # set once the socket answers and workers start
        self.reaper: ZombieReaper | None = None
        self.metrics_server: MetricsServer | None = None
        self.control: Any = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._drain_deadline = 0.0
        self._title = ""
        self._title_pending: asyncio.TimerHandle | None = None
        self._trimming = False
        self._exit_code = 0  # 1 once the store was taken over by another supervisor
        self.rejoin = False  # fenced while serving: start again in place (run_supervisor)
        # Seconds each final state is kept (config.retention(), read once per job's end).
        self._retention = config.retention()
        self._title_prefix = f"hostqueue supervisor {display_name(config.store)}"
        # Parts made once the loop runs (_make_parts).
        self.loop: asyncio.AbstractEventLoop
        self.stopped: asyncio.Future[int]
        self.committer: GroupCommitter
        self.running_count: RunningCount
        self.book: JobBook
        self.board: Board
        self.pool: Pool
        self.dispatcher: Dispatcher
        self.announcer: Announcer
        self.outcomes: Outcomes
        self.sampler: ProgressSampler
        self.retention: Retention
        self.sizer: PoolSizer
        self.scheduler: Scheduler
        self.actions: Actions
        self.cluster: Cluster | None = None  # several hosts share the store

    # == the parts ================================================================

    def _make_parts(self) -> None:
        loop, config = self.loop, lambda: self.config
        state = lambda: self.state  # noqa: E731
        self.running_count = RunningCount(loop)
        self.committer = GroupCommitter(
            self.store, loop, lambda: self.book.handed + self.book.ready_count,
            on_commit=self.running_count.committed)
        self.running_count.committer = self.committer
        self.book = JobBook(self.committer.add, self.running_count.started, self._job_waits)
        self.board = Board()
        spawner = Spawner(loop, self.board, self._on_worker_message, self._on_worker_exit,
                          self.config.log_level, self.config.log_format)
        self.pool = Pool(loop, spawner, lambda: tuple(self.config.tasks), state, self.book.holds)
        self.sizer = PoolSizer(self.pool, config, lambda: self.autoscale, state,
                               lambda: self.book.available(self.paused), self.scale,
                               self.counters)
        self.dispatcher = Dispatcher(
            loop, self.book, self.pool, self.shaper, self.committer, self.store, self.paused,
            state, lambda: self.config.prefetch, lambda: self.config.max_jobs_per_worker,
            self.sizer.grow, self._jobs_handed, self.events.wants, self._job_ended)
        self.announcer = Announcer(loop, self.store, self.committer, self.events)
        self.retention = Retention(loop, self.store, self.committer, lambda: self._retention,
                                   lambda: self.state if self._leading() else SupervisorState.STARTING,
                                   self.book.forget_deleted)
        self.outcomes = Outcomes(self.book, self.dispatcher, self.committer, self.announcer,
                                 self.events, self.counters, self.runtime, lambda: self.tasks,
                                 self.retention.ended, self._worker_reported)
        self.sampler = ProgressSampler(loop, self.book, self.pool, self.board, self.events,
                                       self.outcomes.board_started)
        self.actions = Actions(self)
        self.scheduler = Scheduler(loop, self.store, self.committer,
                                   lambda: self.state is SupervisorState.RUNNING and self._leading(),
                                   lambda: self.tasks, self.peek_id, self.actions.submit_jobs)
        if isinstance(self.store, SharedStore):
            conf = self.config
            self.cluster = Cluster(
                loop, self.store, self.book, lambda: self.pool.target,
                lambda: len(self.pool.idle()), self.paused,
                lambda: self.state, self.dispatcher.wake, self._decide_interrupted,
                self.announcer.ended_elsewhere, self._abort_here, self._paused_elsewhere,
                self._ended_count, self._expired_released, conf.pg_lease,
                conf.pg_notify == "on", conf.pg_poll, self.shaper.strict_queues,
                self.shaper.queue_caps, self._progress_elsewhere, self.committer.after_commit,
                self.committer.inserted)
            self.cluster.on_leader(self._became_leader)
            self.sampler.on_changed = self.cluster.progress
            self.committer.foreign = self.cluster.foreign
            self.dispatcher.on_hungry(self.cluster.hungry)
        # One loop timer each for the earliest delayed job and deadline.
        self._delay_timer = EarliestTimer(self._delay_due)
        self._deadline_timer = EarliestTimer(self._deadline_due)

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
        from hostqueue.supervisor.control import ControlServer

        try:
            self.tasks = registry.load_task_modules(self.config.tasks)
        except registry.TaskModuleError as exc:
            log.error("%s", exc)
            return 2
        try:
            await self.store.open()
        except (StoreError, StoreLocked) as exc:
            log.error("%s", exc)
            return 1
        self._make_parts()
        self.store.on_fenced(self._fenced)
        try:
            await self._recover()
        except StoreError as exc:
            log.error("cannot start on this store: %s", exc)
            await self.store.close()
            self.board.close()
            return 1
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
            self.reaper = ZombieReaper(self.loop, lambda pid: pid in self.pool)
            self.reaper.start()
        self.state = SupervisorState.RUNNING
        self.pool.converge()
        self._arm_delay_timer()
        self._arm_deadline_timer()
        if self._leading():
            spawn(self.retention.rearm(), "retention timer")
            await self.scheduler.start(Scheduler.configured(self.config.schedules, self.tasks), time.time())
        self.dispatcher.wake()
        self._update_title()
        self.ready_event.set()
        log.info(
            "hostqueue %s supervisor %d serving %s on %s with %d workers (%d tasks, %d jobs ready)",
            __version__, os.getpid(), display_name(self.config.store), self.config.socket_path,
            self.pool.target,
            len(self.tasks), self.book.ready_count,
        )
        self.notifier.notify(f"READY=1\nSTATUS=serving with {self.pool.target} workers\nMAINPID={os.getpid()}")
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
            # What is still to be written gets what is left of the grace (1 s at least):
            # a store that refuses writes must not keep a drain from ending.
            wait = max(1.0, self._drain_deadline - time.monotonic())
            try:
                await asyncio.wait_for(self.committer.wait_idle(), wait)
            except asyncio.TimeoutError:
                log.error(
                    "stopping with %d writes the store did not take (%s): job outcomes since"
                    " then are lost; jobs that were running then run again at the next start",
                    len(self.committer.batch), self.committer.last_error)
                code = 1
            if self.cluster is not None:
                await self.cluster.leave()
            await self.store.close()
            self.board.close()
        log.info("supervisor %d stopped", os.getpid())
        return code

    def _decide_interrupted(self, job: Interrupted) -> tuple[str, Any]:
        """What a job interrupted by the death of its supervisor (or host) becomes."""
        d = outcome.after_crash(job.interruptions, time.time())
        return (d.state.value if d.state is State.FAILED else "pending"), d.error

    async def _recover(self) -> None:
        """Before any new work: jobs left running by a supervisor that died run again
        (uncharged; failed after 3 such interruptions in a row), and the job book,
        timers and keys are rebuilt from the store. On a store shared by several
        hosts: this host joins, takes over from hosts gone silent, and claims."""
        now = time.time()
        if self.cluster is not None:
            await self._join()
            return
        requeued, failed = await self.store.recover_interrupted(now, self._decide_interrupted)
        if requeued or failed:
            log.warning(
                "recovered %d jobs interrupted by the last stop: %d run again, not charged;"
                " %d failed after %d interruptions in a row",
                requeued + failed, requeued, failed, outcome.MAX_INTERRUPTIONS,
            )
        self.next_id = await self.store.last_job_id() + 1
        self.committer.committed_through = self.next_id - 1
        stored = await self.store.load_settings()
        if self.config.workers is not None:
            self.pool.target = self.config.workers
        else:
            self.pool.target = int(stored.get("workers", os.cpu_count() or 2))
        if self.autoscale:
            assert self.config.workers_min is not None and self.config.workers_max is not None
            self.pool.target = min(max(self.pool.target, self.config.workers_min), self.config.workers_max)
        self.paused.update(stored.get("paused", []))
        self.book.load(await self.store.load_pending(now))

    async def _join(self) -> None:
        assert self.cluster is not None
        stored = await self.store.load_settings()
        if self.config.workers is not None:
            self.pool.target = self.config.workers
        else:
            self.pool.target = int(stored.get(self._workers_setting, os.cpu_count() or 2))
        if self.autoscale:
            assert self.config.workers_min is not None and self.config.workers_max is not None
            self.pool.target = min(max(self.pool.target, self.config.workers_min), self.config.workers_max)
        self.paused.update(stored.get("paused", []))
        await self.cluster.join(self.config.socket_path, self.pool.target)
        self.committer.committed_through = self.cluster.peek_id() - 1

    @property
    def _workers_setting(self) -> str:
        """The stored pool size: per host (name and socket) on a shared store."""
        if self.cluster is None:
            return "workers"
        return f"workers@{self.cluster.name}:{os.path.abspath(self.config.socket_path)}"

    def _leading(self) -> bool:
        """Whether this host runs schedules and retention (always, on one host)."""
        return self.cluster is None or self.cluster.leader

    def _became_leader(self) -> None:
        if self.state is SupervisorState.RUNNING:
            spawn(self.retention.rearm(), "retention timer")
            spawn(self.scheduler.start(Scheduler.configured(self.config.schedules, self.tasks),
                                       time.time(), fresh=True), "schedules")

    @property
    def shared_store(self) -> SharedStore:
        """The store, shared by several hosts (only while self.cluster is not None)."""
        assert isinstance(self.store, SharedStore)
        return self.store

    def peek_id(self) -> int:
        """The id the next submitted job gets."""
        return self.cluster.peek_id() if self.cluster is not None else self.next_id

    def ids_ready(self, count: int) -> bool:
        return self.cluster is None or self.cluster.ids_ready(count)

    def take_ids(self, count: int) -> int:
        """The first of count new job ids, in this host's order."""
        if self.cluster is not None:
            if not self.cluster.ids_ready(count):  # a caller that did not ensure_ids()
                raise ProtocolError("store_busy", "job ids are being reserved in the store;"
                                    " submit again in a moment")
            return self.cluster.take_ids(count)
        first = self.next_id
        self.next_id += count
        return first

    def _ended_count(self) -> int:
        c = self.counters
        return c.get("completed", 0) + c.get("failed", 0) + c.get("retried", 0) \
            + c.get("cancelled", 0) + c.get("expired", 0)

    def _expired_released(self, ids: list[int]) -> None:
        now = time.time()
        for job_id in ids:
            self.counters["expired"] = self.counters.get("expired", 0) + 1
            self.retention.ended("expired", now)
        self.announcer.ended_elsewhere(ids)

    def _abort_here(self, ids: list[int]) -> None:
        """Another host asked to abort jobs: those this host owns are aborted here."""
        mine = [i for i in ids if self.book.state(i) is not None]
        if self.cluster is not None and len(mine) < len(ids):
            self.cluster.abort_unknown([i for i in ids if i not in mine])
        if mine:
            spawn(self.actions.abort_jobs(mine), "abort asked by another host")

    def _progress_elsewhere(self, entries: list[Any]) -> None:
        """Progress of jobs running on another host, for the watchers here."""
        events = self.events
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 6 or not isinstance(entry[0], int):
                continue
            job_id, fraction, message, queue, task, run_id = entry
            if events.wants(job_id):
                events.publish({"event": "progress", "job_id": job_id, "progress": fraction,
                                "message": message}, queue, task, run_id)

    def _paused_elsewhere(self, paused: list[str]) -> None:
        self.paused.clear()
        self.paused.update(paused)
        if self.cluster is not None:
            self.cluster.resumed()
        self.dispatcher.wake()

    async def count_by_state(self, run_id: str | None = None) -> dict[str, Any]:
        """The store's counts by state and queue, once our writes so far are committed
        (at once while the store refuses writes)."""
        await self.committer.barrier(reads=True)
        now = time.time()
        # Several hosts: jobs due later may be released, in no book: read them all.
        later = self.book.scheduled(now, SCHEDULED_BY_ID) \
            if run_id is None and self.cluster is None else None
        running = self.running_count.in_snapshot if run_id is None else None
        return await self.store.count_by_state(now, run_id, later, running)

    async def metrics_text(self) -> str:
        stats = await self.count_by_state()
        return render(stats, await self.store.file_size(), self.counters, self.runtime,
                      [w.state.value for w in self.pool], self.pool.target, self.book.ready_count,
                      self.committer.commits, self.state is SupervisorState.RUNNING)

    def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: a stuck loop stops pinging and systemd acts.
        (A timer that exists only because the operator asked for the watchdog.)"""
        self.notifier.notify("WATCHDOG=1")
        if not self.stopped.done():
            self.loop.call_later(interval, self._watchdog, interval)

    # == signals ==================================================================

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
        self.scale(min(self.pool.target + 1, 256))

    def handle_ttou(self) -> None:
        """One worker fewer (a retiring worker finishes its job first)."""
        self.scale(max(self.pool.target - 1, 0))

    def handle_hup(self) -> None:
        """Reload: re-import task modules, replace every worker with a fresh one."""
        try:
            self.reload()
        except ProtocolError as exc:
            log.error("reload refused: %s", exc.message)

    # == drain ======================================================================

    def begin_drain(self, grace: float | None = None) -> None:
        grace = self.config.grace if grace is None else grace
        if self.state is SupervisorState.DRAINING:
            if grace == 0.0:
                self._grace_expired()
            return
        if self.state is not SupervisorState.RUNNING:
            return
        self.state = SupervisorState.DRAINING
        self._drain_deadline = time.monotonic() + grace
        extend = int((grace + 10) * 1e6)
        # Running: started, or at the head of an idle worker's queue (it starts as it
        # reads it; a worker stopping still starts that one).
        busy = sum(1 for w in self.pool if self.book.running_on(w.pid) is not None
                   or (w.state is WorkerState.BUSY and self.book.holds(w.pid)))
        self.notifier.notify(f"STOPPING=1\nSTATUS=draining: {busy} jobs running\nEXTEND_TIMEOUT_USEC={extend}")
        log.info("draining: %d jobs running on %d workers, grace %.1f s", busy, busy, grace)
        self.scheduler.stop()
        if self.cluster is not None:
            self.cluster.drain()
        for timer in (self._delay_timer, self._deadline_timer, self.retention.timer,
                      self.sizer.idle_timer):
            timer.cancel()
        self.dispatcher.stop_timers()
        self.pool.stop_timers()
        for worker in self.pool:
            self.pool.retire(worker)
        if grace <= 0:
            self._grace_expired()
        else:
            self._grace_timer = self.loop.call_later(grace, self._grace_expired)
        self._check_drained()
        self._update_title()

    def _fenced(self, exc: Exception) -> None:
        """This host's lease lapsed while it was frozen or cut off: the jobs it runs
        now belong to other hosts (they run again those it was running). Stop every
        worker at once, store nothing more, exit 1; a host that was serving (not
        draining already) then starts again in place and rejoins as a new host
        (run_supervisor)."""
        log.critical("%s", exc)
        self._exit_code = 1
        if self.cluster is not None:
            self.cluster.fenced()
            if not self.embedded and self.state is SupervisorState.RUNNING:
                self.rejoin = True
        if self.state is SupervisorState.DRAINING:
            self._grace_expired()
        else:
            self.begin_drain(grace=0.0)

    def _grace_expired(self) -> None:
        for worker in self.pool:
            if worker.exit_status is None:
                held = self.book.holds(worker.pid)
                if held:
                    log.warning(
                        "grace period over: stopping worker %d; its %d jobs go back to pending",
                        worker.pid, held,
                    )
                worker.killed_for = "drain"
                worker.kill(signal.SIGKILL)
        self._check_drained()

    def _check_drained(self) -> None:
        if self.state is SupervisorState.DRAINING and not len(self.pool) and not self.stopped.done():
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            self.sampler.stop()
            self.state = SupervisorState.STOPPED
            self.stopped.set_result(self._exit_code)

    # == the pool ================================================================

    def scale(self, n: int, manual: bool = True) -> int:
        """Set the pool's target size; a manual size turns autoscale off until reload."""
        previous = self.pool.target
        if manual and self.autoscale:
            self.autoscale = False
            log.info("autoscale off until reload: the pool size was set by hand")
        self.pool.target = n
        self.committer.add("save_setting", self.store.setting_params(self._workers_setting, n))
        if n != previous:
            log.info("scaling from %d to %d workers", previous, n)
        self.pool.converge()
        self._update_title()
        return previous

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration and task modules, then replace every worker."""
        try:
            config = settings.reread(self.config)
        except settings.SettingsError as exc:
            raise ProtocolError("bad_request", f"reload refused, the running configuration stays: {exc}") from None
        for name in ("store", "pg_schema", "socket", "durability", "max_line"):
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
        self._retention = config.retention()  # the reloaded retention applies from now on
        self.tasks = tasks
        self.shaper.apply(ShapingConfig.parse(config.queues, config.limits))
        self.shaper.recount(a.lane for a in self.book.active())
        self.autoscale = config.workers_min is not None
        if self.autoscale:
            assert config.workers_min is not None and config.workers_max is not None
            self.pool.target = min(max(self.pool.target, config.workers_min), config.workers_max)
        # The pool keeps its size (scaled at run time, perhaps) unless the file names one.
        file_workers = settings.read_config_file(config.config_path).get("workers") if config.config_path else None
        if file_workers is not None and file_workers != self.pool.target:
            self.pool.target = file_workers
            self.committer.add("save_setting", self.store.setting_params(self._workers_setting, self.pool.target))
        old = [w for w in self.pool if w.state is not WorkerState.RETIRING]
        for worker in old:
            self.pool.retire(worker)
        self.pool.reset_failures()
        self.pool.converge()
        self.retention.cancel()
        if self._leading():
            spawn(self.retention.rearm(), "retention timer")
            spawn(self.scheduler.start(schedules, time.time()), "schedules")
        log.info("reloaded: %d tasks, replacing %d workers", len(tasks), len(old))
        self.notifier.notify("READY=1")
        return {"workers": self.pool.target, "tasks": sorted(tasks)}

    def _on_worker_message(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "done":
            self.outcomes.on_report(worker, message)
        elif kind == "ready":
            if self.pool.connected_ready(worker):
                self.sizer.became_idle(worker)
                self.dispatcher.wake()
                self._update_title()

    def _worker_reported(self, worker: WorkerHandle) -> None:
        """After a worker's report: recycle it if it did its share; note it idle."""
        self.sizer.maybe_recycle(worker)
        if worker.state is WorkerState.IDLE and not self.book.holds(worker.pid):
            self.sizer.became_idle(worker)
        self._update_title()
        if self.state is SupervisorState.DRAINING:
            self._check_drained()

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        clean, boot_error, cause = exit_kind(worker)
        self.outcomes.on_worker_exit(worker)
        self.dispatcher.forget(worker.pid)
        self.pool.exited(worker, clean, boot_error, cause)
        self._update_title()
        if self.state is SupervisorState.DRAINING:
            self._check_drained()
        else:
            self.pool.converge()
            self.dispatcher.wake()

    def _job_ended(self, job_id: int, status: str, now: float) -> None:
        """A job ended outside a worker's report (aborted before it reached its
        worker, expired waiting): counted, retention armed, its end announced."""
        self.counters[status] = self.counters.get(status, 0) + 1
        self.retention.ended(status, now)
        self.announcer.after_commit(job_id, status)

    def _jobs_handed(self) -> None:
        self.sampler.start()
        self._update_title()

    # == timers ===================================================================

    def _arm_delay_timer(self) -> None:
        due = self.book.next_delay_due()
        if due is not None and self.state is SupervisorState.RUNNING:
            self._delay_timer.arm(due)

    def _delay_due(self) -> None:
        missing = self.book.ready_delayed(time.time())
        if missing:
            spawn(self._promote_unknown(missing), "read delayed jobs")
        self.dispatcher.wake()
        self._arm_delay_timer()

    async def _promote_unknown(self, ids: list[int]) -> None:
        """Delayed jobs loaded at start carry no payload: read queue and priority once."""
        try:
            jobs = await self.store.get_jobs(ids)
        except StoreError as exc:
            log.error("cannot read delayed jobs that came due (tried again in 1 s): %s", exc)
            self.book.delay_again(ids, time.time() + 1.0)
            return
        for job_id in ids:
            job = jobs.get(job_id)
            if job is not None and job["status"] == "pending":
                self.book.promote(job_id, (job["queue"], job["task"]), job["priority"])
            else:
                self.book.promote(job_id, None, 0)
        self.dispatcher.wake()

    def _job_waits(self, run_at: float, deadline: float | None) -> None:
        """Jobs wait (new, retried, returned, revived): wake what takes them."""
        if run_at <= time.time():
            self.dispatcher.wake()
        else:
            self._arm_delay_timer()
        if deadline is not None:
            self._arm_deadline_timer()

    def _arm_deadline_timer(self) -> None:
        due = self.book.next_deadline_due()
        if due is not None and self.state is SupervisorState.RUNNING:
            self._deadline_timer.arm(due)

    def _deadline_due(self) -> None:
        """A deadline bounds every start: a waiting job expires now; a held one is
        taken back from its worker (which also refuses to start it late) and expires
        when it comes back; a running one met it."""
        now = time.time()
        book = self.book
        for job_id in book.due_deadlines(now):
            state = book.state(job_id)
            if state is None and book.recent_final(job_id) is None:
                # A waiting job whose row is not in memory (loaded at start, or in a
                # paused queue): deadlines are dropped as jobs start or end, so it waits.
                state = State.PENDING
            if state is State.PENDING:
                ran = book.attempts_ran(job_id)
                err = outcome.expired_error(ran) if ran is not None else outcome.error(
                    "Expired", "deadline passed before the job could start")
                self._job_ended(job_id, book.cancel_waiting(job_id, Event.EXPIRED, now, err), now)
            elif state is State.HELD:
                a = book.attempt(job_id)
                if a is None:  # its row is being read
                    book.deadline_while_fetching(job_id, now)
                    continue
                worker = self.pool.get(a.worker_pid)
                if worker is not None:
                    worker.send_control({"t": "give_back", "ids": [job_id]})
        self._arm_deadline_timer()

    # == odds and ends ============================================================

    def trim_memory_soon(self) -> None:
        """Return freed heap to the system once large submits have gone through: a
        million submitted jobs otherwise leave ~25 MB of free but fragmented heap."""
        if not self._trimming:
            self._trimming = True
            spawn(self._trim_memory(), "trim memory")

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
        busy = self.pool.busy()
        state = "" if self.state is SupervisorState.RUNNING else f", {self.state.value}"
        title = f"{self._title_prefix} [{len(self.pool)} workers, {busy} busy{state}]"
        if title != self._title:
            self._title = title
            set_title(title)
            if self.notifier.enabled:
                self.notifier.notify(
                    f"STATUS={len(self.pool)} workers, {busy} busy, {self.book.ready_count} jobs ready{state}"
                )


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
    set_title(f"hostqueue supervisor {display_name(config.store)} [starting]")
    code = int(uvloop.run(supervisor.run()))
    if supervisor.rejoin:
        # Its lease lapsed (frozen, cut off): its jobs were taken over and its workers
        # are stopped. The same command again, in this process (same PID for the
        # service manager): it joins as a new host.
        log.warning("rejoining %s as a new host", display_name(config.store))
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, "-m", "hostqueue", *sys.argv[1:]])
    return code
