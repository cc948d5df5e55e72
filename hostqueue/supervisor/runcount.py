"""Running jobs by queue, as the store holds them: for ``stats`` and ``/metrics``.

No index of the store lists running jobs (it would cost every job a write when
it starts and one when it ends, on the path of a lone job's two commits), so
the supervisor counts them: a job counts from the commit of its start to the
commit of the write that takes it out of running. (A job whose start and end
reach the store in one write never counts: it never was running there.)

``stats`` reads everything else from one read snapshot of the store, in the
store's reader thread. To count running jobs as of that snapshot, the committer
is held while the snapshot opens: no transaction is in flight then, so these
counts and the snapshot describe the same commit.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

from hostqueue.supervisor.committer import GroupCommitter
from hostqueue.store.batch import WriteBatch

# Writes that take a running job out of running (to an end, or back to pending).
LEAVE_RUNNING = frozenset({"finish", "retry_later", "requeue"})
# Writes that clear a held row's worker_pid or end it (the SQLite store's index of
# waiting jobs leaves held rows out: they are counted here).
LEAVE_HELD = frozenset({"start", "finish", "retry_later", "requeue", "cancel_pending"})
# How long the reader waits for the loop to hold its commits: only a loop that
# is stopping takes longer, and the counts are then as of a moment later.
HOLD_WAIT = 5.0


class RunningCount:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.committer: GroupCommitter | None = None
        self.starts: dict[int, str] = {}  # starts not yet committed: job id -> queue
        self.jobs: dict[int, str] = {}  # running in the store: job id -> queue
        self.by_queue: dict[str, int] = {}
        # Rows written held ("add_held": pending with a worker_pid) and not changed since.
        self.held: dict[int, str] = {}
        self.held_by_queue: dict[str, int] = {}

    def started(self, job_id: int, queue: str) -> None:
        """The start of this job joined the write batch."""
        self.starts[job_id] = queue

    def committed(self, batch: WriteBatch) -> None:
        """The committer's on_commit: the batch's writes are in the store now."""
        held = self.held
        for kind, params in batch.all_ops():
            if held and kind in LEAVE_HELD:
                queue = held.pop(params[-1], None)
                if queue is not None:
                    self._count(self.held_by_queue, queue, -1)
            if kind == "add_held":
                held[params[0]] = params[2]
                self._count(self.held_by_queue, params[2], 1)
            elif kind == "start":
                job_id = params[-1]
                queue = self.starts.pop(job_id, None)
                if queue is not None and job_id not in self.jobs:
                    self.jobs[job_id] = queue
                    self.by_queue[queue] = self.by_queue.get(queue, 0) + 1
            elif kind in LEAVE_RUNNING:
                queue = self.jobs.pop(params[-1], None)
                if queue is not None:
                    left = self.by_queue[queue] - 1
                    if left:
                        self.by_queue[queue] = left
                    else:
                        del self.by_queue[queue]

    @staticmethod
    def _count(counts: dict[str, int], queue: str, n: int) -> None:
        left = counts.get(queue, 0) + n
        if left:
            counts[queue] = left
        else:
            del counts[queue]

    def in_snapshot(self, open_snapshot: Callable[[], None]) -> tuple[dict[str, int], dict[str, int]]:
        """Called in the store's reader thread: open its snapshot (open_snapshot())
        while the loop starts no commit, and return the running jobs and the held rows
        by queue as of that snapshot."""
        committer = self.committer
        assert committer is not None
        quiet = threading.Event()
        try:
            self.loop.call_soon_threadsafe(committer.hold, quiet.set)
        except RuntimeError:  # the loop is closed: nothing commits any more
            open_snapshot()
            return dict(self.by_queue), dict(self.held_by_queue)
        try:
            quiet.wait(HOLD_WAIT)
            open_snapshot()
            return dict(self.by_queue), dict(self.held_by_queue)
        finally:
            try:
                self.loop.call_soon_threadsafe(committer.release)
            except RuntimeError:
                pass
