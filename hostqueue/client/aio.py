"""The asyncio client of the supervisor's control socket: ``AsyncClient``.

It speaks the same newline-delimited JSON protocol as ``hostqueue.client.Client``
(docs/protocol.md) and shares its framing, error and field helpers. One reader task
hands each reply to the request waiting for it and each stream event to its
stream, so any number of coroutines of one event loop can share a connection.

    async with AsyncClient() as c:
        job = await c.submit("thumbnails.resize", {"path": "a.png"})
        async for event in job.progress():
            print(event["event"], event.get("progress"))
        print(await job.result(timeout=30))

Not thread-safe: use one AsyncClient per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self, cast

from hostqueue.client.sync import (
    FINAL_EVENTS,
    Job,
    Obj,
    When,
    _args,
    _connect_reason,
    _connection_error,
    _culprit,
    _decode,
    _encode,
    _error,
    _is_final,
    _present,
    _submit_fields,
    _submit_wait,
    _timed_out,
    _unavailable,
    _wait_deadline,
)
from hostqueue.core.errors import JobFailed, ProtocolError, SupervisorUnavailable
from hostqueue.core.settings import resolve_socket
from hostqueue.core.states import JobStatus

__all__ = ["AsyncClient", "AsyncEventStream", "AsyncJobHandle"]

# The asyncio reader needs a bound on a line. 16 MiB holds a page of thousands of jobs;
# a longer reply ends the connection with an error that says so.
STREAM_LIMIT = 16 * 1024 * 1024


class _Lost:
    """Put in a stream's queue when the connection closes under it."""

    def __init__(self, error: SupervisorUnavailable) -> None:
        self.error = error


