"""A write batch: the writes of one or more loop turns, as intentions, applied by
the store in one transaction (the group commit, supervisor/committer.py).

Each write is ``(kind, params)``: a kind names an intention (add jobs, start,
finish, retry later, ...) that every store engine maps to its own statements;
the params are in the order that engine's statement for it takes them. A write
about one existing job has that job's id as its last parameter.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# Writes about one existing job, whose id is their last parameter.
JOB_WRITES = frozenset({
    "start", "finish", "retry_later", "requeue", "cancel_pending", "request_abort",
    "revive", "record_progress",
})
# Writes that move a job from one state to another, each guarded by the state it
# leaves: the store counts those that found their job in another state.
TRANSITION_WRITES = frozenset({
    "start", "finish", "retry_later", "requeue", "cancel_pending", "revive",
})
NO_NEW_JOBS = 1 << 62

Op = tuple[str, tuple[Any, ...]]


@dataclass
class Segment:
    """One submit's new rows, the writes about those jobs that followed, and the
    callbacks waiting for them; or, with no rows, writes in arrival order."""

    first_id: int = NO_NEW_JOBS
    rows: int = 0
    ops: list[Op] = field(default_factory=list)
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    # run before every other callback (jobs handed to their workers)
    first_callbacks: list[Callable[[], None]] = field(default_factory=list)
    # (on_commit, on_failure) of its submit
    submits: list[tuple[Callable[[], None], Callable[[BaseException], None]]] = field(
        default_factory=list
    )


@dataclass
class WriteBatch:
    """Writes gathered during one or more loop turns, applied in one transaction.

    Job ids only grow, so a write about a job older than every new job of the
    batch depends on none of its inserts: such writes (``early``) go first, and
    a write about a new job goes right after that job's submit (its segment),
    not behind later submits. split() can then commit a backlog of submits in
    several short transactions, and a start or an outcome never waits behind all
    of it. Other writes keep their arrival order. Consecutive writes of one kind
    go to SQLite together.
    """

    early: list[Op] = field(default_factory=list)
    early_callbacks: list[Callable[[], None]] = field(default_factory=list)
    early_first_callbacks: list[Callable[[], None]] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    # first ids of the segments that add jobs, in order, and those segments
    _firsts: list[int] = field(default_factory=list)
    _adding: list[Segment] = field(default_factory=list)
    new_rows: int = 0
    # when its first write arrived (monotonic)
    opened: float = 0.0
    # strictly in arrival order (after retried writes were put first)
    ordered: bool = False
    _size: int = 0

    def _last(self) -> Segment:
        if not self.segments:
            self.segments.append(Segment())
        return self.segments[-1]

    def _segment_of(self, job_id: int) -> Segment | None:
        """The segment that adds this job, or None for a job older than them all."""
        if self.ordered:
            return self._last()
        i = bisect.bisect_right(self._firsts, job_id)
        return self._adding[i - 1] if i else None

    def _touch(self) -> None:
        if not self._size:
            self.opened = time.monotonic()
        self._size += 1

    def add(self, kind: str, params: tuple[Any, ...]) -> None:
        self._touch()
        if kind in JOB_WRITES:
            seg = self._segment_of(params[-1])
            if seg is None:
                self.early.append((kind, params))
            else:
                seg.ops.append((kind, params))
        else:
            self._last().ops.append((kind, params))

    def add_submit(
        self,
        first_id: int,
        count: int,
        params: tuple[Any, ...],
        extra: list[Op],
        on_commit: Callable[[], None],
        on_failure: Callable[[BaseException], None],
        kind: str = "add_jobs",
    ) -> None:
        """The jobs first_id .. first_id + count - 1 of one submit ("add_jobs" params;
        kind "add_released" on a store shared by several hosts, for jobs this host
        does not keep), with the writes that stand or fall with them."""
        seg = Segment(first_id=first_id if count else NO_NEW_JOBS, rows=count)
        if count:
            seg.ops.append((kind, params))
        seg.ops.extend(extra)
        seg.submits.append((on_commit, on_failure))
        if not self._size:
            self.opened = time.monotonic()
        self._size += count + len(extra)
        self.segments.append(seg)
        if count and not self.ordered:
            self._firsts.append(seg.first_id)
            self._adding.append(seg)
        self.new_rows += count

    def hold_new(self, job_id: int, worker_pid: int) -> bool:
        """A job of a one-job submit not yet committed was handed to a worker: its row
        is written held by that worker ("add_held": pending, worker_pid set), which
        keeps it out of the index of waiting jobs it would leave again at once.
        False when the job is not such a submit of this batch."""
        if self.ordered:
            return False
        seg = self._segment_of(job_id)
        if seg is None or seg.rows != 1 or seg.first_id != job_id or not seg.ops \
                or seg.ops[0][0] != "add_jobs":
            return False
        seg.ops[0] = ("add_held", seg.ops[0][1] + (worker_pid,))
        return True

    def after_commit(self, callback: Callable[[], None], job_ids: Iterable[int] | None = None,
                     first: bool = False) -> None:
        """Run callback once everything added so far is committed; given job_ids,
        once everything added so far about those jobs is. With first, before the
        callbacks without it (submits' included)."""
        if job_ids is not None and not self.ordered:
            newest = max(job_ids, default=-1)
            seg = self._segment_of(newest)
            if seg is None:
                (self.early_first_callbacks if first else self.early_callbacks).append(callback)
            else:
                (seg.first_callbacks if first else seg.callbacks).append(callback)
            return
        seg = self._last()
        (seg.first_callbacks if first else seg.callbacks).append(callback)

    @property
    def has_callbacks(self) -> bool:
        return bool(self.early_callbacks or self.early_first_callbacks) or any(
            seg.callbacks or seg.first_callbacks or seg.submits for seg in self.segments
        )

    def all_ops(self) -> list[Op]:
        ops = list(self.early)
        for seg in self.segments:
            ops.extend(seg.ops)
        return ops

    def submits(self) -> list[tuple[Callable[[], None], Callable[[BaseException], None]]]:
        return [pair for seg in self.segments for pair in seg.submits]

    def callbacks(self) -> list[Callable[[], None]]:
        """After a commit: those asked to run first, then submits' on_commit, then
        the rest in order."""
        firsts = self._first_callbacks()
        return firsts + [ok for ok, _ in self.submits()] + self.callbacks_without_submits(firsts=False)

    def _first_callbacks(self) -> list[Callable[[], None]]:
        out = list(self.early_first_callbacks)
        for seg in self.segments:
            out.extend(seg.first_callbacks)
        return out

    def split(self, max_rows: int) -> "WriteBatch":
        """Keep the early writes and the first segments adding max_rows new rows (at
        least one); return the rest as a new batch. A transaction stays short."""
        if self.new_rows <= max_rows:
            return WriteBatch()
        rows = 0
        cut = 0
        for i, seg in enumerate(self.segments):
            if rows >= max_rows and seg.rows:
                cut = i
                break
            rows += seg.rows
        if not cut:
            return WriteBatch()
        rest = WriteBatch(segments=self.segments[cut:], ordered=self.ordered, opened=self.opened)
        for seg in rest.segments:
            rest._size += len(seg.ops) + max(seg.rows - 1, 0)
            rest.new_rows += seg.rows
            if seg.rows and not rest.ordered:
                rest._firsts.append(seg.first_id)
                rest._adding.append(seg)
        del self.segments[cut:]
        self.new_rows = rows
        self._size -= rest._size
        return rest

    def prepend(self, failed: "WriteBatch", ops: list[Op]) -> None:
        """Put writes (and the callbacks) of a failed batch first, to be retried; this
        batch's early writes follow them. From now on, writes keep arrival order."""
        head = Segment(ops=ops + self.early, callbacks=failed.callbacks_without_submits(firsts=False),
                       first_callbacks=failed._first_callbacks() + self.early_first_callbacks)
        head.callbacks.extend(self.early_callbacks)
        self.early = []
        self.early_callbacks = []
        self.early_first_callbacks = []
        self.segments.insert(0, head)
        self._size += len(ops)
        self.ordered = True
        self._firsts = []
        self._adding = []
        if ops:
            self.opened = failed.opened or self.opened

    def callbacks_without_submits(self, firsts: bool = True) -> list[Callable[[], None]]:
        out = self._first_callbacks() if firsts else []
        out.extend(self.early_callbacks)
        for seg in self.segments:
            out.extend(seg.callbacks)
        return out

    def newest_id(self) -> int:
        """The highest id of the jobs this batch adds (0: none)."""
        newest = 0
        for seg in self.segments:
            if seg.rows and seg.first_id + seg.rows - 1 > newest:
                newest = seg.first_id + seg.rows - 1
        return newest

    def __len__(self) -> int:
        """Writes in the batch, counting each new job as one."""
        return self._size
