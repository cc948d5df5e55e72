"""The store's interface: what the supervisor asks of a store, in intentions.

The supervisor never speaks SQL. It gathers writes on a ``WriteBatch`` (batch.py:
add jobs, start, finish, retry later, requeue, cancel, revive, record
progress and attempts, forget ended jobs, save settings and schedules), hands
the batch to ``apply()`` (or ``apply_now()``) to commit in one transaction, and
reads through the methods below. Each engine (``sqlite.py``; a PostgreSQL store
later) maps every write kind to its statements and guards each transition by
the state it leaves.

Errors: ``StoreError`` for a store that refuses a write or read (disk full,
read-only, corrupt); ``StoreBusy``, a ``StoreError``, for one that another
process keeps locked past the store's patience.
"""

from __future__ import annotations

import abc
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from hostqueue.store.batch import WriteBatch

JOB_COLUMNS = (
    "id", "task", "queue", "status", "args", "result", "error", "attempts", "max_attempts",
    "priority", "progress", "progress_message", "key", "run_id", "created_at", "started_at",
    "finished_at", "run_at", "deadline", "timeout", "abort_requested", "worker_pid",
    "cpu_seconds", "peak_rss",
)


def job_row_to_dict(row: Any) -> dict[str, Any]:
    """A row of JOB_COLUMNS (either engine's) as the protocol's job object."""
    import orjson

    job = dict(zip(JOB_COLUMNS, row))
    job["args"] = orjson.loads(job["args"]) if job["args"] is not None else {}
    job["result"] = orjson.loads(job["result"]) if job["result"] is not None else None
    job["error"] = orjson.loads(job["error"]) if job["error"] is not None else None
    job["abort_requested"] = bool(job["abort_requested"])
    if job["status"] == "pending":
        job["worker_pid"] = None  # held by a worker, maybe, but not started: nobody's yet
    return job


def state_totals(rows: Iterable[tuple[str, str, int]]) -> dict[str, Any]:
    """Counts by state, and by queue and state, from (queue, state, count) rows."""
    names = ("pending", "scheduled", "running", "completed", "failed", "cancelled", "expired")
    totals: dict[str, Any] = {n: 0 for n in names}
    queues: dict[str, dict[str, int]] = {}
    for queue, state, n in rows:
        totals[state] = totals.get(state, 0) + n
        per = queues.setdefault(queue, {k: 0 for k in names})
        per[state] = per.get(state, 0) + n
    totals["queues"] = queues
    return totals


class StoreError(Exception):
    """The store could not carry out a write or a read (disk full, read-only, corrupt)."""


class StoreBusy(StoreError):
    """Another process holds the store's lock (a backup, a sqlite3 shell) past our patience."""


class StoreCorrupt(StoreError):
    """The store's file is damaged: retrying cannot help; it must be restored or recovered."""


class StoreKeyTaken(StoreError):
    """A submit's idempotency key is held by an unfinished job another host stored
    meanwhile (a store shared by several hosts): its transaction stored nothing."""

    def __init__(self, message: str, key: str | None) -> None:
        super().__init__(message)
        self.key = key


class StoreFenced(StoreError):
    """Another supervisor took the store over (this one lost its lock while cut off):
    nothing this one does may be stored any more; it must stop its jobs and exit."""


@dataclass
class PendingSet:
    """Every pending job at start, in the compact shapes the ready index keeps."""

    # lane -> priority -> ids in increasing order
    ready: dict[tuple[str, str], dict[int, "array[int]"]] = field(default_factory=dict)
    # ready jobs the scan met out of id order (the arrays above must stay sorted)
    unordered: list[tuple[tuple[str, str], int, int]] = field(default_factory=list)
    delayed: list[tuple[float, int]] = field(default_factory=list)
    deadlines: list[tuple[float, int]] = field(default_factory=list)
    keys: dict[str, int] = field(default_factory=dict)

    def add(self, row: Any, now: float) -> None:
        """One pending row (id, queue, task, priority, run_at, deadline, key), as read
        by an engine's scan."""
        job_id, queue, task, priority, run_at, deadline, key = row
        if run_at <= now:
            by_priority = self.ready.get((queue, task))
            if by_priority is None:
                by_priority = self.ready[(queue, task)] = {}
            ids = by_priority.get(priority)
            if ids is None:
                ids = by_priority[priority] = array("q")
            if ids and job_id < ids[-1]:
                self.unordered.append(((queue, task), priority, job_id))
            else:
                ids.append(job_id)
        else:
            self.delayed.append((run_at, job_id))
        if deadline is not None:
            self.deadlines.append((deadline, job_id))
        if key is not None:
            self.keys[key] = job_id


@dataclass(frozen=True)
class DispatchRow:
    """What dispatch needs of a pending job whose row is not in memory."""

    id: int
    task: str
    queue: str
    args: str
    attempts: int
    max_attempts: int
    timeout: float | None
    abort_requested: bool
    run_id: str | None
    priority: int
    key: str | None
    created_at: float
    run_at: float
    deadline: float | None


@dataclass(frozen=True)
class Interrupted:
    """A job found running at start: its supervisor died while it ran."""

    id: int
    attempts: int
    interruptions: int
    worker_pid: int | None
    started_at: float | None


