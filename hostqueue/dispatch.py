"""Dispatch: which ready job goes to which worker, when, and how it gets there.

A mixin of ``Supervisor`` (supervisor.py holds the loop, the pool and the
outcomes). Dispatch runs when something changed (a job became ready, a worker
became idle or is running out of work), never on a timer, except the one a
rate-limited lane arms for the moment it may start again.

A worker is handed about ``max(PREFETCH_WINDOW, 2 x the recent commit time)``
of work by its tasks' measured run times, at most ``workers.prefetch`` jobs:
many fast jobs in one pipe message, a slow or unmeasured one alone. Its claims
(attempt + 1) join the write batch, and the jobs reach the worker only once
they are committed.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from .parts import SupervisorParts
from .pool import RunningJob, WorkerHandle
from .readyindex import Lane, Payload, unpack_id
from .states import SupervisorState, WorkerState
from .store import StoreError

log = logging.getLogger("hostqueue.supervisor")

# A worker is handed at most this much expected work at once: many fast jobs in
# one pipe message, but a slow job alone, so others stay free for idle workers
# (and for autoscale to see them wait). Tasks not yet measured count as slow.
PREFETCH_WINDOW = 0.005
# ... or, while commits take long (large submits), up to this much.
PREFETCH_WINDOW_MAX = 0.05


class Dispatch(SupervisorParts):
    """The dispatch half of the supervisor; its state lives on the Supervisor."""



    def _wake_dispatch(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self.state is not SupervisorState.RUNNING:
            return
        if not self.ready.count:
            # Nothing to hand out: the common call after a job ends with none waiting.
            self._update_title()
            return
        now_m = time.monotonic()
        # A worker is handed about this much work ahead: enough to keep it busy
        # until the claims of its next jobs commit (jobs reach it after commit).
        window = min(max(PREFETCH_WINDOW, 2 * self.committer.commit_latency), PREFETCH_WINDOW_MAX)
        prefetch = self.config.prefetch
        idle = [w for w in self.workers.values() if w.state is WorkerState.IDLE and w.transport]
        # Busy workers running only fast jobs are topped up too: their next batch's
        # claims commit while they run this one.
        refill = [
            w for w in self.workers.values()
            if w.state is WorkerState.BUSY and w.transport and not w.fetching
            and len(w.jobs) < prefetch and w.busy_until - now_m < window
        ]
        if not idle and not refill:
            self.sizer.grow()
            return
        idle += refill
        # The count is a hint for batch sizes; _next_job() is the truth.
        available = max(self.ready.available(self.paused), 1)
        per_worker = max(1, min(prefetch, -(-available // len(idle))))
        now = time.time()
        self._limit_wake = math.inf
        max_jobs = self.config.max_jobs_per_worker
        runtime = self.task_runtime
        for worker in idle:
            if not self.ready.count:
                break  # all taken: the other workers need not look (a lone job, usually)
            picked: list[tuple[Lane, int]] = []
            holds = len(worker.jobs) + worker.fetching
            budget = min(per_worker, prefetch - holds)
            if max_jobs is not None:  # recycle on time: no more than it may still run
                budget = min(budget, max_jobs - worker.jobs_done - holds)
            if budget <= 0:
                continue
            expected = max(0.0, worker.busy_until - now_m) if worker.jobs else 0.0
            for _ in range(budget):
                taken = self._next_job(now_m)
                if taken is None:
                    break
                picked.append(taken)
                expected += runtime.get(taken[0][1], window)
                if expected >= window:
                    break
            worker.busy_until = now_m + expected
            if not picked:
                break
            worker.state = WorkerState.BUSY
            ids = [unpack_id(packed) for _, packed in picked]
            if any(i not in self.payloads for i in ids):
                self.claiming.update(ids)
                worker.fetching += len(ids)
                self.loop.create_task(self._fetch_and_send(worker, picked))
            else:
                self._send_jobs(worker, ids, now)
        if self._limit_wake < math.inf:
            self._limit_timer.arm(self._limit_wake)  # a rate-limited lane may start then
        if self.ready.count:
            self.sizer.grow()
        self._update_title()

    def _next_job(self, now_m: float) -> tuple[Lane, int] | None:
        """Take the next job that may start now, across lanes, under pauses and limits."""
        if "*" in self.paused:
            return None
        shaper = self.shaper
        best_lane = None
        best_key: tuple[float, float, int] | None = None
        for lane in self.ready.lanes:
            if lane[0] in self.paused:
                continue
            top = self.ready.top(lane)
            if top is None:
                continue
            free = shaper.free_at(lane, now_m)
            if free > now_m:
                if free < self._limit_wake:
                    self._limit_wake = free
                continue
            key = shaper.order_key(lane, top)
            if best_key is None or key < best_key:
                best_lane, best_key = lane, key
        if best_lane is None:
            return None
        shaper.started(best_lane, now_m)
        return best_lane, self.ready.pop(best_lane)

    def _job_left_worker(self, rj: RunningJob) -> None:
        """A held job is done with its worker (finished, failed, returned): free its limits."""
        self.shaper.finished((rj.queue, rj.task))
        self._wake_dispatch()

    async def _fetch_and_send(self, worker: WorkerHandle, picked: list[tuple[Lane, int]]) -> None:
        """Jobs without a cached payload (loaded at start, or beyond the cache): read, then send."""
        ids = [unpack_id(packed) for _, packed in picked]
        try:
            await self.committer.barrier()
            rows = await self.store.jobs_for_dispatch(ids)
        except StoreError as exc:
            log.error("cannot read jobs to dispatch: %s", exc)
            rows = None
        except Exception:  # noqa: BLE001 - the jobs must go back, whatever went wrong
            log.exception("error reading jobs to dispatch; they go back to the queue")
            rows = None
        finally:
            worker.fetching -= len(ids)
        sendable = []
        for lane, packed in picked:
            job_id = unpack_id(packed)
            self.claiming.discard(job_id)
            row = rows.get(job_id) if rows is not None else None
            aborted = job_id in self.recent_finals
            if rows is None or worker.state is not WorkerState.BUSY or worker.exit_status is not None:
                # Not claimed after all: back where it was, unless it ended meanwhile.
                self.shaper.finished(lane)
                if not aborted:
                    self.ready.push_back(lane, packed)
                continue
            if row is None or aborted:
                self.shaper.finished(lane)  # it ended (or vanished) while we read
                continue
            self.payloads[job_id] = Payload(
                row.task, row.queue, row.args, row.attempts, row.max_attempts, row.timeout,
                row.priority, row.run_id, row.key, row.created_at, row.run_at, row.deadline,
            )
            sendable.append(job_id)
        if sendable:
            self._send_jobs(worker, sendable, time.time())
        elif worker.state is WorkerState.BUSY and not worker.jobs and not worker.fetching:
            worker.state = WorkerState.IDLE
            self.sizer.became_idle(worker)
        self._wake_dispatch()

    def _send_jobs(self, worker: WorkerHandle, ids: list[int], now: float) -> None:
        messages = []
        payloads = self.payloads
        running = self.running
        held = worker.jobs
        add = self.committer.add
        pid = worker.pid
        for job_id in ids:
            p = payloads.pop(job_id)
            attempt = p.attempts + 1
            rj = RunningJob(
                job_id, p.task, p.queue, p.args, attempt, p.max_attempts, p.timeout,
                p.priority, p.run_id, p.key, p.created_at, p.run_at, p.deadline, now, pid,
            )
            running[job_id] = rj
            held[job_id] = rj
            if job_id in self.claim_aborts:
                self.claim_aborts.discard(job_id)
                rj.abort_requested = True
                add("request_abort", (job_id,))
            if p.deadline is not None:
                self.deadlines.discard(job_id)
            add("claim", (attempt, now, pid, job_id))
            self.running_count.claimed(job_id, p.queue)
            messages.append(
                {"id": job_id, "task": p.task, "args": p.args, "attempt": attempt,
                 "max_attempts": p.max_attempts, "timeout": p.timeout,
                 "abort": rj.abort_requested}
            )
        self.counters["started"] += len(ids)
        # At least once, with every run counted: the worker gets the jobs only once
        # their claims (attempt + 1) are committed, so a kill -9 in between leaves
        # them pending with no run to count, never run with the attempt uncounted.
        # The worker first: it runs the jobs while the commit's other callbacks
        # (the submits' replies) run here. Their `started` events follow those
        # callbacks, after `submitted`.
        sent: list[dict[str, Any]] = []
        self.committer.after_commit(lambda: self._hand_over(worker, messages, sent), ids, first=True)
        if self.events.everything or self.events.by_job:
            self.committer.after_commit(lambda: self._announce_started(worker, sent), ids)
        self.sampler.start()

    def _hand_over(self, worker: WorkerHandle, messages: list[dict[str, Any]],
                   sent: list[dict[str, Any]]) -> None:
        """Send the claimed jobs whose claims committed; those sent go into sent."""
        live = [m for m in messages if m["id"] in worker.jobs]
        if not live or worker.exit_status is not None:
            return  # its exit put them back already
        if worker.state is WorkerState.RETIRING:
            # Retired (drain, scale-down, reload) while the claims committed: these
            # jobs never start there; they go back without charging an attempt.
            for m in live:
                rj = worker.jobs.pop(m["id"])
                self.running.pop(rj.id, None)
                self._job_left_worker(rj)
                self._requeue_uncharged(rj)
            self._check_drained()
            return
        worker.send({"t": "run", "jobs": live})
        sent.extend(live)

    def _announce_started(self, worker: WorkerHandle, sent: list[dict[str, Any]]) -> None:
        for m in sent:
            rj = worker.jobs.get(m["id"])
            if rj is not None and self.events.wants(rj.id):
                self.events.publish(
                    {"event": "started", "job_id": rj.id, "job": rj.to_dict()},
                    rj.queue, rj.task, rj.run_id,
                )

