"""Job states and the transitions between them, named once.

This module imports nothing of hostqueue's; every other module names states
through it.

    pending -> running -> completed
       |          |-> pending (retry, run_at = now + backoff)
       |          |-> failed
       |          '-> cancelled (abort while running)
       |-> cancelled (abort before start)
       '-> expired (deadline passed)
"""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)
UNFINISHED_STATES = frozenset({JobStatus.PENDING, JobStatus.RUNNING})
ALL_STATES = tuple(s.value for s in JobStatus)

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset(
        {JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.EXPIRED}
    ),
    JobStatus.RUNNING: frozenset(
        {JobStatus.COMPLETED, JobStatus.PENDING, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    # A finished job comes back only through an operator's retry.
    JobStatus.FAILED: frozenset({JobStatus.PENDING}),
    JobStatus.CANCELLED: frozenset({JobStatus.PENDING}),
    JobStatus.EXPIRED: frozenset({JobStatus.PENDING}),
    JobStatus.COMPLETED: frozenset(),
}


def check_transition(old: JobStatus | str, new: JobStatus | str) -> None:
    """Raise ValueError unless the diagram above has the edge old -> new."""
    old_s, new_s = JobStatus(old), JobStatus(new)
    if new_s not in TRANSITIONS[old_s]:
        raise ValueError(f"job cannot go from {old_s.value} to {new_s.value}")


class WorkerState(str, enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"
    EXITED = "exited"

    def __str__(self) -> str:
        return self.value


class SupervisorState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


# Events streamed to watchers; one per transition, plus progress.
EVENTS = (
    "submitted",
    "started",
    "progress",
    "retrying",
    "completed",
    "failed",
    "cancelled",
    "expired",
)
