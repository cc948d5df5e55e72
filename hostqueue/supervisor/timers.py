"""One loop timer for the earliest of many due times.

Every timed thing in the supervisor (delayed jobs, deadlines, rate limits,
retention, autoscale's idle check) keeps its due times in its own structure and
arms one of these for the earliest: arming a later time than the armed one does
nothing, an earlier one re-arms. With nothing due, no timer exists.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class EarliestTimer:
    def __init__(self, callback: Callable[[], None], clock: Callable[[], float] = time.time) -> None:
        self.callback = callback
        self.clock = clock  # wall clock for stored times, monotonic for intervals
        self.handle: asyncio.TimerHandle | None = None
        self.at = 0.0

    @property
    def armed(self) -> bool:
        return self.handle is not None

    def arm(self, at: float) -> None:
        """Fire at ``at`` (in the clock's time) unless already armed for earlier."""
        if self.handle is not None:
            if self.at <= at:
                return
            self.handle.cancel()
        self.at = at
        loop = asyncio.get_running_loop()  # armed from the loop, always
        self.handle = loop.call_later(max(0.0, at - self.clock()), self._fire)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        self.handle = None
        self.callback()
