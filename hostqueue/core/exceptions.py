"""Exceptions that task code raises (or receives) to steer its job."""

from __future__ import annotations

import time as _time
from datetime import datetime


class Retry(Exception):
    """Retry the job later. Uses up an attempt.

    ``delay`` is seconds from now; ``at`` is an absolute time (Unix seconds or
    a datetime). Without either, the task's backoff decides.
    """

    def __init__(
        self, message: str = "", delay: float | None = None, at: float | datetime | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if at is not None:
            at_ts = at.timestamp() if isinstance(at, datetime) else float(at)
            self.delay: float | None = max(0.0, at_ts - _time.time())
        else:
            self.delay = None if delay is None else max(0.0, float(delay))


class Permanent(Exception):
    """Fail the job now, without retrying."""


class Aborted(Exception):
    """Raised by ``ctx.check_abort()`` once a client asked to abort the job."""


class TimeLimit(Exception):
    """Raised inside a task that ran past its time limit (a soft limit: clean up and return)."""
