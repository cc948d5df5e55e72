"""Events of jobs, delivered to the subscribers that asked for them.

Publishing costs a dict lookup when nobody watches, so the hot path pays
nothing for this.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("hostqueue.events")

Sink = Callable[[dict[str, Any]], None]


@dataclass(eq=False)
class Subscription:
    sink: Sink
    job_id: int | None = None
    queue: str | None = None
    task: str | None = None
    run_id: str | None = None

    def matches(self, queue: str | None, task: str | None, run_id: str | None) -> bool:
        return (
            (self.queue is None or self.queue == queue)
            and (self.task is None or self.task == task)
            and (self.run_id is None or self.run_id == run_id)
        )


class EventHub:
    def __init__(self) -> None:
        self.by_job: dict[int, list[Subscription]] = {}
        self.everything: list[Subscription] = []

    def subscribe(self, sub: Subscription) -> None:
        if sub.job_id is None:
            self.everything.append(sub)
        else:
            self.by_job.setdefault(sub.job_id, []).append(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.job_id is None:
            if sub in self.everything:
                self.everything.remove(sub)
            return
        subs = self.by_job.get(sub.job_id)
        if subs and sub in subs:
            subs.remove(sub)
            if not subs:
                del self.by_job[sub.job_id]

    def watching(self) -> int:
        """Event streams open: of every job (or a queue's, a task's, a run's), and of one job."""
        return len(self.everything) + sum(len(s) for s in self.by_job.values())

    def wants(self, job_id: int) -> bool:
        return bool(self.everything) or job_id in self.by_job

    def publish(
        self,
        event: dict[str, Any],
        queue: str | None = None,
        task: str | None = None,
        run_id: str | None = None,
    ) -> None:
        job_id = event["job_id"]
        event.setdefault("at", time.time())
        for sub in list(self.by_job.get(job_id, ())):
            self._deliver(sub, event)
        for sub in list(self.everything):
            if sub.matches(queue, task, run_id):
                self._deliver(sub, event)

    def _deliver(self, sub: Subscription, event: dict[str, Any]) -> None:
        try:
            sub.sink(event)
        except Exception:  # noqa: BLE001 - a broken watcher must not stop the others
            log.exception("dropping a watcher that failed")
            self.unsubscribe(sub)
