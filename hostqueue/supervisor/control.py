"""The control socket: a Unix stream socket speaking newline-delimited JSON.

Framing, replies and every op are documented in docs/protocol.md. An example::

    -> {"id": 1, "op": "submit", "task": "tasks.resize", "args": {"path": "a.png"}}
    <- {"id": 1, "ok": true, "job": {"id": 17, "status": "pending", ...}, "duplicate": false}
    -> {"id": 2, "op": "bogus"}
    <- {"id": 2, "ok": false, "error": {"code": "unknown_op", "message": "..."}}

A connection is an asyncio Protocol: lines are split from the byte stream,
parsed with orjson and handed to ``Operations``. A handler returns a dict (the
reply, written at once), a ``DeferredReply`` (written in the turn it is settled
in), or an awaitable whose result is the reply. No client
can stop the supervisor: every failure becomes an error reply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any

import orjson

from hostqueue.supervisor.deferred import DeferredReply
from hostqueue.core.errors import ProtocolError
from hostqueue.store.base import StoreBusy, StoreError
from hostqueue.supervisor.operations import Operations

if TYPE_CHECKING:
    from hostqueue.supervisor.main import Supervisor

log = logging.getLogger("hostqueue.control")

LISTEN_BACKLOG = 1024
# Stop reading a client's requests while this much of its replies waits unsent.
WRITE_HIGH_WATER = 4 * 1024 * 1024
# Requests of one client being served at once (waits, submits awaiting their
# commit, reads): past this its further lines stay unread until some finish.
MAX_IN_FLIGHT = 256
# A watcher that lets this much pile up is cut off rather than held in memory.
WRITE_HARD_LIMIT = 64 * 1024 * 1024
# All clients together may leave this much unsent; past it the slowest (the most
# unsent) are cut off, until half of it is left, and the memory given back.
TOTAL_UNSENT_LIMIT = 128 * 1024 * 1024
# File descriptors kept free for workers, the store and the log whatever the
# clients do: a client beyond that is refused at once.
FD_RESERVE = 64
FD_PER_WORKER = 4
_PEERCRED = struct.Struct("3i")


def process_groups(pid: int) -> set[int]:
    """The supplementary groups of a process (Linux: /proc/PID/status), empty if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def hung_up(sock: Any) -> bool:
    """Whether the peer of a stream socket closed it altogether (POLLHUP), rather than
    only its sending half (shutdown: it still reads what we send)."""
    if sock is None:
        return False
    poller = select.poll()
    try:
        poller.register(sock.fileno(), select.POLLIN | getattr(select, "POLLRDHUP", 0x2000))
        events = poller.poll(0)
    except (OSError, ValueError):
        return False
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events)


def peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the peer, from SO_PEERCRED."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


_LEADING_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.){0,200}"|-?\d{1,19})\s*,')


def _leading_id(line: bytes) -> Any:
    """The id of a request whose line does not parse, if it stands first (else None)."""
    m = _LEADING_ID.match(line[:300])
    if m is None:
        return None
    try:
        return orjson.loads(m.group(1))
    except orjson.JSONDecodeError:
        return None


# A job in a reply: its fields and their names, besides its args.
REPLY_BYTES_PER_JOB = 400


def reply_estimate(request: dict[str, Any], line_bytes: int) -> int:
    """How many bytes the reply to this request will take, roughly."""
    args = request.get("args")
    if request.get("op") == "submit_many" and isinstance(args, list):
        return line_bytes + REPLY_BYTES_PER_JOB * len(args)
    return 0


