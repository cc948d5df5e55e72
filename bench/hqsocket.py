"""The benchmark's own client of hostqueue's control socket (docs/protocol.md).

The benchmark talks to the checkout it measures through the CLI (`python -m
hostqueue run`) and this socket protocol only: it imports nothing of hostqueue,
so that it measures any checkout whatever its module layout, and two checkouts
(bench.py --against) with the same client code. It needs only the standard
library (and orjson when it is there, as hostqueue's own client does).

Newline-delimited JSON on one Unix stream connection; every request gets a fresh
integer id and replies are matched by id, so requests can be pipelined. Like
hostqueue's blocking client, it reads replies while a long pipelined send cannot
proceed (the server stops reading a client that leaves 4 MiB of replies unread).
"""

from __future__ import annotations

import select
import socket as _socket
import time
from collections import deque
from typing import Any

try:
    import orjson

    def _encode(message: dict[str, Any]) -> bytes:
        return orjson.dumps(message) + b"\n"

    def _decode(line: bytes) -> Any:
        return orjson.loads(line)
except ImportError:  # pragma: no cover - orjson comes with hostqueue's environment
    import json

    def _encode(message: dict[str, Any]) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"

    def _decode(line: bytes) -> Any:
        return json.loads(line)

READ_CHUNK = 256 * 1024
WAIT_MARGIN = 5.0  # a `wait` with its own timeout: the server answers; we give up this much later


