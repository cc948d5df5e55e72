"""The pool's size on its own: autoscale between workers.min and workers.max, and
recycling of workers that ran max_jobs jobs or grew past max_memory.

Growth happens when dispatch finds jobs waiting and no idle worker (one worker
at a time); shrinking on one timer for the earliest moment an idle worker
passes idle_timeout. Nothing runs while nothing changes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from .pool import WorkerHandle
from .states import SupervisorState, WorkerState
from .timers import EarliestTimer

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger("hostqueue.supervisor")


class PoolSizer:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.idle_timer = EarliestTimer(self.shrink, time.monotonic)

    def maybe_recycle(self, worker: WorkerHandle) -> None:
        """Replace a worker that did its share of jobs or grew too big (checked after jobs)."""
        if worker.state is not WorkerState.BUSY and worker.state is not WorkerState.IDLE:
            return
        reason = None
        limit_jobs = self.sup.config.max_jobs_per_worker
        limit_mb = self.sup.config.max_memory_per_worker
        if limit_jobs is not None and worker.jobs_done >= limit_jobs:
            reason = f"it ran {worker.jobs_done} jobs (max_jobs {limit_jobs})"
        elif limit_mb is not None and worker.rss_now is not None and worker.rss_now > limit_mb * 1024 * 1024:
            reason = f"its memory is {worker.rss_now / 1048576:.0f} MB (max_memory {limit_mb} MB)"
        if reason is not None:
            log.info("recycling worker %d: %s", worker.pid, reason)
            self.sup.counters["recycled"] += 1
            self.sup._retire(worker, drop_queued=True)
            self.sup._manage_workers()

    def became_idle(self, worker: WorkerHandle) -> None:
        worker.idle_since = time.monotonic()
        if self.sup.autoscale and self.sup.config.workers_min is not None and self.sup.target > self.sup.config.workers_min:
            self.idle_timer.arm(worker.idle_since + self.sup.config.idle_timeout)

    def shrink(self) -> None:
        """Retire workers idle for idle_timeout, down to workers.min."""
        if not self.sup.autoscale or self.sup.state is not SupervisorState.RUNNING or self.sup.config.workers_min is None:
            return
        now = time.monotonic()
        earliest = math.inf
        for worker in sorted(self.sup.workers.values(), key=lambda w: w.idle_since or 0.0):
            if self.sup.target <= self.sup.config.workers_min:
                break
            if worker.state is not WorkerState.IDLE or worker.idle_since is None:
                continue
            due = worker.idle_since + self.sup.config.idle_timeout
            if due <= now:
                log.info("autoscale: worker %d idle for %.0f s; shrinking to %d", worker.pid, now - worker.idle_since, self.sup.target - 1)
                self.sup.scale(self.sup.target - 1, manual=False)
            else:
                earliest = min(earliest, due)
        if earliest < math.inf and self.sup.target > self.sup.config.workers_min:
            self.idle_timer.arm(earliest)

    def grow(self) -> None:
        """Jobs wait and no worker is idle: one more worker, up to workers.max."""
        if not self.sup.autoscale or self.sup.config.workers_max is None or self.sup.target >= self.sup.config.workers_max:
            return
        if any(w.state is WorkerState.STARTING for w in self.sup.workers.values()):
            return  # one at a time: the next grows when this one is ready
        if self.sup.ready.available(self.sup.paused) <= 0:
            return
        log.info("autoscale: jobs wait and every worker is busy; growing to %d", self.sup.target + 1)
        self.sup.scale(self.sup.target + 1, manual=False)