class Connection(asyncio.Protocol):
    def __init__(self, server: "ControlServer") -> None:
        self.server = server
        self.ops = server.ops
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.discarding = False
        self.closed = False
        self.tasks: set[asyncio.Future[Any] | DeferredReply] = set()
        self.subscriptions: list[Any] = []
        self.peer: tuple[int, int, int] | None = None
        self.eof = False
        # Bytes of replies still to come for requests in flight (estimated): a big
        # submit_many's reply is counted before it exists, so that a client
        # pipelining many of them is held back before, not after, megabytes pile up.
        self.replies_due = 0
        # Reading is paused (too much in flight, or unread replies): _unhold() resumes it.
        self.held_back = False

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = transport.get_extra_info("socket")
        self.peer = peer_credentials(sock)
        if not self.server.room_for_a_client(sock):
            self.write_error(None, "too_many_clients",
                             "the supervisor serves as many clients as its open-files limit allows"
                             " (descriptors are kept for its workers); try again later")
            log.warning("refused a client (pid %s): the open-files limit is near",
                        self.peer[0] if self.peer else "?")
            self.transport.close()
            return
        if self.peer is not None and not self.server.allowed(self.peer[1], self.peer[2], self.peer[0]):
            self.write(
                {"id": None, "ok": False, "error": ProtocolError(
                    "forbidden",
                    f"uid {self.peer[1]} may not use this socket; connect as uid {os.getuid()} or root",
                ).to_dict()}
            )
            log.warning("refused a client with pid %d uid %d", self.peer[0], self.peer[1])
            self.transport.close()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for task in list(self.tasks):  # a DeferredReply leaves the set as it is cancelled
            task.cancel()
        for sub in self.subscriptions:
            self.ops.supervisor.events.unsubscribe(sub)
        self.subscriptions.clear()

    def eof_received(self) -> bool:
        """The client sent all it will send (`echo ... | socat`): answer what is
        pending, then close; a line without its final newline still counts. A client
        that hung up altogether (not just its sending half) reads nothing more: its
        waits and streams end now, and its descriptor is freed."""
        self.eof = True
        if self.transport is not None and hung_up(self.transport.get_extra_info("socket")):
            return False  # the transport closes: connection_lost cancels what waits

        if self.buffer and not self.buffer.endswith(b"\n"):
            self.buffer += b"\n"
        self._process()
        if self._done():
            return False  # nothing pending: let the transport close
        return True

    def _done(self) -> bool:
        return (
            not self.tasks
            and not self.buffer
            and not any(s.job_id is not None for s in self.subscriptions)
        )

    def maybe_close(self) -> None:
        """After the client's EOF, close once the last pending reply or stream ended."""
        if self.eof and not self.closed and self._done() and self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop taking its requests.
        if self.transport is not None:
            self.held_back = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._unhold()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()

    def _held(self) -> bool:
        """Too much in flight for this client: leave its further lines unread for now."""
        if self.transport is None:
            return True
        return (
            len(self.tasks) >= MAX_IN_FLIGHT
            or self.transport.get_write_buffer_size() + self.replies_due > WRITE_HIGH_WATER
        )

    def _process(self) -> None:
        limit = self.server.max_line
        buf = self.buffer
        pos = 0
        while not self.closed:
            if self._held():
                if self.transport is not None:
                    self.held_back = True
                    self.transport.pause_reading()  # resumed as replies go out
                break
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            if self.discarding:
                self.discarding = False
            else:
                self.handle_line(bytes(buf[pos:nl]))
            pos = nl + 1
        if pos:
            del buf[:pos]
        if len(buf) > limit and buf.find(b"\n") < 0:
            if not self.discarding:
                self.discarding = True
                self.write_error(
                    None, "line_too_long",
                    f"request line exceeds {limit} bytes; the rest of this line is discarded",
                )
            buf.clear()

    def _unhold(self) -> None:
        if not self.held_back or self.closed or self.transport is None or self._held():
            return
        self.held_back = False
        self._process()
        if not self.held_back and not self.eof:
            self.transport.resume_reading()

    # -- requests -------------------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        if not line.strip():
            return
        if len(line) > self.server.max_line:
            self.write_error(None, "line_too_long", f"request line exceeds {self.server.max_line} bytes")
            return
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            # The line is refused whole, but a pipelining client still learns which
            # request it was when the id leads the line.
            self.write_error(_leading_id(line), "bad_json", f"the line is not valid JSON: {exc}")
            return
        if not isinstance(request, dict):
            self.write_error(None, "bad_json", "a request must be a JSON object, like {\"id\": 1, \"op\": \"ping\"}")
            return
        request_id = request.get("id")
        if isinstance(request_id, (dict, list)):
            self.write_error(None, "bad_request", "'id' must be a string, a number or null")
            return
        try:
            result = self.ops.dispatch(self, request)
        except ProtocolError as exc:
            self.write_error(request_id, exc.code, exc.message)
            return
        except Exception:  # noqa: BLE001 - the supervisor never dies from a client
            log.exception("error handling op %r", request.get("op"))
            self.write_error(request_id, "internal", "unexpected error; see the supervisor's log")
            return
        if result is None:
            return
        if isinstance(result, dict):
            self.reply(request_id, result)
            return
        future = (result if isinstance(result, (DeferredReply, asyncio.Future))
                  else asyncio.ensure_future(result))
        self.tasks.add(future)
        due = reply_estimate(request, len(line))
        self.replies_due += due
        future.add_done_callback(lambda f: self._reply_later(request_id, f, due))

    def _reply_later(self, request_id: Any, future: asyncio.Future[Any] | DeferredReply,
                     due: int) -> None:
        self.tasks.discard(future)
        self.replies_due -= due
        if self.closed or future.cancelled():
            return
        try:
            self._write_result(request_id, future)
        finally:
            self._unhold()
            self.maybe_close()

    def _write_result(self, request_id: Any, future: asyncio.Future[Any] | DeferredReply) -> None:
        exc = future.exception()
        if exc is None:
            result = future.result()
            if result is not None:
                self.reply(request_id, result)
        elif isinstance(exc, ProtocolError):
            self.write_error(request_id, exc.code, exc.message)
        elif isinstance(exc, StoreError):  # a read the store refused: said as it is
            code = "store_busy" if isinstance(exc, StoreBusy) else "store_error"
            self.write_error(request_id, code, self.ops.public(exc))
        else:
            log.error("error handling a request", exc_info=exc)
            self.write_error(request_id, "internal", f"unexpected error: {type(exc).__name__}: {exc}")

    # -- replies ----------------------------------------------------------------

    def write(self, message: dict[str, Any]) -> None:
        if self.closed or self.transport is None:
            return
        unsent = self.transport.get_write_buffer_size()
        if unsent > WRITE_HARD_LIMIT:
            self.cut_off(f"{unsent} bytes of its replies and events unsent")
            return
        self.transport.write(orjson.dumps(message) + b"\n")
        self.server.unsent_grew(self, self.transport.get_write_buffer_size() - unsent)

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None and not self.closed else 0

    def cut_off(self, why: str) -> None:
        """Close a client that does not read, dropping what it left unsent."""
        if self.closed or self.transport is None:
            return
        pid = self.peer[0] if self.peer else "?"
        log.warning("cutting off a client (pid %s) that does not read: %s", pid, why)
        self.transport.abort()
        self.closed = True
        self.server.cut_off_one()

    def reply(self, request_id: Any, data: dict[str, Any]) -> None:
        message = {"id": request_id, "ok": True}
        message.update(data)
        self.write(message)

    def write_error(self, request_id: Any, code: str, text: str) -> None:
        self.write({"id": request_id, "ok": False, "error": {"code": code, "message": text}})


