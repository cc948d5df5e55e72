"""What the supervisor does for its clients: submit, abort, wait, retry, pause, status.

A mixin of ``Supervisor``, kept apart so that supervisor.py holds the loop, the
pool and dispatch, and this module holds the actions the control plane asks for.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import orjson

from hostqueue import __version__
from hostqueue.core import registry
from hostqueue.core.errors import ProtocolError
from hostqueue.core.outcome import aborted_before_start
from hostqueue.store import display_name
from hostqueue.store.base import StoreKeyTaken
from hostqueue.core.states import FINAL_STATES, Event, State, SupervisorState, WorkerState
from hostqueue.supervisor.background import spawn
from hostqueue.supervisor.deferred import DeferredReply
from hostqueue.supervisor.readyindex import Payload

if TYPE_CHECKING:
    from hostqueue.supervisor.main import Supervisor


# A submit of at least this many jobs leaves megabytes of freed request and reply
# objects behind: the supervisor gives them back to the system a moment later.
TRIM_AFTER_JOBS = 1000


def wait_timeout(job_id: int, timeout: float) -> ProtocolError:
    return ProtocolError("timeout", f"job {job_id} did not end within {timeout:g} s")


class Actions:
    """The supervisor's answers to client requests, through its parts' interfaces."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.book = sup.book
        self.committer = sup.committer
        self.store = sup.store
        self.announcer = sup.announcer

    def submit_jobs(
        self,
        spec: registry.TaskSpec,
        args_list: list[dict[str, Any]],
        options: dict[str, Any],
        on_done: Callable[[list[dict[str, Any]] | None, BaseException | None], None],
        extra: list[tuple[str, tuple[Any, ...]]] | None = None,
        ids_only: bool = False,
    ) -> range:
        """Add jobs; on_done(jobs, None) after COMMIT, or on_done(None, error). Returns
        the new jobs' ids. With ids_only no job objects are built for the reply (jobs
        is then empty unless watchers want them): the caller answers with the ids."""
        now = time.time()
        queue = options.get("queue") or spec.queue
        priority = options["priority"] if options.get("priority") is not None else spec.priority
        retries = options["retries"] if options.get("retries") is not None else spec.retries
        timeout = options["timeout"] if options.get("timeout") is not None else spec.timeout
        run_at = options.get("run_at") or now
        deadline = options.get("deadline")
        key = options.get("key")
        run_id = options.get("run_id")
        sup = self.sup
        try:
            texts = [orjson.dumps(args).decode() for args in args_list]
        except orjson.JSONEncodeError as exc:
            raise ProtocolError("bad_request", f"'args' cannot be stored as JSON: {exc}") from None
        count = len(texts)
        first_id = sup.take_ids(count)
        ids = range(first_id, first_id + count)
        max_attempts = retries + 1
        # On a store shared by several hosts, this host keeps what it can start soon;
        # the rest is released for any host to claim (cluster.py).
        cluster = sup.cluster
        keep = count if cluster is None else cluster.keep(count, run_at <= now, queue)
        kept = ids[:keep]
        params = (first_id, spec.name, queue, max_attempts, priority, key, run_id, now, run_at,
                  deadline, timeout, orjson.dumps(texts[:keep] if 0 < keep < count else texts).decode())
        kind = "add_jobs" if keep else "add_released"
        if 0 < keep < count:
            released = (first_id + keep, spec.name, queue, max_attempts, priority, key, run_id,
                        now, run_at, deadline, timeout, orjson.dumps(texts[keep:]).decode())
            extra = [("add_released", released)] + list(extra or ())
        # Every job of a submit shares these; the reply copies the template.
        template = {
            "id": 0, "task": spec.name, "queue": queue, "status": "pending", "args": None,
            "result": None, "error": None, "attempts": 0, "max_attempts": max_attempts,
            "priority": priority, "progress": None, "progress_message": None, "key": key,
            "run_id": run_id, "created_at": now, "started_at": None, "finished_at": None,
            "run_at": run_at, "deadline": deadline, "timeout": timeout,
            "abort_requested": False, "worker_pid": None,
        }
        events = sup.events
        jobs = []
        if not ids_only or events.everything:
            for job_id, args in zip(ids, args_list):
                job = template.copy()
                job["id"] = job_id
                job["args"] = args
                jobs.append(job)
        # The jobs wait at once, before their rows commit: dispatch may give them to
        # a worker in this turn, and hands them over once the INSERT commits, as the
        # client gets its answer. If the transaction fails, failed() takes them back
        # out: nothing ran.
        payloads = None
        if keep and self.book.cache_allows(queue, sup.paused):
            payloads = [Payload(spec.name, queue, text, 0, max_attempts, timeout, priority, run_id,
                                key, now, run_at, deadline) for text in texts[:keep]]
        if keep:
            self.book.submitted(kept, (queue, spec.name), priority, run_at, deadline, key, now, payloads)

        def committed() -> None:
            sup.counters["submitted"] = sup.counters.get("submitted", 0) + count
            if keep < count and cluster is not None:
                cluster.released(run_at, deadline)
            if events.everything:
                for job in jobs:
                    events.publish(
                        {"event": "submitted", "job_id": job["id"], "job": job}, queue, spec.name, run_id
                    )
            on_done(jobs, None)

        def failed(exc: BaseException) -> None:
            if keep:
                for a in self.book.withdraw(kept, (queue, spec.name), key):
                    sup.dispatcher.released_unsent(a)
            on_done(None, exc)

        self.committer.add_submit(first_id, count, params, committed, failed, extra, kind)
        if count >= TRIM_AFTER_JOBS:
            sup.trim_memory_soon()
        return ids

    async def committed_job(self, job_id: int) -> dict[str, Any] | None:
        """The job as the store has it once our writes so far are committed."""
        return (await self.committed_jobs([job_id])).get(job_id)

    async def committed_jobs(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """The jobs as the store has them once our writes so far are committed (with
        the live progress of those running); not waiting on a store that refuses writes."""
        await self.committer.barrier(reads=True)
        jobs = await self.store.get_jobs(ids)
        for job_id, job in jobs.items():
            a = self.book.attempt(job_id)
            if a is not None:
                job.update(progress=a.progress, progress_message=a.progress_message,
                           abort_requested=a.abort_requested)
        return jobs

    async def abort_job(self, job_id: int) -> dict[str, Any]:
        return (await self.abort_jobs([job_id], strict=True))[0]

    async def abort_jobs(self, ids: list[int], strict: bool = False) -> list[dict[str, Any]]:
        """Abort these jobs: one read before, one commit and one read after, however
        many. With strict, a job that is unknown or has ended is an error; else it
        is left out."""
        sup = self.sup
        book = self.book
        before = await self.committed_jobs(ids)
        now = time.time()
        aborted = []
        elsewhere = []
        owners: dict[int, tuple[int | None, str]] = {}
        if sup.cluster is not None:  # several hosts: which of these jobs are another's
            unknown = [i for i in ids if book.state(i) is None]
            owners = await sup.shared_store.owners(unknown) if unknown else {}
        for job_id in ids:
            job = before.get(job_id)
            if job is None:
                if strict:
                    raise ProtocolError("not_found", f"no job has id {job_id}")
                continue
            state = book.state(job_id)
            if book.is_fetching(job_id):
                book.abort_while_fetching(job_id)
            elif state in (State.HELD, State.RUNNING):
                a = book.attempt(job_id)
                assert a is not None
                sup.outcomes.request_abort(a, sup.pool.get, sup.loop.call_later)
            elif book.recent_final(job_id) is not None or job["status"] not in ("pending", "running"):
                if strict:
                    status = book.recent_final(job_id) or job["status"]
                    raise ProtocolError("invalid_state", f"job {job_id} has already ended ({status}); nothing to abort")
                continue
            elif sup.cluster is not None and job_id in owners \
                    and owners[job_id][0] != sup.cluster.host:
                elsewhere.append(job_id)  # released, or another host's
            elif job["status"] == "pending":
                status = book.cancel_waiting(job_id, Event.ABORTED, now, aborted_before_start(),
                                             lane=(job["queue"], job["task"]))
                sup._job_ended(job_id, status, now)
            aborted.append(job_id)
        if elsewhere:
            await self._abort_elsewhere(elsewhere, now)
        after = await self.committed_jobs(aborted)
        return [after.get(job_id) or before[job_id] for job_id in aborted]

    async def _abort_elsewhere(self, ids: list[int], now: float) -> None:
        """Aborts of jobs not in this host's book: a released job is cancelled here;
        one another host owns is marked aborted, and its owner told (NOTIFY): it
        aborts it as its own (and a host that claims it later finds the mark)."""
        sup = self.sup
        assert sup.cluster is not None
        told = []
        for job_id in ids:
            if await sup.shared_store.cancel_released(job_id, now, aborted_before_start()):
                sup._job_ended(job_id, "cancelled", now)
            elif self.book.state(job_id) is not None:
                await self.abort_jobs([job_id])  # this host claimed it meanwhile
            else:
                told.append(job_id)
                self.committer.add("request_abort", (job_id,))
        if told:
            await self.committer.barrier()
            await sup.cluster.tell({"a": told})

    def wait_reply(self, job_id: int, timeout: float | None, wrap: Callable[[dict[str, Any]], Any],
                   on_timeout: Callable[[DeferredReply], None]) -> DeferredReply | None:
        """The usual wait, on a job still running or waiting, or one that has just
        ended: a reply settled in the turn its end is committed, with wrap(job);
        after timeout seconds, on_timeout(reply) settles it. None when the job
        may have ended earlier: wait_job() then reads the store."""
        if not self.book.unfinished(job_id):
            recent = self.book.recent_job(job_id)
            cluster = self.sup.cluster
            if cluster is not None and not cluster.alone:
                recent = None  # another host may have revived it since: read the store
            if recent is None:
                return None
            # It just ended, and is known whole from memory: as soon as its end is
            # committed (a submit's caller often waits while the job runs).
            reply = DeferredReply()
            committer = self.committer

            def answer() -> None:
                reply.resolve(wrap(recent.job()))

            if not committer.busy:
                answer()
                return reply  # settled: no timer to arm
            committer.after_commit(answer)
            if timeout is not None:
                # It has ended; only its commit may be outstanding, which a working
                # store finishes in a moment (a PostgreSQL server's round trip can
                # outlast a timeout of 0): the timeout holds only while the store
                # refuses writes.
                def expired(reply: DeferredReply) -> None:
                    if committer.failing:
                        on_timeout(reply)

                reply.on_settled(self.sup.loop.call_later(timeout, expired, reply).cancel)
            return reply
        else:
            reply = DeferredReply()
            reply.on_settled(self.announcer.listen(job_id, lambda job: reply.resolve(wrap(job))))
        if timeout is not None:
            # An end not committed in time (a store refusing writes) is not told.
            reply.on_settled(self.sup.loop.call_later(timeout, on_timeout, reply).cancel)
        return reply

    async def wait_job(self, job_id: int, timeout: float | None) -> dict[str, Any]:
        waited = self.wait_reply(job_id, timeout, lambda job: job,
                                 lambda reply: reply.fail(wait_timeout(job_id, timeout or 0.0)))
        if waited is not None:  # known from memory
            try:
                result: dict[str, Any] = await waited
                return result
            finally:
                waited.cancel()  # given up on (its client left): stop listening
        # It may have ended long ago: listen first, so that an end committed while
        # the store is read is heard.
        fut: asyncio.Future[dict[str, Any]] = self.sup.loop.create_future()

        def ended(job: dict[str, Any]) -> None:
            if not fut.done():
                fut.set_result(job)

        stop = self.announcer.listen(job_id, ended)
        try:
            job = await self.committed_job(job_id)
            if job is None:
                raise ProtocolError("not_found", f"no job has id {job_id}")
            if job["status"] in FINAL_STATES:
                return job
            if timeout is None:
                return await fut
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                raise wait_timeout(job_id, timeout) from None
        finally:
            stop()

    async def retry_job(self, job_id: int) -> dict[str, Any]:
        job = await self.committed_job(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job has id {job_id}")
        if job["status"] not in ("failed", "cancelled", "expired"):
            raise ProtocolError(
                "invalid_state",
                f"job {job_id} is {job['status']}; only failed, cancelled or expired jobs can be retried",
            )
        owner = self.book.key_owner(job["key"]) if job["key"] is not None else None
        if owner is None and job["key"] is not None and self.sup.cluster is not None:
            owner = await self.sup.shared_store.unfinished_with_key(job["key"])  # on another host
        if owner is not None:
            raise ProtocolError(
                "invalid_state", f"job {owner} with the same key {job['key']!r} is unfinished"
            )
        now = time.time()
        if self.sup.cluster is not None:
            # Several hosts: the row changes first (one host wins a race of retries,
            # and a key taken meanwhile on another host is an error, not a stuck write).
            try:
                revived = await self.sup.shared_store.revive(job_id, job["status"], now)
            except StoreKeyTaken:
                raise ProtocolError("invalid_state", f"another job with the same key {job['key']!r}"
                                    " is unfinished") from None
            if not revived:
                raise ProtocolError("invalid_state", f"job {job_id} changed meanwhile (retried"
                                    " on another host?); look at it again")
            self.book.revive(job, now, written=True)
        else:
            self.book.revive(job, now)
        await self.committer.barrier()
        self.book.make_ready(job_id, (job["queue"], job["task"]), job["priority"])
        return await self.committed_job(job_id) or job

    def set_paused(self, queue: str | None, paused: bool) -> list[str]:
        sup = self.sup
        name = queue or "*"
        if paused:
            sup.paused.add(name)
        elif queue is None:
            sup.paused.clear()
        else:
            sup.paused.discard(name)
        self.committer.add("save_setting", self.store.setting_params("paused", sorted(sup.paused)))
        if sup.cluster is not None:  # every host pauses and resumes with this one
            cluster = sup.cluster

            def tell() -> None:
                spawn(cluster.tell({"p": sorted(sup.paused)}), "tell the paused queues")

            self.committer.after_commit(tell)
        if not paused:
            if sup.cluster is not None:
                sup.cluster.resumed()
            sup.dispatcher.wake()
        return sorted(sup.paused)

    def status(self) -> dict[str, Any]:
        sup = self.sup
        book = self.book
        workers = []
        for w in sorted(sup.pool, key=lambda w: w.number):
            rss, cpu = w.resources()
            running = book.running_on(w.pid)
            workers.append(
                {"pid": w.pid, "number": w.number, "state": w.state.value,
                 "job": running.id if running is not None else None,
                 "held": book.unstarted(w.pid), "jobs_done": w.jobs_done, "rss": rss,
                 "cpu_percent": cpu, **sup.dispatcher.describe(w.pid)}
            )
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": time.time() - sup.started,
            "store": display_name(sup.config.store),
            "socket": os.path.abspath(sup.config.socket_path),
            "state": "draining" if sup.state is not SupervisorState.RUNNING else "running",
            "workers": workers,
            "target_workers": sup.pool.target,
            "paused": sorted(sup.paused),
            "running_jobs": book.running,
            "held_jobs": book.handed - book.running,
            "ready_jobs": book.available(set()),
            "pool_error": sup.pool.error,
            "autoscale": (
                {"min": sup.config.workers_min, "max": sup.config.workers_max,
                 "idle_timeout": sup.config.idle_timeout}
                if sup.autoscale else None
            ),
            "shaping": sup.shaper.describe(),
            "waiting_by_queue": book.waiting_by_queue(),
            "store_error": self.committer.last_error,
            "watchers": sup.events.watching(),
            "counters": dict(sup.counters),
        }

    def why_waiting(self, job: dict[str, Any]) -> str:
        """Why a pending job has not started, in words (for `job show`)."""
        sup = self.sup
        now = time.time()
        queue, task = job["queue"], job["task"]
        if job["run_at"] > now:
            return f"scheduled: may start in {job['run_at'] - now:.1f} s"
        if "*" in sup.paused or queue in sup.paused:
            return f"queue {queue} is paused (hostqueue ctl resume {queue})"
        limited = sup.shaper.why_waiting((queue, task), time.monotonic())
        if limited:
            return limited
        if self.book.state(job["id"]) is State.HELD:
            a = self.book.attempt(job["id"])
            pid = f" {a.worker_pid}" if a is not None else ""
            return f"handed to worker{pid}: it starts when the worker's current job ends"
        idle = sum(1 for w in sup.pool if w.state is WorkerState.IDLE)
        if not len(sup.pool) or sup.pool.target == 0:
            return "no workers (hostqueue ctl scale N)"
        if not idle:
            return f"every worker is busy ({len(sup.pool)} workers); {self.book.available(sup.paused)} jobs ready"
        return "ready: a worker takes it next"
