"""The web example's task: a "report" that takes a while and says how far it is."""

from __future__ import annotations

import time
from typing import Any

import hostqueue


@hostqueue.task(retries=0, timeout=300)
def report(ctx: hostqueue.JobContext, name: str = "report", steps: int = 10,
           delay: float = 0.3) -> dict[str, Any]:
    """``steps`` steps of ``delay`` seconds, with progress after each."""
    total = 0
    for i in range(1, steps + 1):
        ctx.check_abort()
        time.sleep(delay)
        total += i * i
        ctx.progress(i / steps, f"step {i} of {steps}")
    return {"name": name, "steps": steps, "checksum": total}