class ProtocolError(Exception):
    """An ``ok: false`` reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unavailable(Exception):
    """No connection, or the connection was lost."""


class Handle:
    """A submitted job: its id and the job object of the reply."""

    __slots__ = ("id", "job", "duplicate")

    def __init__(self, job: dict[str, Any], duplicate: bool = False) -> None:
        self.id: int = job["id"]
        self.job = job
        self.duplicate = duplicate

    def __repr__(self) -> str:
        return f"<job {self.id} {self.job.get('status')}>"


class Client:
    """A blocking connection; ``timeout``: seconds to connect and for each reply
    (None: without limit); ``wait`` waits as long as it is asked to."""

    def __init__(self, socket_path: str, timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: _socket.socket | None = None
        self._poller: Any = None
        self._events = 0
        self._buffer = bytearray()
        self._chunk = bytearray(READ_CHUNK)
        self._view = memoryview(self._chunk)
        self._scanned = 0
        self._next_id = 0
        self._awaiting: set[int] = set()
        self._inbox: dict[int, deque[dict[str, Any]]] = {}

    # -- connection

    def connect(self) -> Client:
        if self._sock is not None:
            return self
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot connect to {self.socket_path}: {exc}") from None
        sock.setblocking(False)
        self._sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._events = select.POLLIN
        self._buffer.clear()
        self._scanned = 0
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._awaiting.clear()
        self._inbox.clear()
        self._buffer.clear()
        self._scanned = 0

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _lost(self, reason: str) -> Unavailable:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._awaiting.clear()
        return Unavailable(f"lost the connection to {self.socket_path} ({reason})")

    # -- framing

    def _poll(self, events: int, deadline: float | None) -> int:
        assert self._sock is not None
        if self._events != events:
            self._poller.modify(self._sock, events)
            self._events = events
        while True:
            if deadline is None:
                wait_ms = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no reply from the supervisor in time")
                wait_ms = max(1, int(remaining * 1000))
            ready = self._poller.poll(wait_ms)
            if ready:
                return ready[0][1]

    def _pump(self, deadline: float | None) -> None:
        if self._sock is None:
            raise self._lost("not connected")
        self._poll(select.POLLIN, deadline)
        try:
            size = self._sock.recv_into(self._view)
        except BlockingIOError:
            return
        except OSError as exc:
            raise self._lost(exc.strerror or str(exc)) from None
        if not size:
            raise self._lost("the supervisor closed it")
        buf = self._buffer
        buf += self._view[:size]
        while True:
            nl = buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(buf)
                return
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            self._scanned = 0
            if line.strip():
                msg = _decode(line)
                rid = msg.get("id") if isinstance(msg, dict) else None
                if isinstance(rid, int) and rid in self._awaiting:
                    self._awaiting.discard(rid)
                    self._inbox.setdefault(rid, deque()).append(msg)
                elif isinstance(msg, dict) and msg.get("ok") is False and rid is None:
                    err = msg.get("error") or {}
                    raise ProtocolError(str(err.get("code")), f"(for no request) {err.get('message')}")

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        deadline: float | None = None
        while view:
            if self._sock is None:
                raise self._lost("not connected")
            try:
                view = view[self._sock.send(view):]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._lost(exc.strerror or str(exc)) from None
            # The server stops reading a client that leaves its replies unread:
            # take them in while the send cannot proceed.
            if deadline is None and self.timeout is not None:
                deadline = time.monotonic() + self.timeout
            if self._poll(select.POLLIN | select.POLLOUT, deadline) & select.POLLIN:
                self._pump(deadline)

    # -- requests

    def send(self, op: str, /, **fields: Any) -> int:
        """Send one request without waiting; its id, for ``receive``."""
        self.connect()
        self._next_id += 1
        rid = self._next_id
        self._awaiting.add(rid)
        self._send_all(_encode({"id": rid, "op": op, **fields}))
        return rid

    def receive(self, rid: int, timeout: float | None = None) -> dict[str, Any]:
        """The reply to request rid (whole); ProtocolError on ``ok: false``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            queue = self._inbox.get(rid)
            if queue:
                msg = queue.popleft()
                if not queue:
                    del self._inbox[rid]
                if msg.get("ok") is False:
                    err = msg.get("error") or {}
                    raise ProtocolError(str(err.get("code")), str(err.get("message")))
                return msg
            if rid not in self._awaiting:
                raise ValueError(f"request {rid} is not outstanding on this connection")
            self._pump(deadline)

    def _call(self, op: str, reply_timeout: float | None, /, **fields: Any) -> dict[str, Any]:
        rid = self.send(op, **fields)
        try:
            return self.receive(rid, reply_timeout)
        except TimeoutError:
            self._awaiting.discard(rid)  # its late reply is dropped
            raise

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return self._call(op, self.timeout, **fields)

    # -- the ops the benchmark uses

    def submit(self, task: str, args: dict[str, Any] | None = None, **fields: Any) -> Handle:
        """``submit``; fields as in the protocol (queue, wait, ...)."""
        if args is not None:
            fields["args"] = args
        wait = fields.get("wait")
        timeout = self.timeout
        if wait is True:
            timeout = None
        elif wait is not None and timeout is not None:
            timeout = float(wait) + timeout
        reply = self._call("submit", timeout, task=task, **fields)
        return Handle(reply["job"], bool(reply.get("duplicate", False)))

    def submit_many_ids(self, task: str, args_list: list[dict[str, Any]], **fields: Any) -> list[int]:
        return list(self.request("submit_many", task=task, args=args_list, reply="ids", **fields)["ids"])

    def wait(self, job_id: int, timeout: float | None = None) -> dict[str, Any]:
        """The job once ended; TimeoutError if it does not end within timeout."""
        fields: dict[str, Any] = {"job": job_id}
        if timeout is not None:
            fields["timeout"] = timeout
        client_timeout = None if timeout is None else timeout + (self.timeout or WAIT_MARGIN)
        try:
            return dict(self._call("wait", client_timeout, **fields)["job"])
        except ProtocolError as exc:
            if exc.code == "timeout":
                raise TimeoutError(f"job {job_id} did not end within {timeout} s") from None
            raise

    def get(self, job_id: int) -> dict[str, Any]:
        return dict(self.request("get", job=job_id)["job"])

    def status(self) -> dict[str, Any]:
        return dict(self.request("status")["status"])

    def stats(self) -> dict[str, Any]:
        return dict(self.request("stats")["stats"])

    def ping(self) -> dict[str, Any]:
        return dict(self.request("ping")["pong"])

    def scale(self, n: int) -> dict[str, Any]:
        return dict(self.request("scale", n=n)["scale"])

    def pause(self, queue: str | None = None) -> list[str]:
        return list(self.request("pause", **({"queue": queue} if queue else {}))["paused"])

    def resume(self, queue: str | None = None) -> list[str]:
        return list(self.request("resume", **({"queue": queue} if queue else {}))["paused"])
