"""Background tasks of the supervisor's loop, kept and watched.

asyncio keeps only a weak reference to a task: one nobody holds may vanish
mid-way, and an exception nobody retrieves is logged late or never. Every
background coroutine of the supervisor starts through ``spawn()``: the task is
held until it ends, and an unexpected error is logged at once, naming it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine

log = logging.getLogger("hostqueue.supervisor")

_tasks: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro, name=what)
    _tasks.add(task)
    task.add_done_callback(_ended)
    return task


def _ended(task: asyncio.Task[Any]) -> None:
    _tasks.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %r failed", task.get_name(), exc_info=exc)


def pending() -> int:
    return len(_tasks)
