"""Retention: finished jobs are deleted once older than their state's retention.

One loop timer for the earliest moment a finished job is due (armed when a job
finishes, and from the store at start); deletion runs in transactions of
RETENTION_BATCH rows through the group committer, so dispatch never waits long.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .states import SupervisorState
from .store import StoreError
from .timers import EarliestTimer

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger("hostqueue.supervisor")

RETENTION_BATCH = 500  # rows deleted per transaction


class Retention:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.timer = EarliestTimer(self._start_sweep)
        self.sweeping = False

    def _start_sweep(self) -> None:
        self.sup.loop.create_task(self.sweep())

    def cancel(self) -> None:
        self.timer.cancel()

    def arm(self, when: float) -> None:
        """One timer for the earliest moment a finished job is due for deletion."""
        if self.sup.state is SupervisorState.RUNNING and not self.sweeping:
            self.timer.arm(when)

    async def sweep(self) -> None:
        """Delete finished jobs past their retention, a batch per transaction."""
        self.sweeping = True
        deleted = 0
        try:
            while self.sup.state is SupervisorState.RUNNING:
                now = time.time()
                cutoffs = {state: now - keep for state, keep in self.sup.config.retention().items()}
                ids = await self.sup.store.expired_finished(cutoffs, RETENTION_BATCH)
                for job_id in ids:
                    self.sup.committer.add("forget_attempts", (job_id,))
                    self.sup.committer.add("forget_jobs", (job_id,))
                    self.sup.recent_jobs.pop(job_id, None)  # wait: not_found, as get
                await self.sup.committer.barrier()
                deleted += len(ids)
                if len(ids) < RETENTION_BATCH:
                    break
        except StoreError as exc:
            log.error("retention sweep failed: %s", exc)
        finally:
            self.sweeping = False
        if deleted:
            log.info("retention: deleted %d finished jobs", deleted)
        await self.rearm()

    async def rearm(self) -> None:
        retention = self.sup.config.retention()
        if not retention:
            return
        try:
            oldest = await self.sup.store.oldest_finished(list(retention))
        except StoreError as exc:
            log.error("cannot read finished jobs for retention: %s", exc)
            return
        if oldest:
            self.arm(min(oldest[s] + retention[s] for s in oldest))

