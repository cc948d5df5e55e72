"""Announcing committed final states: waiters (`wait`) and watchers (`watch`) hear
that a job ended only after that is committed, with the job as the store has it.
One read per commit for all the jobs anybody listens to; nothing when nobody does.
(Events that are not final, `started`, `retrying`, `progress`, go out at once.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .states import FINAL_STATES
from .store import StoreError

if TYPE_CHECKING:
    from .supervisor import Supervisor

log = logging.getLogger("hostqueue.supervisor")


class Announcer:
    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.pending: dict[int, str] = {}
        # The final job as it will be committed, when the supervisor knows all of
        # it: delivered without reading it back (one thread hop fewer per job).
        self.known: dict[int, dict[str, Any]] = {}
        self.armed = False

    def after_commit(self, job_id: int, event: str, job: dict[str, Any] | None = None) -> None:
        if job_id not in self.sup.waiters and not self.sup.events.wants(job_id):
            return
        self.pending[job_id] = event
        if job is not None:
            self.known[job_id] = job
        else:
            self.known.pop(job_id, None)
        if not self.armed:
            self.armed = True
            self.sup.committer.after_commit(self._start)

    def _start(self) -> None:
        self.armed = False
        pending, self.pending = self.pending, {}
        known, self.known = self.known, {}
        if len(known) == len(pending):
            self._publish(pending, known)  # all known: at once, no read
        else:
            self.sup.loop.create_task(self._deliver(pending, known))

    async def _deliver(self, pending: dict[int, str], known: dict[int, dict[str, Any]]) -> None:
        try:
            jobs = await self.sup.store.get_jobs([i for i in pending if i not in known])
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
            self.sup.events.publish(
                {"event": event, "job_id": job_id, "job": job},
                job["queue"], job["task"], job["run_id"],
            )
            if final:
                for ended in self.sup.waiters.pop(job_id, ()):
                    try:
                        ended(job)
                    except Exception:  # noqa: BLE001 - one waiter must not stop the rest
                        log.exception("error telling a waiter that job %d ended", job_id)