class ControlServer:
    def __init__(self, supervisor: "Supervisor", path: str, max_line: int) -> None:
        self.supervisor = supervisor
        self.path = path
        self.max_line = max_line
        self.ops = Operations(supervisor)
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[Connection] = set()
        self.uid = os.getuid()
        self.activated = False  # the socket came from systemd (socket activation)
        self.group_gid: int | None = None
        self.unsent_total = 0  # what clients left unsent, counted up (see unsent_grew)
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_limit = soft if soft != resource.RLIM_INFINITY else 1 << 20

    def unsent_grew(self, conn: Connection, grew: int) -> None:
        """Keep the total of what clients left unsent under TOTAL_UNSENT_LIMIT. The
        running total only grows between exact counts (a drained buffer is not
        seen), so it is counted exactly, once over the limit, before anyone is cut."""
        self.unsent_total += grew
        if self.unsent_total <= TOTAL_UNSENT_LIMIT:
            return
        sizes = sorted(((c.unsent(), id(c), c) for c in self.connections), reverse=True)
        self.unsent_total = sum(size for size, _, _ in sizes)
        for size, _, c in sizes:
            if self.unsent_total <= TOTAL_UNSENT_LIMIT // 2 or not size:
                break
            c.cut_off(f"{size} bytes unsent, the most of all clients, while all of them left"
                      f" {self.unsent_total} unsent (limit {TOTAL_UNSENT_LIMIT})")
            self.unsent_total -= size

    def cut_off_one(self) -> None:
        """A client was cut off: give its buffers' memory back to the system soon."""
        self.supervisor.trim_memory_soon()

    def room_for_a_client(self, sock: Any) -> bool:
        """Whether this client's descriptor leaves FD_RESERVE (and some per worker) free."""
        fd = sock.fileno() if sock is not None else -1
        return fd < 0 or fd < self.fd_limit - FD_RESERVE - FD_PER_WORKER * self.supervisor.pool.target

    def allowed(self, uid: int, gid: int | None = None, pid: int | None = None) -> bool:
        """The socket's owner and root; with a group, its members: by the peer's
        primary group, its supplementary groups (those of the connecting process:
        systemd's SupplementaryGroups=, sg, newgrp), or the group's member list."""
        if uid == self.uid or uid == 0:
            return True
        if self.group_gid is None:
            return False
        if gid == self.group_gid or (pid is not None and self.group_gid in process_groups(pid)):
            return True
        import pwd

        try:
            name = pwd.getpwuid(uid).pw_name
            import grp

            return name in grp.getgrgid(self.group_gid).gr_mem
        except KeyError:
            return False

    async def start(
        self, group: str | None = None, inherited: list[int] | None = None, mode: str | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        if group is not None:
            import grp

            self.group_gid = grp.getgrnam(group).gr_gid
        if inherited:
            # Socket activation: systemd listens, and clients that connect while
            # we restart wait in its backlog instead of failing.
            sock = socket.socket(fileno=inherited[0])
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise OSError("the socket passed by systemd (LISTEN_FDS) is not a Unix stream socket")
            sock.setblocking(False)
            self.activated = True
            self.path = sock.getsockname() or self.path
            self.server = await loop.create_unix_server(lambda: Connection(self), sock=sock)
            return
        self._remove_stale_socket()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self.server = await loop.create_unix_server(
                lambda: Connection(self), path=self.path, backlog=LISTEN_BACKLOG
            )
        finally:
            os.umask(old_umask)
        if self.group_gid is not None:
            os.chown(self.path, -1, self.group_gid)
        os.chmod(self.path, int(mode, 8) if mode else 0o660 if self.group_gid is not None else 0o600)

    def _remove_stale_socket(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{self.path} exists and is not a socket; remove it or pass another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # left by a supervisor that died
            return
        finally:
            probe.close()
        raise OSError(f"another process is serving {self.path}; stop it or pass another --socket")

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
            self.server = None
        if self.activated:
            return  # systemd owns the socket file
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
