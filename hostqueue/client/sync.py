"""Clients of the supervisor's control socket: ``Client`` (blocking) here, and
``AsyncClient`` in hostqueue.aclient (importable from here too).

Both speak the newline-delimited JSON protocol of docs/protocol.md over one Unix
stream connection. Every request gets a fresh integer id; replies are matched by
id, so requests can be pipelined and a watch stream can run on the same
connection as other calls: whatever arrives for an id nobody is reading yet is
kept for it until it is read.

    with Client() as c:
        job = c.submit("thumbnails.resize", {"path": "a.png"})
        for event in job.progress():
            print(event["event"], event.get("progress"))
        print(job.result(timeout=30))

Neither client is thread-safe: use one per thread (or one AsyncClient per loop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket as _socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import orjson

from hostqueue.core.errors import ERROR_CODES, JobFailed, ProtocolError, SupervisorUnavailable
from hostqueue.core.settings import resolve_socket
from hostqueue.core.states import FINAL_STATES, JobStatus

__all__ = [
    "AsyncClient",
    "AsyncEventStream",
    "AsyncJobHandle",
    "Client",
    "EventStream",
    "JobHandle",
]

log = logging.getLogger("hostqueue.client")

Job = dict[str, Any]
Obj = dict[str, Any]
# delay and deadline: seconds from now, or a datetime for an absolute time.
When = float | datetime | timedelta | None

# Events after which a job's stream ends (the final states have events of the same name).
FINAL_EVENTS = frozenset(s.value for s in FINAL_STATES)

READ_CHUNK = 256 * 1024
# When a `wait` has its own timeout, the server answers `timeout` itself; the client
# only gives up this much later, in case the server never answers at all.
WAIT_MARGIN = 5.0


# ---------------------------------------------------------------------------
# helpers shared by both clients (hostqueue.aclient imports them)


def _unavailable(path: str, reason: str) -> SupervisorUnavailable:
    return SupervisorUnavailable(
        f"cannot reach the hostqueue supervisor at {path} ({reason}); start one with "
        f"`hostqueue run --socket {path}`, or point --socket / $HOSTQUEUE_SOCKET at its socket"
    )


def _connection_error(path: str, reason: str, said: str | None) -> SupervisorUnavailable:
    if said:  # the server said why it hung up (forbidden): that is the news
        return SupervisorUnavailable(f"the supervisor at {path} closed the connection: {said}")
    return SupervisorUnavailable(
        f"lost the connection to the supervisor at {path} ({reason}); "
        "a request in flight may or may not have been carried out"
    )


def _connect_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there, the socket file may be stale"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, TimeoutError):
        return "timed out connecting"
    return exc.strerror or str(exc)


def _encode(message: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(message) + b"\n"
    except TypeError as exc:
        raise TypeError(
            f"cannot send op {message.get('op')!r}: a field is not JSON-serialisable ({exc})"
        ) from None


def _decode(line: bytes) -> dict[str, Any] | None:
    # A line we cannot read is the server's bug; dropping it keeps every other
    # request on the connection working, and the log says what happened.
    try:
        msg = orjson.loads(line)
    except orjson.JSONDecodeError:
        log.warning("ignoring a line from the supervisor that is not JSON: %.200r", line)
        return None
    if not isinstance(msg, dict):
        log.warning("ignoring a line from the supervisor that is not an object: %.200r", line)
        return None
    return msg


def _error(reply: Mapping[str, Any]) -> ProtocolError:
    err = reply.get("error")
    if not isinstance(err, Mapping):
        return ProtocolError("internal", f"malformed error reply: {reply!r}")
    code = str(err.get("code", "internal"))
    message = str(err.get("message", ""))
    if code not in ERROR_CODES:
        # A newer server may know codes this client does not; keep the code visible.
        return ProtocolError("internal", f"{code}: {message}")
    return ProtocolError(code, message)


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("ok") is False:
        raise _error(reply)
    return reply


def _when(value: When, relative: str, absolute: str, fields: dict[str, Any]) -> None:
    """delay/deadline: seconds from now, or a datetime for an absolute time."""
    if value is None:
        return
    if isinstance(value, datetime):
        fields[absolute] = value.timestamp()  # a naive datetime is local time
    elif isinstance(value, timedelta):
        fields[relative] = value.total_seconds()
    else:
        fields[relative] = value


def _submit_fields(queue: str | None, priority: int | None, delay: When, deadline: When,
                   retries: int | None, timeout: float | None, run_id: str | None
                   ) -> dict[str, Any]:
    fields = _present(queue=queue, priority=priority, retries=retries, timeout=timeout,
                      run_id=run_id)
    _when(delay, "delay", "run_at", fields)
    _when(deadline, "deadline", "deadline_at", fields)
    return fields


def _present(**fields: Any) -> dict[str, Any]:
    """Only the fields given: an absent field lets the server apply its default."""
    return {k: v for k, v in fields.items() if v is not None}


def _args(args: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if args is None or isinstance(args, dict):
        return args
    return dict(args)  # orjson serialises dicts only


def _submit_wait(fields: dict[str, Any], wait: bool | float | None,
                 client_timeout: float | None) -> float | None:
    """Put a submit's ``wait`` into its fields; return how long to wait for the reply."""
    if wait is None or wait is False:
        return client_timeout
    if wait is not True and (isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0):
        raise ValueError(f"wait must be True, False or a number of seconds >= 0, not {wait!r}")
    fields["wait"] = wait
    return _wait_deadline(None if wait is True else float(wait), client_timeout)


