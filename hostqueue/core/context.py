"""JobContext: what a task receives as its first argument."""

from __future__ import annotations

import threading
from typing import Any

from hostqueue.core.board import SlotWriter
from hostqueue.core.exceptions import Aborted


class JobContext:
    """The running job as its task sees it.

    ``progress()`` writes shared memory only, so calling it in a tight loop is cheap;
    the supervisor samples it a few times a second.
    """

    __slots__ = ("job_id", "task", "attempt", "max_attempts", "args", "_slot", "_abort", "_last")

    def __init__(
        self,
        job_id: int,
        task: str,
        attempt: int,
        max_attempts: int,
        args: dict[str, Any],
        slot: SlotWriter | None,
        abort: threading.Event,
    ) -> None:
        self.job_id = job_id
        self.task = task
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.args = args
        self._slot = slot
        self._abort = abort
        self._last: tuple[float | None, str | None] = (None, None)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the job is: ``fraction`` from 0 to 1, and an optional short message."""
        f = float(fraction)
        if f != f:  # NaN
            raise ValueError("progress fraction must be a number between 0 and 1, got NaN")
        f = 0.0 if f < 0.0 else 1.0 if f > 1.0 else f
        if message is not None:
            message = str(message)
        self._last = (f, message)
        if self._slot is not None:
            self._slot.progress(f, message)

    @property
    def aborted(self) -> bool:
        """True once a client asked to abort this job."""
        return self._abort.is_set()

    def check_abort(self) -> None:
        """Raise ``hostqueue.Aborted`` if a client asked to abort this job."""
        if self._abort.is_set():
            raise Aborted(f"job {self.job_id} was aborted")

    @property
    def last_progress(self) -> tuple[float | None, str | None]:
        return self._last

    def __repr__(self) -> str:
        return f"<JobContext job={self.job_id} task={self.task} attempt={self.attempt}>"
