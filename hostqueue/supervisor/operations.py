"""The control plane's ops: validate a request, act through the supervisor, return the reply.

Each ``op_<name>`` takes the connection and the request dict and returns the
reply's data (a dict), or an awaitable of it. Errors are ProtocolErrors with a
code from errors.ERROR_CODES and a message that names the field and the fix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import reprlib
import os
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from hostqueue import __version__
from hostqueue.supervisor.actions import wait_timeout
from hostqueue.supervisor.deferred import DeferredReply
from hostqueue.store import display_name
from hostqueue.store.base import StoreBusy, StoreError, StoreKeyTaken
from hostqueue.core.errors import ProtocolError
from hostqueue.supervisor.events import Subscription
from hostqueue.supervisor.readyindex import PRIORITY_MAX, PRIORITY_MIN
from hostqueue.core.settings import MAX_WORKERS
from hostqueue.core.states import ALL_STATES, FINAL_STATES, SupervisorState

if TYPE_CHECKING:
    from hostqueue.supervisor.control import Connection
    from hostqueue.supervisor.main import Supervisor

log = logging.getLogger("hostqueue.control")
audit = logging.getLogger("hostqueue.audit")

Reply = dict[str, Any] | DeferredReply | Awaitable[dict[str, Any] | None] | None
MAX_LIST = 10_000
MAX_SECONDS = 30 * 86400.0  # a month: longer time limits are mistakes
# The fields _submit_options() reads.
SUBMIT_OPTIONS = frozenset(("queue", "priority", "retries", "timeout", "key", "run_id", "delay",
                            "run_at", "deadline", "deadline_at"))
# Names, checked for length (MAX_NAME).
NAME_FIELDS = frozenset(("task", "queue", "key", "run_id", "status"))
MAX_NAME = 200

_MISSING = object()


def _field(
    req: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    required: bool = False,
    default: Any = None,
) -> Any:
    value = req.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise ProtocolError("bad_request", f"field '{name}' is required for op '{req.get('op')}'")
        return default
    # The usual cases, on every submit, first: a name, the args.
    if kind is str and type(value) is str:
        return _name_length_checked(name, value)
    if kind is dict and type(value) is dict:
        return value
    if kind is int and type(value) is int and -(2**63) <= value < 2**63:  # a job id
        return value
    if kind is float and type(value) is float and math.isfinite(value):  # a timeout
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON has no separate bool: never let true stand for 1.
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif float in kinds and isinstance(value, int):
        ok = True
    else:
        ok = isinstance(value, kinds)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ProtocolError("bad_request", f"field '{name}' is out of range (a 64-bit integer)")
    if not ok:
        names = " or ".join(
            {"int": "an integer", "float": "a number", "str": "a string", "dict": "an object",
             "list": "a list", "bool": "true or false"}[k.__name__] for k in kinds
        )
        raise ProtocolError("bad_request", f"field '{name}' must be {names}, got {type(value).__name__} {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError("bad_request", f"field '{name}' must be a finite number")
    if isinstance(value, str):
        return _name_length_checked(name, value)
    return value


def _name_length_checked(name: str, value: str) -> str:
    if len(value) > MAX_NAME and name in NAME_FIELDS:
        raise ProtocolError("bad_request", f"field '{name}' is longer than {MAX_NAME} characters")
    return value


_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 40
_REPR.maxother = 40


def _short(value: Any) -> str:
    """A bounded repr for error messages (deeply nested input must not recurse)."""
    return _REPR.repr(value)


def _job_id(req: dict[str, Any]) -> int:
    job_id = _field(req, "job", int, required=True)
    if job_id <= 0:
        raise ProtocolError("bad_request", f"field 'job' must be a positive job id, got {job_id}")
    return int(job_id)


def _absolute(value: Any) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def submit_many_reply(req: dict[str, Any]) -> str:
    """What a submit_many asks back: "jobs" (each job, the default) or "ids"."""
    reply = _field(req, "reply", str, default="jobs")
    if reply not in ("jobs", "ids"):
        raise ProtocolError("bad_request", f"field 'reply' must be 'jobs' or 'ids', got {reply!r}")
    return reply


def submit_wait(req: dict[str, Any]) -> float | None:
    """A submit's "wait": None (reply once committed), seconds, or math.inf for true."""
    wait = _field(req, "wait", (bool, float))
    if wait is None or wait is False:
        return None
    if wait is True:
        return math.inf
    if not 0 <= wait <= MAX_SECONDS:
        raise ProtocolError(
            "bad_request", f"field 'wait' must be true, false or seconds between 0 and {MAX_SECONDS:g}"
        )
    return float(wait)


