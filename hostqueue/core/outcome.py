"""What the end of an attempt does to its job: the one place that decides.

A worker reports how an attempt ended (``run_attempt``'s fields: ``"s"`` and
``"r"``, ``"e"``, ``"d"`` as they apply), or the worker dies, or the supervisor
finds at start that it died itself while jobs ran. Each of these becomes a
``Decision``: the event of the transition table (states.py), the state it
leads to, and what to store with it. The supervisor, recovery at start and
immediate mode all ask here; none of them decides on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from hostqueue.core.states import MAX_INTERRUPTIONS, Event, State

Error = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Decision:
    event: Event
    state: State
    error: Error | None = None
    result: str | None = None  # the task's return value as JSON text
    run_at: float | None = None  # RETRIED, INTERRUPTED: when it may run again
    charged: bool = True  # the attempt counts toward max_attempts


def error(kind: str, message: str, traceback: str | None = None) -> Error:
    return {"type": kind, "message": message, "traceback": traceback}


def lost_error(cause: str) -> Error:
    """A worker death: "worker killed by signal SIGKILL", "worker exited with code 3"."""
    return error("WorkerLost", cause)


def aborted_before_start() -> Error:
    return error("Aborted", "aborted before it started")


def expired_error(attempts_ran: int) -> Error:
    ran = "no attempt" if attempts_ran == 0 else f"{attempts_ran} attempt{'s' if attempts_ran != 1 else ''}"
    return error("Expired", f"deadline passed before the job could start ({ran} ran before)")


def interrupted_error(times: int) -> Error:
    return error(
        "Interrupted",
        f"interrupted {times} times in a row by the supervisor's death (a crash, kill -9 or"
        " power loss) while it ran; not run again, so that a job that takes the host down"
        " cannot loop: find the cause, then retry it (hostqueue job retry ID)",
    )


def drained_error() -> Error:
    return error("Interrupted", "stopped when the supervisor's grace period ran out; not charged")


def backoff_delay(attempt: int, base: float = 1.0, factor: float = 2.0, cap: float = 300.0) -> float:
    """The default backoff before attempt + 1: base x factor^(attempt-1), +-25% jitter, capped."""
    delay = base * factor ** max(attempt - 1, 0)
    return min(cap, delay * random.uniform(0.75, 1.25))


def attempt_failed(err: Error | None, attempt: int, max_attempts: int, now: float,
                   backoff: Callable[[], float], delay: float | None = None) -> Decision:
    """An attempt that failed and may be retried: again at now + delay (or the backoff),
    or failed for good once it was the last."""
    if attempt >= max_attempts:
        return Decision(Event.FAILED, State.FAILED, err)
    run_at = now + (backoff() if delay is None else delay)
    return Decision(Event.RETRIED, State.PENDING, err, run_at=run_at)


def given_back(abort_requested: bool) -> Decision:
    """A held job that did not start and comes back (taken back, its worker retired
    or gone): it waits again, uncharged; one whose abort was asked for ends."""
    if abort_requested:
        return Decision(Event.ABORTED, State.CANCELLED, aborted_before_start(), charged=False)
    return Decision(Event.RETURNED, State.PENDING, charged=False)


def after_report(report: dict[str, Any], attempt: int, max_attempts: int, abort_requested: bool,
                 now: float, backoff: Callable[[], float]) -> Decision:
    """A worker's report on a job it held: not started ("returned", "expired", an abort
    before its start: no "st") or the outcome of its attempt."""
    s = report["s"]
    if s == "returned":
        return given_back(abort_requested)
    if s == "expired":
        return Decision(Event.EXPIRED, State.EXPIRED, expired_error(attempt - 1), charged=False)
    if "st" not in report:  # it never started: only an abort ends a job that way
        return Decision(Event.ABORTED, State.CANCELLED, report.get("e") or aborted_before_start(),
                        charged=False)
    if s == "ok":
        if abort_requested:  # it saw ctx.aborted and returned: cancelled, its result kept
            return Decision(Event.ABORTED, State.CANCELLED,
                            error("Aborted", "aborted; the task returned early"), report.get("r"))
        return Decision(Event.SUCCEEDED, State.COMPLETED, result=report.get("r"))
    err = report.get("e")
    if s == "aborted" or abort_requested:
        return Decision(Event.ABORTED, State.CANCELLED, err)
    if s == "permanent":
        return Decision(Event.FAILED, State.FAILED, err)
    return attempt_failed(err, attempt, max_attempts, now, backoff, report.get("d"))


def after_worker_death(cause: str, killed_for: str | None, kill_error: Error | None,
                       started: bool, attempt: int, max_attempts: int, abort_requested: bool,
                       now: float, backoff: Callable[[], float]) -> Decision:
    """A job its worker held when it died (crash, OOM kill, time limit, abort, drain)."""
    if not started:
        return given_back(abort_requested)
    if killed_for == "drain":
        return Decision(Event.INTERRUPTED, State.PENDING, drained_error(), run_at=now, charged=False)
    if killed_for == "abort" or abort_requested:
        return Decision(Event.ABORTED, State.CANCELLED, lost_error(f"aborted; {cause}"))
    err = kill_error if killed_for in ("timeout", "unresponsive") and kill_error is not None \
        else lost_error(cause)
    return attempt_failed(err, attempt, max_attempts, now, backoff)


def after_crash(interruptions: int, now: float) -> Decision:
    """A job found running at start: the supervisor died while it ran. It runs again
    without using up an attempt, unless this was its MAX_INTERRUPTIONS-th in a row."""
    times = interruptions + 1
    if times >= MAX_INTERRUPTIONS:
        return Decision(Event.RECOVERED, State.FAILED, interrupted_error(times), charged=False)
    return Decision(
        Event.RECOVERED, State.PENDING,
        error("Interrupted", "the supervisor stopped while the job ran; it runs again, not charged"),
        run_at=now, charged=False,
    )
