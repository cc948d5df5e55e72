"""The cleanup example's task: delete the files of a directory older than N seconds.

Run by the schedule in hostqueue.toml (every 2 seconds, to see it work quickly; a real
one would say "0 3 * * *"), or by hand:

    hostqueue submit cleanup_tasks.cleanup '{"directory": "scratch", "older_than": 10}' --wait
"""

from __future__ import annotations

import os
import time
from typing import Any

import hostqueue


@hostqueue.task(retries=1)
def cleanup(ctx: hostqueue.JobContext, directory: str, older_than: float = 3600.0) -> dict[str, Any]:
    """Delete regular files in ``directory`` (not below it) last modified more than
    ``older_than`` seconds ago. Returns what it deleted."""
    if older_than < 0:
        raise hostqueue.Permanent(f"older_than must be >= 0, got {older_than}")
    cutoff = time.time() - older_than
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return {"directory": directory, "deleted": [], "kept": 0}
    deleted, kept = [], 0
    for i, entry in enumerate(entries, 1):
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                deleted.append(entry.name)
            else:
                kept += 1
        except FileNotFoundError:
            pass  # gone meanwhile
        ctx.progress(i / len(entries), entry.name)
    return {"directory": os.path.abspath(directory), "deleted": deleted, "kept": kept}