class Operations:
    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor
        self.handlers: dict[str, Callable[["Connection", dict[str, Any]], Reply]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")
        }

    def dispatch(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        op = req.get("op")
        if not isinstance(op, str):
            raise ProtocolError("bad_request", "field 'op' is required and must be a string, like \"ping\"")
        handler = self.handlers.get(op)
        if handler is None:
            raise ProtocolError("unknown_op", f"unknown op {op[:60]!r}; ops are: {', '.join(sorted(self.handlers))}")
        return handler(conn, req)

    def _audit(self, conn: "Connection", what: str) -> None:
        pid, uid, _ = conn.peer or (0, -1, -1)
        exe = "?"
        if pid:
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                pass
        audit.info("%s by pid %d uid %d (%s)", what, pid, uid, exe)

    # -- jobs -------------------------------------------------------------------------

    def _submit_options(self, req: dict[str, Any]) -> dict[str, Any]:
        if SUBMIT_OPTIONS.isdisjoint(req):  # the usual submit: defaults all
            return dict.fromkeys(("queue", "priority", "retries", "timeout", "key", "run_id",
                                  "run_at", "deadline"))
        now = time.time()
        opts: dict[str, Any] = {
            "queue": _field(req, "queue", str),
            "priority": _field(req, "priority", int),
            "retries": _field(req, "retries", int),
            "timeout": _field(req, "timeout", float),
            "key": _field(req, "key", str),
            "run_id": _field(req, "run_id", str),
        }
        if opts["queue"] is not None and not opts["queue"]:
            raise ProtocolError("bad_request", "field 'queue' must not be empty")
        if opts["priority"] is not None and not PRIORITY_MIN <= opts["priority"] <= PRIORITY_MAX:
            raise ProtocolError("bad_request", f"field 'priority' must be between {PRIORITY_MIN} and {PRIORITY_MAX}")
        if opts["retries"] is not None and not 0 <= opts["retries"] <= 1000:
            raise ProtocolError("bad_request", "field 'retries' must be between 0 and 1000")
        if opts["timeout"] is not None and not 0 < opts["timeout"] <= MAX_SECONDS:
            raise ProtocolError("bad_request", f"field 'timeout' must be a number of seconds > 0 and <= {MAX_SECONDS:g}")
        delay = _field(req, "delay", float)
        run_at = _field(req, "run_at", float)
        if delay is not None and run_at is not None:
            raise ProtocolError("bad_request", "give 'delay' or 'run_at', not both")
        if delay is not None:
            if not 0 <= delay <= MAX_SECONDS * 120:
                raise ProtocolError("bad_request", "field 'delay' must be >= 0 seconds (and under ten years)")
            run_at = now + delay
        opts["run_at"] = run_at
        deadline = _field(req, "deadline", float)
        deadline_at = _field(req, "deadline_at", float)
        if deadline is not None and deadline_at is not None:
            raise ProtocolError("bad_request", "give 'deadline' or 'deadline_at', not both")
        if deadline is not None:
            if deadline <= 0:
                raise ProtocolError("bad_request", "field 'deadline' must be a number of seconds > 0")
            deadline_at = now + deadline
        opts["deadline"] = deadline_at
        return opts

    def public(self, error: object) -> str:
        """An error's text for a client: the store's path is the operator's business
        (`status` and the log name it), not every client's."""
        text = str(error)
        store = self.supervisor.config.store
        for path in {display_name(store), os.path.abspath(store), store}:
            text = text.replace(path, "the store")
        return text

    def _task(self, req: dict[str, Any]) -> Any:
        name = _field(req, "task", str, required=True)
        spec = self.supervisor.tasks.get(name)
        if spec is None:
            known = sorted(self.supervisor.tasks)
            hint = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none (start the supervisor with --tasks MODULE)"
            raise ProtocolError("unknown_task", f"no task named {name[:MAX_NAME]!r}; registered tasks: {hint}")
        return spec

    def _check_accepting(self) -> None:
        if self.supervisor.state is not SupervisorState.RUNNING:
            raise ProtocolError("draining", "the supervisor is shutting down and takes no new jobs; submit again after it restarts")
        committer = self.supervisor.committer
        if committer.failing:
            kind = committer.failure_kind
            hint = {
                "busy": "another process holds its lock (a backup, a sqlite3 shell): submit again shortly",
                "corrupt": "the store file is corrupt: nothing can be stored until the operator"
                           " restores or recovers it",
            }.get(kind or "", "it is retried every few seconds: submit again once space or"
                               " permissions are back")
            raise ProtocolError(
                "store_busy" if kind == "busy" else "store_error",
                f"the store cannot take writes now ({self.public(committer.last_error)});"
                f" nothing was stored; {hint}",
            )

    def op_submit(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        self._check_accepting()
        spec = self._task(req)
        args = _field(req, "args", dict, default={})
        opts = self._submit_options(req)
        wait = submit_wait(req)
        sup = self.supervisor
        key = opts["key"]
        key_ttl = _field(req, "key_ttl", float) if "key_ttl" in req else None
        if key_ttl is not None and (key is None or key_ttl <= 0):
            raise ProtocolError("bad_request", "field 'key_ttl' needs a 'key' and must be > 0 seconds")
        reply: Awaitable[dict[str, Any]]
        existing = sup.book.key_owner(key) if key is not None else None
        if key is not None and sup.cluster is not None:
            reply = self._submit_keyed_shared(spec, args, opts, key, key_ttl)
        elif existing is not None:
            reply = self._duplicate(existing)
        elif key_ttl is not None:
            reply = self._submit_cached(spec, args, opts, key, key_ttl)
        else:
            submitted = self._submit(spec, [args], opts, many=False)
            return submitted if wait is None else self._submit_and_wait(submitted, wait)
        return reply if wait is None else self._then_wait(reply, wait)

    def _submit_and_wait(self, submitted: DeferredReply, wait: float) -> DeferredReply:
        """_then_wait() without a task: the reply is written in the turn the job's
        end is committed (the usual case; the rest goes through _then_wait())."""
        out = DeferredReply()

        def on_submitted(reply: DeferredReply) -> None:
            if reply.cancelled() or reply.exception() is not None:
                out.follow(reply)
                return
            result = reply.result()
            job = result["job"]
            if job["status"] in FINAL_STATES:
                out.resolve(result)
                return
            timeout = None if wait == math.inf else wait

            def as_it_stands(waited: DeferredReply) -> None:
                waited.follow(asyncio.ensure_future(self._as_it_stands(job, result["duplicate"])))

            waited = self.supervisor.actions.wait_reply(
                job["id"], timeout, lambda ended: {"job": ended, "duplicate": result["duplicate"]},
                as_it_stands,
            )
            if waited is None:
                waited = DeferredReply()
                waited.follow(asyncio.ensure_future(self._then_wait(reply, wait)))
            out.follow(waited)

        submitted.add_done_callback(on_submitted)
        out.on_settled(submitted.cancel)  # gone before its commit: nothing to wait for then
        return out

    async def _as_it_stands(self, job: dict[str, Any], duplicate: bool) -> dict[str, Any]:
        """A submit's "wait" ran out: the job as it stands (it stays submitted)."""
        now = await self.supervisor.actions.committed_job(job["id"]) or job
        return {"job": now, "duplicate": duplicate}

    async def _then_wait(self, submitted: Awaitable[dict[str, Any]], wait: float) -> dict[str, Any]:
        """A submit with "wait": its reply once the job has ended, or after `wait`
        seconds with the job as it stands then (it stays submitted either way)."""
        reply = await submitted
        job = reply["job"]
        if job["status"] in FINAL_STATES:
            return reply
        timeout = None if wait == math.inf else wait
        try:
            ended = await self.supervisor.actions.wait_job(job["id"], timeout)
        except ProtocolError as exc:
            if exc.code != "timeout":
                raise
            return await self._as_it_stands(job, reply["duplicate"])
        return {"job": ended, "duplicate": reply["duplicate"]}

    async def _submit_cached(
        self, spec: Any, args: dict[str, Any], opts: dict[str, Any], key: str, key_ttl: float
    ) -> dict[str, Any]:
        """A completed job with this key, finished within key_ttl seconds, answers instead."""
        sup = self.supervisor
        await sup.committer.barrier(reads=True)
        done = await sup.store.completed_with_key(key, time.time() - key_ttl)
        owner = sup.book.key_owner(key)
        if owner is not None:  # a submit with this key got in while we read
            return await self._duplicate(owner)
        if done is not None:
            return {"job": done, "duplicate": True}
        self._check_accepting()
        result: dict[str, Any] = await self._submit(spec, [args], opts, many=False)
        return result

    async def _submit_keyed_shared(self, spec: Any, args: dict[str, Any], opts: dict[str, Any],
                                   key: str, key_ttl: float | None) -> dict[str, Any]:
        """A keyed submit on a store shared by several hosts: the key may be held by a
        job another host stored (found by a read, or by the unique index when both
        submit at once: then the other's job is the answer)."""
        sup = self.supervisor
        for _ in range(5):
            await sup.committer.barrier(reads=True)
            existing = await sup.shared_store.unfinished_with_key(key)
            if existing is None and key_ttl is not None:
                done = await sup.store.completed_with_key(key, time.time() - key_ttl)
                if done is not None:
                    return {"job": done, "duplicate": True}
            if existing is None:
                existing = sup.book.key_owner(key)  # a submit of ours on its way
            if existing is not None:
                job = await sup.actions.committed_job(existing)
                if job is not None:
                    return {"job": job, "duplicate": True}
                continue  # that submit lost to another host's: look again
            self._check_accepting()
            try:
                result: dict[str, Any] = await self._submit(spec, [args], opts, many=False)
            except ProtocolError as exc:
                if exc.code != "key_taken":
                    raise
                continue  # another host stored one at the same moment: it is the answer
            return result
        raise ProtocolError("store_error", f"nothing was stored: the key {key!r} was taken and"
                            " freed again several times while this submit looked; submit again")

    async def _duplicate(self, job_id: int) -> dict[str, Any]:
        job = await self.supervisor.actions.committed_job(job_id)
        if job is None:
            raise ProtocolError("store_error", f"the job {job_id} holding this key was not stored; submit again")
        return {"job": job, "duplicate": True}

    def _submit(self, spec: Any, args_list: list[dict[str, Any]], opts: dict[str, Any], many: bool,
                ids_only: bool = False) -> DeferredReply:
        sup = self.supervisor
        if not sup.ids_ready(len(args_list)):
            # Several hosts: ids come from the store a range at a time; this one first.
            later = DeferredReply()
            later.follow(asyncio.ensure_future(self._submit_later(spec, args_list, opts, many, ids_only)))
            return later
        reply = DeferredReply()

        def done(jobs: list[dict[str, Any]] | None, error: BaseException | None) -> None:
            if error is not None:
                code = "store_busy" if isinstance(error, StoreBusy) else "store_error"
                if isinstance(error, StoreKeyTaken) and error.key == opts.get("key"):
                    code = "key_taken"  # _submit_keyed_shared() answers with the other job
                reply.fail(ProtocolError(code, f"nothing was stored: {self.public(error)}"))
            elif ids_only:
                reply.resolve({"ids": list(ids)})
            elif many:
                reply.resolve({"jobs": jobs})
            else:
                assert jobs is not None
                reply.resolve({"job": jobs[0], "duplicate": False})

        ids = self.supervisor.actions.submit_jobs(spec, args_list, opts, done, ids_only=ids_only)
        return reply

    async def _submit_later(self, spec: Any, args_list: list[dict[str, Any]], opts: dict[str, Any],
                            many: bool, ids_only: bool) -> dict[str, Any]:
        cluster = self.supervisor.cluster
        assert cluster is not None
        try:
            await cluster.ensure_ids(len(args_list))
        except StoreError as exc:
            raise ProtocolError("store_error", f"nothing was stored: {self.public(exc)}") from None
        self._check_accepting()
        result: dict[str, Any] = await self._submit(spec, args_list, opts, many, ids_only)
        return result

    def op_submit_many(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        self._check_accepting()
        spec = self._task(req)
        args_list = _field(req, "args", list, required=True)
        for i, args in enumerate(args_list):
            if not isinstance(args, dict):
                raise ProtocolError("bad_request", f"'args[{i}]' must be an object of keyword arguments, got {type(args).__name__}")
        if req.get("key") is not None:
            raise ProtocolError("bad_request", "'key' is not accepted by submit_many; submit keyed jobs one by one")
        opts = self._submit_options(req)
        ids_only = submit_many_reply(req) == "ids"
        if not args_list:
            return {"ids": []} if ids_only else {"jobs": []}
        return self._submit(spec, args_list, opts, many=True, ids_only=ids_only)

    def op_get(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        job_id = _job_id(req)
        return self._get(job_id)

    async def _get(self, job_id: int) -> dict[str, Any]:
        job = await self.supervisor.actions.committed_job(job_id)
        if job is None:
            raise ProtocolError("not_found", f"no job has id {job_id}")
        job["attempt_log"] = await self.supervisor.store.attempts_of(job_id)
        if job["status"] == "pending":
            job["waiting"] = self.supervisor.actions.why_waiting(job)
        return {"job": job}

    def op_list(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        status = _field(req, "status", str)
        if status is not None and status not in ALL_STATES:
            raise ProtocolError("bad_request", f"field 'status' must be one of {', '.join(ALL_STATES)}")
        limit = _field(req, "limit", int, default=100)
        if not 1 <= limit <= MAX_LIST:
            raise ProtocolError("bad_request", f"field 'limit' must be between 1 and {MAX_LIST}")
        filters = {
            "status": status,
            "queue": _field(req, "queue", str),
            "task": _field(req, "task", str),
            "run_id": _field(req, "run_id", str),
            "limit": limit,
            "before": _field(req, "before", int),
        }
        return self._list(filters)

    async def _list(self, filters: dict[str, Any]) -> dict[str, Any]:
        await self.supervisor.committer.barrier(reads=True)
        return {"jobs": await self.supervisor.store.list_jobs(**filters)}

    def op_wait(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        job_id = _job_id(req)
        timeout = _field(req, "timeout", float)
        if timeout is not None and timeout < 0:
            raise ProtocolError("bad_request", "field 'timeout' must be >= 0 seconds")
        waited = self.supervisor.actions.wait_reply(
            job_id, timeout, lambda job: {"job": job},
            lambda reply: reply.fail(wait_timeout(job_id, timeout or 0.0)),
        )
        return waited if waited is not None else self._wait(job_id, timeout)

    async def _wait(self, job_id: int, timeout: float | None) -> dict[str, Any]:
        return {"job": await self.supervisor.actions.wait_job(job_id, timeout)}

    def op_watch(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        job_id = _field(req, "job", int)
        request_id = req.get("id")
        sub = Subscription(
            sink=lambda e: None,
            job_id=job_id,
            queue=_field(req, "queue", str),
            task=_field(req, "task", str),
            run_id=_field(req, "run_id", str),
        )
        return self._watch(conn, request_id, sub)

    async def _watch(self, conn: "Connection", request_id: Any, sub: Subscription) -> None:
        sup = self.supervisor
        held: list[dict[str, Any]] = []
        acked = False

        def sink(event: dict[str, Any]) -> None:
            message = {"id": request_id}
            message.update(event)
            if not acked:
                held.append(message)
                return
            conn.write(message)
            if sub.job_id is not None and event["event"] in FINAL_STATES:
                sup.events.unsubscribe(sub)
                if sub in conn.subscriptions:
                    conn.subscriptions.remove(sub)
                conn.maybe_close()

        sub.sink = sink
        sup.events.subscribe(sub)
        conn.subscriptions.append(sub)
        job = None
        if sub.job_id is not None:
            job = await sup.actions.committed_job(sub.job_id)
            if job is None:
                sup.events.unsubscribe(sub)
                conn.subscriptions.remove(sub)
                raise ProtocolError("not_found", f"no job has id {sub.job_id}")
        conn.reply(request_id, {"watching": sub.job_id})
        acked = True
        if job is not None and job["status"] in FINAL_STATES and not any(m.get("event") in FINAL_STATES for m in held):
            held.append({"id": request_id, "event": job["status"], "job_id": job["id"], "job": job})
        for message in held:
            sink({k: v for k, v in message.items() if k != "id"})
        return None

    def op_abort(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        job_id = _job_id(req)
        self._audit(conn, f"abort job {job_id}")
        return self._abort(job_id)

    async def _abort(self, job_id: int) -> dict[str, Any]:
        return {"job": await self.supervisor.actions.abort_job(job_id)}

    def op_abort_run(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        run_id = _field(req, "run_id", str, required=True)
        self._audit(conn, f"abort run {run_id!r}")
        return self._abort_run(run_id)

    async def _abort_run(self, run_id: str) -> dict[str, Any]:
        sup = self.supervisor
        await sup.committer.barrier(reads=True)
        ids = await sup.store.unfinished_ids(run_id)
        # Those that ended meanwhile are left out.
        return {"jobs": await sup.actions.abort_jobs(ids)}

    def op_retry(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        job_id = _job_id(req)
        self._audit(conn, f"retry job {job_id}")
        return self._retry(job_id)

    async def _retry(self, job_id: int) -> dict[str, Any]:
        self._check_accepting()
        return {"job": await self.supervisor.actions.retry_job(job_id)}

    def op_retry_all(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        status = _field(req, "status", str, default="failed")
        if status not in ("failed", "cancelled", "expired"):
            raise ProtocolError("bad_request", "field 'status' must be failed, cancelled or expired")
        queue = _field(req, "queue", str)
        task = _field(req, "task", str)
        self._audit(conn, f"retry all {status} jobs")
        return self._retry_all(status, queue, task)

    async def _retry_all(self, status: str, queue: str | None, task: str | None) -> dict[str, Any]:
        self._check_accepting()
        sup = self.supervisor
        await sup.committer.barrier(reads=True)
        jobs = []
        for job_id in await sup.store.ended_ids(status, queue, task):
            try:
                jobs.append(await sup.actions.retry_job(job_id))
            except ProtocolError:
                continue
        return {"jobs": jobs}

    # -- the supervisor ----------------------------------------------------------------

    def op_ping(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        return {"pong": {"pid": os.getpid(), "version": __version__, "state": self.supervisor.state.value}}

    def op_status(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        if self.supervisor.cluster is not None:
            return self._status_with_hosts()
        return {"status": self.supervisor.actions.status()}

    async def _status_with_hosts(self) -> dict[str, Any]:
        """Several hosts: this host's status, with the hosts alive and this one's part."""
        sup = self.supervisor
        assert sup.cluster is not None
        status = sup.actions.status()
        status["cluster"] = sup.cluster.describe()
        try:
            released = await sup.shared_store.released_by_queue(time.time())
        except StoreError:
            released = {}
        waiting = status["waiting_by_queue"]
        for queue, n in released.items():  # released jobs wait for any host
            waiting[queue] = waiting.get(queue, 0) + n
        try:
            status["hosts"] = [h for h in await sup.shared_store.hosts() if h["alive"]]
        except StoreError as exc:
            status["hosts"] = None
            status["hosts_error"] = self.public(exc)
        return {"status": status}

    def op_stats(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        run_id = _field(req, "run_id", str)
        return self._stats(run_id)

    async def _stats(self, run_id: str | None) -> dict[str, Any]:
        return {"stats": await self.supervisor.count_by_state(run_id)}

    def op_metrics(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        return self._metrics()

    async def _metrics(self) -> dict[str, Any]:
        return {"metrics": await self.supervisor.metrics_text()}

    def op_schedules(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        return {"schedules": self.supervisor.scheduler.describe()}

    def op_scale(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        n = _field(req, "n", int, required=True)
        if not 0 <= n <= MAX_WORKERS:
            raise ProtocolError("bad_request", f"field 'n' must be between 0 and {MAX_WORKERS}, got {n}")
        if self.supervisor.state is not SupervisorState.RUNNING:
            raise ProtocolError("draining", "the supervisor is shutting down; scaling is not possible now")
        self._audit(conn, f"scale to {n}")
        previous = self.supervisor.scale(n)
        return {"scale": {"previous": previous, "target": n}}

    def op_pause(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        queue = _field(req, "queue", str)
        self._audit(conn, f"pause {queue or 'every queue'}")
        return {"paused": self.supervisor.actions.set_paused(queue, True)}

    def op_resume(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        queue = _field(req, "queue", str)
        self._audit(conn, f"resume {queue or 'every queue'}")
        return {"paused": self.supervisor.actions.set_paused(queue, False)}

    def op_reload(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        if self.supervisor.state is not SupervisorState.RUNNING:
            raise ProtocolError("draining", "the supervisor is shutting down; reload is not possible now")
        self._audit(conn, "reload")
        return {"reload": self.supervisor.reload()}

    def op_stop(self, conn: "Connection", req: dict[str, Any]) -> Reply:
        mode = _field(req, "mode", str, default="drain")
        if mode not in ("drain", "fast"):
            raise ProtocolError("bad_request", "field 'mode' must be 'drain' or 'fast'")
        self._audit(conn, f"stop ({mode})")
        sup = self.supervisor
        sup.loop.call_soon(sup.begin_drain, 0.0 if mode == "fast" else None)
        return {"stop": {"mode": mode}}
