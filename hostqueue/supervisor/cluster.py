"""Several hosts sharing one PostgreSQL store: this host's lease, the jobs it claims,
what the other hosts tell it, and the rescue of hosts that went silent.

A host's job book holds only the jobs it owns (``jobs.owner``). A submit keeps
what this host can start soon (``keep()``: room = free worker slots plus a
prefetch that follows how fast its jobs end) and writes the rest *released*
(``owner`` NULL), with a NOTIFY in the same transaction; delayed jobs are always
released. A host with room claims released jobs that are due (``FOR UPDATE SKIP
LOCKED``, many per statement) into its book, and dispatch goes on as on one host.

Lease: the host's row is renewed every ``lease / 5`` seconds (the one timer that
runs while idle). Every write transaction of the host first checks that its
lease is live and holds its row until COMMIT (``fence``), so a host whose lease
lapsed stores nothing more: the supervisor stops its jobs and starts again in
place (run_supervisor), joining as a new host. A host alone (no other host
alive at its last renewal) keeps every job it is given and sends no NOTIFY;
when another appears, it releases what it cannot start soon. At each
renewal the host also rescues lapsed hosts: their waiting jobs are released and
their running ones run again (interrupted, uncharged), within one renewal of
the lapse.

What hosts tell each other (one NOTIFY per transaction, JSON): ``r`` released
jobs are ready, ``d`` when released delayed jobs come due, ``e`` jobs that ended
(a wait or watch on another host), ``a`` aborts for the owner of a job, ``p``
the paused queues. With ``--pg-notify off`` (PgBouncer in transaction mode) a
poll every ``--pg-poll`` seconds takes the place of NOTIFY.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import os
import socket
import time
from typing import Any, Callable

from hostqueue import __version__
from hostqueue.core import outcome
from hostqueue.core.states import SupervisorState
from hostqueue.store.base import Interrupted, StoreError, StoreFenced
from hostqueue.supervisor.background import spawn
from hostqueue.supervisor.timers import EarliestTimer

log = logging.getLogger("hostqueue.supervisor")

# Ids reserved at a time, and how few left before the next range is reserved.
ID_RANGE = 10_000
ID_LOW = 5_000
# Claimed beyond the free worker slots: about this many seconds of this host's
# recent pace (fast jobs: many per claim; slow ones: none beyond free slots).
PREFETCH_SECONDS = 0.05
PREFETCH_MAX = 512


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Cluster:
    def __init__(self, loop: asyncio.AbstractEventLoop, store: Any, book: Any, slots: Callable[[], int],
                 idle: Callable[[], int],
                 paused: set[str], state: Callable[[], SupervisorState], wake: Callable[[], None],
                 decide: Callable[[Interrupted], tuple[str, Any]],
                 ended_elsewhere: Callable[[list[int] | None], None],
                 abort_here: Callable[[list[int]], None],
                 paused_elsewhere: Callable[[list[str]], None],
                 ended_count: Callable[[], int], expired: Callable[[list[int]], None],
                 lease: float, notify: bool, poll: float,
                 strict: Callable[[], list[str] | None] = lambda: None,
                 caps: Callable[[], dict[str, int]] = dict,
                 progress_elsewhere: Callable[[list[Any]], None] = lambda _: None,
                 after_commit: Callable[[Callable[[], None]], None] = lambda f: f(),
                 inserted: Callable[[int], bool] = lambda job_id: True) -> None:
        self.loop = loop
        self.store = store
        self.book = book
        self._slots = slots  # worker slots (the pool's target)
        self._idle = idle  # workers idle now
        self._paused = paused
        self._state = state
        self._wake = wake  # dispatch
        self._decide = decide
        self._ended_elsewhere = ended_elsewhere
        self._abort_here = abort_here
        self._paused_elsewhere = paused_elsewhere
        self._ended_count = ended_count
        self._expired = expired  # released jobs this host expired: counted, announced
        self._strict = strict  # queues in strict order (queues.order = "strict"), or None
        self._caps = caps  # queues whose concurrency cap holds across hosts
        self._progress_elsewhere = progress_elsewhere  # watchers here of jobs elsewhere
        self._ended_seen = 0
        self._to_release: set[int] = set()  # out of the book, not yet released in the store
        self._inserted = inserted  # the committer's: a job's row is committed
        self._aborts: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._after_commit = after_commit  # the committer's: once what is written is stored
        self.lease = lease
        self.renew_every = lease / 5
        self.notify = notify
        self.poll = poll
        self.host: int | None = None
        self.name = socket.gethostname()
        self._maybe_ready = True  # released jobs may be due: a claim may find some
        self._claiming = False
        self._due_timer = EarliestTimer(self._due, time.time)
        self._expiry_timer = EarliestTimer(self._expire_now, time.time)
        self._renew_handle: asyncio.TimerHandle | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        self._stopped = False
        self._fenced = False
        # Job ids: ranges reserved in the store, this host's alone.
        self._ids = range(0)
        self._next = 0
        self._reserving: asyncio.Future[None] | None = None
        self._ranges: list[int] = []  # starts of reserved ranges (sorted), and their ends
        self._range_ends: list[int] = []
        # The pace of this host: jobs ended per second, for the prefetch.
        self._pace = 0.0
        self._pace_at = time.monotonic()
        self._pace_count = 0
        self.leader = False
        self.alone = False  # no other host alive (as of the last renewal)
        self._on_leader: Callable[[], None] | None = None
        self.rescued = 0
        self.claimed = 0
        self.claims = 0

    # == joining and leaving =======================================================

    async def join(self, socket_path: str, workers: int) -> None:
        """Join as a new host, take over what hosts gone from here left, and claim."""
        store = self.store
        self.host = await store.join(self.name, os.getpid(), os.path.abspath(socket_path), workers,
                                     __version__, self.lease, pid_alive)
        await self._rescue(orphans=True)
        _left, _lapsed, others = await store.renew(self.lease, self._slots())
        self._others(others)
        if not self.alone:
            # Hosts alone until now send no NOTIFY until their next renewal: the ends
            # of jobs waited on here are looked for once after it.
            self.loop.call_later(2.5 * self.renew_every, self._ended_elsewhere, None)
        store.listen(self._notified if self.notify else None, self._reconnected)
        if self.notify:
            await store.start_listening()
        await self._reserve(ID_RANGE)
        self.leader = await store.try_lead()
        self._renew_handle = self.loop.call_later(self.renew_every, self._renew_now)
        if not self.notify:
            self._poll_handle = self.loop.call_later(self.poll, self._poll_now)
        log.info("joined %s as host %d (lease %.1f s%s)", store.path, self.host, self.lease,
                 "" if self.notify else f"; polling every {self.poll:g} s, NOTIFY off")

    def on_leader(self, callback: Callable[[], None]) -> None:
        """callback() once this host becomes the one doing schedules and retention."""
        self._on_leader = callback

    def stop(self) -> None:
        self._stopped = True
        self._due_timer.cancel()
        self._expiry_timer.cancel()
        for handle in (self._renew_handle, self._poll_handle):
            if handle is not None:
                handle.cancel()

    def drain(self) -> None:
        """This host drains: the ready jobs it kept go to the other hosts now, not
        when it exits."""
        ids = self.book.release_ready(self._inserted)
        if ids and not self._fenced:
            spawn(self._release(ids), "release kept jobs")

    async def _release(self, ids: list[int]) -> None:
        """Jobs taken out of this host's book, released in the store (tried again at
        each renewal until it takes them: meanwhile they are this host's in the
        store and in no book)."""
        self._to_release.update(ids)
        try:
            ready, due, deadline = await self.store.release(sorted(self._to_release))
        except StoreError as exc:
            log.warning("could not give %d waiting jobs to the other hosts (%s); tried again"
                        " at the next renewal", len(self._to_release), exc)
            return
        self._to_release.clear()
        # Its own NOTIFY does not come back to this host: its timers, as the others'.
        if ready:
            self._maybe_ready = True
        if due is not None:
            self._due_timer.arm(due)
        if deadline is not None:
            self._expiry_timer.arm(deadline)

    async def leave(self) -> None:
        """A clean stop: this host's row goes; its jobs not run were given back."""
        self.stop()
        if not self._fenced:
            await self.store.leave()

    # == ids ===========================================================================

    def ids_ready(self, count: int) -> bool:
        return self._next + count <= self._ids.stop

    def take_ids(self, count: int) -> int:
        """The first of count new ids (ids_ready(count) must hold)."""
        first = self._next
        assert first + count <= self._ids.stop, "ids_ready() first"
        self._next += count
        if self._ids.stop - self._next < ID_LOW and self._reserving is None:
            self._reserving = asyncio.ensure_future(self._reserve_ahead())
        return first

    async def _reserve_ahead(self) -> None:
        try:
            await self._reserve(ID_RANGE)
        except StoreError as exc:  # ensure_ids() tries again when the ids run out
            log.warning("cannot reserve job ids ahead (%s); tried again when needed", exc)

    def peek_id(self) -> int:
        return self._next

    async def ensure_ids(self, count: int) -> None:
        """Ids for a submit of count jobs: a range of its own if it is a large one."""
        while not self.ids_ready(count):
            if self._reserving is not None:
                await asyncio.shield(self._reserving)
                continue
            self._reserving = asyncio.ensure_future(self._reserve(max(ID_RANGE, count)))
            await asyncio.shield(self._reserving)

    async def _reserve(self, count: int) -> None:
        try:
            first = await self.store.reserve_ids(count)
            if self._ranges and first == self._ids.stop:
                # No host took ids since: the range goes on (one host's ids stay
                # consecutive, as on SQLite).
                self._ids = range(self._ids.start, first + count)
                self._range_ends[-1] = first + count
            else:
                self._ids = range(first, first + count)
                self._next = first
                self._ranges.append(first)
                self._range_ends.append(first + count)
        finally:
            self._reserving = None

    def foreign(self, job_id: int) -> bool:
        """A job id this host did not hand out (a job claimed from another host's
        submit): its row was committed before this host could see it."""
        i = bisect.bisect_right(self._ranges, job_id) - 1
        return i < 0 or job_id >= self._range_ends[i]

    # == room and claims ============================================================

    def _prefetch(self) -> int:
        """About PREFETCH_SECONDS of this host's recent pace (jobs ended per second)."""
        now = time.monotonic()
        elapsed = now - self._pace_at
        if elapsed >= 0.1:
            ended = self._ended_count()
            self._pace = 0.5 * self._pace + 0.5 * (ended - self._pace_count) / elapsed
            self._pace_count, self._pace_at = ended, now
        return min(PREFETCH_MAX, int(self._pace * PREFETCH_SECONDS))

    def room(self) -> int:
        """Jobs this host can take now: its idle workers, plus its prefetch, less the
        ready jobs it has."""
        return self._idle() + self._prefetch() - self.book.ready_count

    def keep(self, count: int, ready: bool, queue: str) -> int:
        """Of a submit of count jobs here, how many this host keeps (the first ones);
        the rest are released for any host. Delayed jobs, and those of a paused
        queue, are always released (all hosts take them in order when due); a host
        alone keeps all (nobody else would run them)."""
        if self._fenced or queue in self._caps():  # a cap holds across hosts: claimed
            return 0
        if self.alone:
            return count
        if (not ready or queue in self._paused or "*" in self._paused
                or queue in self._caps()):
            return 0
        return max(0, min(count, self.room()))

    def released(self, run_at: float, deadline: float | None) -> None:
        """This host released jobs (its own NOTIFY does not come back to it)."""
        if deadline is not None:
            self._expiry_timer.arm(deadline)
        if run_at <= time.time():
            self._maybe_ready = True
            self.hungry()
        else:
            self._due_timer.arm(run_at)

    def hungry(self) -> None:
        """Dispatch has handed what it could: claim released jobs if there is room
        and there may be some (nothing is read while none can be)."""
        caps = self._caps()
        if caps:
            ended = self._ended_count()
            if ended != self._ended_seen:
                # A capped queue's job may have ended here: once its end is stored,
                # the cap may have room (the claim counts what the store says).
                self._ended_seen = ended
                self._after_commit(self._capped_room)
        if not self._maybe_ready or self._claiming or self._stopped or "*" in self._paused:
            return
        if self._state() is not SupervisorState.RUNNING:
            return
        # Right after a dispatch, the ready jobs left could not start (a pause, a
        # limit): they take no worker. An idle worker claims at once; the prefetch is
        # topped up once half of it is gone (fewer, larger claims).
        idle = self._idle()
        extra = self._prefetch()
        ready = self.book.ready_count
        if idle or (extra and ready <= extra // 2):
            want = idle + max(0, extra - ready)
            if want > 0:
                self._claiming = True
                spawn(self._claim(want), "claim released jobs")

    async def _claim(self, want: int) -> None:
        """One claim; its jobs are dispatched, and dispatch asks again (hungry())
        while there is room and the claim found as many as it asked for."""
        try:
            now = time.time()
            self._maybe_ready = False  # a NOTIFY during the claim sets it again
            caps = self._caps()
            taken = 0
            more = False
            try:
                rows, due = await self.store.claim(want, now, sorted(self._paused | set(caps)),
                                                   self._strict())
                self._take(rows)  # in the book at once, whatever comes next
                taken = len(rows)
                more = taken >= want
                if due is not None:
                    self._due_timer.arm(due)
                for queue, cap in caps.items():
                    if taken >= want:
                        break
                    if queue in self._paused:
                        continue
                    capped, _full = await self.store.claim_capped(queue, cap, want - taken, now)
                    self._take(capped)
                    taken += len(capped)
            except StoreFenced:
                return
            except StoreError as exc:
                log.error("cannot claim released jobs (tried again at the next renewal): %s", exc)
                self._maybe_ready = True
                return
            self.claims += 1
            if more or taken >= want:
                self._maybe_ready = True  # there may be more
        finally:
            self._claiming = False
        self._wake()  # dispatch, then hungry() again

    def _take(self, rows: list[Any]) -> None:
        if not rows:
            return
        self.claimed += len(rows)
        aborted = self.book.claimed(rows, time.time())
        aborted += [r.id for r in rows if r.id in self._aborts and r.id not in aborted]
        for r in rows:
            self._aborts.pop(r.id, None)
        if aborted:
            self._abort_here(aborted)

    def abort_unknown(self, ids: list[int]) -> None:
        """Aborts told for jobs in no book here: one may be in a claim on its way."""
        for job_id in ids:
            self._aborts[job_id] = None
        while len(self._aborts) > 10_000:
            self._aborts.popitem(last=False)

    def _expire_now(self) -> None:
        if not self._stopped:
            spawn(self._expire(), "expire released jobs")

    async def _expire(self) -> None:
        """Released jobs whose deadline passed while no host could take them."""
        try:
            ids, due = await self.store.expire_released(
                time.time(), outcome.error("Expired", "deadline passed before the job could start"))
        except StoreFenced:
            return
        except StoreError as exc:
            log.error("cannot expire released jobs past their deadline (tried again in 1 s): %s", exc)
            self._expiry_timer.arm(time.time() + 1.0)
            return
        if ids:
            self._expired(ids)
        if due is not None:
            self._expiry_timer.arm(due)

    def _capped_room(self) -> None:
        self._maybe_ready = True
        self.hungry()

    def resumed(self) -> None:
        """Queues were resumed: their released jobs may be claimed now."""
        self._maybe_ready = True
        self.hungry()

    def _due(self) -> None:
        self._maybe_ready = True
        self.hungry()

    # == what other hosts say =========================================================

    def _notified(self, notice: dict[str, Any]) -> None:
        if self._stopped:
            return
        if notice.get("r"):
            self._maybe_ready = True
            self.hungry()
        due = notice.get("d")
        if isinstance(due, (int, float)):
            self._due_timer.arm(float(due))
        ended = notice.get("e")
        if ended and self._caps():  # a capped queue may have room again
            self._maybe_ready = True
            self.hungry()
        if ended == "*":
            self._ended_elsewhere(None)
        elif isinstance(ended, list) and ended:
            self._ended_elsewhere([i for i in ended if isinstance(i, int)])
        aborts = notice.get("a")
        if isinstance(aborts, list) and aborts:
            self._abort_here([i for i in aborts if isinstance(i, int)])
        progress = notice.get("g")
        if isinstance(progress, list) and progress:
            self._progress_elsewhere(progress)
        paused = notice.get("p")
        if isinstance(paused, list):
            self._paused_elsewhere([q for q in paused if isinstance(q, str)])

    def progress(self, changed: list[Any]) -> None:
        """Progress sampled here (at most every 0.1 s): told to the other hosts, whose
        clients may watch these jobs, in one NOTIFY (at most ~7 KB of it)."""
        if not self.notify or self._stopped or self.alone:
            return
        entries = []
        size = 0
        for a in changed:
            message = (a.progress_message or "")[:200] or None
            entry = [a.id, a.progress, message, a.queue, a.task, a.run_id]
            size += 40 + len(a.queue) + len(a.task) + len(message or "") + len(a.run_id or "")
            if size > 7000:
                break
            entries.append(entry)
        spawn(self._tell_quietly({"g": entries}), "tell progress")

    async def _tell_quietly(self, notice: dict[str, Any]) -> None:
        try:
            await self.store.notify(notice)
        except StoreError as exc:
            log.debug("cannot tell progress to other hosts: %s", exc)

    def _reconnected(self) -> None:
        """The host's connection was down for a while: what NOTIFY said meanwhile is
        looked for once, and the advisory lock of the schedules went with it (the
        next renewal tries to take it again)."""
        if self.leader:
            log.warning("host %s: its connection to the store broke; schedules and retention"
                        " stop here until it leads again", self.host)
        self.leader = False
        self._maybe_ready = True
        self.hungry()
        self._ended_elsewhere(None)

    async def tell(self, notice: dict[str, Any]) -> None:
        """A NOTIFY to the other hosts (an abort for a job's owner, the paused queues):
        rare, so sent even by a host that believes it is alone (one may have joined
        since its last renewal)."""
        if self.notify:
            await self.store.notify(notice)

    # == lease, rescue, poll ==========================================================

    def _renew_now(self) -> None:
        self._renew_handle = None
        if not self._stopped:
            spawn(self._renew(), "renew the lease")

    async def _renew(self) -> None:
        try:
            left, lapsed, others = await self.store.renew(self.lease, self._slots())
            if left is None:
                self._fence()
                return
            self._others(others)
            if self._to_release:
                await self._release([])
            if lapsed:
                await self._rescue()
            if not self.leader:
                self.leader = await self.store.try_lead()
                if self.leader:
                    log.info("host %d now runs the schedules and retention of %s",
                             self.host, self.store.path)
                    if self._on_leader is not None:
                        self._on_leader()
            if self._maybe_ready:
                self.hungry()  # a claim that failed is tried again
        except StoreFenced:
            self._fence()
            return
        except StoreError as exc:
            log.error("cannot renew this host's lease (tried again in %.1f s; it lapses %.1f s"
                      " after the last renewal): %s", self.renew_every, self.lease, exc)
        finally:
            if not self._stopped:
                self._renew_handle = self.loop.call_later(self.renew_every, self._renew_now)

    def _others(self, others: int) -> None:
        """How many other hosts are alive, as the last renewal saw. Alone, a host keeps
        every job it is given and sends no NOTIFY (as on one host); when another
        host appears, it releases what it cannot start soon."""
        alone = others == 0
        if alone == self.alone:
            return
        self.alone = alone
        self.store.set_alone(alone)
        if alone:
            log.info("host %s is alone on %s: it keeps the jobs it is given", self.host,
                     self.store.path)
            self._maybe_ready = True  # released jobs nobody else will claim now
            self.hungry()
            return
        log.info("host %s shares %s with %d other hosts", self.host, self.store.path, others)
        ids = self.book.release_ready(self._inserted, keep=max(0, self._idle() + self._prefetch()))
        if ids:
            spawn(self._release(ids), "release jobs for the other hosts")

    def _fence(self) -> None:
        self.fenced()
        self.store.lease_lost()  # the supervisor's on_fenced stops every job

    def fenced(self) -> None:
        """This host's lease lapsed: it stores, claims and renews nothing more."""
        self._fenced = True
        self.stop()

    async def _rescue(self, orphans: bool = False) -> None:
        gone, requeued, failed, failed_ids = await self.store.rescue(
            time.time(), self._decide, orphans)
        if gone or requeued or failed:
            self.rescued += requeued + failed
            names = ", ".join(f"host {h} ({name}, pid {pid})" for h, name, pid in gone) or "no host"
            log.warning("took over from %s, gone silent past its lease: %d running jobs run"
                        " again, not charged; %d failed after too many interruptions",
                        names, requeued, failed)
        if gone or requeued or orphans:
            self._maybe_ready = True
            self.hungry()
        if failed_ids:
            self._ended_elsewhere(failed_ids)

    def _poll_now(self) -> None:
        """--pg-notify off: the look NOTIFY would have prompted."""
        self._poll_handle = None
        if self._stopped:
            return
        self._maybe_ready = True
        self.hungry()
        self._ended_elsewhere(None)
        self._poll_handle = self.loop.call_later(self.poll, self._poll_now)

    def describe(self) -> dict[str, Any]:
        return {"host": self.host, "name": self.name, "lease": self.lease,
                "notify": self.notify, "leader": self.leader, "claims": self.claims,
                "claimed": self.claimed, "rescued": self.rescued}
