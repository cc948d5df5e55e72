"""hostqueue: a durable job queue for one host, in one process and one SQLite file.

Task code::

    import hostqueue

    @hostqueue.task(retries=3, timeout=60)
    def resize(ctx: hostqueue.JobContext, path: str) -> dict:
        ctx.progress(0.5, "scaled")
        return {"ok": True}

Clients::

    with hostqueue.Client() as c:
        print(c.submit("tasks.resize", {"path": "a.png"}).result(timeout=30))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hostqueue.core.context import JobContext
from hostqueue.core.errors import HostqueueError, JobFailed, ProtocolError, SupervisorUnavailable
from hostqueue.core.exceptions import Aborted, Permanent, Retry, TimeLimit

from hostqueue.core.registry import task

__version__ = "0.1.0"

__all__ = [
    "task", "JobContext", "Retry", "Permanent", "Aborted", "TimeLimit",
    "Client", "AsyncClient", "JobHandle", "AsyncJobHandle", "EventStream", "Supervisor",
    "ImmediateClient", "ImmediateSupervisor",
    "HostqueueError", "ProtocolError", "SupervisorUnavailable", "JobFailed", "SupervisorFailed",
    "__version__",
]

if TYPE_CHECKING:
    from hostqueue.client.aio import AsyncClient, AsyncJobHandle
    from hostqueue.client.sync import Client, EventStream, JobHandle
    from hostqueue.client.embed import Supervisor, SupervisorFailed
    from hostqueue.client.immediate import ImmediateClient, ImmediateSupervisor

# Where each client name lives (loaded on first use).
_CLIENT_NAMES = {
    "Client": "client.sync", "JobHandle": "client.sync", "EventStream": "client.sync",
    "AsyncClient": "client.aio", "AsyncJobHandle": "client.aio",
    "Supervisor": "client.embed", "SupervisorFailed": "client.embed",
    "ImmediateClient": "client.immediate", "ImmediateSupervisor": "client.immediate",
}


def __getattr__(name: str) -> Any:
    # Task modules import hostqueue in every worker: keep the client out of that path.
    module = _CLIENT_NAMES.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module 'hostqueue' has no attribute {name!r}")
