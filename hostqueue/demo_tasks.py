"""Example tasks, used by ``hostqueue demo`` and handy for trying hostqueue by hand:

    hostqueue run --tasks hostqueue.demo_tasks
    hostqueue submit hostqueue.demo_tasks.thumbnail '{"image": "cat.png"}' --wait
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from hostqueue.core.registry import task

if TYPE_CHECKING:
    from hostqueue.core.context import JobContext


@task
def thumbnail(ctx: JobContext, image: str, steps: int = 5, delay: float = 0.02) -> dict[str, Any]:
    """Pretend to make a thumbnail of ``image`` in ``steps`` steps of ``delay`` seconds."""
    started = time.monotonic()
    for i in range(1, steps + 1):
        ctx.check_abort()
        time.sleep(delay)
        ctx.progress(i / steps, f"step {i}/{steps}")
    stem, ext = os.path.splitext(image)
    return {
        "image": image,
        "thumbnail": f"{stem}.thumb{ext or '.png'}",
        "steps": steps,
        "seconds": round(time.monotonic() - started, 4),
        "worker_pid": os.getpid(),
    }


# A short backoff so that its retries show up within a demo's few seconds.
@task(retries=3, backoff_base=0.2)
def flaky(ctx: JobContext, fail_times: int = 1) -> dict[str, Any]:
    """Fail the first ``fail_times`` attempts, then succeed."""
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"flaky: failing attempt {ctx.attempt} of the first {fail_times}")
    return {"attempts": ctx.attempt}


@task
def noop(ctx: JobContext) -> None:
    """Do nothing: the cost of a job itself."""


@task
def sleep(ctx: JobContext, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds``, reporting progress and stopping early when aborted."""
    end = time.monotonic() + seconds
    while True:
        ctx.check_abort()
        left = end - time.monotonic()
        if left <= 0:
            break
        if seconds > 0:
            ctx.progress(1 - left / seconds, f"{left:.1f}s left")
        time.sleep(min(left, 0.1))  # short slices so that an abort is seen quickly
    ctx.progress(1.0, "done")
    return {"slept": seconds}