class AsyncClient:
    """An asyncio connection to the supervisor, with the methods of Client as coroutines.

        async with AsyncClient() as c:
            job = await c.submit("thumbnails.resize", {"path": "a.png"})
            async for event in job.progress(): ...

    or ``c = await AsyncClient.connect(socket)`` ... ``await c.close()``. One reader
    task hands each reply to the request waiting for it and each stream event to its
    stream, so any number of coroutines can share the connection.
    """

    def __init__(self, socket: str | None = None, timeout: float | None = None) -> None:
        self.socket_path = resolve_socket(socket)
        self.timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._next_id = 0
        # Requests whose first reply has not come, in the order they were sent.
        self._futures: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._sizes: dict[int, int] = {}  # their line lengths, see _culprit
        self._streams: dict[int, asyncio.Queue[dict[str, Any] | _Lost]] = {}
        self._orphan_error: str | None = None  # an error the server sent for no request

    @classmethod
    async def connect(cls, socket: str | None = None, timeout: float | None = None) -> AsyncClient:
        client = cls(socket, timeout)
        await client._ensure_connected()
        return client

    async def __aenter__(self) -> Self:
        await self._ensure_connected()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "connected" if self._writer is not None else "not connected"
        return f"<AsyncClient {self.socket_path} {state}>"

    async def _ensure_connected(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._writer is not None:
                return self._writer
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.socket_path, limit=STREAM_LIMIT),
                    self.timeout,
                )
            except OSError as exc:
                raise _unavailable(self.socket_path, _connect_reason(exc)) from None
            self._writer = writer
            self._reader_task = asyncio.create_task(
                self._read_loop(reader, writer), name=f"hostqueue-client-reader {self.socket_path}"
            )
            return writer

    async def close(self) -> None:
        """Close the connection; requests still waiting raise SupervisorUnavailable."""
        task, self._reader_task = self._reader_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, RuntimeError):
                await writer.wait_closed()
        self._fail_all("the client closed it")

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "the supervisor closed it"
        try:
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    break  # EOF, possibly after half a line
                if line.strip():
                    msg = _decode(line)
                    if msg is not None:
                        self._file(msg)
        except ValueError:
            reason = f"a reply line was longer than {STREAM_LIMIT} bytes"
        except OSError as exc:
            reason = exc.strerror or str(exc)
        except asyncio.CancelledError:
            reason = "the client closed it"
            raise
        finally:
            if self._writer is writer:
                self._writer = None
                writer.close()
                self._fail_all(reason)

    def _file(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        if rid is None:
            rid = _culprit(msg, self._sizes)
        if rid is None and msg.get("ok") is False:
            self._orphan_error = _error(msg).args[0]
        if not isinstance(rid, int):
            return
        future = self._futures.pop(rid, None)
        self._sizes.pop(rid, None)
        if future is not None:
            if not future.done():
                future.set_result(msg)
            if msg.get("ok") is False:
                self._streams.pop(rid, None)
            return
        queue = self._streams.get(rid)
        if queue is not None:
            queue.put_nowait(msg)

    def _fail_all(self, reason: str) -> None:
        futures, self._futures = self._futures, {}
        self._sizes.clear()
        streams, self._streams = self._streams, {}
        said, self._orphan_error = self._orphan_error, None
        for future in futures.values():
            if not future.done():
                future.set_exception(_connection_error(self.socket_path, reason, said))
        for queue in streams.values():
            queue.put_nowait(_Lost(_connection_error(self.socket_path, reason, said)))

    async def _send(self, op: str, fields: dict[str, Any], stream: bool = False
                    ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        data = _encode({"id": self._next_id + 1, "op": op, **fields})
        writer = await self._ensure_connected()
        self._next_id += 1
        rid = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[rid] = future
        self._sizes[rid] = len(data)
        if stream:
            # Registered before sending: events may follow the first reply at once.
            self._streams[rid] = asyncio.Queue()
        try:
            writer.write(data)
            await writer.drain()
        except OSError as exc:
            self._forget(rid)
            raise _unavailable(self.socket_path, exc.strerror or str(exc)) from None
        return rid, future

    def _forget(self, rid: int) -> None:
        self._futures.pop(rid, None)
        self._sizes.pop(rid, None)
        self._streams.pop(rid, None)

    async def _call(self, op: str, fields: dict[str, Any], timeout: float | None,
                    stream: bool = False) -> tuple[int, dict[str, Any]]:
        rid, future = await self._send(op, fields, stream)
        try:
            reply = await asyncio.wait_for(future, timeout)
        except BaseException:
            self._forget(rid)
            raise
        if reply.get("ok") is False:
            self._streams.pop(rid, None)
            raise _error(reply)
        return rid, reply

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its whole reply (``{"id", "ok", KEY: DATA}``)."""
        return (await self._call(op, fields, self.timeout))[1]

    async def _ask(self, op: str, key: str, **fields: Any) -> Any:
        return (await self.request(op, **fields))[key]

    # -- jobs

    async def submit(self, task: str, args: Mapping[str, Any] | None = None, *,
                     queue: str | None = None, priority: int | None = None, delay: When = None,
                     deadline: When = None, retries: int | None = None,
                     timeout: float | None = None, key: str | None = None,
                     run_id: str | None = None, key_ttl: float | None = None,
                     wait: bool | float | None = None) -> AsyncJobHandle:
        """See Client.submit (``wait`` included)."""
        fields = _submit_fields(queue, priority, delay, deadline, retries, timeout, run_id)
        fields.update(_present(task=task, args=_args(args), key=key, key_ttl=key_ttl))
        _, reply = await self._call("submit", fields, _submit_wait(fields, wait, self.timeout))
        return AsyncJobHandle(self, reply["job"], bool(reply.get("duplicate", False)))

    async def submit_many(self, task: str, args_list: Iterable[Mapping[str, Any]], *,
                          queue: str | None = None, priority: int | None = None,
                          delay: When = None, deadline: When = None, retries: int | None = None,
                          timeout: float | None = None, run_id: str | None = None
                          ) -> list[AsyncJobHandle]:
        fields = _submit_fields(queue, priority, delay, deadline, retries, timeout, run_id)
        reply = await self.request("submit_many", task=task, args=[_args(a) for a in args_list],
                                   **fields)
        return [AsyncJobHandle(self, job) for job in reply["jobs"]]

    async def submit_many_ids(self, task: str, args_list: Iterable[Mapping[str, Any]], *,
                              queue: str | None = None, priority: int | None = None,
                              delay: When = None, deadline: When = None,
                              retries: int | None = None, timeout: float | None = None,
                              run_id: str | None = None) -> list[int]:
        """``submit_many`` that answers with the new jobs' ids only."""
        fields = _submit_fields(queue, priority, delay, deadline, retries, timeout, run_id)
        reply = await self.request("submit_many", task=task, args=[_args(a) for a in args_list],
                                   reply="ids", **fields)
        return cast("list[int]", reply["ids"])

    async def get(self, job_id: int) -> Job:
        return cast("Job", await self._ask("get", "job", job=job_id))

    async def list_jobs(self, status: str | None = None, queue: str | None = None,
                        task: str | None = None, run_id: str | None = None, limit: int = 100,
                        before: int | None = None) -> list[Job]:
        fields = _present(status=status, queue=queue, task=task, run_id=run_id, limit=limit,
                          before=before)
        return cast("list[Job]", await self._ask("list", "jobs", **fields))

    async def wait(self, job_id: int, timeout: float | None = None) -> Job:
        try:
            _, reply = await self._call("wait", _present(job=job_id, timeout=timeout),
                                        _wait_deadline(timeout, self.timeout))
        except ProtocolError as exc:
            if exc.code == "timeout":
                raise _timed_out(job_id, timeout) from None
            raise
        return cast("Job", reply["job"])

    async def abort(self, job_id: int) -> Job:
        return cast("Job", await self._ask("abort", "job", job=job_id))

    async def abort_run(self, run_id: str) -> list[Job]:
        return cast("list[Job]", await self._ask("abort_run", "jobs", run_id=run_id))

    async def retry(self, job_id: int) -> Job:
        return cast("Job", await self._ask("retry", "job", job=job_id))

    async def retry_all(self, status: str = "failed", queue: str | None = None,
                        task: str | None = None) -> list[Job]:
        fields = _present(status=status, queue=queue, task=task)
        return cast("list[Job]", await self._ask("retry_all", "jobs", **fields))

    def watch(self, job_id: int | None = None, queue: str | None = None,
              task: str | None = None, run_id: str | None = None) -> AsyncEventStream:
        """An async iterator of job events. It subscribes on first iteration, or at
        ``await stream.start()`` to be sure to see everything after that point."""
        fields = _present(job=job_id, queue=queue, task=task, run_id=run_id)
        return AsyncEventStream(self, fields, job_id is not None)

    # -- control

    async def scale(self, n: int) -> dict[str, Any]:
        return cast("Obj", await self._ask("scale", "scale", n=n))

    async def status(self) -> dict[str, Any]:
        return cast("Obj", await self._ask("status", "status"))

    async def stats(self, run_id: str | None = None) -> dict[str, Any]:
        return cast("Obj", await self._ask("stats", "stats", **_present(run_id=run_id)))

    async def pause(self, queue: str | None = None) -> list[str]:
        return cast("list[str]", await self._ask("pause", "paused", **_present(queue=queue)))

    async def resume(self, queue: str | None = None) -> list[str]:
        return cast("list[str]", await self._ask("resume", "paused", **_present(queue=queue)))

    async def reload(self) -> dict[str, Any]:
        return cast("Obj", await self._ask("reload", "reload"))

    async def stop(self, fast: bool = False) -> dict[str, Any]:
        return cast("Obj", await self._ask("stop", "stop", mode="fast" if fast else "drain"))

    async def ping(self) -> dict[str, Any]:
        return cast("Obj", await self._ask("ping", "pong"))


class AsyncEventStream(AsyncIterator[dict[str, Any]]):
    """The events of one ``watch`` request on an AsyncClient."""

    def __init__(self, client: AsyncClient, fields: dict[str, Any], single_job: bool) -> None:
        self.client = client
        self.request_id: int | None = None
        self.watching: Any = None
        self._fields = fields
        self._single_job = single_job
        self._queue: asyncio.Queue[dict[str, Any] | _Lost] | None = None
        self._done = False

    async def start(self) -> AsyncEventStream:
        """Subscribe now (iteration does it otherwise); returns once subscribed."""
        if self.request_id is None and not self._done:
            rid, reply = await self.client._call("watch", self._fields, self.client.timeout,
                                                 stream=True)
            self.request_id = rid
            self.watching = reply.get("watching")
            self._queue = self.client._streams.get(rid)
            if self._queue is None:  # the connection closed right after the reply
                self._done = True
                raise _unavailable(self.client.socket_path, "connection lost")
        return self

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        assert self._queue is not None
        item = await self._queue.get()
        if isinstance(item, _Lost):
            self._close()
            raise item.error
        if item.get("ok") is False:
            self._close()
            raise _error(item)
        if self._single_job and _is_final(item):
            self._close()
        return item

    @property
    def ended(self) -> bool:
        return self._done

    def _close(self) -> None:
        self._done = True
        if self.request_id is not None:
            self.client._streams.pop(self.request_id, None)

    async def aclose(self) -> None:
        """Stop keeping this stream's events."""
        self._close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # nothing may escape __del__
            self._close()


class AsyncJobHandle:
    """A job submitted through an AsyncClient. ``job`` is the last job object seen."""

    def __init__(self, client: AsyncClient, job: Job, duplicate: bool = False) -> None:
        self.client = client
        self.job = job
        self.id: int = job["id"]
        self.duplicate = duplicate
        # Known to have ended (a submit with wait, a key_ttl answer): wait() and
        # result() need not ask.
        self.ended = job.get("status") in FINAL_EVENTS

    async def status(self) -> str:
        return str((await self.refresh())["status"])

    async def refresh(self) -> Job:
        self.job = await self.client.get(self.id)
        return self.job

    async def wait(self, timeout: float | None = None) -> Job:
        if not self.ended:
            self.job = await self.client.wait(self.id, timeout)
        return self.job

    async def result(self, timeout: float | None = None) -> Any:
        job = await self.wait(timeout)
        if job.get("status") == JobStatus.COMPLETED.value:
            return job.get("result")
        raise JobFailed(job)

    async def abort(self) -> Job:
        self.job = await self.client.abort(self.id)
        return self.job

    def progress(self) -> AsyncEventStream:
        """``async for event in job.progress()``: the job's events until its final one."""
        return self.client.watch(job_id=self.id)

    def __repr__(self) -> str:
        dup = " duplicate" if self.duplicate else ""
        return f"<AsyncJobHandle {self.id} {self.job.get('task')} {self.job.get('status')}{dup}>"
