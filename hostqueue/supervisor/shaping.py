"""Traffic shaping: queue order, concurrency caps and rate limits, as functions of ``now``.

Jobs wait in lanes, one per (queue, task). A lane may start a job when its
queue is not paused and neither its queue's limit nor its task's limit holds it
back. Limits:

- ``concurrency = N``: at most N of its jobs held by workers at once;
- ``min_interval = S``: at least S seconds between two starts;
- ``rate = "N/T"``: at most N starts in any T seconds (a sliding window).

All that apply must agree. A lane held back by time reports when it may start,
so the supervisor arms one timer for the earliest such moment (never a busy
loop); one held back by concurrency waits for a job of its own to end.

Between queues, ``order`` decides: ``priority`` (default: the highest priority
job of any queue first, then submit order), ``strict`` (queues in the
configured order, a later queue only when the earlier ones have nothing that
may start), or ``weighted`` (each queue gets starts in proportion to its
``weight``).

Times here are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

Lane = tuple[str, str]  # (queue, task)

ORDERS = ("priority", "strict", "weighted")
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


class ShapingError(ValueError):
    """An invalid queue or limit setting; the message names the key."""


@dataclass(frozen=True)
class LimitSpec:
    concurrency: int | None = None
    min_interval: float | None = None
    rate: tuple[int, float] | None = None  # (starts, per seconds)

    @classmethod
    def parse(cls, table: dict[str, Any], where: str) -> "LimitSpec":
        concurrency = table.get("concurrency")
        if concurrency is not None and (
            not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
        ):
            raise ShapingError(f"{where}.concurrency must be an integer >= 1, got {concurrency!r}")
        min_interval = table.get("min_interval")
        if min_interval is not None:
            if isinstance(min_interval, bool) or not isinstance(min_interval, (int, float)) or min_interval <= 0:
                raise ShapingError(f"{where}.min_interval must be a number of seconds > 0, got {min_interval!r}")
            min_interval = float(min_interval)
        rate = table.get("rate")
        parsed_rate = None
        if rate is not None:
            m = _RATE.match(str(rate)) if isinstance(rate, str) else None
            if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
                raise ShapingError(
                    f"{where}.rate must look like \"10/60\" (10 starts per 60 s; \"100/1m\", \"5/1h\" also work), got {rate!r}"
                )
            per = float(m.group(2)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(3)]
            parsed_rate = (int(m.group(1)), per)
        return cls(concurrency, min_interval, parsed_rate)

    @property
    def empty(self) -> bool:
        return self.concurrency is None and self.min_interval is None and self.rate is None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency
        if self.min_interval is not None:
            out["min_interval"] = self.min_interval
        if self.rate is not None:
            out["rate"] = f"{self.rate[0]}/{self.rate[1]:g}"
        return out


class Limiter:
    """The state of one limit: jobs held, and recent starts."""

    def __init__(self, spec: LimitSpec, label: str) -> None:
        self.spec = spec
        self.label = label
        self.running = 0
        self.last_start: float | None = None
        self.starts: collections.deque[float] = collections.deque()

    def _trim(self, now: float) -> None:
        if self.spec.rate is not None:
            per = self.spec.rate[1]
            while self.starts and self.starts[0] <= now - per:
                self.starts.popleft()

    def free_at(self, now: float) -> float:
        """When the next start is allowed: ``now`` if at once, a later time, or inf
        (held by concurrency: wait for a job to end)."""
        spec = self.spec
        if spec.concurrency is not None and self.running >= spec.concurrency:
            return math.inf
        t = now
        if spec.min_interval is not None and self.last_start is not None:
            t = max(t, self.last_start + spec.min_interval)
        if spec.rate is not None:
            self._trim(now)
            n, per = spec.rate
            if len(self.starts) >= n:
                t = max(t, self.starts[-n] + per)
        return t

    def started(self, now: float) -> None:
        self.running += 1
        self.last_start = now
        if self.spec.rate is not None:
            self.starts.append(now)

    def finished(self) -> None:
        self.running = max(0, self.running - 1)

    def why(self, now: float) -> str | None:
        spec = self.spec
        if spec.concurrency is not None and self.running >= spec.concurrency:
            return f"{self.label}: concurrency limit {spec.concurrency} reached"
        at = self.free_at(now)
        if at > now:
            kind = "min_interval" if spec.min_interval is not None and self.last_start is not None and self.last_start + spec.min_interval >= at else "rate"
            limit = f"{spec.min_interval:g} s between starts" if kind == "min_interval" else f"rate {spec.rate[0]}/{spec.rate[1]:g} s" if spec.rate else ""
            return f"{self.label}: {limit}; next start in {at - now:.2f} s"
        return None


@dataclass(frozen=True)
class QueueSpec:
    name: str
    weight: float = 1.0
    limit: LimitSpec = field(default_factory=LimitSpec)


@dataclass(frozen=True)
class ShapingConfig:
    order: str = "priority"
    queues: tuple[QueueSpec, ...] = ()
    tasks: dict[str, LimitSpec] = field(default_factory=dict)

    @classmethod
    def parse(cls, queues: dict[str, Any] | None, limits: dict[str, Any] | None) -> "ShapingConfig":
        """From the configuration file's [queues] and [limits] tables."""
        queues = dict(queues or {})
        order = queues.pop("order", "priority")
        if order not in ORDERS:
            raise ShapingError(f"queues.order must be one of {', '.join(ORDERS)}, got {order!r}")
        specs = []
        for name, table in queues.items():
            if not isinstance(table, dict):
                raise ShapingError(f"queues.{name} must be a table like [queues.{name}]")
            unknown = set(table) - {"concurrency", "min_interval", "rate", "weight"}
            if unknown:
                raise ShapingError(f"queues.{name}: unknown key(s) {', '.join(sorted(unknown))}; known: concurrency, min_interval, rate, weight")
            weight = table.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise ShapingError(f"queues.{name}.weight must be a number > 0, got {weight!r}")
            specs.append(QueueSpec(name, float(weight), LimitSpec.parse(table, f"queues.{name}")))
        tasks = {}
        for task, table in (limits or {}).items():
            if not isinstance(table, dict):
                raise ShapingError(f"limits.\"{task}\" must be a table like [limits.\"{task}\"]")
            unknown = set(table) - {"concurrency", "min_interval", "rate"}
            if unknown:
                raise ShapingError(f"limits.\"{task}\": unknown key(s) {', '.join(sorted(unknown))}; known: concurrency, min_interval, rate")
            tasks[task] = LimitSpec.parse(table, f"limits.\"{task}\"")
        return cls(order, tuple(specs), tasks)


