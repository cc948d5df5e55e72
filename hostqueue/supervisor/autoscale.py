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
from typing import Callable

from hostqueue.core.settings import SupervisorConfig
from hostqueue.core.states import SupervisorState, WorkerState
from hostqueue.supervisor.pool import Pool, WorkerHandle
from hostqueue.supervisor.timers import EarliestTimer

log = logging.getLogger("hostqueue.supervisor")


class PoolSizer:
    def __init__(self, pool: Pool, config: Callable[[], SupervisorConfig],
                 autoscale: Callable[[], bool], state: Callable[[], SupervisorState],
                 waiting: Callable[[], int], scale: Callable[[int, bool], int],
                 counters: dict[str, int]) -> None:
        self.pool = pool
        self._config = config
        self._autoscale = autoscale
        self._state = state
        self._waiting = waiting  # jobs ready to start in queues not paused
        self._scale = scale  # scale(n, manual)
        self.counters = counters
        self.idle_timer = EarliestTimer(self.shrink, time.monotonic)

    def maybe_recycle(self, worker: WorkerHandle) -> None:
        """Replace a worker that did its share of jobs or grew too big (checked after jobs)."""
        if worker.state is not WorkerState.BUSY and worker.state is not WorkerState.IDLE:
            return
        reason = None
        config = self._config()
        limit_jobs = config.max_jobs_per_worker
        limit_mb = config.max_memory_per_worker
        if limit_jobs is not None and worker.jobs_done >= limit_jobs:
            reason = f"it ran {worker.jobs_done} jobs (max_jobs {limit_jobs})"
        elif limit_mb is not None and worker.rss_now is not None and worker.rss_now > limit_mb * 1024 * 1024:
            reason = f"its memory is {worker.rss_now / 1048576:.0f} MB (max_memory {limit_mb} MB)"
        if reason is not None:
            log.info("recycling worker %d: %s", worker.pid, reason)
            self.counters["recycled"] = self.counters.get("recycled", 0) + 1
            self.pool.retire(worker)
            self.pool.converge()

    def became_idle(self, worker: WorkerHandle) -> None:
        worker.idle_since = time.monotonic()
        config = self._config()
        if self._autoscale() and config.workers_min is not None and self.pool.target > config.workers_min:
            self.idle_timer.arm(worker.idle_since + config.idle_timeout)

    def shrink(self) -> None:
        """Retire workers idle for idle_timeout, down to workers.min."""
        config = self._config()
        if not self._autoscale() or self._state() is not SupervisorState.RUNNING or config.workers_min is None:
            return
        now = time.monotonic()
        earliest = math.inf
        for worker in sorted(self.pool, key=lambda w: w.idle_since or 0.0):
            if self.pool.target <= config.workers_min:
                break
            if worker.state is not WorkerState.IDLE or worker.idle_since is None:
                continue
            due = worker.idle_since + config.idle_timeout
            if due <= now:
                log.info("autoscale: worker %d idle for %.0f s; shrinking to %d", worker.pid, now - worker.idle_since, self.pool.target - 1)
                self._scale(self.pool.target - 1, False)
            else:
                earliest = min(earliest, due)
        if earliest < math.inf and self.pool.target > config.workers_min:
            self.idle_timer.arm(earliest)

    def grow(self) -> None:
        """Jobs wait and no worker is idle: one more worker, up to workers.max."""
        config = self._config()
        if not self._autoscale() or config.workers_max is None or self.pool.target >= config.workers_max:
            return
        if any(w.state is WorkerState.STARTING for w in self.pool):
            return  # one at a time: the next grows when this one is ready
        if self._waiting() <= 0:
            return
        log.info("autoscale: jobs wait and every worker is busy; growing to %d", self.pool.target + 1)
        self._scale(self.pool.target + 1, False)
