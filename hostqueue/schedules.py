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
from typing import Any
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
