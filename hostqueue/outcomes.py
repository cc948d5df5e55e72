"""Outcomes: what the end of an attempt does to its job (completed, retried later,
failed, cancelled, or back to pending uncharged), in the store and in memory.

A mixin of ``Supervisor``. Every write joins the group commit; waiters and
watchers hear of a final state after it is committed (the announcer).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import orjson

from .parts import SupervisorParts
from .pool import RunningJob, WorkerHandle
from .readyindex import Payload
from .states import JobStatus, WorkerState

log = logging.getLogger("hostqueue.supervisor")

RECENT_FINALS = 20_000  # final states remembered to answer races without a read
# Jobs just ended, whole: a `wait` that arrives right after its job ended (the
# usual case for a fast job) answers from memory, not from a read.
RECENT_JOBS = 1024
RECENT_JOB_BYTES = 16 * 1024  # larger args and results are read back instead


def error_json(error: dict[str, Any] | None) -> str | None:
    return orjson.dumps(error).decode() if error is not None else None


def lost_error(message: str) -> dict[str, Any]:
    return {"type": "WorkerLost", "message": message, "traceback": None}


def final_job(rj: RunningJob, status: str, result: str | None, error: dict[str, Any] | None,
              now: float) -> dict[str, Any]:
    """The job as its final write leaves it in the store, from what is in memory."""
    job = rj.to_dict()
    job.update(status=status, finished_at=now, error=error,
               result=orjson.loads(result) if result is not None else None,
               cpu_seconds=rj.cpu_seconds, peak_rss=rj.peak_rss)
    return job


class Outcomes(SupervisorParts):
    """The outcome half of the supervisor; its state lives on the Supervisor."""



    def _on_outcomes(self, worker: WorkerHandle, message: dict[str, Any]) -> None:
        outcomes: list[dict[str, Any]] = message["o"]
        if message.get("mem") is not None:
            worker.rss_now = message["mem"]
        now = time.time()
        held = worker.jobs
        running = self.running
        left = self.shaper.finished
        for o in outcomes:
            rj = held.pop(o["id"], None)
            if rj is None:
                continue
            running.pop(rj.id, None)
            left((rj.queue, rj.task))  # its limits are free again (see _job_left_worker)
            worker.jobs_done += 1
            if o.get("p") is not None:
                rj.progress, rj.progress_message = o["p"], o.get("pm")
            rj.cpu_seconds, rj.peak_rss = o.get("cpu"), o.get("rss")
            if o.get("ft") is not None and o.get("st") is not None:
                took = max(0.0, o["ft"] - o["st"])
                avg = self.task_runtime.get(rj.task)
                self.task_runtime[rj.task] = took if avg is None else avg * 0.8 + took * 0.2
            status = o["s"]
            if status == "ok":
                self._finish(rj, JobStatus.COMPLETED, o.get("r"), None, now)
            elif status == "returned":
                self._requeue_uncharged(rj)
            elif status == "aborted" or rj.abort_requested:
                self._finish(rj, JobStatus.CANCELLED, None, o.get("e"), now, attempt_started=o.get("st"))
            elif status == "permanent":
                self._finish(rj, JobStatus.FAILED, None, o.get("e"), now, attempt_started=o.get("st"))
            else:
                self._fail_attempt(rj, o.get("e"), now, delay=o.get("d"), attempt_started=o.get("st"))
        self._wake_dispatch()
        self.sizer.maybe_recycle(worker)
        if not worker.jobs and not worker.fetching and worker.state is WorkerState.BUSY:
            worker.state = WorkerState.IDLE
            self.sizer.became_idle(worker)
            self._wake_dispatch()
            self._update_title()

    def _finish(
        self,
        rj: RunningJob,
        status: JobStatus,
        result: str | None,
        error: dict[str, Any] | None,
        now: float,
        attempt_started: float | None = None,
    ) -> None:
        sv = status.value
        self.committer.add(
            "finish",
            (sv, result, error_json(error) if error is not None else None, now, rj.progress,
             rj.progress_message, rj.cpu_seconds, rj.peak_rss, rj.id),
        )
        # The attempt log keeps every failed attempt, and the last one of a job that
        # needed several; a job done at the first try has its figures on its row.
        if error is not None or rj.attempt > 1:
            self.committer.add(
                "record_attempt",
                (rj.id, rj.attempt, status.value, error_json(error), rj.worker_pid,
                 attempt_started or rj.claimed_at, now, rj.cpu_seconds, rj.peak_rss),
            )
        self._forget(rj.id, rj.key, sv, now)
        self.counters[sv] += 1
        self.runtime.observe(max(0.0, now - (attempt_started or rj.claimed_at)))
        if status is JobStatus.FAILED and error is not None:
            log.warning("job %d %s failed: %s: %s", rj.id, rj.task, error.get("type"), error.get("message"))
        # The store keeps an earlier attempt's progress when this one reported none:
        # only then is the row worth reading back.
        whole = rj.progress is not None or rj.attempt == 1
        if whole and len(rj.args) + len(result or "") <= RECENT_JOB_BYTES:
            recent = self.recent_jobs
            recent[rj.id] = (rj, sv, result, error, now)
            if len(recent) > RECENT_JOBS:
                recent.popitem(last=False)
        if rj.id in self.waiters or self.events.wants(rj.id):
            self.announcer.after_commit(rj.id, sv, final_job(rj, sv, result, error, now) if whole else None)

    def _forget(self, job_id: int, key: str | None, status: str, now: float | None = None) -> None:
        if key is not None and self.keys.get(key) == job_id:
            del self.keys[key]
        self.payloads.pop(job_id, None)
        keep = self.retention.get(status)
        if keep is not None:
            self.retention_sweeper.arm((now or time.time()) + keep)
        finals = self.recent_finals
        finals[job_id] = status
        if len(finals) > RECENT_FINALS:
            finals.popitem(last=False)

    def backoff(self, rj: RunningJob) -> float:
        spec = self.tasks.get(rj.task)
        base, factor, cap = (spec.backoff_base, spec.backoff_factor, spec.backoff_cap) if spec else (1.0, 2.0, 300.0)
        delay = base * factor ** max(rj.attempt - 1, 0)
        return min(cap, delay * random.uniform(0.75, 1.25))

    def _fail_attempt(
        self,
        rj: RunningJob,
        error: dict[str, Any] | None,
        now: float,
        delay: float | None = None,
        attempt_started: float | None = None,
    ) -> None:
        if rj.attempt >= rj.max_attempts:
            self._finish(rj, JobStatus.FAILED, None, error, now, attempt_started)
            return
        run_at = now + (self.backoff(rj) if delay is None else delay)
        self.committer.add("retry_later", (run_at, error_json(error), rj.id))
        self.committer.add(
            "record_attempt",
            (rj.id, rj.attempt, "retrying", error_json(error), rj.worker_pid,
             attempt_started or rj.claimed_at, now, rj.cpu_seconds, rj.peak_rss),
        )
        self.counters["retried"] += 1
        self.runtime.observe(max(0.0, now - (attempt_started or rj.claimed_at)))
        self._make_pending(rj, rj.attempt, run_at)
        if self.events.wants(rj.id):
            # Not final: told at once, in order with `started`, from what we know.
            job = rj.to_dict()
            job.update(status="pending", run_at=run_at, error=error, started_at=None,
                       worker_pid=None, finished_at=None)
            self.events.publish({"event": "retrying", "job_id": rj.id, "job": job},
                                rj.queue, rj.task, rj.run_id)

    def _requeue_uncharged(self, rj: RunningJob) -> None:
        """Back to pending as if the attempt never started (drain, worker retired)."""
        self.committer.add("requeue_uncharged", (rj.id,))
        self._make_pending(rj, rj.attempt - 1, rj.run_at)

    def _make_pending(self, rj: RunningJob, attempts: int, run_at: float) -> None:
        self.payloads[rj.id] = Payload(
            rj.task, rj.queue, rj.args, attempts, rj.max_attempts, rj.timeout, rj.priority,
            rj.run_id, rj.key, rj.created_at, run_at, rj.deadline,
        )
        self._enqueue(rj.id, rj.queue, rj.task, rj.priority, run_at, time.time())

    def _enqueue(
        self, job_id: int, queue: str, task: str, priority: int, run_at: float, now: float
    ) -> None:
        if run_at <= now:
            self.ready.push((queue, task), priority, job_id)
            self._wake_dispatch()
        else:
            self.delayed.push(run_at, job_id)
            self._arm_delay_timer()