class Shaper:
    """Which lane starts next, and when a held-back lane may start."""

    def __init__(self, config: ShapingConfig | None = None) -> None:
        self.config = config or ShapingConfig()
        self.queue_limits: dict[str, Limiter] = {}
        self.task_limits: dict[str, Limiter] = {}
        self.rank: dict[str, int] = {}
        self.weights: dict[str, float] = {}
        # Weighted order (start-time fair queuing): each queue's virtual time, which
        # a start moves on by 1 / weight; the queue with the earliest goes next. A
        # queue never lags the virtual clock (the time of the last start): what it
        # ran alone, or did not run while it had no work, earns it neither a
        # penalty nor a credit later. Queues at or behind the clock are dropped:
        # no state stays for names with no job left.
        self.served: dict[str, float] = {}
        self.clock = 0.0
        self.apply(self.config)

    def apply(self, config: ShapingConfig) -> None:
        """Take a new configuration; jobs held now keep counting against the new limits."""
        old_q, old_t = self.queue_limits, self.task_limits
        self.config = config
        self.queue_limits = {}
        self.task_limits = {}
        for i, q in enumerate(config.queues):
            self.rank[q.name] = i
            self.weights[q.name] = q.weight
            limiter = Limiter(q.limit, f"queue {q.name}")
            prev = old_q.get(q.name)
            if prev is not None:
                limiter.running, limiter.last_start, limiter.starts = prev.running, prev.last_start, prev.starts
            self.queue_limits[q.name] = limiter
        self.rank = {q.name: i for i, q in enumerate(config.queues)}
        self.weights = {q.name: q.weight for q in config.queues}
        for task, spec in config.tasks.items():
            limiter = Limiter(spec, f"task {task}")
            prev = old_t.get(task)
            if prev is not None:
                limiter.running, limiter.last_start, limiter.starts = prev.running, prev.last_start, prev.starts
            self.task_limits[task] = limiter
        # Running counts of queues/tasks without a limit are not tracked; new
        # limits start from what is held now (set by the supervisor: recount()).

    def recount(self, held: Iterable[Lane]) -> None:
        for limiter in (*self.queue_limits.values(), *self.task_limits.values()):
            limiter.running = 0
        for queue, task in held:
            if queue in self.queue_limits:
                self.queue_limits[queue].running += 1
            if task in self.task_limits:
                self.task_limits[task].running += 1

    def limited(self, lane: Lane) -> bool:
        """Whether a limit applies to the lane (its queue's or its task's)."""
        q = self.queue_limits.get(lane[0])
        if q is not None and not q.spec.empty:
            return True
        k = self.task_limits.get(lane[1])
        return k is not None and not k.spec.empty

    def free_at(self, lane: Lane, now: float) -> float:
        queue, task = lane
        t = now
        q = self.queue_limits.get(queue)
        if q is not None:
            t = max(t, q.free_at(now))
        k = self.task_limits.get(task)
        if k is not None:
            t = max(t, k.free_at(now))
        return t

    def started(self, lane: Lane, now: float) -> None:
        queue, task = lane
        if queue in self.queue_limits:
            self.queue_limits[queue].started(now)
        if task in self.task_limits:
            self.task_limits[task].started(now)
        if self.config.order == "weighted":
            start = max(self.served.get(queue, 0.0), self.clock)
            self.clock = start
            self.served[queue] = start + 1.0 / self.weights.get(queue, 1.0)
            if len(self.served) > 64 and len(self.served) > 4 * len(self.weights):
                self.served = {q: v for q, v in self.served.items() if v > self.clock}

    def finished(self, lane: Lane) -> None:
        queue, task = lane
        if queue in self.queue_limits:
            self.queue_limits[queue].finished()
        if task in self.task_limits:
            self.task_limits[task].finished()

    def queue_caps(self) -> dict[str, int]:
        """The queues with a concurrency cap, and their caps (held across hosts on a
        shared store: cluster.py)."""
        return {q.name: q.limit.concurrency for q in self.config.queues
                if q.limit.concurrency is not None}

    def strict_queues(self) -> list[str] | None:
        """With order = "strict": the queues in their order (others come after them)."""
        if self.config.order != "strict":
            return None
        return [q.name for q in self.config.queues]

    def order_key(self, lane: Lane, top: int) -> tuple[float, float, int]:
        """Smaller runs first; ``top`` is the lane's best packed (priority, id) key."""
        queue = lane[0]
        if self.config.order == "strict":
            return (float(self.rank.get(queue, len(self.rank))), 0.0, top)
        if self.config.order == "weighted":
            return (max(self.served.get(queue, 0.0), self.clock), 0.0, top)
        return (0.0, 0.0, top)

    def why_waiting(self, lane: Lane, now: float) -> str | None:
        queue, task = lane
        reasons = []
        for limiter in (self.queue_limits.get(queue), self.task_limits.get(task)):
            if limiter is not None:
                why = limiter.why(now)
                if why:
                    reasons.append(why)
        return "; ".join(reasons) or None

    def describe(self) -> dict[str, Any]:
        return {
            "order": self.config.order,
            "queues": {
                q.name: {"weight": q.weight, **q.limit.describe(),
                         "running": self.queue_limits[q.name].running}
                for q in self.config.queues
            },
            "tasks": {t: {**s.describe(), "running": self.task_limits[t].running}
                      for t, s in self.config.tasks.items()},
        }
