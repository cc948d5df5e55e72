"""Immediate mode: jobs run inline, in the caller's process, when they are submitted.

For unit tests of task code and of the code that submits jobs::

    client = hostqueue.Client.immediate(tasks=["myapp.tasks"])
    job = client.submit("myapp.tasks.resize", {"path": "a.png"})   # has run already
    assert job.result() == {...}
    assert [e["event"] for e in job.progress()][-1] == "completed"

or, without changing the code under test, ``HOSTQUEUE_IMMEDIATE=1`` in the environment:
every ``hostqueue.Client(...)`` is then an immediate client of one in-memory supervisor
per process, whose task modules come from ``$HOSTQUEUE_TASKS`` (comma-separated).

What is the same as production (so that a test that passes here does not fail there for
a reason immediate mode hid):

- every request is encoded by the real client (``hostqueue.client._encode``) and read
  back from those bytes, as the supervisor reads its socket: an argument that is not
  JSON-serialisable raises the same ``TypeError``, a tuple arrives as a list, a line
  over the supervisor's limit fails with ``line_too_long``;
- the request is validated by the supervisor's own code (``hostqueue.operations``):
  ``unknown_task``, ``bad_request`` and their messages are production's;
- the task gets a real ``hostqueue.JobContext``; outcomes follow the worker's rules
  (``hostqueue.worker.main.run_attempt``) and the supervisor's: every change of state is
  checked against the one transition table (``hostqueue.core.states``) and every outcome
  decided by the same rules (``hostqueue.core.outcome``):
  ``Retry``/``Permanent``/``Aborted``, a result that is not JSON fails the job at once,
  a ``TypeError`` from calling the task with the wrong arguments is permanent, attempts
  are counted and ``max_attempts`` is respected; errors are the worker's error dicts;
- replies, jobs and events have the shapes of docs/protocol.md, and come back through
  the same ``JobHandle``/``EventStream`` classes as from a real supervisor.

What differs, because nothing waits:

- a job runs during ``submit`` (``submit_many``: one after the other, in order), so the
  submit's reply shows it ``pending`` (with ``wait``: ended) but ``status()``, ``result()``
  and ``wait()`` already see it ended; ``delay``/``run_at`` and retry backoff (``Retry(delay=...)`` included)
  are not waited for: retries run at once;
- time limits (``timeout``) are not enforced: the task runs to its end;
- a job only stays ``pending`` while its queue is paused (``pause``), the pool is scaled
  to 0 (``scale(0)``) or after ``stop``; ``resume``/``scale(n)`` run what waits;
  so ``abort`` of a job that has ended fails with ``invalid_state``, as in production;
- an idempotency ``key`` matches only a job that has not ended, so two submits in a row
  with the same key both run (production would answer the second with the first while
  that one waits); ``key_ttl`` works as in production;
- schedules (``cron=``, ``[schedules]``) never fire; ``status`` reports no workers;
- ``progress()`` on a job replays every recorded event of the job (``started``,
  ``progress`` up to MAX_PROGRESS_EVENTS of them, ``retrying``) and then its final event.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import orjson

from hostqueue import __version__

from hostqueue.core import registry
from hostqueue.client.sync import Client, _encode
from hostqueue.core.context import JobContext
from hostqueue.core.errors import ProtocolError
from hostqueue.core.exceptions import Aborted, Permanent
from hostqueue.supervisor.operations import Operations, _field, _job_id, submit_many_reply, submit_wait
from hostqueue.core.registry import TaskModule, TaskModuleError, TaskSpec, _module_name, load_tasks
from hostqueue.core.settings import DEFAULT_MAX_LINE, MAX_WORKERS
from hostqueue.core import outcome
from hostqueue.core.states import ALL_STATES, FINAL_STATES, Event, State, transition
from hostqueue.store.base import JOB_COLUMNS
from hostqueue.worker.main import run_attempt

__all__ = ["ImmediateClient", "ImmediateSupervisor", "load_tasks", "shared_supervisor",
           "reset_shared_supervisor", "MAX_PROGRESS_EVENTS"]

UNFINISHED = ("pending", "running")
# Progress events kept per job for replay (live watchers get every one).
MAX_PROGRESS_EVENTS = 1000
ENV_FLAG = "HOSTQUEUE_IMMEDIATE"



# ---------------------------------------------------------------------------
# the in-memory supervisor


@dataclass(eq=False)
class _Sub:
    client: ImmediateClient
    rid: int
    job_id: int | None
    queue: str | None
    task: str | None
    run_id: str | None

    def matches(self, job: Mapping[str, Any]) -> bool:
        if self.job_id is not None:
            return bool(self.job_id == job["id"])
        return ((self.queue is None or self.queue == job["queue"])
                and (self.task is None or self.task == job["task"])
                and (self.run_id is None or self.run_id == job["run_id"]))


@dataclass(eq=False)
class _Waiter:
    client: ImmediateClient
    rid: int
    job_id: int
    expires: float | None  # Unix time, or None
    timeout: float | None


class _ProgressSink:
    """Takes the place of the worker's shared-memory slot: JobContext.progress() calls it."""

    def __init__(self, supervisor: ImmediateSupervisor, job_id: int) -> None:
        self.supervisor = supervisor
        self.job_id = job_id

    def progress(self, fraction: float, message: str | None) -> None:
        self.supervisor._progress(self.job_id, fraction, message)


