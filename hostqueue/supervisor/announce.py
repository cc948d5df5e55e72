"""Announcing committed final states: waiters (`wait`) and watchers (`watch`) hear
that a job ended only after that is committed, with the job as the store has it.
One read per commit for all the jobs anybody listens to; nothing when nobody does.
(Events that are not final, `started`, `retrying`, `progress`, go out as they happen.)

The announcer owns the waiters: callbacks that want a job's end, once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from hostqueue.core.states import FINAL_STATES
from hostqueue.store.base import Store, StoreError
from hostqueue.supervisor.committer import GroupCommitter
from hostqueue.supervisor.events import EventHub
from hostqueue.supervisor.background import spawn

log = logging.getLogger("hostqueue.supervisor")

Ended = Callable[[dict[str, Any]], None]


class Announcer:
    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store, committer: GroupCommitter,
                 events: EventHub) -> None:
        self.loop = loop
        self.store = store
        self.committer = committer
        self.events = events
        self.waiters: dict[int, list[Ended]] = {}
        self.pending: dict[int, str] = {}
        # The final job as it will be committed, when the supervisor knows all of
        # it: delivered without reading it back (one thread hop fewer per job).
        self.known: dict[int, dict[str, Any]] = {}
        self.armed = False

    def listen(self, job_id: int, ended: Ended) -> Callable[[], None]:
        """Call ended(job) once the job's end is committed; returns the way to stop."""
        waiters = self.waiters

        def stop() -> None:
            listeners = waiters.get(job_id)
            if listeners and ended in listeners:
                listeners.remove(ended)
                if not listeners:
                    del waiters[job_id]

        waiters.setdefault(job_id, []).append(ended)
        return stop

    def after_commit(self, job_id: int, event: str, job: dict[str, Any] | None = None) -> None:
        if job_id not in self.waiters and not self.events.wants(job_id):
            return
        self.pending[job_id] = event
        if job is not None:
            self.known[job_id] = job
        else:
            self.known.pop(job_id, None)
        if not self.armed:
            self.armed = True
            self.committer.after_commit(self._start)

    def ended_elsewhere(self, ids: list[int] | None) -> None:
        """Jobs that ended on another host (None: any may have, a NOTIFY was missed):
        those waited on or watched here are read, and announced if they ended."""
        events = self.events
        if ids is None:
            wanted = list(self.waiters)
        else:
            wanted = [i for i in ids if i in self.waiters or events.wants(i)]
        if wanted:
            spawn(self._deliver_ended(wanted), "announce jobs ended elsewhere")

    async def _deliver_ended(self, ids: list[int]) -> None:
        try:
            jobs = await self.store.get_jobs(ids)
        except StoreError as exc:
            log.error("cannot read jobs that ended on another host to announce them: %s", exc)
            return
        ended = {i: job for i, job in jobs.items() if job["status"] in FINAL_STATES}
        if ended:
            self._publish({i: job["status"] for i, job in ended.items()}, ended)

    def _start(self) -> None:
        self.armed = False
        pending, self.pending = self.pending, {}
        known, self.known = self.known, {}
        if len(known) == len(pending):
            self._publish(pending, known)  # all known: at once, no read
        else:
            spawn(self._deliver(pending, known), "announce ended jobs")

    async def _deliver(self, pending: dict[int, str], known: dict[int, dict[str, Any]]) -> None:
        try:
            jobs = await self.store.get_jobs([i for i in pending if i not in known])
        except StoreError as exc:
            log.error("cannot read finished jobs to announce them: %s", exc)
            return
        jobs.update(known)
        self._publish(pending, jobs)

    def _publish(self, pending: dict[int, str], jobs: dict[int, dict[str, Any]]) -> None:
        for job_id, event in pending.items():
            job = jobs.get(job_id)
            if job is None:
                continue
            final = job["status"] in FINAL_STATES
            if final:
                event = job["status"]
            # The event first: a client that watches and waits hears it before the reply.
            self.events.publish(
                {"event": event, "job_id": job_id, "job": job},
                job["queue"], job["task"], job["run_id"],
            )
            if final:
                for ended in self.waiters.pop(job_id, ()):
                    try:
                        ended(job)
                    except Exception:  # noqa: BLE001 - one waiter must not stop the rest
                        log.exception("error telling a waiter that job %d ended", job_id)
