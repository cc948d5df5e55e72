"""Group commit: every write of a loop turn (and of the turns a commit takes) in one transaction.

The first write of a turn schedules a flush with ``call_soon``, so the flush
runs after the rest of the turn's callbacks have added theirs. While a
transaction is in flight, new writes gather in the next batch, which is
flushed as soon as the first one commits. Nothing waits on a timer.

A submit is acknowledged from ``after_commit``; if the transaction fails, its
jobs were never stored and ``on_submit_failure`` tells its client so. Other
writes (claims, outcomes, ...) describe state the supervisor already acts on;
they are carried into the next attempt, retried with backoff until the store
accepts them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable

from hostqueue.store.base import Store, StoreBusy, StoreCorrupt, StoreError, StoreFenced
from hostqueue.store.batch import WriteBatch
from hostqueue.supervisor.background import spawn

log = logging.getLogger("hostqueue.store")

# New jobs per transaction, roughly (whole submits only): a larger backlog of
# submits commits in several, so that the claims and outcomes arriving
# meanwhile wait for one of them, not for all.
MAX_NEW_ROWS = 4000

# Written only together with the jobs they submit: refused with them.
SUBMIT_KINDS = frozenset({"add_jobs", "add_held", "add_released", "save_schedule"})

# A write this soon after the last commit ended, with other jobs in flight, means
# load: its transaction waits one more loop turn for company. Otherwise (a lone
# job's next step) it commits in the turn it arrived.
BUSY_GAP = 0.0002


class GroupCommitter:
    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop,
                 in_flight: Callable[[], int] = lambda: 2,
                 on_commit: Callable[[WriteBatch], None] | None = None) -> None:
        self.store = store
        self.loop = loop
        # Jobs running or ready: with one at most, no other write is coming to share
        # a transaction with, however close the last commit was.
        self.in_flight = in_flight
        # Told of every committed batch, before its callbacks: what the store now holds.
        self.on_commit = on_commit
        # While held (hold()), no transaction starts: a reader may open a snapshot
        # that matches what on_commit has been told.
        self._holds = 0
        self._on_quiet: list[Callable[[], None]] = []
        self.batch = WriteBatch()
        self._flushing = False
        self._scheduled = False
        self._retry_delay = 0.0
        self.commits = 0
        # Recent time from a write's arrival to its commit (EWMA, seconds): how far
        # ahead a worker must be given work so that it never waits for its claims.
        self.commit_latency = 0.0
        self.failures = 0
        self.last_error: str | None = None
        # Set while a failed transaction waits to be retried: new submits are
        # refused at once instead of waiting for a store that cannot take them.
        self.failing = False
        # What the last failure was: "busy" (another process's lock), "corrupt" (the
        # file is damaged: retried rarely), "error" (disk full, read-only, ...).
        self.failure_kind: str | None = None
        # Reads waiting for the writes before them: released as well when writes fail,
        # so that a read never waits on a store that refuses writes.
        self._read_waiters: set[asyncio.Future[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._gathered = False
        self._last_end = 0.0  # when the last commit ended (monotonic)
        # Every job with an id up to this one has its INSERT committed (or never will:
        # its submit failed). Ids only grow and submits commit in order.
        self.committed_through = 0
        # Several hosts: ids this host did not hand out (jobs claimed from the store).
        self.foreign: Callable[[int], bool] | None = None
        self.refused = 0  # guarded transitions that found their job elsewhere (bugs)

    def add(self, kind: str, params: tuple[Any, ...]) -> None:
        self.batch.add(kind, params)
        self._schedule()

    def hold_new(self, job_id: int, worker_pid: int) -> None:
        """The uncommitted one-job submit of job_id was handed to this worker (batch.py)."""
        self.batch.hold_new(job_id, worker_pid)

    def after_commit(self, callback: Callable[[], None], job_ids: Iterable[int] | None = None,
                     first: bool = False) -> None:
        """Run callback once everything added so far is committed; given job_ids,
        once everything added so far about those jobs is. With first, before the
        other callbacks of that commit (submits' acknowledgements included)."""
        self.batch.after_commit(callback, job_ids, first)
        self._schedule()

    def add_submit(
        self,
        first_id: int,
        count: int,
        params: tuple[Any, ...],
        on_commit: Callable[[], None],
        on_failure: Callable[[BaseException], None],
        extra: list[tuple[str, tuple[Any, ...]]] | None = None,
        kind: str = "add_jobs",
    ) -> None:
        """Add the jobs of one submit (and writes that stand or fall with them);
        exactly one of the callbacks runs, after the transaction ends."""
        self.batch.add_submit(first_id, count, params, list(extra or ()), on_commit, on_failure,
                              kind)
        self._schedule()

    def inserted(self, job_id: int) -> bool:
        """Whether the job's row is committed (a job of this host's submits once its
        INSERT is; a job claimed from the store always)."""
        return job_id <= self.committed_through or (
            self.foreign is not None and self.foreign(job_id))

    async def barrier(self, reads: bool = False) -> None:
        """Wait until everything added so far is committed. With reads (a read that
        follows), not while the store refuses writes: the read then sees what is
        committed, at once, instead of waiting for a full disk to empty."""
        if not len(self.batch) and not self._flushing:
            return
        if reads and self.failing:
            return
        done: asyncio.Future[None] = self.loop.create_future()

        def release() -> None:
            if not done.done():
                done.set_result(None)

        self.after_commit(release)
        if reads:
            self._read_waiters.add(done)
            done.add_done_callback(self._read_waiters.discard)
        await done

    def hold(self, quiet: Callable[[], None]) -> None:
        """Start no transaction until release(); call quiet() once none is in flight
        (at once, or when the one in flight has ended)."""
        self._holds += 1
        if self._flushing:
            self._on_quiet.append(quiet)
        else:
            quiet()

    def release(self) -> None:
        self._holds -= 1
        if not self._holds and (len(self.batch) or self.batch.has_callbacks):
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._flushing and not self._holds:
            self._scheduled = True
            self._idle.clear()
            self.loop.call_soon(self._start)

    def _start(self) -> None:
        if (not self._gathered and time.monotonic() - self._last_end < BUSY_GAP
                and self.in_flight() > 1):
            # Commits follow each other closely: gather one more loop turn's writes
            # (the other workers' outcomes, more submits) into this transaction.
            self._gathered = True
            self.loop.call_soon(self._start)
            return
        self._gathered = False
        self._scheduled = False
        if self._flushing or self._holds:
            return  # release() schedules it again
        self._flushing = True
        # Since a failure, writes go to the store's thread until one commits: a
        # store that blocks (busy, slow disk) never blocks the loop.
        handover: float | None = 0.0
        if self.last_error is None and self.store.can_apply_now(len(self.batch)):
            try:
                handover = self._commit_here()
            except BaseException:
                self._flush_done()
                raise
        if handover is None:
            self._flush_done()
        else:
            spawn(self._flush_loop(handover), "group commit")

    def _commit_here(self) -> float | None:
        """Commit a small batch (no split needed) right here, in this turn: no task,
        no hop. None when done; else the delay after which the flush task takes over."""
        batch = self.batch
        try:
            if len(batch) and not self.store.apply_now(batch):
                return 0.0  # the connection was taken after all: through its thread
        except Exception as exc:  # noqa: BLE001 - the batch must not be lost
            self.batch = WriteBatch()
            self._failed(batch, self._as_store_error(exc))
            # Writes to retry: after a delay, submits refused meanwhile.
            return self._retry_delay if self.failing else None
        self.batch = WriteBatch()
        self._committed(batch)
        return None

    async def _flush_loop(self, delay: float = 0.0) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)
            while (len(self.batch) or self.batch.has_callbacks) and not self._holds:
                batch = self.batch
                self.batch = batch.split(MAX_NEW_ROWS)
                try:
                    if len(batch):
                        await self.store.apply(batch)
                except Exception as exc:  # noqa: BLE001 - the batch must not be lost
                    self._failed(batch, self._as_store_error(exc))
                    if self.failing:
                        await asyncio.sleep(self._retry_delay)
                    continue
                self._committed(batch)
        finally:
            self._flush_done()

    @staticmethod
    def _as_store_error(exc: Exception) -> StoreError:
        """A StoreError as it is; anything else is a bug, logged with its traceback,
        and handled like a refused write: submits refused, other writes retried."""
        if isinstance(exc, StoreError):
            return exc
        log.error("unexpected error committing a batch (a bug: please report it)", exc_info=exc)
        return StoreError(f"unexpected error writing to the store: {exc!r}")

    def _flush_done(self) -> None:
        self._flushing = False
        self._idle.set()
        quiet, self._on_quiet = self._on_quiet, []
        for callback in quiet:
            callback()
        if len(self.batch) or self.batch.has_callbacks:
            self._schedule()

    def _failed(self, batch: WriteBatch, exc: StoreError) -> None:
        """A refused submit leaves nothing to retry: the next write is tried at once.
        Other writes are retried after a growing delay, and submits are refused
        meanwhile (``failing``). A fenced store (another host took this one's jobs
        over) takes nothing more: its writes are dropped, its submits refused."""
        if isinstance(exc, StoreFenced):
            self._fenced_drop(batch, exc)
            return
        self.failures += 1
        self.last_error = str(exc)
        self.failure_kind = ("busy" if isinstance(exc, StoreBusy)
                             else "corrupt" if isinstance(exc, StoreCorrupt) else "error")
        self._carry_over(batch, exc)
        self.failing = bool(len(self.batch))
        for waiter in list(self._read_waiters):
            if not waiter.done():
                waiter.set_result(None)
        if self.failing:
            # A damaged file does not heal: retried once a minute, not every few seconds.
            cap = 60.0 if self.failure_kind == "corrupt" else 5.0
            self._retry_delay = min(max(self._retry_delay * 2, 0.1), cap)
            log.error("%s; retrying in %.1f s", exc, self._retry_delay)
        else:
            log.error("%s; the submit was refused", exc)

    def _committed(self, batch: WriteBatch) -> None:
        self._last_end = time.monotonic()
        newest = batch.newest_id()
        if newest > self.committed_through:
            self.committed_through = newest
        refused = self.store.refused_transitions()
        if refused:
            self.refused += refused
            log.error("%d writes found their job in another state than the one they leave,"
                      " and changed nothing (a bug: please report it)", refused)
        if len(batch):  # callbacks alone prove nothing about the store
            if self.on_commit is not None:
                try:
                    self.on_commit(batch)
                except Exception:  # noqa: BLE001 - the callbacks must still run
                    log.exception("error noting a commit")
            took = self._last_end - batch.opened
            self.commit_latency += (took - self.commit_latency) * 0.2
            if self.failing or self.last_error:
                log.warning("the store takes writes again")
            self.failing = False
            self._retry_delay = 0.0
            self.last_error = None
        self.commits += 1
        for callback in batch.callbacks():
            try:
                callback()
            except Exception:  # noqa: BLE001 - one bad callback must not stop the rest
                log.exception("error in a post-commit callback")

    def _fenced_drop(self, batch: WriteBatch, exc: StoreFenced) -> None:
        self.failures += 1
        self.last_error = str(exc)
        self.failure_kind = "fenced"
        self.failing = True
        for _, on_failure in batch.submits():
            try:
                on_failure(exc)
            except Exception:  # noqa: BLE001
                log.exception("error in a submit-failure callback")
        for waiter in list(self._read_waiters):
            if not waiter.done():
                waiter.set_result(None)

    def _carry_over(self, batch: WriteBatch, exc: StoreError) -> None:
        """Submits of a failed batch are refused; the rest goes first into the next attempt."""
        for _, on_failure in batch.submits():
            try:
                on_failure(exc)
            except Exception:  # noqa: BLE001
                log.exception("error in a submit-failure callback")
        kept = [op for op in batch.all_ops() if op[0] not in SUBMIT_KINDS]
        self.batch.prepend(batch, kept)

    @property
    def busy(self) -> bool:
        return self._flushing or bool(len(self.batch))

    async def wait_idle(self) -> None:
        while self._flushing or self._scheduled or len(self.batch):
            await self._idle.wait()
            await asyncio.sleep(0)
