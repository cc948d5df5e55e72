"""The supervisor's state that its mixins (dispatch.py, outcomes.py) share, declared
once for type checkers: the attributes themselves are set by ``Supervisor``."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from . import registry
    from .announce import Announcer
    from .autoscale import PoolSizer
    from .committer import GroupCommitter
    from .events import EventHub
    from .metrics import Histogram
    from .pool import RunningJob, WorkerHandle
    from .readyindex import Payload, ReadyIndex, TimedHeap
    from .retention import Retention
    from .runcount import RunningCount
    from .sampler import ProgressSampler
    from .settings import SupervisorConfig
    from .shaping import Shaper
    from .states import SupervisorState
    from .store import Store
    from .timers import EarliestTimer


class SupervisorParts:
    """Declarations only (see the module's docstring)."""

    if TYPE_CHECKING:
        config: SupervisorConfig
        state: SupervisorState
        store: Store
        loop: asyncio.AbstractEventLoop
        committer: GroupCommitter
        ready: ReadyIndex
        deadlines: TimedHeap
        payloads: dict[int, Payload]
        running: dict[int, RunningJob]
        running_count: RunningCount
        claiming: set[int]
        claim_aborts: set[int]
        recent_finals: collections.OrderedDict[int, str]
        recent_jobs: collections.OrderedDict[int, tuple[Any, ...]]
        workers: dict[int, WorkerHandle]
        paused: set[str]
        events: EventHub
        counters: collections.Counter[str]
        shaper: Shaper
        task_runtime: dict[str, float]
        sampler: ProgressSampler
        sizer: PoolSizer
        _dispatch_scheduled: bool
        _limit_timer: EarliestTimer
        _limit_wake: float
        tasks: dict[str, registry.TaskSpec]
        delayed: TimedHeap
        keys: dict[str, int]
        waiters: dict[int, list[Callable[[dict[str, Any]], None]]]
        runtime: Histogram
        retention: dict[str, float]
        retention_sweeper: Retention
        announcer: Announcer

        def _update_title(self) -> None: ...
        def _requeue_uncharged(self, rj: RunningJob) -> None: ...
        def _check_drained(self) -> None: ...
        def _wake_dispatch(self) -> None: ...
        def _arm_delay_timer(self) -> None: ...
