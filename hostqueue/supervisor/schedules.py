"""Recurring schedules: cron expressions (parsed by cronsim) in a time zone.

A schedule submits one job of its task each time its cron expression comes
due. The next due time is kept in the store and written in the same
transaction as the job it submits, so a restart neither loses nor doubles a
run. Runs missed while the supervisor was stopped follow the misfire policy:
``run_once`` (default) submits one job at start for all of them, ``skip``
submits none. The supervisor arms one loop timer for the earliest due time.

Configured in the file as named tables::

    [schedules.cleanup]
    task = "myapp.tasks.cleanup"
    cron = "*/5 * * * *"
    timezone = "Europe/Berlin"     # default UTC
    args = { older_than = 3600 }   # default {}
    misfire = "skip"               # or "run_once" (default)

or on the task: ``@hostqueue.task(cron="0 3 * * *", cron_timezone="UTC")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

MISFIRE_POLICIES = ("run_once", "skip")


class ScheduleError(ValueError):
    """An invalid schedule; the message names it and the key."""


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    task: str
    cron: str
    timezone: str = "UTC"
    args: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    queue: str | None = None
    priority: int | None = None
    misfire: str = "run_once"

    def next_after(self, t: float) -> float:
        """The first due time strictly after Unix time t."""
        zone = ZoneInfo(self.timezone)
        start = datetime.fromtimestamp(t, zone)
        return next(CronSim(self.cron, start)).timestamp()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "task": self.task, "cron": self.cron, "timezone": self.timezone,
            "args": self.args, "queue": self.queue, "priority": self.priority,
            "misfire": self.misfire,
        }


def check(spec: ScheduleSpec, where: str) -> ScheduleSpec:
    try:
        ZoneInfo(spec.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"{where}.timezone {spec.timezone!r} is not a known time zone (like \"UTC\" or \"Europe/Berlin\")") from None
    try:
        CronSim(spec.cron, datetime.now(ZoneInfo(spec.timezone)))
    except CronSimError as exc:
        raise ScheduleError(f"{where}.cron {spec.cron!r} is not a valid cron expression: {exc}") from None
    if spec.misfire not in MISFIRE_POLICIES:
        raise ScheduleError(f"{where}.misfire must be one of {', '.join(MISFIRE_POLICIES)}, got {spec.misfire!r}")
    return spec


def parse(table: dict[str, Any] | None) -> list[ScheduleSpec]:
    """Schedules from the configuration file's [schedules.NAME] tables."""
    out = []
    for name, entry in (table or {}).items():
        where = f"schedules.{name}"
        if not isinstance(entry, dict):
            raise ScheduleError(f"{where} must be a table like [schedules.{name}]")
        known = {"task", "cron", "timezone", "args", "queue", "priority", "misfire"}
        unknown = set(entry) - known
        if unknown:
            raise ScheduleError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        for key in ("task", "cron"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ScheduleError(f"{where}.{key} is required and must be a string")
        args = entry.get("args", {})
        if not isinstance(args, dict):
            raise ScheduleError(f"{where}.args must be a table of keyword arguments")
        priority = entry.get("priority")
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise ScheduleError(f"{where}.priority must be an integer")
        out.append(
            check(
                ScheduleSpec(
                    name=name, task=entry["task"], cron=entry["cron"],
                    timezone=str(entry.get("timezone", "UTC")), args=args,
                    queue=entry.get("queue"), priority=priority,
                    misfire=str(entry.get("misfire", "run_once")),
                ),
                where,
            )
        )
    return out


@dataclass
class ScheduleState:
    """What the store keeps of a schedule between runs."""

    next_run: float
    last_run: float | None = None
    last_job: int | None = None
    cron: str = ""
    timezone: str = "UTC"


def plan_start(spec: ScheduleSpec, stored: ScheduleState | None, now: float) -> tuple[ScheduleState, bool]:
    """At start: the schedule's state, and whether to submit one job now for missed runs."""
    if stored is None or stored.cron != spec.cron or stored.timezone != spec.timezone:
        return ScheduleState(spec.next_after(now), stored.last_run if stored else None,
                             stored.last_job if stored else None, spec.cron, spec.timezone), False
    if stored.next_run > now:
        return stored, False
    missed = ScheduleState(spec.next_after(now), stored.last_run, stored.last_job, spec.cron, spec.timezone)
    return missed, spec.misfire == "run_once"


class Scheduler:
    """Runs the schedules inside the supervisor: one loop timer for the earliest due time."""

    def __init__(self, loop: Any, store: Any, committer: Any, running: Callable[[], bool],
                 tasks: Callable[[], dict[str, Any]], next_id: Callable[[], int],
                 submit: Callable[..., Any]) -> None:
        self.loop = loop
        self.store = store
        self.committer = committer
        self._running = running  # the supervisor serves (not draining)
        self._tasks = tasks
        self._next_id = next_id  # the id the next submitted job gets
        self._submit = submit  # Actions.submit_jobs
        self.specs: dict[str, ScheduleSpec] = {}
        self.states: dict[str, ScheduleState] = {}
        self._timer: Any = None
        self._timer_at = 0.0

    @staticmethod
    def configured(config_table: dict[str, Any], tasks: dict[str, Any]) -> list[ScheduleSpec]:
        """The file's schedules, then one per task declared with ``cron=`` (named after it)."""
        specs = parse(config_table)
        names = {s.name for s in specs}
        for name, task in sorted(tasks.items()):
            if task.cron and name not in names:
                specs.append(check(ScheduleSpec(name=name, task=name, cron=task.cron,
                                                timezone=task.cron_timezone), f"task {name}"))
        return specs

    async def start(self, specs: list[ScheduleSpec], now: float, fresh: bool = False) -> None:
        """Plan every schedule from what the store kept; submit missed runs by policy.
        With fresh (a host that takes the schedules over from another), from the
        store alone: what this host remembers is out of date."""
        stored = await self.store.load_schedules()
        known = {} if fresh else self.states  # on reload, memory is ahead of the store
        self.specs = {s.name: s for s in specs}
        self.states = {}
        for spec in specs:
            row = stored.get(spec.name)
            previous = known.get(spec.name) or (
                ScheduleState(row[0], row[1], row[2], row[3], row[4]) if row else None
            )
            state, run_now = plan_start(spec, previous, now)
            self.states[spec.name] = state
            if run_now:
                self.sup_log("schedule %s missed runs while stopped: running once now (misfire run_once)", spec.name)
                self._fire(spec, now)
            elif previous is not None and previous.next_run <= now:
                self.sup_log("schedule %s missed runs while stopped: skipped (misfire skip)", spec.name)
                self._save(spec, state)
            elif previous is None or previous.cron != spec.cron or previous.timezone != spec.timezone:
                self._save(spec, state)
        self.arm()

    def sup_log(self, msg: str, *args: Any) -> None:
        import logging

        logging.getLogger("hostqueue.schedules").info(msg, *args)

    def _save(self, spec: ScheduleSpec, state: ScheduleState) -> None:
        self.committer.add("save_schedule", self._row(spec, state))

    @staticmethod
    def _row(spec: ScheduleSpec, state: ScheduleState) -> tuple[Any, ...]:
        return (spec.name, state.next_run, state.last_run, state.last_job, spec.cron, spec.timezone)

    def arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.states or not self._running():
            return
        import time

        due = min(s.next_run for s in self.states.values())
        self._timer_at = due
        self._timer = self.loop.call_later(max(0.0, due - time.time()), self._due)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> None:
        import time

        self._timer = None
        if not self._running():  # draining, or another host took the schedules over
            return
        now = time.time()
        for name, state in list(self.states.items()):
            if state.next_run <= now:
                self._fire(self.specs[name], now)
        self.arm()

    def _fire(self, spec: ScheduleSpec, now: float) -> None:
        """Submit one job and move the schedule on, in one transaction."""
        import logging

        log = logging.getLogger("hostqueue.schedules")
        task = self._tasks().get(spec.task)
        old = self.states[spec.name]
        new = ScheduleState(spec.next_after(now), now, old.last_job, spec.cron, spec.timezone)
        self.states[spec.name] = new
        if task is None:
            log.error("schedule %s names task %s, which no task module registers; skipped", spec.name, spec.task)
            self._save(spec, new)
            return

        def done(jobs: list[dict[str, Any]] | None, error: BaseException | None) -> None:
            if error is not None:
                log.error("schedule %s could not submit its job (%s); trying again in 5 s", spec.name, error)
                if self.states.get(spec.name) is new:
                    self.states[spec.name] = ScheduleState(now + 5.0, old.last_run, old.last_job, spec.cron, spec.timezone)
                    self.arm()
            elif jobs:
                new.last_job = jobs[0]["id"]

        # The job's id is known before the commit: the saved row names it.
        job_id = self._next_id()
        row = (spec.name, new.next_run, new.last_run, job_id, spec.cron, spec.timezone)
        opts = {"queue": spec.queue, "priority": spec.priority}
        try:
            self._submit(task, [dict(spec.args)], opts, done, extra=[("save_schedule", row)])
        except Exception as exc:  # noqa: BLE001 - ids not ready (several hosts), a bad option
            done(None, exc)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, spec in sorted(self.specs.items()):
            state = self.states.get(name)
            out.append({
                **spec.describe(),
                "next_run": state.next_run if state else None,
                "last_run": state.last_run if state else None,
                "last_job": state.last_job if state else None,
            })
        return out
