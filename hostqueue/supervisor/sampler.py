"""The progress sampler: reads the workers' shared-memory slots while jobs run.

It exists only while a job runs (a timer every PROGRESS_SAMPLE_INTERVAL; with
no job running it stops). Each round it forwards changed progress to watchers,
persists the latest values at most once a second, and enforces hard time
limits: a job still running TIME_LIMIT_GRACE after its soft limit has its
worker killed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable

from hostqueue.core.board import Board
from hostqueue.core.states import State
from hostqueue.supervisor.events import EventHub
from hostqueue.supervisor.jobs import Attempt, JobBook
from hostqueue.supervisor.pool import Pool, WorkerHandle

log = logging.getLogger("hostqueue.supervisor")

PROGRESS_SAMPLE_INTERVAL = 0.1  # DESIGN: at least every 250 ms while a job runs
PROGRESS_PERSIST_INTERVAL = 1.0
# After the soft limit (TimeLimit raised in the task) a job gets this long to
# clean up before its worker is killed.
TIME_LIMIT_GRACE = 2.0


class ProgressSampler:
    def __init__(self, loop: asyncio.AbstractEventLoop, book: JobBook, pool: Pool, board: Board,
                 events: EventHub, board_started: Callable[[Attempt, float], None]) -> None:
        self.loop = loop
        self.book = book
        self.pool = pool
        self.board = board
        self.events = events
        self._board_started = board_started  # a held job the board shows running
        self.timer: asyncio.TimerHandle | None = None
        self.last_write = 0.0
        # Several hosts: progress told to the other hosts' watchers (cluster.py).
        self.on_changed: Callable[[list[Attempt]], None] | None = None

    def start(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(PROGRESS_SAMPLE_INTERVAL, self.sample)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def sample(self) -> None:
        self.timer = None
        if not self.book.handed:
            return
        now = time.time()
        changed: list[Attempt] = []
        for worker in self.pool:
            if worker.slot < 0 or not self.book.holds(worker.pid):
                continue
            reading = self.board.read(worker.slot)
            if reading is None or not reading.job_id:
                continue
            a = self.book.attempt(reading.job_id)
            if a is None or a.worker_pid != worker.pid:
                continue
            if a.state is State.HELD:
                self._board_started(a, reading.started)
            if a.timeout and now - reading.started > a.timeout + TIME_LIMIT_GRACE:
                self.time_limit_overdue(worker, a, now - reading.started)
                continue
            if reading.fraction is None or reading.seq == a.board_seq:
                continue
            a.board_seq = reading.seq
            a.progress, a.progress_message = reading.fraction, reading.message
            a.progress_dirty = True
            changed.append(a)
            if self.events.wants(a.id):
                self.events.publish(
                    {"event": "progress", "job_id": a.id, "progress": a.progress,
                     "message": a.progress_message},
                    a.queue, a.task, a.run_id,
                )
        if changed and self.on_changed is not None:
            self.on_changed(changed)
        if now - self.last_write >= PROGRESS_PERSIST_INTERVAL:
            self.last_write = now
            for a in list(self.book.active()):
                self.book.record_progress(a)
        self.timer = self.loop.call_later(PROGRESS_SAMPLE_INTERVAL, self.sample)

    def time_limit_overdue(self, worker: WorkerHandle, a: Attempt, ran: float) -> None:
        if worker.killed_for is not None:
            return
        log.warning(
            "job %d %s ignored its time limit of %g s (ran %.1f s): replacing worker %d",
            a.id, a.task, a.timeout, ran, worker.pid,
        )
        worker.killed_for = "timeout"
        worker.kill_error = {
            "type": "TimeLimit",
            "message": f"time limit exceeded after {a.timeout:g} s; the worker was killed",
            "traceback": None,
        }
        worker.kill(signal.SIGKILL)