def _wait_deadline(timeout: float | None, client_timeout: float | None) -> float | None:
    if timeout is None:
        return None
    return timeout + (client_timeout if client_timeout is not None else WAIT_MARGIN)


def _timed_out(job_id: int, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"job {job_id} did not end within {timeout} s")


def _culprit(msg: Mapping[str, Any], sizes: Mapping[int, int]) -> int | None:
    """The request that a reply without an id answers, if it can be known.

    The server cannot read the id of a line it refuses as too long. That line is
    longer than every unanswered request the server did not refuse, so the longest
    unanswered request is one that was refused."""
    error = msg.get("error")
    if msg.get("ok") is False and isinstance(error, Mapping) and sizes \
            and error.get("code") == "line_too_long":
        return max(sizes, key=lambda rid: (sizes[rid], -rid))
    return None


def _is_final(event: Mapping[str, Any]) -> bool:
    return event.get("event") in FINAL_EVENTS


# ---------------------------------------------------------------------------
# blocking client


class Client:
    """A blocking connection to the supervisor.

    ``socket``: the socket path (else $HOSTQUEUE_SOCKET, else next to the store).
    ``timeout``: seconds to wait for connecting and for the reply of a request;
    ``wait``, ``result`` and watch streams wait as long as they are asked to.
    ``None`` waits without limit.

    The connection opens on first use (or on ``with``); if it is lost, the calls
    that were waiting raise SupervisorUnavailable and the next call reconnects.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Client:
        # HOSTQUEUE_IMMEDIATE=1 makes every Client an immediate one (hostqueue.immediate):
        # jobs run inline, in this process, for unit tests of code that makes its own Client.
        if cls is Client and os.environ.get("HOSTQUEUE_IMMEDIATE"):
            from hostqueue.client import immediate

            if immediate.enabled():
                return object.__new__(immediate.ImmediateClient)
        return object.__new__(cls)

    @classmethod
    def immediate(cls, tasks: Iterable[str | ModuleType] = (), *,
                  supervisor: ImmediateSupervisor | None = None,
                  timeout: float | None = None) -> ImmediateClient:
        """A client whose jobs run inline, in this process, when submitted: for unit tests.

        ``tasks``: task modules, as ``hostqueue run --tasks``; or ``supervisor``, an
        ``hostqueue.immediate.ImmediateSupervisor`` to share between clients.
        See hostqueue/immediate.py and docs/testing.md for what differs from production.
        """
        from hostqueue.client.immediate import ImmediateClient, ImmediateSupervisor

        if supervisor is None:
            supervisor = ImmediateSupervisor(tasks)
        return ImmediateClient(timeout=timeout, supervisor=supervisor)

    def __init__(self, socket: str | None = None, timeout: float | None = None) -> None:
        self.socket_path = resolve_socket(socket)
        self.timeout = timeout
        self._sock: _socket.socket | None = None
        self._buffer = bytearray()
        # recv() of a large size allocates (and maps) a fresh block on every read,
        # three syscalls more than the read itself: read into this one instead.
        self._chunk = bytearray(READ_CHUNK)
        self._chunk_view = memoryview(self._chunk)
        self._scanned = 0  # bytes of _buffer already known to hold no newline
        self._next_id = 0
        # Requests whose first reply has not come, in the order they were sent.
        self._awaiting: dict[int, str] = {}
        self._sizes: dict[int, int] = {}  # their line lengths, see _culprit
        self._streams: set[int] = set()  # watch requests whose events are kept
        self._inbox: dict[int, deque[dict[str, Any]]] = {}
        self._lost: set[int] = set()  # ids whose connection closed under them
        self._orphan_error: str | None = None  # an error the server sent for no request
        # Made with the socket and kept: a new one per read costs an object and a
        # registration on every request.
        self._poller: Any = None
        self._poller_events = 0

    # -- connection

    def connect(self) -> Client:
        """Open the connection now (it otherwise opens on the first request)."""
        if self._sock is not None:
            return self
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise _unavailable(self.socket_path, _connect_reason(exc)) from None
        # Non-blocking from here: reads and writes wait in poll(), so a long
        # pipelined send can take in replies meanwhile instead of deadlocking.
        sock.setblocking(False)
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._poller_events = select.POLLIN
        self._buffer.clear()
        self._scanned = 0
        return self

    def close(self) -> None:
        """Close the connection. Unread replies and events are dropped."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._awaiting.clear()
        self._sizes.clear()
        self._streams.clear()
        self._inbox.clear()
        self._lost.clear()
        self._buffer.clear()
        self._scanned = 0

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "not connected"
        return f"<Client {self.socket_path} {state}>"

    def _connection_lost(self, reason: str) -> SupervisorUnavailable:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._lost.update(self._awaiting)
        self._lost.update(self._streams)
        self._awaiting.clear()
        self._sizes.clear()
        self._streams.clear()
        self._buffer.clear()
        self._scanned = 0
        said, self._orphan_error = self._orphan_error, None
        return _connection_error(self.socket_path, reason, said)

    # -- framing

    def _poll(self, events: int, deadline: float | None) -> int:
        assert self._sock is not None
        poller = self._poller
        if self._poller_events != events:
            poller.modify(self._sock, events)
            self._poller_events = events
        while True:
            if deadline is None:
                wait_ms = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no reply from the supervisor in time")
                wait_ms = max(1, int(remaining * 1000))
            ready = poller.poll(wait_ms)
            if ready:
                return ready[0][1]

    def _pump(self, deadline: float | None) -> None:
        """Read what the socket has (waiting until the deadline) and file each line."""
        if self._sock is None:
            raise self._connection_lost("not connected")
        self._poll(select.POLLIN, deadline)
        try:
            size = self._sock.recv_into(self._chunk_view)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self._connection_lost(exc.strerror or str(exc)) from None
        if not size:
            raise self._connection_lost("the supervisor closed it")
        self._buffer += self._chunk_view[:size]
        self._file_lines()

    def _file_lines(self) -> None:
        buf = self._buffer
        while True:
            nl = buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(buf)
                return
            line = bytes(buf[:nl])
            del buf[: nl + 1]  # cheap: bytearray drops a prefix without copying the rest
            self._scanned = 0
            if line.strip():
                msg = _decode(line)
                if msg is not None:
                    self._file(msg)

    def _file(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if rid is None:
            rid = _culprit(msg, self._sizes)
        if rid is None and msg.get("ok") is False:
            self._orphan_error = _error(msg).args[0]  # e.g. forbidden, then the server hangs up
        if not isinstance(rid, int):
            return
        op = self._awaiting.pop(rid, None)
        self._sizes.pop(rid, None)
        if op is None and rid not in self._streams:
            return  # a request given up on, or a stream closed by its reader
        if op == "watch" and msg.get("ok") is True:
            self._streams.add(rid)
        queue = self._inbox.get(rid)
        if queue is None:
            queue = self._inbox[rid] = deque()
        queue.append(msg)

    def _next_message(self, request_id: int, deadline: float | None) -> dict[str, Any]:
        while True:
            queue = self._inbox.get(request_id)
            if queue:
                msg = queue.popleft()
                if not queue:
                    del self._inbox[request_id]
                return msg
            if request_id in self._lost:
                self._lost.discard(request_id)
                raise SupervisorUnavailable(
                    f"lost the connection to the supervisor at {self.socket_path} "
                    f"before request {request_id} was answered"
                )
            if request_id not in self._awaiting and request_id not in self._streams:
                raise ValueError(f"request {request_id} is not outstanding on this connection")
            self._pump(deadline)

    def _forget(self, request_id: int) -> None:
        """Stop keeping messages for a request (given up on, or a stream closed early)."""
        self._awaiting.pop(request_id, None)
        self._sizes.pop(request_id, None)
        self._streams.discard(request_id)
        self._inbox.pop(request_id, None)
        self._lost.discard(request_id)

    # -- low level

    def send(self, op: str, **fields: Any) -> int:
        """Send one request without waiting for its reply; returns its id for ``receive``."""
        data = _encode({"id": self._next_id + 1, "op": op, **fields})
        self.connect()
        self._next_id += 1
        rid = self._next_id
        self._awaiting[rid] = op
        self._sizes[rid] = len(data)
        try:
            self._send_all(data)
        except BaseException:
            self._forget(rid)
            raise
        return rid

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        deadline: float | None = None  # set once a send has to wait (most never do)
        while view:
            if self._sock is None:
                raise self._connection_lost("not connected")
            try:
                sent = self._sock.send(view)
                view = view[sent:]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._connection_lost(exc.strerror or str(exc)) from None
            # The server stops reading a client that leaves its replies unread,
            # so take them in while our send cannot proceed.
            if deadline is None and self.timeout is not None:
                deadline = time.monotonic() + self.timeout
            try:
                if self._poll(select.POLLIN | select.POLLOUT, deadline) & select.POLLIN:
                    self._pump(deadline)
            except TimeoutError:
                if len(view) < len(data):
                    # Half a line is on the wire: the connection cannot carry another.
                    self._connection_lost("timed out sending")
                raise TimeoutError("timed out sending to the supervisor") from None

    def receive(self, request_id: int, timeout: float | None = None) -> dict[str, Any]:
        """The next message for a request sent with ``send`` (its reply, or a stream's
        next event), waiting at most ``timeout`` seconds (None: without limit).
        An ``ok: false`` reply raises ProtocolError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return _check(self._next_message(request_id, deadline))

    def _call(self, op: str, fields: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        rid = self.send(op, **fields)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return _check(self._next_message(rid, deadline))
        except TimeoutError:
            self._forget(rid)  # its late reply is not wanted any more
            raise

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its whole reply (``{"id", "ok", KEY: DATA}``)."""
        return self._call(op, fields, self.timeout)

    def _ask(self, op: str, key: str, **fields: Any) -> Any:
        return self.request(op, **fields)[key]

    # -- jobs

    def submit(self, task: str, args: Mapping[str, Any] | None = None, *,
               queue: str | None = None, priority: int | None = None, delay: When = None,
               deadline: When = None, retries: int | None = None, timeout: float | None = None,
               key: str | None = None, run_id: str | None = None,
               key_ttl: float | None = None, wait: bool | float | None = None) -> JobHandle:
        """Add a job; returns once it is committed. ``delay``/``deadline`` are seconds
        from now, or a datetime for an absolute time. With ``key_ttl``, a job with the
        same key that completed within that many seconds answers instead.

        With ``wait`` (True, or at most that many seconds), the same request also
        waits for the job to end: the handle's ``job`` is then final, and
        ``result()`` needs no second request. After ``wait`` seconds, the handle
        holds the job as it stands; it stays submitted."""
        fields = _submit_fields(queue, priority, delay, deadline, retries, timeout, run_id)
        fields.update(_present(task=task, args=_args(args), key=key, key_ttl=key_ttl))
        reply = self._call("submit", fields, _submit_wait(fields, wait, self.timeout))
        return JobHandle(self, reply["job"], bool(reply.get("duplicate", False)))

    def submit_many(self, task: str, args_list: Iterable[Mapping[str, Any]], *,
                    queue: str | None = None, priority: int | None = None,
                    delay: When = None, deadline: When = None, retries: int | None = None,
                    timeout: float | None = None, run_id: str | None = None
                    ) -> list[JobHandle]:
        """Add one job per args object, all or none, in one request (which must fit
        the server's line limit, 1 MiB by default)."""
        fields = _submit_fields(queue, priority, delay, deadline, retries, timeout, run_id)
        reply = self.request("submit_many", task=task, args=[_args(a) for a in args_list],
                             **fields)
        return [JobHandle(self, job) for job in reply["jobs"]]

    def submit_many_ids(self, task: str, args_list: Iterable[Mapping[str, Any]], *,
                        queue: str | None = None, priority: int | None = None,
                        delay: When = None, deadline: When = None, retries: int | None = None,
                        timeout: float | None = None, run_id: str | None = None) -> list[int]:
        """``submit_many`` that answers with the new jobs' ids only: a reply of a few
        bytes per job instead of each whole job, for large batches."""
        fields = _submit_fields(queue, priority, delay, deadline, retries, timeout, run_id)
        reply = self.request("submit_many", task=task, args=[_args(a) for a in args_list],
                             reply="ids", **fields)
        return cast("list[int]", reply["ids"])

    def get(self, job_id: int) -> Job:
        return cast("Job", self._ask("get", "job", job=job_id))

    def list_jobs(self, status: str | None = None, queue: str | None = None,
                  task: str | None = None, run_id: str | None = None, limit: int = 100,
                  before: int | None = None) -> list[Job]:
        """Jobs matching every filter given, newest first."""
        fields = _present(status=status, queue=queue, task=task, run_id=run_id, limit=limit,
                          before=before)
        return cast("list[Job]", self._ask("list", "jobs", **fields))

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """The job once it has ended; TimeoutError if it does not end within ``timeout``."""
        try:
            reply = self._call("wait", _present(job=job_id, timeout=timeout),
                               _wait_deadline(timeout, self.timeout))
        except ProtocolError as exc:
            if exc.code == "timeout":
                raise _timed_out(job_id, timeout) from None
            raise
        return cast("Job", reply["job"])

    def abort(self, job_id: int) -> Job:
        return cast("Job", self._ask("abort", "job", job=job_id))

    def abort_run(self, run_id: str) -> list[Job]:
        return cast("list[Job]", self._ask("abort_run", "jobs", run_id=run_id))

    def retry(self, job_id: int) -> Job:
        return cast("Job", self._ask("retry", "job", job=job_id))

    def retry_all(self, status: str = "failed", queue: str | None = None,
                  task: str | None = None) -> list[Job]:
        fields = _present(status=status, queue=queue, task=task)
        return cast("list[Job]", self._ask("retry_all", "jobs", **fields))

    def watch(self, job_id: int | None = None, queue: str | None = None,
              task: str | None = None, run_id: str | None = None) -> EventStream:
        """Subscribe to job events (returns once subscribed, so nothing after this call
        is missed). With ``job_id`` the stream ends after that job's final event;
        otherwise it lasts until closed."""
        fields = _present(job=job_id, queue=queue, task=task, run_id=run_id)
        rid = self.send("watch", **fields)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            reply = _check(self._next_message(rid, deadline))
        except BaseException:
            self._forget(rid)
            raise
        return EventStream(self, rid, job_id is not None, reply.get("watching"))

    # -- control

    def scale(self, n: int) -> dict[str, Any]:
        return cast("Obj", self._ask("scale", "scale", n=n))

    def status(self) -> dict[str, Any]:
        return cast("Obj", self._ask("status", "status"))

    def stats(self, run_id: str | None = None) -> dict[str, Any]:
        return cast("Obj", self._ask("stats", "stats", **_present(run_id=run_id)))

    def pause(self, queue: str | None = None) -> list[str]:
        return cast("list[str]", self._ask("pause", "paused", **_present(queue=queue)))

    def resume(self, queue: str | None = None) -> list[str]:
        return cast("list[str]", self._ask("resume", "paused", **_present(queue=queue)))

    def reload(self) -> dict[str, Any]:
        return cast("Obj", self._ask("reload", "reload"))

    def stop(self, fast: bool = False) -> dict[str, Any]:
        """Ask the supervisor to stop: drain (like SIGTERM) or, with fast, like SIGQUIT."""
        return cast("Obj", self._ask("stop", "stop", mode="fast" if fast else "drain"))

    def ping(self) -> dict[str, Any]:
        return cast("Obj", self._ask("ping", "pong"))


class EventStream(Iterator[dict[str, Any]]):
    """The events of one ``watch`` request. Iterate it; ``close()`` stops keeping its
    events (the server goes on sending an every-job stream until the connection
    closes, so use a Client of its own for a long watch)."""

    def __init__(self, client: Client, request_id: int, single_job: bool, watching: Any) -> None:
        self.client = client
        self.request_id = request_id
        self.watching = watching
        self._single_job = single_job
        self._done = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> dict[str, Any]:
        event = self.next_event()
        if event is None:
            raise StopIteration
        return event

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, waiting at most ``timeout`` seconds (None: without limit).
        Returns None once the stream has ended, or when the timeout passes
        (``ended`` tells which)."""
        if self._done:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            event = _check(self.client._next_message(self.request_id, deadline))
        except TimeoutError:
            return None
        except BaseException:
            self.close()
            raise
        if self._single_job and _is_final(event):
            self.close()
        return event

    @property
    def ended(self) -> bool:
        return self._done

    def close(self) -> None:
        if not self._done:
            self._done = True
            self.client._forget(self.request_id)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned stream would otherwise keep every later event in memory.
        with contextlib.suppress(Exception):  # nothing may escape __del__
            self.close()


class JobHandle:
    """A job submitted through a Client. ``job`` is the last job object seen."""

    def __init__(self, client: Client, job: Job, duplicate: bool = False) -> None:
        self.client = client
        self.job = job
        self.id: int = job["id"]
        self.duplicate = duplicate
        # Known to have ended (a submit with wait, a key_ttl answer): wait() and
        # result() need not ask.
        self.ended = job.get("status") in FINAL_EVENTS

    def status(self) -> str:
        """The job's current status (asks the supervisor)."""
        return str(self.refresh()["status"])

    def refresh(self) -> Job:
        self.job = self.client.get(self.id)
        return self.job

    def wait(self, timeout: float | None = None) -> Job:
        """The job once it has ended; TimeoutError if not within ``timeout``."""
        if not self.ended:
            self.job = self.client.wait(self.id, timeout)
        return self.job

    def result(self, timeout: float | None = None) -> Any:
        """The job's result once it completes; JobFailed if it ends otherwise."""
        job = self.wait(timeout)
        if job.get("status") == JobStatus.COMPLETED.value:
            return job.get("result")
        raise JobFailed(job)

    def abort(self) -> Job:
        self.job = self.client.abort(self.id)
        return self.job

    def progress(self) -> EventStream:
        """The job's events (progress and changes of state) until its final one."""
        return self.client.watch(job_id=self.id)

    def __repr__(self) -> str:
        dup = " duplicate" if self.duplicate else ""
        return f"<JobHandle {self.id} {self.job.get('task')} {self.job.get('status')}{dup}>"


# ---------------------------------------------------------------------------
# the asyncio client lives in hostqueue.aclient, which imports the helpers above;
# it is loaded on first use so that neither module imports the other at load time.

_ASYNC_NAMES = ("AsyncClient", "AsyncEventStream", "AsyncJobHandle")

if TYPE_CHECKING:
    from hostqueue.client.aio import AsyncClient, AsyncEventStream, AsyncJobHandle
    from hostqueue.client.immediate import ImmediateClient, ImmediateSupervisor


def __getattr__(name: str) -> Any:
    if name in _ASYNC_NAMES:
        from hostqueue.client import aio as aclient

        return getattr(aclient, name)
    raise AttributeError(f"module 'hostqueue.client' has no attribute {name!r}")
