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

from . import __version__, registry
from .deferred import DeferredReply
from .errors import ProtocolError
from .states import FINAL_STATES, JobStatus, SupervisorState, WorkerState
from .outcomes import final_job
from .readyindex import PAYLOAD_CACHE, Payload
from .store import Store

if TYPE_CHECKING:
    from .supervisor import Supervisor


# A submit of at least this many jobs leaves megabytes of freed request and reply
# objects behind: the supervisor gives them back to the system a moment later.
TRIM_AFTER_JOBS = 1000

ABORT_GRACE = 10.0  # a running job gets this long to honour an abort before its worker is replaced


def wait_timeout(job_id: int, timeout: float) -> ProtocolError:
    return ProtocolError("timeout", f"job {job_id} did not end within {timeout:g} s")


class Actions:
    """The supervisor's answers to client requests; ``sup`` is the supervisor."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup

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
        first_id = sup.next_id
        try:
            texts = [orjson.dumps(args).decode() for args in args_list]
        except orjson.JSONEncodeError as exc:
            raise ProtocolError("bad_request", f"'args' cannot be stored as JSON: {exc}") from None
        count = len(texts)
        sup.next_id += count
        ids = range(first_id, first_id + count)
        max_attempts = retries + 1
        params = (first_id, spec.name, queue, max_attempts, priority, key, run_id, now, run_at,
                  deadline, timeout, orjson.dumps(texts).decode())
        # Every job of a submit shares these; the reply copies the template.
        template = {
            "id": 0, "task": spec.name, "queue": queue, "status": "pending", "args": None,
            "result": None, "error": None, "attempts": 0, "max_attempts": max_attempts,
            "priority": priority, "progress": None, "progress_message": None, "key": key,
            "run_id": run_id, "created_at": now, "started_at": None, "finished_at": None,
            "run_at": run_at, "deadline": deadline, "timeout": timeout,
            "abort_requested": False, "worker_pid": None,
        }
        jobs = []
        if not ids_only or sup.events.everything:
            for job_id, args in zip(ids, args_list):
                job = template.copy()
                job["id"] = job_id
                job["args"] = args
                jobs.append(job)
        if key is not None:
            sup.keys[key] = first_id

        # The jobs are ready at once, before their rows commit: dispatch claims them in
        # the same transaction that adds them (claims follow the inserts), and hands
        # them to workers once it commits, as the client gets its answer. If the
        # transaction fails, failed() takes them back out: nothing ran.
        # A paused queue's jobs are read back from the store when it resumes: a
        # million of them kept here would cost ~300 bytes each.
        cache = len(sup.payloads) < PAYLOAD_CACHE and queue not in sup.paused and "*" not in sup.paused
        payloads = sup.payloads
        for job_id, text in zip(ids, texts):
            if cache:
                payloads[job_id] = Payload(
                    spec.name, queue, text, 0, max_attempts, timeout, priority, run_id,
                    key, now, run_at, deadline,
                )
            if deadline is not None:
                sup.deadlines.push(deadline, job_id)
            sup._enqueue(job_id, queue, spec.name, priority, run_at, now)
        if deadline is not None:
            sup._arm_deadline_timer()

        def committed() -> None:
            sup.counters["submitted"] += count
            if sup.events.everything:
                for job in jobs:
                    sup.events.publish(
                        {"event": "submitted", "job_id": job["id"], "job": job}, queue, spec.name, run_id
                    )
            on_done(jobs, None)

        def failed(exc: BaseException) -> None:
            if key is not None and sup.keys.get(key) == first_id:
                del sup.keys[key]
            for job_id in ids:
                sup._withdraw(job_id, (queue, spec.name))
            on_done(None, exc)

        sup.committer.add_submit(first_id, count, params, committed, failed, extra)
        if count >= TRIM_AFTER_JOBS:
            sup.trim_memory_soon()
        return ids

    async def committed_job(
        self, job_id: int) -> dict[str, Any] | None:
        """The job as the store has it once our writes so far are committed."""
        return (await self.committed_jobs([job_id])).get(job_id)

    async def committed_jobs(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """The jobs as the store has them once our writes so far are committed (with
        the live progress of those running)."""
        await self.sup.committer.barrier()
        jobs = await self.sup.store.get_jobs(ids)
        for job_id, job in jobs.items():
            rj = self.sup.running.get(job_id)
            if rj is not None:
                job.update(progress=rj.progress, progress_message=rj.progress_message,
                           abort_requested=rj.abort_requested)
        return jobs

    async def abort_job(
        self, job_id: int) -> dict[str, Any]:
        return (await self.abort_jobs([job_id], strict=True))[0]

    async def abort_jobs(self, ids: list[int], strict: bool = False) -> list[dict[str, Any]]:
        """Abort these jobs: one read before, one commit and one read after, however
        many. With strict, a job that is unknown or has ended is an error; else it
        is left out."""
        sup = self.sup
        before = await self.committed_jobs(ids)
        now = time.time()
        aborted = []
        for job_id in ids:
            job = before.get(job_id)
            if job is None:
                if strict:
                    raise ProtocolError("not_found", f"no job has id {job_id}")
                continue
            if job_id in sup.claiming:
                sup.claim_aborts.add(job_id)
            elif job_id in sup.running:
                self._request_abort(job_id)
            elif job_id in sup.recent_finals or job["status"] not in ("pending", "running"):
                if strict:
                    status = sup.recent_finals.get(job_id, job["status"])
                    raise ProtocolError("invalid_state", f"job {job_id} has already ended ({status}); nothing to abort")
                continue
            elif job["status"] == "pending":
                sup._cancel_pending(
                    job_id, JobStatus.CANCELLED, now,
                    {"type": "Aborted", "message": "aborted before it started", "traceback": None},
                    lane=(job["queue"], job["task"]),
                )
            aborted.append(job_id)
        after = await self.committed_jobs(aborted)
        return [after.get(job_id) or before[job_id] for job_id in aborted]

    def _request_abort(
        self, job_id: int) -> None:
        rj = self.sup.running.get(job_id)
        if rj is None:
            return
        if not rj.abort_requested:
            rj.abort_requested = True
            self.sup.committer.add("request_abort", (job_id,))
            worker = self.sup.workers.get(rj.worker_pid)
            if worker is not None:
                worker.send_control({"t": "abort", "id": job_id})
                self.sup.loop.call_later(ABORT_GRACE, self.sup._abort_overdue, worker, job_id)

    def _unfinished(self, job_id: int) -> bool:
        """Known from memory not to have ended: its end will be announced."""
        sup = self.sup
        return job_id not in sup.recent_finals and (
            job_id in sup.running or job_id in sup.claiming or job_id in sup.payloads
        )

    def _listen(self, job_id: int, ended: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ended(job) once the job's end is committed; returns the way to stop listening."""
        waiters = self.sup.waiters

        def stop() -> None:
            listeners = waiters.get(job_id)
            if listeners and ended in listeners:
                listeners.remove(ended)
                if not listeners:
                    del waiters[job_id]

        waiters.setdefault(job_id, []).append(ended)
        return stop

    def wait_reply(self, job_id: int, timeout: float | None, wrap: Callable[[dict[str, Any]], Any],
                   on_timeout: Callable[[DeferredReply], None]) -> DeferredReply | None:
        """The usual wait, on a job still running or waiting, or one that has just
        ended: a reply settled in the turn its end is committed, with wrap(job);
        after timeout seconds, on_timeout(reply) settles it. None when the job
        may have ended earlier: wait_job() then reads the store."""
        if not self._unfinished(job_id):
            recent = self.sup.recent_jobs.get(job_id)
            if recent is None:
                return None
            # It just ended, and is known whole from memory: as soon as its end is
            # committed (a submit's caller often waits while the job runs).
            reply = DeferredReply()
            committer = self.sup.committer

            def answer() -> None:
                reply.resolve(wrap(final_job(*recent)))

            if not committer.busy:
                answer()
                return reply  # settled: no timer to arm
            committer.after_commit(answer)
        else:
            reply = DeferredReply()
            reply.on_settled(self._listen(job_id, lambda job: reply.resolve(wrap(job))))
        if timeout is not None:
            # An end not committed in time (a store refusing writes) is not told.
            reply.on_settled(self.sup.loop.call_later(timeout, on_timeout, reply).cancel)
        return reply

    async def wait_job(
        self, job_id: int, timeout: float | None) -> dict[str, Any]:
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

        stop = self._listen(job_id, ended)
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

    async def retry_job(
        self, job_id: int) -> dict[str, Any]:
        job = await self.committed_job(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job has id {job_id}")
        if job["status"] not in ("failed", "cancelled", "expired"):
            raise ProtocolError(
                "invalid_state",
                f"job {job_id} is {job['status']}; only failed, cancelled or expired jobs can be retried",
            )
        if job["key"] is not None and job["key"] in self.sup.keys:
            raise ProtocolError(
                "invalid_state", f"job {self.sup.keys[job['key']]} with the same key {job['key']!r} is unfinished"
            )
        now = time.time()
        self.sup.committer.add("revive", (now, job_id))
        self.sup.recent_finals.pop(job_id, None)
        self.sup.recent_jobs.pop(job_id, None)
        if job["key"] is not None:
            self.sup.keys[job["key"]] = job_id
        self.sup.payloads[job_id] = Payload(
            job["task"], job["queue"], orjson.dumps(job["args"]).decode(), 0, job["max_attempts"],
            job["timeout"], job["priority"], job["run_id"], job["key"], job["created_at"], now,
            job["deadline"],
        )
        await self.sup.committer.barrier()
        self.sup._enqueue(job_id, job["queue"], job["task"], job["priority"], now, time.time())
        return await self.committed_job(job_id) or job

    def set_paused(
        self, queue: str | None, paused: bool) -> list[str]:
        name = queue or "*"
        if paused:
            self.sup.paused.add(name)
        elif queue is None:
            self.sup.paused.clear()
        else:
            self.sup.paused.discard(name)
        self.sup.committer.add("save_setting", Store.setting_params("paused", sorted(self.sup.paused)))
        if not paused:
            self.sup._wake_dispatch()
        return sorted(self.sup.paused)

    def status(self) -> dict[str, Any]:
        workers = []
        for w in sorted(self.sup.workers.values(), key=lambda w: w.number):
            rss, cpu = w.resources()
            current = None
            if w.jobs and w.slot >= 0:
                reading = self.sup.board.read(w.slot)
                current = reading.job_id if reading and reading.job_id in w.jobs else next(iter(w.jobs))
            state = w.state.value
            if w.state is WorkerState.BUSY and not w.jobs:
                state = "busy"
            workers.append(
                {"pid": w.pid, "number": w.number, "state": state, "job": current,
                 "held": len(w.jobs), "jobs_done": w.jobs_done, "rss": rss, "cpu_percent": cpu}
            )
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": time.time() - self.sup.started,
            "store": os.path.abspath(self.sup.config.store),
            "socket": os.path.abspath(self.sup.config.socket_path),
            "state": "draining" if self.sup.state is not SupervisorState.RUNNING else "running",
            "workers": workers,
            "target_workers": self.sup.target,
            "paused": sorted(self.sup.paused),
            "running_jobs": len(self.sup.running),
            "ready_jobs": self.sup.ready.available(set()),
            "pool_error": self.sup.pool_error,
            "autoscale": (
                {"min": self.sup.config.workers_min, "max": self.sup.config.workers_max,
                 "idle_timeout": self.sup.config.idle_timeout}
                if self.sup.autoscale else None
            ),
            "shaping": self.sup.shaper.describe(),
            "waiting_by_queue": self.sup.ready.waiting_by_queue(),
            "store_error": self.sup.committer.last_error,
            "counters": dict(self.sup.counters),
        }

    def why_waiting(self, job: dict[str, Any]) -> str:
        """Why a pending job has not started, in words (for `job show`)."""
        now = time.time()
        queue, task = job["queue"], job["task"]
        if job["run_at"] > now:
            return f"scheduled: may start in {job['run_at'] - now:.1f} s"
        if "*" in self.sup.paused or queue in self.sup.paused:
            return f"queue {queue} is paused (hostqueue ctl resume {queue})"
        limited = self.sup.shaper.why_waiting((queue, task), time.monotonic())
        if limited:
            return limited
        if job["id"] in self.sup.claiming:
            return "being handed to a worker"
        idle = sum(1 for w in self.sup.workers.values() if w.state is WorkerState.IDLE)
        if not self.sup.workers or self.sup.target == 0:
            return "no workers (hostqueue ctl scale N)"
        if not idle:
            return f"every worker is busy ({len(self.sup.workers)} workers); {self.sup.ready.available(self.sup.paused)} jobs ready"
        return "ready: a worker takes it next"
