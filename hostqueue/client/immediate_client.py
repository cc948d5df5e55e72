"""Immediate mode's client: a ``hostqueue.Client`` whose supervisor is an
``ImmediateSupervisor`` (immediate.py) in this process, and the shared supervisor
every ``Client`` uses under ``HOSTQUEUE_IMMEDIATE=1``."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterable

from hostqueue.client.immediate import (
    ENV_FLAG, ImmediateSupervisor, TaskModule, _copy, _current,
)
from hostqueue.client.sync import Client, _encode


# ---------------------------------------------------------------------------
# the client


class ImmediateClient(Client):
    """A ``hostqueue.Client`` whose supervisor is an ImmediateSupervisor in this process.

    It has every method of Client (inherited: the same argument handling and the same
    JobHandle and EventStream), and ``supervisor``, the in-memory supervisor (its
    ``jobs`` can be inspected directly). Without ``tasks`` or ``supervisor`` it uses
    the process's shared supervisor (see ``shared_supervisor``).
    """

    supervisor: ImmediateSupervisor

    def __init__(self, socket: str | None = None, timeout: float | None = None, *,
                 tasks: Iterable[TaskModule] | None = None,
                 supervisor: ImmediateSupervisor | None = None) -> None:
        if getattr(self, "_initialised", False):
            return  # Client(...) under HOSTQUEUE_IMMEDIATE: __new__ made it, __init__ runs twice
        super().__init__(socket, timeout)
        if supervisor is None:
            if tasks is not None:
                supervisor = ImmediateSupervisor(tasks)
            else:
                supervisor = getattr(_current, "supervisor", None) or shared_supervisor()
        self.supervisor = supervisor
        self._filed = 0
        self._initialised = True

    # -- the connection is a function call

    def connect(self) -> ImmediateClient:
        return self

    def close(self) -> None:
        self.supervisor._drop_client(self)
        with self.supervisor.lock:
            super().close()

    def __repr__(self) -> str:
        return f"<ImmediateClient {self.supervisor!r}>"

    def send(self, op: str, **fields: Any) -> int:
        # Encoded by the real client (same TypeError for what JSON cannot hold), then
        # read back from those bytes by the supervisor, as over the socket.
        data = _encode({"id": self._next_id + 1, "op": op, **fields})
        with self.supervisor.lock:
            self._next_id += 1
            rid = self._next_id
            self._awaiting[rid] = op
            self._sizes[rid] = len(data)
        self.supervisor.serve(self, rid, data)
        return rid

    def _deliver(self, message: dict[str, Any]) -> None:
        """A message from the supervisor (a reply or an event), as if read from the socket."""
        with self.supervisor.cond:
            self._file(_copy(message))
            self._filed += 1
            self.supervisor.cond.notify_all()

    def _wants(self, rid: int) -> bool:
        return rid in self._streams or rid in self._awaiting

    def _next_message(self, request_id: int, deadline: float | None) -> dict[str, Any]:
        with self.supervisor.cond:
            return super()._next_message(request_id, deadline)

    def _forget(self, request_id: int) -> None:
        with self.supervisor.lock:
            super()._forget(request_id)

    def _pump(self, deadline: float | None) -> None:
        """Wait for a message for this client (another thread's job, a wait's timeout)."""
        sup = self.supervisor
        with sup.cond:
            seen = self._filed
            while self._filed == seen:
                sup._expire_waiters(time.time())
                if self._filed != seen:
                    return
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise TimeoutError("no reply from the supervisor in time")
                expiry = sup._next_expiry()
                if expiry is not None:
                    until = max(0.0, expiry - time.time())
                    wait = until if wait is None else min(wait, until)
                sup.cond.wait(wait)


# ---------------------------------------------------------------------------
# HOSTQUEUE_IMMEDIATE=1

_shared: ImmediateSupervisor | None = None
_shared_lock = threading.Lock()


def enabled() -> bool:
    """True when $HOSTQUEUE_IMMEDIATE asks every Client to be an immediate one."""
    return os.environ.get(ENV_FLAG, "").strip().lower() not in ("", "0", "false", "no", "off")


def shared_supervisor() -> ImmediateSupervisor:
    """The process's shared immediate supervisor (tasks from $HOSTQUEUE_TASKS), made on
    first use; ``reset_shared_supervisor()`` forgets it (e.g. between tests)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            modules = [m.strip() for m in os.environ.get("HOSTQUEUE_TASKS", "").split(",") if m.strip()]
            _shared = ImmediateSupervisor(modules)
        return _shared


def reset_shared_supervisor() -> None:
    global _shared
    with _shared_lock:
        _shared = None