class Store(abc.ABC):
    """A store engine. Writes arrive as batches; reads are coroutines."""

    path: str

    # -- life ---------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, migrate the schema, and check the store takes writes."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- writes -------------------------------------------------------------------

    @abc.abstractmethod
    def can_apply_now(self, size: int) -> bool:
        """Whether apply_now() would take a batch of this many writes at once."""

    @abc.abstractmethod
    def apply_now(self, batch: WriteBatch) -> bool:
        """Commit a small batch without leaving the caller's thread, never waiting on a
        lock; False (nothing done) when that cannot be done now: use apply()."""

    @abc.abstractmethod
    async def apply(self, batch: WriteBatch) -> None:
        """Commit every write of the batch in one transaction, off the event loop."""

    def on_fenced(self, callback: Callable[[StoreFenced], None]) -> None:
        """Call callback if another supervisor takes the store over while this one
        runs (a store shared over the network); a local file cannot be."""

    def refused_transitions(self) -> int:
        """How many guarded transitions, since the last call, found their job in
        another state than the one they leave (and so changed nothing)."""
        return 0

    # -- start-up -----------------------------------------------------------------

    @abc.abstractmethod
    async def recover_interrupted(
        self, now: float, decide: Callable[[Interrupted], tuple[str, Any]]
    ) -> tuple[int, int]:
        """Jobs left running by a supervisor that died: decide(job) says what each
        becomes (("pending", error) or ("failed", error)); returns (requeued, failed)."""

    @abc.abstractmethod
    async def load_pending(self, now: float) -> PendingSet: ...

    @abc.abstractmethod
    async def last_job_id(self) -> int: ...

    @abc.abstractmethod
    async def load_settings(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def load_schedules(self) -> dict[str, tuple[float, float | None, int | None, str, str]]: ...

    # -- reads --------------------------------------------------------------------

    @abc.abstractmethod
    async def jobs_for_dispatch(self, ids: list[int]) -> dict[int, DispatchRow]: ...

    @abc.abstractmethod
    async def get_jobs(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]: ...

    async def get_job(self, job_id: int) -> dict[str, Any] | None:
        return (await self.get_jobs([job_id])).get(job_id)

    @abc.abstractmethod
    async def list_jobs(self, status: str | None = None, queue: str | None = None,
                        task: str | None = None, run_id: str | None = None, limit: int = 100,
                        before: int | None = None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def unfinished_ids(self, run_id: str) -> list[int]: ...

    @abc.abstractmethod
    async def ended_ids(self, status: str, queue: str | None = None,
                        task: str | None = None) -> list[int]: ...

    @abc.abstractmethod
    async def count_by_state(
        self, now: float, run_id: str | None = None, scheduled_ids: list[int] | None = None,
        running: Callable[[Callable[[], None]], tuple[dict[str, int], dict[str, int]]] | None = None,
    ) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def completed_with_key(self, key: str, since: float) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def ended_before(self, cutoffs: dict[str, float], limit: int) -> list[tuple[int, str, float]]:
        """Up to ``limit`` ended jobs older than their state's cutoff: (id, status, cutoff)."""

    @abc.abstractmethod
    async def oldest_finished(self, states: list[str]) -> dict[str, float]: ...

    @abc.abstractmethod
    async def attempts_of(self, job_id: int) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def file_size(self) -> int: ...

    @staticmethod
    def setting_params(name: str, value: Any) -> tuple[str, str]:
        import orjson

        return (name, orjson.dumps(value).decode())


class SharedStore(Store):
    """A store several hosts share (PostgreSQL): what the supervisor's cluster part
    (supervisor/cluster.py) and the cross-host operations ask of it besides."""

    @abc.abstractmethod
    async def join(self, name: str, pid: int, socket_path: str, workers: int, version: str,
                   lease: float, alive: Callable[[int], bool]) -> int: ...

    @abc.abstractmethod
    def listen(self, notified: Callable[[dict[str, Any]], None] | None,
               reconnected: Callable[[], None]) -> None: ...

    @abc.abstractmethod
    async def start_listening(self) -> None: ...

    @abc.abstractmethod
    async def notify(self, notice: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def renew(self, lease: float, workers: int) -> tuple[float | None, bool, int]: ...

    @abc.abstractmethod
    def set_alone(self, alone: bool) -> None: ...

    @abc.abstractmethod
    async def try_lead(self) -> bool: ...

    @abc.abstractmethod
    async def rescue(self, now: float, decide: Callable[[Interrupted], tuple[str, Any]],
                     orphans: bool = False) -> tuple[list[tuple[int, str, int]], int, int, list[int]]: ...

    @abc.abstractmethod
    async def claim(self, count: int, now: float, paused: list[str],
                    strict: list[str] | None = None) -> tuple[list[DispatchRow], float | None]: ...

    @abc.abstractmethod
    async def claim_capped(self, queue: str, cap: int, count: int, now: float
                           ) -> tuple[list[DispatchRow], bool]: ...

    @abc.abstractmethod
    async def release(self, ids: list[int]) -> tuple[bool, float | None, float | None]: ...

    @abc.abstractmethod
    async def expire_released(self, now: float, error: dict[str, Any]
                              ) -> tuple[list[int], float | None]: ...

    @abc.abstractmethod
    async def released_by_queue(self, now: float) -> dict[str, int]: ...

    @abc.abstractmethod
    async def reserve_ids(self, count: int) -> int: ...

    @abc.abstractmethod
    async def hosts(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def cancel_released(self, job_id: int, now: float, error: dict[str, Any]) -> bool: ...

    @abc.abstractmethod
    async def unfinished_with_key(self, key: str) -> int | None: ...

    @abc.abstractmethod
    async def revive(self, job_id: int, status: str, now: float) -> bool: ...

    @abc.abstractmethod
    async def owners(self, ids: list[int]) -> dict[int, tuple[int | None, str]]:
        """job id -> (the host that holds it, or None: released; its status)."""

    @abc.abstractmethod
    def lease_lost(self) -> StoreFenced: ...

    @abc.abstractmethod
    async def leave(self) -> None: ...
