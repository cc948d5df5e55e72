"""Human-readable output of the command line: tables, job and status views, event
lines, durations and times, progress bars.

Pure formatting (strings in, strings out) except ``ProgressLine``, which redraws one
line on a terminal stream. JSON output does not come through here: ``--json``
prints the reply's data as it is. hostqueue.cli and hostqueue.demo use these.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import IO, Any

import orjson

from hostqueue.core.states import JobStatus

__all__ = [
    "STAT_COLUMNS",
    "ProgressLine",
    "error_summary",
    "format_bar",
    "format_duration",
    "format_event",
    "format_job",
    "format_jobs",
    "format_paused",
    "format_progress",
    "format_rate",
    "format_rss",
    "format_stats",
    "format_status",
    "format_table",
    "format_time",
    "shown_status",
    "truncate",
]

STAT_COLUMNS = ("pending", "scheduled", "running", "completed", "failed", "cancelled", "expired")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                 right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell; ``right`` lists columns of numbers."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right_set = set(right)
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right_set else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_bar(fraction: float | None, width: int = 20) -> str:
    f = min(1.0, max(0.0, fraction or 0.0))
    filled = round(f * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def format_rss(rss: float | None) -> str:
    """Resident memory in MB (one decimal), or "-"."""
    return "-" if rss is None else f"{rss / 1048576:.1f}"


def format_rate(per_second: float | None) -> str:
    """A rate of events: "12.3/s", "1.2k/s", or "-" when unknown."""
    if per_second is None:
        return "-"
    if per_second >= 10000:
        return f"{per_second / 1000:.0f}k/s"
    if per_second >= 1000:
        return f"{per_second / 1000:.1f}k/s"
    return f"{per_second:.1f}/s"


def truncate(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with "…" where it was cut."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def format_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    when = datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")
    delta = time.time() - ts
    relative = f"{format_duration(delta)} ago" if delta >= 0 else f"in {format_duration(-delta)}"
    return f"{when} ({relative})"


def format_stats(stats: Mapping[str, Any]) -> str:
    rows = [["(all)"] + [stats.get(c, 0) for c in STAT_COLUMNS]]
    for name, counts in sorted((stats.get("queues") or {}).items()):
        rows.append([name] + [counts.get(c, 0) for c in STAT_COLUMNS])
    return format_table(["QUEUE"] + [c.upper() for c in STAT_COLUMNS], rows,
                        right=range(1, len(STAT_COLUMNS) + 1))


def format_status(st: Mapping[str, Any]) -> str:
    paused = st.get("paused") or []
    workers = st.get("workers") or []
    target = st.get("target_workers")
    header = [
        ("pid", st.get("pid")),
        ("uptime", format_duration(st.get("uptime"))),
        ("state", st.get("state")),
        ("store", st.get("store")),
        ("socket", st.get("socket")),
        ("paused", "all queues" if "*" in paused else ", ".join(paused) or "none"),
        ("workers", f"{len(workers)}" + (f" (target {target})" if target is not None else "")),
        ("version", st.get("version")),
    ]
    lines = [f"{name + ':':<9} {value}" for name, value in header if value is not None]
    if workers:
        rows = [[w.get("pid"), w.get("state"), w.get("job"),
                 f"{w['rss'] / 1048576:.1f}" if w.get("rss") is not None else None,
                 f"{w['cpu_percent']:.1f}" if w.get("cpu_percent") is not None else None]
                for w in workers]
        headers = ["PID", "STATE", "JOB", "RSS MB", "CPU%"]
        lines += ["", format_table(headers, rows, right=[0, 2, 3, 4])]
    hosts = st.get("hosts")
    if hosts:  # several hosts share a PostgreSQL store: the ones alive
        me = (st.get("cluster") or {}).get("host")
        rows = [[("* " if h.get("id") == me else "") + str(h.get("id")), h.get("name"), h.get("pid"),
                 h.get("workers"), f"{h['lease_left']:.1f}" if h.get("lease_left") is not None else None,
                 h.get("socket")]
                for h in hosts]
        lines += ["", f"hosts alive ({len(hosts)}; * this one):",
                  format_table(["HOST", "NAME", "PID", "WORKERS", "LEASE S", "SOCKET"], rows,
                               right=[2, 3, 4])]
    return "\n".join(lines)


def shown_status(job: Mapping[str, Any]) -> str:
    """``scheduled`` for a pending job whose run_at is still ahead, as stats counts it."""
    status = str(job.get("status"))
    run_at = job.get("run_at")
    if status == JobStatus.PENDING.value and run_at is not None and run_at > time.time():
        return "scheduled"
    return status


def error_summary(error: Any, width: int = 60) -> str:
    if not error:
        return ""
    if isinstance(error, Mapping):
        text = f"{error.get('type', 'Error')}: {error.get('message', '')}"
    else:
        text = str(error)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _took(job: Mapping[str, Any]) -> float | None:
    started: float | None = job.get("started_at")
    finished: float | None = job.get("finished_at")
    if started is None:
        return None
    return (finished if finished is not None else time.time()) - started


def format_jobs(jobs: Sequence[Mapping[str, Any]]) -> str:
    now = time.time()
    rows = []
    for j in jobs:
        created = j.get("created_at")
        rows.append([
            j.get("id"), shown_status(j), j.get("task"), j.get("queue"),
            f"{j.get('attempts', 0)}/{j.get('max_attempts', '?')}",
            format_duration(now - created) if created is not None else "-",
            format_duration(_took(j)), error_summary(j.get("error"), 50),
        ])
    headers = ["ID", "STATUS", "TASK", "QUEUE", "TRIES", "AGE", "TOOK", "ERROR"]
    return format_table(headers, rows, right=[0, 4, 5, 6])


# Fields of a job shown first by `job show`, in this order; times get a date.
_JOB_FIELDS = ("id", "task", "status", "queue", "priority", "attempts", "progress", "args",
               "result", "key", "run_id", "created_at", "run_at", "started_at", "finished_at",
               "deadline", "timeout", "abort_requested", "worker_pid", "cpu_seconds", "peak_rss")
_TIME_FIELDS = {"created_at", "run_at", "started_at", "finished_at"}


def format_job(job: Mapping[str, Any]) -> str:
    lines: list[tuple[str, str]] = []
    for name in _JOB_FIELDS:
        if name not in job:
            continue
        value = job[name]
        if name == "status":
            text = shown_status(job)
            if job.get("abort_requested") and value == JobStatus.RUNNING.value:
                text += " (abort requested)"
        elif name == "attempts":
            text = f"{value} of {job.get('max_attempts', '?')}"
        elif name == "progress":
            if value is None:
                continue
            text = f"{value * 100:.0f}% {job.get('progress_message') or ''}".rstrip()
        elif name in _TIME_FIELDS:
            text = format_time(value)
        elif name == "deadline" and isinstance(value, (int, float)) and value > 1e9:
            text = format_time(value)  # an absolute time rather than seconds
        elif name in ("cpu_seconds", "peak_rss"):
            text = _resource(name, value)
        elif isinstance(value, (dict, list)):
            text = orjson.dumps(value).decode()
        else:
            text = "-" if value is None else str(value)
        lines.append((name, text))
    if job.get("started_at") is not None:
        lines.append(("took", format_duration(_took(job))))
    skip = set(_JOB_FIELDS) | {"error", "max_attempts", "progress_message", "attempt_log"}
    for name, value in job.items():  # fields a newer server adds
        if name not in skip:
            lines.append((name, value if isinstance(value, str) else orjson.dumps(value).decode()))
    width = max(len(n) for n, _ in lines) + 1
    out = [f"{(n + ':').ljust(width)} {t}" for n, t in lines]
    attempts = job.get("attempt_log") or []
    for attempt in attempts:
        took = format_duration(attempt.get("duration"))
        head = (f"attempt {attempt.get('attempt')}: {attempt.get('status')} after {took} "
                f"on pid {attempt.get('worker_pid')}, "
                f"cpu {_resource('cpu_seconds', attempt.get('cpu_seconds'))}, "
                f"peak {_resource('peak_rss', attempt.get('peak_rss'))}")
        out += ["", head]
        out += _error_lines(attempt.get("error"), "  ")
    if job.get("error"):
        out += ["", f"error: {error_summary(job['error'], 200)}"]
        if not attempts or attempts[-1].get("error") != job["error"]:  # else shown above
            out += _error_lines(job["error"], "  ", summary=False)
    return "\n".join(out)


def _resource(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3f}s" if name == "cpu_seconds" else f"{value / 1048576:.1f} MB"


def _error_lines(error: Any, indent: str, summary: bool = True) -> list[str]:
    lines = [indent + error_summary(error, 200)] if summary and error else []
    traceback = error.get("traceback") if isinstance(error, Mapping) else None
    if traceback:
        lines += [indent + "  " + line for line in str(traceback).rstrip().splitlines()]
    return lines


def format_event(event: Mapping[str, Any], tasks: dict[Any, str],
                 lookup: Callable[[int], str] | None = None) -> str:
    """One line per watch event: time, event, job, task, then what changed.

    ``tasks`` remembers each job's task from its state events (progress events do
    not name it); ``lookup`` finds the task of a job first seen by its progress."""
    kind = str(event.get("event"))
    job_id = event.get("job_id")
    job = event.get("job") if isinstance(event.get("job"), Mapping) else None
    if job_id not in tasks:
        if job is not None:
            tasks[job_id] = str(job.get("task") or "")
        elif lookup is not None and isinstance(job_id, int):
            tasks[job_id] = lookup(job_id)
        if len(tasks) > 10000:  # a long watch should not grow without end
            tasks.pop(next(iter(tasks)))
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    detail = ""
    if kind == "progress":
        fraction = event.get("progress")
        pct = f"{fraction * 100:3.0f}%" if isinstance(fraction, (int, float)) else "   ?"
        detail = f"{pct} {event.get('message') or ''}".rstrip()
    elif job is not None:
        if kind == "submitted":
            detail = f"queue {job.get('queue')}"
        elif kind == "started":
            detail = f"attempt {job.get('attempts')}/{job.get('max_attempts')}"
        elif kind == "completed":
            detail = f"took {format_duration(_took(job))}"
        elif kind == "retrying":
            run_at = job.get("run_at")
            wait = format_duration(run_at - time.time()) if run_at is not None else "?"
            detail = f"{error_summary(job.get('error'), 60)}; retry in {wait}"
        else:
            detail = error_summary(job.get("error"), 80)
    return f"{stamp}  {kind:<9}  job {job_id}  {tasks.get(job_id, '')}  {detail}".rstrip()


def format_progress(job_id: Any, state: str, fraction: float | None, message: str) -> str:
    """The text of a waited-for job's progress line: state, bar, percent, message."""
    pct = f"{fraction * 100:3.0f}%" if fraction is not None else "    "
    return f"job {job_id} {state} {format_bar(fraction, 30)} {pct} {message}".rstrip()


def format_paused(paused: Sequence[str]) -> str:
    if "*" in paused:
        return "paused: all queues"
    return "paused: " + (", ".join(paused) or "no queue")


class ProgressLine:
    """One redrawn line on a terminal stream (stderr): a job's bar, percent and message."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.shown = False

    def show(self, text: str) -> None:
        cols = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r\x1b[2K" + text[: cols - 1])
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False


def format_schedules(schedules: list[dict[str, Any]]) -> str:
    if not schedules:
        return "no schedules (add [schedules.NAME] to the configuration, or @task(cron=...))"
    rows = [
        (s["name"], s["task"], s["cron"], s["timezone"], s["misfire"],
         format_time(s["last_run"]), s["last_job"], format_time(s["next_run"]))
        for s in schedules
    ]
    return format_table(("NAME", "TASK", "CRON", "TZ", "MISFIRE", "LAST RUN", "LAST JOB", "NEXT RUN"), rows)
