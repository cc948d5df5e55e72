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
from typing import TYPE_CHECKING

from .pool import RunningJob, WorkerHandle

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger("hostqueue.supervisor")

PROGRESS_SAMPLE_INTERVAL = 0.1  # DESIGN: at least every 250 ms while a job runs
PROGRESS_PERSIST_INTERVAL = 1.0
# After the soft limit (TimeLimit raised in the task) a job gets this long to
# clean up before its worker is killed.
TIME_LIMIT_GRACE = 2.0


class ProgressSampler:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.timer: asyncio.TimerHandle | None = None
        self.last_write = 0.0

    def start(self) -> None:
        if self.timer is None:
            self.timer = self.sup.loop.call_later(PROGRESS_SAMPLE_INTERVAL, self.sample)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def sample(self) -> None:
        self.timer = None
        if not self.sup.running:
            return
        now = time.time()
        for worker in self.sup.workers.values():
            if not worker.jobs or worker.slot < 0:
                continue
            reading = self.sup.board.read(worker.slot)
            if reading is None or not reading.job_id:
                continue
            rj = worker.jobs.get(reading.job_id)
            if rj is None:
                continue
            if rj.timeout and now - reading.started > rj.timeout + TIME_LIMIT_GRACE:
                self.time_limit_overdue(worker, rj, now - reading.started)
                continue
            if reading.fraction is None or reading.seq == rj.board_seq:
                continue
            rj.board_seq = reading.seq
            rj.progress, rj.progress_message = reading.fraction, reading.message
            rj.progress_dirty = True
            if self.sup.events.wants(rj.id):
                self.sup.events.publish(
                    {"event": "progress", "job_id": rj.id, "progress": rj.progress,
                     "message": rj.progress_message},
                    rj.queue, rj.task, rj.run_id,
                )
        if now - self.last_write >= PROGRESS_PERSIST_INTERVAL:
            self.last_write = now
            for rj in self.sup.running.values():
                if rj.progress_dirty:
                    rj.progress_dirty = False
                    self.sup.committer.add("record_progress", (rj.progress, rj.progress_message, rj.id))
        self.timer = self.sup.loop.call_later(PROGRESS_SAMPLE_INTERVAL, self.sample)

    def time_limit_overdue(self, worker: WorkerHandle, rj: RunningJob, ran: float) -> None:
        if worker.killed_for is not None:
            return
        log.warning(
            "job %d %s ignored its time limit of %g s (ran %.1f s): replacing worker %d",
            rj.id, rj.task, rj.timeout, ran, worker.pid,
        )
        worker.killed_for = "timeout"
        worker.kill_error = {
            "type": "TimeLimit",
            "message": f"time limit exceeded after {rj.timeout:g} s; the worker was killed",
            "traceback": None,
        }
        worker.kill(signal.SIGKILL)