_current = threading.local()  # the supervisor running a job in this thread (nested submits)


class ImmediateSupervisor:
    """An in-memory stand-in for the supervisor: holds jobs, runs them inline.

    ``tasks``: task modules (names, .py paths or module objects), as ``--tasks``.
    ``workers``: the pool's target size; 0 holds jobs pending, like a real pool of 0.
    Share one between clients with ``client()`` (or ``ImmediateClient(supervisor=...)``).
    Thread-safe: jobs run in the thread that submits (or resumes) them.
    """

    def __init__(self, tasks: Iterable[TaskModule] = (), *, workers: int = 1,
                 max_line: int = DEFAULT_MAX_LINE) -> None:
        self.modules: list[TaskModule] = list(tasks)
        self.tasks: dict[str, TaskSpec] = load_tasks(self.modules)
        self.target = workers
        self.max_line = max_line
        self.state = "running"
        self.started = time.time()
        self.paused: set[str] = set()
        self.keys: dict[str, int] = {}
        self.jobs: dict[int, dict[str, Any]] = {}
        self.attempt_logs: dict[int, list[dict[str, Any]]] = {}
        self.events: dict[int, list[dict[str, Any]]] = {}
        self.counters: dict[str, int] = {}
        self.next_id = 1
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self._subs: list[_Sub] = []
        self._waiters: list[_Waiter] = []
        self._aborts: dict[int, threading.Event] = {}
        self._progress_kept: dict[int, int] = {}
        # The supervisor's own validation (operations.py): _submit_options and _task
        # only read `self.supervisor.tasks`.
        self._ops = Operations.__new__(Operations)
        self._ops.supervisor = cast(Any, self)
        self._handlers: dict[str, Callable[[ImmediateClient, int, dict[str, Any], list[int]],
                                           dict[str, Any] | None]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")
        }

    def client(self, timeout: float | None = None) -> ImmediateClient:
        """A new client of this supervisor."""
        return ImmediateClient(timeout=timeout, supervisor=self)

    def __repr__(self) -> str:
        return f"<ImmediateSupervisor {len(self.tasks)} tasks, {len(self.jobs)} jobs>"

    # -- serving a request ------------------------------------------------------

    def serve(self, client: ImmediateClient, rid: int, data: bytes) -> None:
        """Answer one request line (as the real client encoded it) for ``client``."""
        if len(data.rstrip(b"\n")) > self.max_line:
            client._deliver(_failure(rid, ProtocolError(
                "line_too_long", f"request line exceeds {self.max_line} bytes")))
            return
        request = orjson.loads(data)  # what the supervisor's control server reads
        to_run: list[int] = []
        try:
            with self.lock:
                self._expire_deadlines(time.time())
                reply = self._dispatch(client, rid, request, to_run)
        except ProtocolError as exc:
            client._deliver(_failure(rid, exc))
            return
        # A submit with "wait" answers once its job ran (or with the job as it stands,
        # when it cannot run now: a paused queue, no workers).
        after_run = reply is not None and request.get("op") == "submit" and request.get("wait")
        if reply is not None and not after_run:
            client._deliver({"id": rid, "ok": True, **reply})
        self._run_jobs(to_run)
        if after_run:
            assert reply is not None
            with self.lock:
                job = self._job_view(reply["job"]["id"])
            client._deliver({"id": rid, "ok": True, "job": job, "duplicate": reply["duplicate"]})

    def _dispatch(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                  to_run: list[int]) -> dict[str, Any] | None:
        op = req.get("op")
        if not isinstance(op, str):
            raise ProtocolError("bad_request", "field 'op' is required and must be a string, like \"ping\"")
        handler = self._handlers.get(op)
        if handler is None:
            raise ProtocolError("unknown_op", f"unknown op {op[:60]!r}; ops are: {', '.join(sorted(self._handlers))}")
        return handler(client, rid, req, to_run)

    def _check_accepting(self) -> None:
        if self.state != "running":
            raise ProtocolError("draining", "the supervisor is shutting down and takes no new jobs; submit again after it restarts")

    def _get_job(self, job_id: int) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job has id {job_id}")
        return job

    # -- ops: jobs ----------------------------------------------------------------

    def op_submit(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                  to_run: list[int]) -> dict[str, Any] | None:
        self._check_accepting()
        spec = self._ops._task(req)
        args = _field(req, "args", dict, default={})
        opts = self._ops._submit_options(req)
        submit_wait(req)  # checked as in production; serve() answers after the run
        key = opts["key"]
        key_ttl = _field(req, "key_ttl", float)
        if key_ttl is not None and (key is None or key_ttl <= 0):
            raise ProtocolError("bad_request", "field 'key_ttl' needs a 'key' and must be > 0 seconds")
        if key is not None and key in self.keys:
            return {"job": self._job_view(self.keys[key]), "duplicate": True}
        if key is not None and key_ttl is not None:
            since = time.time() - key_ttl
            done = [j for j in self.jobs.values() if j["key"] == key and j["status"] == "completed"
                    and j["finished_at"] is not None and j["finished_at"] >= since]
            if done:
                newest = max(done, key=lambda j: (j["finished_at"], j["id"]))
                return {"job": self._job_view(newest["id"]), "duplicate": True}
        [job] = self._add(spec, [args], opts)
        to_run.append(job["id"])
        return {"job": job, "duplicate": False}

    def op_submit_many(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                       to_run: list[int]) -> dict[str, Any] | None:
        self._check_accepting()
        spec = self._ops._task(req)
        args_list = _field(req, "args", list, required=True)
        for i, args in enumerate(args_list):
            if not isinstance(args, dict):
                raise ProtocolError("bad_request", f"'args[{i}]' must be an object of keyword arguments, got {type(args).__name__}")
        if req.get("key") is not None:
            raise ProtocolError("bad_request", "'key' is not accepted by submit_many; submit keyed jobs one by one")
        opts = self._ops._submit_options(req)
        ids_only = submit_many_reply(req) == "ids"
        if not args_list:
            return {"ids": []} if ids_only else {"jobs": []}
        jobs = self._add(spec, args_list, opts)
        to_run.extend(j["id"] for j in jobs)
        return {"ids": [j["id"] for j in jobs]} if ids_only else {"jobs": jobs}

    def _add(self, spec: TaskSpec, args_list: list[dict[str, Any]],
             opts: dict[str, Any]) -> list[dict[str, Any]]:
        """New pending jobs (as hostqueue.actions.Actions.submit_jobs builds them)."""
        now = time.time()
        queue = opts.get("queue") or spec.queue
        priority = opts["priority"] if opts.get("priority") is not None else spec.priority
        retries = opts["retries"] if opts.get("retries") is not None else spec.retries
        timeout = opts["timeout"] if opts.get("timeout") is not None else spec.timeout
        replies = []
        for args in args_list:
            job_id = self.next_id
            self.next_id += 1
            job: dict[str, Any] = {c: None for c in JOB_COLUMNS}
            job.update(
                id=job_id, task=spec.name, queue=queue, status="pending", args=args,
                attempts=0, max_attempts=retries + 1, priority=priority, key=opts.get("key"),
                run_id=opts.get("run_id"), created_at=now, run_at=opts.get("run_at") or now,
                deadline=opts.get("deadline"), timeout=timeout, abort_requested=False,
            )
            self.jobs[job_id] = job
            self.attempt_logs[job_id] = []
            self.events[job_id] = []
            if job["key"] is not None:
                self.keys[job["key"]] = job_id
            self._count("submitted")
            replies.append(_copy(job))
        for job in replies:
            self._publish({"event": "submitted", "job_id": job["id"], "job": job}, record=False)
        return replies

    def op_get(self, client: ImmediateClient, rid: int, req: dict[str, Any],
               to_run: list[int]) -> dict[str, Any] | None:
        job = self._job_view(_job_id(req), get=True)
        return {"job": job}

    def op_list(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                to_run: list[int]) -> dict[str, Any] | None:
        status = _field(req, "status", str)
        if status is not None and status not in ALL_STATES:
            raise ProtocolError("bad_request", f"field 'status' must be one of {', '.join(ALL_STATES)}")
        limit = _field(req, "limit", int, default=100)
        if not 1 <= limit <= 10_000:
            raise ProtocolError("bad_request", "field 'limit' must be between 1 and 10000")
        filters = {k: _field(req, k, str) for k in ("queue", "task", "run_id")}
        before = _field(req, "before", int)
        found = []
        for job_id in sorted(self.jobs, reverse=True):
            job = self.jobs[job_id]
            if (before is not None and job_id >= before) or (status and job["status"] != status):
                continue
            if any(v is not None and job[k] != v for k, v in filters.items()):
                continue
            found.append(self._job_view(job_id))
            if len(found) >= limit:
                break
        return {"jobs": found}

    def op_wait(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                to_run: list[int]) -> dict[str, Any] | None:
        job_id = _job_id(req)
        timeout = _field(req, "timeout", float)
        if timeout is not None and timeout < 0:
            raise ProtocolError("bad_request", "field 'timeout' must be >= 0 seconds")
        job = self._get_job(job_id)
        if job["status"] in FINAL_STATES:
            return {"job": self._job_view(job_id)}
        expires = None if timeout is None else time.time() + timeout
        self._waiters.append(_Waiter(client, rid, job_id, expires, timeout))
        return None  # answered when the job ends, or with `timeout`

    def op_watch(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                 to_run: list[int]) -> dict[str, Any] | None:
        job_id = _field(req, "job", int)
        sub = _Sub(client, rid, job_id, _field(req, "queue", str), _field(req, "task", str),
                   _field(req, "run_id", str))
        if job_id is not None:
            self._get_job(job_id)
        client._deliver({"id": rid, "ok": True, "watching": job_id})
        if job_id is not None:
            # Everything the job did so far, then live events until its final one.
            for event in self.events.get(job_id, ()):
                client._deliver({"id": rid, **event})
            if self.jobs[job_id]["status"] in FINAL_STATES:
                return None
        self._subs.append(sub)
        return None

    def op_abort(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                 to_run: list[int]) -> dict[str, Any] | None:
        return {"job": self._abort(_job_id(req))}

    def _abort(self, job_id: int) -> dict[str, Any]:
        job = self._get_job(job_id)
        if job["status"] in FINAL_STATES:
            raise ProtocolError("invalid_state", f"job {job_id} has already ended ({job['status']}); nothing to abort")
        if job["status"] == "pending":
            self._move(job, Event.ABORTED)
            self._end(job, "cancelled", None, outcome.aborted_before_start(), time.time(),
                      attempt=False)
        else:
            job["abort_requested"] = True
            event = self._aborts.get(job_id)
            if event is not None:
                event.set()
        return self._job_view(job_id)

    def op_abort_run(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                     to_run: list[int]) -> dict[str, Any] | None:
        run_id = _field(req, "run_id", str, required=True)
        ids = [i for i, j in sorted(self.jobs.items())
               if j["run_id"] == run_id and j["status"] in UNFINISHED]
        return {"jobs": [self._abort(i) for i in ids]}

    def op_retry(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                 to_run: list[int]) -> dict[str, Any] | None:
        job_id = _job_id(req)
        self._check_accepting()
        job = self._revive(job_id)
        to_run.append(job_id)
        return {"job": job}

    def _revive(self, job_id: int) -> dict[str, Any]:
        """hostqueue.actions.Actions.retry_job: back to pending with fresh attempts."""
        job = self._get_job(job_id)
        if job["status"] not in ("failed", "cancelled", "expired"):
            raise ProtocolError(
                "invalid_state",
                f"job {job_id} is {job['status']}; only failed, cancelled or expired jobs can be retried",
            )
        if job["key"] is not None and job["key"] in self.keys:
            raise ProtocolError(
                "invalid_state", f"job {self.keys[job['key']]} with the same key {job['key']!r} is unfinished")
        self._move(job, Event.REVIVED)
        job.update(status="pending", attempts=0, run_at=time.time(), result=None, error=None,
                   finished_at=None, started_at=None, abort_requested=False, progress=None,
                   progress_message=None)
        if job["key"] is not None:
            self.keys[job["key"]] = job_id
        self.events[job_id] = []  # a watch of the revived job sees its new run only
        return self._job_view(job_id)

    def op_retry_all(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                     to_run: list[int]) -> dict[str, Any] | None:
        status = _field(req, "status", str, default="failed")
        if status not in ("failed", "cancelled", "expired"):
            raise ProtocolError("bad_request", "field 'status' must be failed, cancelled or expired")
        queue = _field(req, "queue", str)
        task = _field(req, "task", str)
        self._check_accepting()
        jobs = []
        for job_id, job in sorted(self.jobs.items()):
            if job["status"] != status or (queue and job["queue"] != queue) or (task and job["task"] != task):
                continue
            try:
                jobs.append(self._revive(job_id))
            except ProtocolError:
                continue
            to_run.append(job_id)
        return {"jobs": jobs}

    # -- ops: the supervisor ------------------------------------------------------

    def op_ping(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                to_run: list[int]) -> dict[str, Any] | None:
        return {"pong": {"pid": os.getpid(), "version": __version__, "state": self.state}}

    def op_status(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                  to_run: list[int]) -> dict[str, Any] | None:
        return {"status": {
            "pid": os.getpid(), "version": __version__, "uptime": time.time() - self.started,
            "store": ":memory:", "socket": None, "state": self.state, "workers": [],
            "target_workers": self.target, "paused": sorted(self.paused),
            "running_jobs": sum(1 for j in self.jobs.values() if j["status"] == "running"),
            "ready_jobs": sum(1 for j in self.jobs.values()
                              if j["status"] == "pending" and not self._held(j)),
            "immediate": True, "counters": dict(self.counters),
        }}

    def op_stats(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                 to_run: list[int]) -> dict[str, Any] | None:
        run_id = _field(req, "run_id", str)
        now = time.time()
        names = ("pending", "scheduled", "running", "completed", "failed", "cancelled", "expired")
        totals: dict[str, Any] = {n: 0 for n in names}
        queues: dict[str, dict[str, int]] = {}
        for job in self.jobs.values():
            if run_id is not None and job["run_id"] != run_id:
                continue
            state = job["status"]
            if state == "pending" and job["run_at"] > now:
                state = "scheduled"
            totals[state] += 1
            queues.setdefault(job["queue"], {n: 0 for n in names})[state] += 1
        totals["queues"] = queues
        return {"stats": totals}

    def op_metrics(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                   to_run: list[int]) -> dict[str, Any] | None:
        counts: dict[tuple[str, str], int] = {}
        for job in self.jobs.values():
            counts[(job["queue"], job["status"])] = counts.get((job["queue"], job["status"]), 0) + 1
        lines = ["# HELP hostqueue_jobs Jobs by queue and state.", "# TYPE hostqueue_jobs gauge"]
        lines += [f'hostqueue_jobs{{queue="{q}",state="{s}"}} {n}' for (q, s), n in sorted(counts.items())]
        return {"metrics": "\n".join(lines) + "\n"}

    def op_schedules(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                     to_run: list[int]) -> dict[str, Any] | None:
        return {"schedules": [
            {"name": s.name, "task": s.name, "cron": s.cron, "timezone": s.cron_timezone,
             "args": {}, "queue": s.queue, "priority": s.priority, "misfire": "run_once",
             "next_run": None, "last_run": None, "last_job": None}
            for s in sorted(self.tasks.values(), key=lambda s: s.name) if s.cron
        ]}

    def op_scale(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                 to_run: list[int]) -> dict[str, Any] | None:
        n = _field(req, "n", int, required=True)
        if not 0 <= n <= MAX_WORKERS:
            raise ProtocolError("bad_request", f"field 'n' must be between 0 and {MAX_WORKERS}, got {n}")
        if self.state != "running":
            raise ProtocolError("draining", "the supervisor is shutting down; scaling is not possible now")
        previous, self.target = self.target, n
        to_run.extend(self._runnable())
        return {"scale": {"previous": previous, "target": n}}

    def op_pause(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                 to_run: list[int]) -> dict[str, Any] | None:
        self.paused.add(_field(req, "queue", str) or "*")
        return {"paused": sorted(self.paused)}

    def op_resume(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                  to_run: list[int]) -> dict[str, Any] | None:
        queue = _field(req, "queue", str)
        if queue is None:
            self.paused.clear()
        else:
            self.paused.discard(queue)
        to_run.extend(self._runnable())
        return {"paused": sorted(self.paused)}

    def op_reload(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                  to_run: list[int]) -> dict[str, Any] | None:
        if self.state != "running":
            raise ProtocolError("draining", "the supervisor is shutting down; reload is not possible now")
        try:
            for entry in self.modules:  # re-import, as the supervisor's reload does
                name = entry.__name__ if isinstance(entry, ModuleType) else _module_name(entry)
                if name in sys.modules:
                    importlib.reload(sys.modules[name])
            tasks = load_tasks(self.modules)
        except Exception as exc:  # the running configuration stays, as in production
            raise ProtocolError("internal", f"reload failed: {type(exc).__name__}: {exc}") from None
        self.tasks = tasks
        return {"reload": {"workers": self.target, "tasks": sorted(self.tasks)}}

    def op_stop(self, client: ImmediateClient, rid: int, req: dict[str, Any],
                to_run: list[int]) -> dict[str, Any] | None:
        mode = _field(req, "mode", str, default="drain")
        if mode not in ("drain", "fast"):
            raise ProtocolError("bad_request", "field 'mode' must be 'drain' or 'fast'")
        self.state = "draining"
        return {"stop": {"mode": mode}}

    # -- running jobs ---------------------------------------------------------------

    def _held(self, job: Mapping[str, Any]) -> str | None:
        """Why a pending job cannot start now (None: it can)."""
        if self.state != "running":
            return "the supervisor is draining"
        if "*" in self.paused or job["queue"] in self.paused:
            return f"queue {job['queue']} is paused (hostqueue ctl resume {job['queue']})"
        if self.target == 0:
            return "no workers (hostqueue ctl scale N)"
        return None

    def _runnable(self) -> list[int]:
        ready = [j for j in self.jobs.values() if j["status"] == "pending" and not self._held(j)]
        ready.sort(key=lambda j: (-j["priority"], j["id"]))
        return [j["id"] for j in ready]

    def _run_jobs(self, ids: list[int]) -> None:
        for job_id in ids:
            self._run_job(job_id)

    def _run_job(self, job_id: int) -> None:
        """Run a pending job's attempts until it ends (retries at once) or is held."""
        while True:
            with self.lock:
                job = self.jobs.get(job_id)
                if job is None or job["status"] != "pending" or self._held(job):
                    return
                now = time.time()
                if job["deadline"] is not None and job["deadline"] <= now:
                    self._expire(job, now)
                    return
                attempt = job["attempts"] + 1
                self._move(job, Event.HANDED)  # handed and started at once: no worker to hold it
                self._move(job, Event.STARTED)
                job.update(status="running", attempts=attempt, started_at=now,
                           worker_pid=os.getpid(), finished_at=None)
                abort = threading.Event()
                if job["abort_requested"]:
                    abort.set()
                self._aborts[job_id] = abort
                self._progress_kept[job_id] = 0
                self._count("started")
                self._publish({"event": "started", "job_id": job_id, "job": _copy(job)})
                spec = self.tasks.get(job["task"])
                args_text = orjson.dumps(job["args"]).decode()
                max_attempts = job["max_attempts"]
                task_name = job["task"]
            previous = getattr(_current, "supervisor", None)
            _current.supervisor = self
            try:
                outcome, ctx, interrupt = self._attempt(spec, job_id, task_name, args_text,
                                                        attempt, max_attempts, abort)
            finally:
                _current.supervisor = previous
            with self.lock:
                self._aborts.pop(job_id, None)
                ended = self._apply(job, outcome, ctx)
            if interrupt is not None:
                raise interrupt
            if ended:
                return

    def _attempt(self, spec: TaskSpec | None, job_id: int, task_name: str, args_text: str,
                 attempt: int, max_attempts: int, abort: threading.Event
                 ) -> tuple[dict[str, Any], JobContext | None, BaseException | None]:
        """One attempt, classified by hostqueue.worker.run_attempt, as in a worker. No time limit."""
        started = time.time()
        cpu_started = time.process_time()
        outcome: dict[str, Any] = {"id": job_id, "st": started}
        ctx: JobContext | None = None
        interrupt: BaseException | None = None
        def call() -> Any:
            nonlocal ctx
            if abort.is_set():
                raise Aborted(f"job {job_id} was aborted before it started")
            if spec is None:
                raise Permanent(f"task {task_name!r} is not registered in this worker")
            args = orjson.loads(args_text)  # a fresh copy, as the worker gets from its pipe
            ctx = JobContext(job_id, task_name, attempt, max_attempts, args,
                             cast(Any, _ProgressSink(self, job_id)), abort)
            return spec.func(ctx, **args)

        fields, exc = run_attempt(call, task_name)  # the worker's own rules
        outcome.update(fields)
        if isinstance(exc, KeyboardInterrupt):
            interrupt = exc  # recorded, then handed back to the test run
        outcome["ft"] = time.time()
        outcome["cpu"] = time.process_time() - cpu_started
        return outcome, ctx, interrupt

    def _apply(self, job: dict[str, Any], o: dict[str, Any], ctx: JobContext | None) -> bool:
        """An attempt's outcome, decided by the supervisor's rules (core/outcome.py). True
        once the job ended."""
        now = time.time()
        if ctx is not None:
            p, pm = ctx.last_progress
            if p is not None:
                job["progress"], job["progress_message"] = p, pm
        job["cpu_seconds"], job["peak_rss"] = o.get("cpu"), None
        # Retries run at once: neither the backoff nor Retry(delay=...) is waited for.
        d = outcome.after_report({**o, "d": 0.0}, job["attempts"], job["max_attempts"],
                                 job["abort_requested"], now, lambda: 0.0)
        self._move(job, d.event, d.state)
        if d.state is State.PENDING:
            self._log_attempt(job, "retrying", d.error, o["st"], now)
            self._count("retried")
            job.update(status="pending", run_at=now, error=d.error, worker_pid=None)
            view = _copy(job)
            view.update(started_at=None, worker_pid=None, finished_at=None)
            self._publish({"event": "retrying", "job_id": job["id"], "job": view})
            return False
        result = orjson.loads(d.result) if d.result is not None else None
        self._end(job, d.state.value, result, d.error, now, started=o["st"])
        return True

    def _move(self, job: dict[str, Any], event: Event, to: State | None = None) -> None:
        """Check a change of state against the transition table (core/states.py);
        immediate mode has no held state: a job is handed and started at once."""
        state = State.HELD if event is Event.STARTED else State(job["status"])
        transition(state, event, to)

    def _log_attempt(self, job: dict[str, Any], status: str, error: Any, started: float,
                     finished: float) -> None:
        self.attempt_logs[job["id"]].append({
            "attempt": job["attempts"], "status": status, "error": error,
            "worker_pid": job["worker_pid"], "started_at": started, "finished_at": finished,
            "duration": finished - started, "cpu_seconds": job["cpu_seconds"], "peak_rss": None,
        })

    def _end(self, job: dict[str, Any], status: str, result: Any, error: Any, now: float,
             started: float | None = None, attempt: bool = True) -> None:
        job.update(status=status, result=result, error=error, finished_at=now)
        if attempt and (error is not None or job["attempts"] > 1):
            self._log_attempt(job, status, error, started or now, now)
        key = job["key"]
        if key is not None and self.keys.get(key) == job["id"]:
            del self.keys[key]
        self._count(status)
        view = _copy(job)
        self._publish({"event": status, "job_id": job["id"], "job": view})
        for waiter in [w for w in self._waiters if w.job_id == job["id"]]:
            self._waiters.remove(waiter)
            waiter.client._deliver({"id": waiter.rid, "ok": True, "job": view})

    def _expire(self, job: dict[str, Any], now: float) -> None:
        self._move(job, Event.EXPIRED)
        self._end(job, "expired", None, outcome.expired_error(job["attempts"]), now, attempt=False)

    def _expire_deadlines(self, now: float) -> None:
        for job in list(self.jobs.values()):
            if job["status"] == "pending" and job["deadline"] is not None and job["deadline"] <= now:
                self._expire(job, now)

    def _progress(self, job_id: int, fraction: float, message: str | None) -> None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or (job["progress"], job["progress_message"]) == (fraction, message):
                return
            job["progress"], job["progress_message"] = fraction, message
            kept = self._progress_kept.get(job_id, 0)
            record = kept < MAX_PROGRESS_EVENTS
            if record:
                self._progress_kept[job_id] = kept + 1
            self._publish({"event": "progress", "job_id": job_id, "progress": fraction,
                           "message": message}, record=record)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    # -- events, waiters ----------------------------------------------------------------

    def _publish(self, event: dict[str, Any], record: bool = True) -> None:
        event.setdefault("at", time.time())
        job = self.jobs[event["job_id"]]
        if record:
            self.events[job["id"]].append(event)
        final = event["event"] in FINAL_STATES
        for sub in list(self._subs):
            if not sub.client._wants(sub.rid):
                self._subs.remove(sub)  # its stream was closed by its reader
                continue
            if event["event"] == "submitted" and sub.job_id is not None:
                continue
            if sub.matches(job):
                sub.client._deliver({"id": sub.rid, **event})
                if final and sub.job_id is not None:
                    self._subs.remove(sub)

    def _expire_waiters(self, now: float) -> None:
        for waiter in [w for w in self._waiters if w.expires is not None and w.expires <= now]:
            self._waiters.remove(waiter)
            waiter.client._deliver(_failure(waiter.rid, ProtocolError(
                "timeout", f"job {waiter.job_id} did not end within {waiter.timeout:g} s")))

    def _next_expiry(self) -> float | None:
        times = [w.expires for w in self._waiters if w.expires is not None]
        return min(times) if times else None

    def _drop_client(self, client: ImmediateClient) -> None:
        with self.lock:
            self._subs = [s for s in self._subs if s.client is not client]
            self._waiters = [w for w in self._waiters if w.client is not client]

    def _job_view(self, job_id: int, get: bool = False) -> dict[str, Any]:
        job: dict[str, Any] = _copy(self._get_job(job_id))
        if get:
            job["attempt_log"] = _copy(self.attempt_logs.get(job_id, []))
            if job["status"] == "pending":
                job["waiting"] = self._held(job) or "ready: it runs next"
        return job


def _copy(value: Any) -> Any:
    """A deep copy as the wire makes it (replies are JSON)."""
    return orjson.loads(orjson.dumps(value))


def _failure(rid: int, exc: ProtocolError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": exc.to_dict()}


# The client, and the shared supervisor of HOSTQUEUE_IMMEDIATE=1, live beside this
# module; they are imported here so that this module offers the whole of immediate mode.
from hostqueue.client.immediate_client import (  # noqa: E402
    ImmediateClient, enabled, reset_shared_supervisor, shared_supervisor,
)
