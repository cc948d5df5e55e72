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

from .context import JobContext
from .errors import HostqueueError, JobFailed, ProtocolError, SupervisorUnavailable
from .exceptions import Aborted, Permanent, Retry, TimeLimit
from .registry import task

__version__ = "0.1.0"

__all__ = [
    "task", "JobContext", "Retry", "Permanent", "Aborted", "TimeLimit",
    "Client", "AsyncClient", "JobHandle", "AsyncJobHandle",
    "HostqueueError", "ProtocolError", "SupervisorUnavailable", "JobFailed",
    "__version__",
]

if TYPE_CHECKING:
    from .client import AsyncClient, AsyncJobHandle, Client, JobHandle


def __getattr__(name: str) -> Any:
    # Task modules import hostqueue in every worker: keep the client out of that path.
    if name in ("Client", "AsyncClient", "JobHandle", "AsyncJobHandle"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'hostqueue' has no attribute {name!r}")
