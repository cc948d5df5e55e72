"""Job states, the events that move a job between them, and the one transition
table that decides every change. Named once; this module imports nothing of
hostqueue's, and every other module (the supervisor, recovery at start,
immediate mode) moves jobs only through ``transition()``.

A job's public status is one of ``JobStatus``. Inside a supervisor a pending
job is either waiting (``PENDING``) or handed to a worker ahead of time and not
started (``HELD``); both read ``pending`` to everyone, and the store holds
both as ``pending``: a held job has no ``started_at``, no ``started`` event,
and does not count as running. ``RUNNING`` begins when the task really starts.

::

    (new) --submitted--> pending --handed--> held --started--> running
                         ^   ^  <--returned--'                  |
                         |   '-------- retried (attempt failed) -+--> completed (succeeded)
                         '------- interrupted (drain), recovered +--> failed (failed; or recovered
                                  (supervisor died; uncharged)   |    after 3 interruptions)
      pending, held --aborted--> cancelled <--------- aborted ---'
      pending, held --expired--> expired
      failed, cancelled, expired --revived--> pending   (an operator's retry)

The store writes each transition guarded by the stored status it leaves
(``stored(state)``), so that no late or duplicate message moves a job twice.
"""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """A job's status as clients and the store see it."""

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


class State(str, enum.Enum):
    """Where a job is, as the supervisor knows it: the public states, and ``HELD``
    (handed to a worker, not started; it reads and is stored as ``pending``)."""

    PENDING = "pending"
    HELD = "held"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


class Event(str, enum.Enum):
    SUBMITTED = "submitted"      # a client added it
    HANDED = "handed"            # given to a worker ahead of its start
    RETURNED = "returned"        # given back unstarted (taken back, worker retired or died)
    STARTED = "started"          # its task started in a worker
    SUCCEEDED = "succeeded"      # the task returned
    FAILED = "failed"            # a permanent error, or no attempt left
    RETRIED = "retried"          # the attempt failed; it runs again at run_at
    ABORTED = "aborted"          # a client aborted it
    EXPIRED = "expired"          # its deadline passed before it could start
    INTERRUPTED = "interrupted"  # the supervisor stopped it (drain, fast stop): uncharged
    RECOVERED = "recovered"      # found running at start: the supervisor had died
    REVIVED = "revived"          # an operator retried an ended job

    def __str__(self) -> str:
        return self.value


S, E = State, Event
_ENDED = (S.FAILED, S.CANCELLED, S.EXPIRED)

# (state it leaves, event) -> the states it may lead to. None: the job is new.
TRANSITIONS: dict[tuple[State | None, Event], frozenset[State]] = {
    (None, E.SUBMITTED): frozenset({S.PENDING}),
    (S.PENDING, E.HANDED): frozenset({S.HELD}),
    (S.HELD, E.RETURNED): frozenset({S.PENDING}),
    (S.HELD, E.STARTED): frozenset({S.RUNNING}),
    (S.RUNNING, E.SUCCEEDED): frozenset({S.COMPLETED}),
    (S.RUNNING, E.FAILED): frozenset({S.FAILED}),
    (S.RUNNING, E.RETRIED): frozenset({S.PENDING}),
    (S.PENDING, E.ABORTED): frozenset({S.CANCELLED}),
    (S.HELD, E.ABORTED): frozenset({S.CANCELLED}),
    (S.RUNNING, E.ABORTED): frozenset({S.CANCELLED}),
    (S.PENDING, E.EXPIRED): frozenset({S.EXPIRED}),
    (S.HELD, E.EXPIRED): frozenset({S.EXPIRED}),
    (S.RUNNING, E.INTERRUPTED): frozenset({S.PENDING}),
    (S.RUNNING, E.RECOVERED): frozenset({S.PENDING, S.FAILED}),
    **{(s, E.REVIVED): frozenset({S.PENDING}) for s in _ENDED},
}

# Every state a transition leads to; FINAL ones lead nowhere but through REVIVED.
REACHABLE = frozenset(s for targets in TRANSITIONS.values() for s in targets)
FINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED})

# An interruption by the supervisor's death uses up no attempt; this many in a row
# end the job failed, so that a job that takes the host down cannot loop forever.
MAX_INTERRUPTIONS = 3


class TransitionError(ValueError):
    """A change of state the table does not have: a bug, or a late message."""


def transition(state: State | None, event: Event, to: State | None = None) -> State:
    """The state ``event`` leads to from ``state`` (``to`` picks one where the table
    allows several). Raises TransitionError for an edge the table does not have."""
    targets = TRANSITIONS.get((state, event))
    if targets is None:
        where = state.value if state is not None else "(new)"
        raise TransitionError(f"no transition from {where} on {event.value}")
    if to is None:
        if len(targets) != 1:
            raise TransitionError(f"{event.value} from {state} needs a target: one of {sorted(targets)}")
        return next(iter(targets))
    if to not in targets:
        raise TransitionError(f"{event.value} cannot lead from {state} to {to.value}")
    return to


def stored(state: State) -> str:
    """The status the store (and every client) holds for a state."""
    return JobStatus.PENDING.value if state is State.HELD else state.value


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


# Events streamed to watchers; one per change of public status, plus progress.
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
