"""Retention: finished jobs are deleted once older than their state's retention.

One loop timer for the earliest moment a finished job is due (armed when a job
finishes, and from the store at start); deletion runs in transactions of
RETENTION_BATCH rows through the group committer, so dispatch never waits long.
"""

from __future__ import annotations

import logging
import time
import asyncio
from typing import Callable

from hostqueue.core.states import SupervisorState
from hostqueue.store.base import Store, StoreError
from hostqueue.supervisor.committer import GroupCommitter
from hostqueue.supervisor.timers import EarliestTimer
from hostqueue.supervisor.background import spawn

log = logging.getLogger("hostqueue.supervisor")

RETENTION_BATCH = 500  # rows deleted per transaction


class Retention:
    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store, committer: GroupCommitter,
                 retention: Callable[[], dict[str, float]], state: Callable[[], SupervisorState],
                 deleted: Callable[[int], None]) -> None:
        self.loop = loop
        self.store = store
        self.committer = committer
        self._retention = retention  # seconds to keep, by final state
        self._state = state
        self._deleted = deleted  # the job book forgets a deleted job
        self.timer = EarliestTimer(self._start_sweep)
        self.sweeping = False

    def _start_sweep(self) -> None:
        spawn(self.sweep(), "retention sweep")

    def cancel(self) -> None:
        self.timer.cancel()

    def ended(self, status: str, finished_at: float) -> None:
        """A job ended in this state: arm the timer for its deletion, if it is kept
        for a while only."""
        keep = self._retention().get(status)
        if keep is not None:
            self.arm(finished_at + keep)

    def arm(self, when: float) -> None:
        """One timer for the earliest moment a finished job is due for deletion."""
        if self._state() is SupervisorState.RUNNING and not self.sweeping:
            self.timer.arm(when)

    async def sweep(self) -> None:
        """Delete finished jobs past their retention, a batch per transaction. Each
        delete is guarded: a job retried since it was found stays."""
        self.sweeping = True
        deleted = 0
        try:
            while self._state() is SupervisorState.RUNNING:
                now = time.time()
                cutoffs = {state: now - keep for state, keep in self._retention().items()}
                found = await self.store.ended_before(cutoffs, RETENTION_BATCH)
                for job_id, status, cutoff in found:
                    self.committer.add("forget_ended", (job_id, status, cutoff))
                    self.committer.add("forget_attempts", (job_id, job_id))
                    self._deleted(job_id)
                await self.committer.barrier()
                deleted += len(found)
                if len(found) < RETENTION_BATCH:
                    break
        except StoreError as exc:
            log.error("retention sweep failed: %s", exc)
        finally:
            self.sweeping = False
        if deleted:
            log.info("retention: deleted %d finished jobs", deleted)
        await self.rearm()

    async def rearm(self) -> None:
        retention = self._retention()
        if not retention:
            return
        try:
            oldest = await self.store.oldest_finished(list(retention))
        except StoreError as exc:
            log.error("cannot read finished jobs for retention: %s", exc)
            return
        if oldest:
            self.arm(min(oldest[s] + retention[s] for s in oldest))
