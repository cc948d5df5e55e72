"""``hostqueue ctl top``: a live view of one supervisor, like htop.

What it shows: the supervisor (pid, state, uptime, workers target/actual,
autoscale), one row per worker (state, its job and task, a progress bar with the
task's message and an ETA estimated from the job's progress rate, CPU% and RSS),
the queues (jobs ready to start from ``status``'s ``waiting_by_queue``, counts by
state from ``stats``) and the throughput (jobs completed, failed and submitted
per second, counted from the event stream).

Where the figures come from, all over the control socket:

- a ``watch`` of every job's events, on a connection of its own, read by a
  thread (``Watcher``): ``started`` and ``progress`` feed the progress bars and
  ETAs, ``completed`` / ``failed`` / ``submitted`` the rates;
- ``status`` and ``stats`` once per ``--interval`` while the view is open (the
  view is interactive, so a refresh timer is fine), and ``get`` once for a
  running job the view has not seen start (it was running when the view opened).

The screen is drawn with plain ANSI sequences on the alternate screen; the
terminal is put in cbreak mode (keys arrive one by one, no echo; Ctrl-C still
interrupts) and is restored on every way out: q, Ctrl-C, SIGTERM, SIGHUP, an
error. SIGWINCH redraws at the new size; Ctrl-Z restores the terminal before
stopping. ``--once`` prints one frame as plain text, without any of that.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Self

from hostqueue.client.sync import FINAL_EVENTS, Client
from hostqueue.cli.display import (
    STAT_COLUMNS,
    format_bar,
    format_duration,
    format_rate,
    format_rss,
    format_table,
    truncate,
)
from hostqueue.core.errors import HostqueueError, ProtocolError, SupervisorUnavailable

RATE_WINDOW = 10  # seconds of events the rates are computed over
ETA_WINDOW = 30.0  # seconds of a job's progress the ETA's rate is computed over
MAX_JOBS = 10_000  # running jobs the view keeps progress for
MAX_LOOKUPS = 32  # `get` requests per refresh for jobs first seen in `status`
MIN_REDRAW = 0.2  # at most 5 frames a second from events
REQUEST_TIMEOUT = 5.0

# Styles of a line (the live view shows them; plain text ignores them).
TITLE, HEAD, WARN = "title", "head", "warn"
_SGR = {TITLE: "\x1b[7m", HEAD: "\x1b[1m", WARN: "\x1b[1;31m"}

Line = tuple[str, str | None]


# ---------------------------------------------------------------------------
# what the view knows


class Rate:
    """Events counted in one-second buckets; ``per_second`` over the last seconds."""

    def __init__(self, since: float) -> None:
        self.since = since
        self.buckets: dict[int, int] = {}
        self.total = 0

    def add(self, at: float, n: int = 1) -> None:
        second = int(at)
        self.buckets[second] = self.buckets.get(second, 0) + n
        self.total += n
        if len(self.buckets) > 4 * RATE_WINDOW:
            for old in sorted(self.buckets)[: -2 * RATE_WINDOW]:
                del self.buckets[old]

    def per_second(self, now: float, window: int = RATE_WINDOW) -> float | None:
        """Events per second over the last ``window`` seconds (fewer if the view is
        younger); None before a second of measuring."""
        start = int(now) - window
        span = now - max(start, self.since)
        if span < 1.0:
            return None
        count = sum(n for second, n in self.buckets.items() if start <= second <= int(now))
        return count / span


@dataclass
class JobView:
    """A running job as the view knows it."""

    job_id: int
    task: str | None = None
    queue: str | None = None
    started_at: float | None = None
    fraction: float | None = None
    message: str = ""
    updated: float = 0.0
    # (time, fraction) samples of this attempt, oldest first: the ETA's rate
    samples: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=256))

    def eta(self, now: float) -> float | None:
        """Seconds until the job is done at its recent rate of progress, or None."""
        f = self.fraction
        if f is None or not self.samples:
            return None
        if f >= 1.0:
            return 0.0
        t1, f1 = self.samples[-1]
        ref = None
        for t, fr in self.samples:
            if t >= t1 - ETA_WINDOW and (t, fr) != (t1, f1):
                ref = (t, fr)
                break
        if ref is None:
            ref = self.samples[0]
        t0, f0 = ref
        if t1 <= t0 or f1 <= f0:
            return None
        rate = (f1 - f0) / (t1 - t0)
        return max(0.0, (1.0 - f1) / rate - max(0.0, now - t1))


class TopModel:
    """Everything the view shows; fed by the watcher thread and the refreshes.
    Every method takes the lock; ``clock`` is the supervisor's kind of time (Unix)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.lock = threading.RLock()
        self.opened = clock()
        self.status: dict[str, Any] | None = None
        self.stats: dict[str, Any] | None = None
        self.jobs: dict[int, JobView] = {}
        self.completed = Rate(self.opened)
        self.failed = Rate(self.opened)
        self.submitted = Rate(self.opened)
        self.error: str | None = None  # the status connection's trouble, if any
        self.watch_error: str | None = None  # the watch connection's trouble, if any
        self.refreshed: float | None = None
        self.on_change: Callable[[], None] | None = None

    # -- the event stream

    def on_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        job_id = event.get("job_id")
        if not isinstance(job_id, int):
            return
        at = event.get("at")
        at = float(at) if isinstance(at, (int, float)) else self.clock()
        job = event.get("job") if isinstance(event.get("job"), Mapping) else None
        with self.lock:
            if kind == "progress":
                jv = self.jobs.get(job_id)
                if jv is None:
                    jv = self._add(job_id)
                fraction = event.get("progress")
                if isinstance(fraction, (int, float)):
                    jv.fraction = min(1.0, max(0.0, float(fraction)))
                    jv.samples.append((at, jv.fraction))
                jv.message = str(event.get("message") or "")
                jv.updated = at
            elif kind == "started":
                jv = self._add(job_id)  # a fresh attempt: its own samples
                if job is not None:
                    jv.task, jv.queue = job.get("task"), job.get("queue")
                    started = job.get("started_at")
                    jv.started_at = float(started) if isinstance(started, (int, float)) else at
                else:
                    jv.started_at = at
                jv.samples.append((jv.started_at, 0.0))
                jv.updated = at
            elif kind == "submitted":
                self.submitted.add(at)
            elif kind == "retrying" or kind in FINAL_EVENTS:
                self.jobs.pop(job_id, None)
                if kind == "completed":
                    self.completed.add(at)
                elif kind == "failed":
                    self.failed.add(at)
        if self.on_change is not None and kind != "submitted":
            self.on_change()

    def _add(self, job_id: int) -> JobView:
        if len(self.jobs) >= MAX_JOBS:
            oldest = min(self.jobs.values(), key=lambda j: j.updated)
            del self.jobs[oldest.job_id]
        jv = self.jobs[job_id] = JobView(job_id, updated=self.clock())
        return jv

    # -- the refreshes

    def set_status(self, status: dict[str, Any], stats: dict[str, Any] | None) -> None:
        with self.lock:
            self.status = status
            if stats is not None:
                self.stats = stats
            self.error = None
            self.refreshed = self.clock()
            # Forget jobs no worker runs any more whose end we did not see
            # (the watch connection was lost, say).
            shown = self.running_job_ids()
            now = self.clock()
            for job_id in [j for j, jv in self.jobs.items()
                           if j not in shown and now - jv.updated > 60]:
                del self.jobs[job_id]

    def running_job_ids(self) -> set[int]:
        with self.lock:
            workers = (self.status or {}).get("workers") or []
            return {w["job"] for w in workers if isinstance(w.get("job"), int)}

    def unknown_jobs(self) -> list[int]:
        """Running jobs whose task the view does not know (started before it opened)."""
        with self.lock:
            return sorted(j for j in self.running_job_ids()
                          if j not in self.jobs or self.jobs[j].task is None)

    def adopt(self, job: Mapping[str, Any]) -> None:
        """A running job read with `get`: its task, start and last persisted progress."""
        job_id = job.get("id")
        if not isinstance(job_id, int):
            return
        with self.lock:
            if job.get("status") != "running":
                return
            jv = self.jobs.get(job_id) or self._add(job_id)
            jv.task, jv.queue = job.get("task"), job.get("queue")
            started = job.get("started_at")
            if jv.started_at is None and isinstance(started, (int, float)):
                jv.started_at = float(started)
                jv.samples.appendleft((jv.started_at, 0.0))
            progress = job.get("progress")
            if jv.fraction is None and isinstance(progress, (int, float)):
                jv.fraction = min(1.0, max(0.0, float(progress)))
                jv.message = str(job.get("progress_message") or "")
                jv.samples.append((self.clock(), jv.fraction))

    def set_error(self, message: str) -> None:
        with self.lock:
            self.error = message

    def set_watch_error(self, message: str | None) -> None:
        with self.lock:
            self.watch_error = message
        if self.on_change is not None:
            self.on_change()

    # -- what is shown

    def snapshot(self) -> dict[str, Any]:
        """The view's data, for ``--once --json``."""
        now = self.clock()
        with self.lock:
            return {
                "status": self.status,
                "stats": self.stats,
                "jobs": [
                    {"id": jv.job_id, "task": jv.task, "queue": jv.queue,
                     "started_at": jv.started_at, "progress": jv.fraction,
                     "message": jv.message, "eta": jv.eta(now)}
                    for jv in sorted(self.jobs.values(), key=lambda j: j.job_id)
                    if jv.job_id in self.running_job_ids()
                ],
                "throughput": {
                    "window": RATE_WINDOW,
                    "measured_for": now - self.opened,
                    "completed_per_second": self.completed.per_second(now),
                    "failed_per_second": self.failed.per_second(now),
                    "submitted_per_second": self.submitted.per_second(now),
                    "completed": self.completed.total,
                    "failed": self.failed.total,
                },
                "error": self.error,
                "watch_error": self.watch_error,
            }


# ---------------------------------------------------------------------------
# one frame


def render(model: TopModel, width: int | None = None, height: int | None = None,
           now: float | None = None, socket: str = "") -> list[Line]:
    """The frame's lines with their styles, cut to ``width`` x ``height`` when given."""
    now = model.clock() if now is None else now
    with model.lock:
        st = model.status or {}
        stats = model.stats or {}
        header = _header(model, st, now, socket)
        workers = _workers(model, st, now, width)
        queues = _queues(st, stats)
    footer: list[Line] = [("q quit, space refresh", None)] if height is not None else []
    if height is not None:
        room = max(0, height - len(header) - len(footer))
        if len(workers) + len(queues) > room:
            q_keep = min(len(queues), max(3, room // 3))
            w_keep = max(0, room - q_keep)
            if w_keep > len(workers):
                w_keep = len(workers)
                q_keep = room - w_keep
            workers = _cut(workers, w_keep, "workers")
            queues = _cut(queues, q_keep, "queues")
    lines = header + workers + queues
    if height is not None:
        lines = lines[: max(0, height - len(footer))]
        lines += [("", None)] * (height - len(footer) - len(lines)) + footer
    if width is not None:
        lines = [(truncate(text, width), style) for text, style in lines]
    return lines


def _cut(section: list[Line], keep: int, what: str) -> list[Line]:
    if len(section) <= keep:
        return section
    if keep <= 2:
        return section[:keep]
    hidden = len(section) - keep + 1
    return section[: keep - 1] + [(f"  … {hidden} more {what} (enlarge the window)", None)]


def _header(model: TopModel, st: Mapping[str, Any], now: float, socket: str) -> list[Line]:
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    if not st:
        title = f"hostqueue top  {socket}"
        out: list[Line] = [(f"{title}  {clock}", TITLE)]
        out.append((model.error or "waiting for the supervisor's status…", WARN if model.error else None))
        return out
    state = str(st.get("state"))
    if model.error and model.refreshed is not None:
        seen = time.strftime("%H:%M:%S", time.localtime(model.refreshed))
        state = f"NOT ANSWERING (figures of {seen})"
    title = (f"hostqueue top  supervisor {st.get('pid')}  {state}  "
             f"up {format_duration(st.get('uptime'))}  {st.get('socket') or socket}")
    out = [(f"{title}  {clock}", TITLE)]
    workers = st.get("workers") or []
    states: dict[str, int] = {}
    for w in workers:
        states[str(w.get("state"))] = states.get(str(w.get("state")), 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    line = f"workers {len(workers)}/{st.get('target_workers', '?')} (actual/target)"
    if counts:
        line += f": {counts}"
    auto = st.get("autoscale")
    if isinstance(auto, Mapping):
        line += (f"   autoscale {auto.get('min')}..{auto.get('max')}, "
                 f"shrink after {format_duration(auto.get('idle_timeout'))} idle")
    paused = st.get("paused") or []
    line += "   paused: " + ("all queues" if "*" in paused else ", ".join(paused) or "none")
    out.append((line, None))
    completed = model.completed.per_second(now)
    rates = (f"throughput (last {RATE_WINDOW} s): completed {format_rate(completed)}, "
             f"failed {format_rate(model.failed.per_second(now))}, "
             f"submitted {format_rate(model.submitted.per_second(now))}")
    if completed is None:
        rates = "throughput: measuring (needs a second of events)"
    counters = st.get("counters") or {}
    rates += (f"   running {st.get('running_jobs', 0)}, ready {st.get('ready_jobs', 0)}"
              f"   since start: {counters.get('completed', 0)} completed, "
              f"{counters.get('failed', 0)} failed")
    out.append((rates, None))
    for problem, label in ((st.get("pool_error"), "pool"), (st.get("store_error"), "store"),
                           (model.error, "status"), (model.watch_error, "events")):
        if problem:
            out.append((f"{label}: {problem}", WARN))
    return out


def _progress_cell(jv: JobView | None, bar: int) -> str:
    if jv is None or jv.fraction is None:
        return ""
    pct = f"{jv.fraction * 100:3.0f}%"
    return f"{format_bar(jv.fraction, bar)} {pct} {jv.message}".rstrip()


def _workers(model: TopModel, st: Mapping[str, Any], now: float, width: int | None) -> list[Line]:
    workers = st.get("workers") or []
    if not workers:
        return [("", None), ("no workers" if st else "", None)]
    bar = 20 if width is None or width >= 140 else 10
    rows = []
    for w in workers:
        job_id = w.get("job")
        jv = model.jobs.get(job_id) if isinstance(job_id, int) else None
        cpu = w.get("cpu_percent")
        held = w.get("held") or 0
        job_cell = "" if job_id is None else str(job_id) + (f" +{held - 1}" if held > 1 else "")
        eta = jv.eta(now) if jv is not None else None
        rows.append([
            w.get("pid"), w.get("number"), w.get("state"), job_cell,
            truncate(jv.task or "", 32) if jv is not None and jv.task else ("" if job_id is None else "?"),
            f"{cpu:.1f}" if isinstance(cpu, (int, float)) else None,
            format_rss(w.get("rss")),
            "" if job_id is None else ("?" if eta is None else format_duration(eta)),
            _progress_cell(jv, bar) if job_id is not None else "",
        ])
    table = format_table(["PID", "#", "STATE", "JOB", "TASK", "CPU%", "RSS MB", "ETA", "PROGRESS"],
                         rows, right=[0, 1, 3, 5, 6, 7]).splitlines()
    return [("", None), (table[0], HEAD)] + [(line, None) for line in table[1:]]


def _queues(st: Mapping[str, Any], stats: Mapping[str, Any]) -> list[Line]:
    waiting = st.get("waiting_by_queue") or {}
    by_queue = stats.get("queues") or {}
    names = sorted(set(waiting) | set(by_queue))
    if not names:
        return []
    paused = set(st.get("paused") or [])
    rows = []
    for name in names:
        counts = by_queue.get(name) or {}
        mark = " (paused)" if name in paused or "*" in paused else ""
        rows.append([name + mark, waiting.get(name, 0)] + [counts.get(c, 0) for c in STAT_COLUMNS])
    headers = ["QUEUE", "READY"] + [c.upper() for c in STAT_COLUMNS]
    table = format_table(headers, rows, right=range(1, len(headers))).splitlines()
    return [("", None), (table[0], HEAD)] + [(line, None) for line in table[1:]]


def plain(lines: list[Line]) -> str:
    return "\n".join(text.rstrip() for text, _ in lines).rstrip("\n")


# ---------------------------------------------------------------------------
# the connections


class Watcher(threading.Thread):
    """Reads a `watch` of every job into the model, on a connection of its own;
    reconnects (once a second) when the connection is lost."""

    def __init__(self, socket: str | None, model: TopModel) -> None:
        super().__init__(name="hostqueue-top-watch", daemon=True)
        self.socket = socket
        self.model = model
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self.client: Client | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            client = Client(self.socket, timeout=REQUEST_TIMEOUT)
            self.client = client
            try:
                stream = client.watch()
                self.subscribed.set()
                self.model.set_watch_error(None)
                while not self.stopping.is_set():
                    event = stream.next_event(0.25)
                    if event is not None:
                        self.model.on_event(event)
                    elif stream.ended:
                        raise SupervisorUnavailable("the event stream ended")
            except (HostqueueError, OSError) as exc:
                if not self.stopping.is_set():
                    self.model.set_watch_error(f"{exc}; reconnecting")
            finally:
                client.close()
            self.stopping.wait(1.0)

    def stop(self) -> None:
        self.stopping.set()
        self.join(2.0)


def refresh(client: Client, model: TopModel) -> None:
    """status and stats, then `get` for running jobs the view has not seen start."""
    try:
        st = client.status()
        try:
            stats = client.stats()
        except ProtocolError:
            stats = None
        model.set_status(st, stats)
        for job_id in model.unknown_jobs()[:MAX_LOOKUPS]:
            try:
                model.adopt(client.get(job_id))
            except ProtocolError:
                continue
    except (SupervisorUnavailable, TimeoutError, OSError) as exc:
        client.close()
        model.set_error(f"cannot reach the supervisor: {exc}")


# ---------------------------------------------------------------------------
# the terminal


class Screen:
    """The terminal in cbreak mode on the alternate screen, restored on exit."""

    def __init__(self, infd: int, out: IO[str], wake: int) -> None:
        self.infd = infd
        self.out = out
        self.wake = wake
        self.saved: list[Any] | None = None
        self.old_handlers: dict[int, Any] = {}

    def __enter__(self) -> Self:
        self._enter_mode()
        for sig, handler in ((signal.SIGWINCH, self._on_winch), (signal.SIGTERM, self._on_exit),
                             (signal.SIGHUP, self._on_exit), (signal.SIGTSTP, self._on_tstp),
                             (signal.SIGCONT, self._on_cont)):
            self.old_handlers[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        self._leave_mode()
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)

    def _enter_mode(self) -> None:
        self.saved = termios.tcgetattr(self.infd)
        mode = termios.tcgetattr(self.infd)
        mode[3] &= ~(termios.ICANON | termios.ECHO)  # lflag: keys one by one, unechoed
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self.infd, termios.TCSANOW, mode)
        self.out.write("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J")  # alternate screen, no cursor
        self.out.flush()

    def _leave_mode(self) -> None:
        try:
            self.out.write("\x1b[0m\x1b[?25h\x1b[?1049l")
            self.out.flush()
        except OSError:
            pass
        if self.saved is not None:
            try:
                termios.tcsetattr(self.infd, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass

    def _poke(self, what: bytes) -> None:
        try:
            os.write(self.wake, what)
        except OSError:
            pass

    def _on_winch(self, signum: int, frame: Any) -> None:
        self._poke(b"r")

    def _on_exit(self, signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    def _on_tstp(self, signum: int, frame: Any) -> None:
        self._leave_mode()
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT

    def _on_cont(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTSTP, self._on_tstp)
        self._enter_mode()
        self._poke(b"r")

    def size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self.out.fileno())
            return size.columns, size.lines
        except OSError:
            size = shutil.get_terminal_size((80, 24))
            return size.columns, size.lines

    def draw(self, lines: list[Line], width: int) -> None:
        parts = []
        for text, style in lines:
            if style == TITLE:
                text = text.ljust(width)
            parts.append(f"{_SGR[style]}{text}\x1b[0m" if style else text)
        self.out.write("\x1b[H" + "\x1b[K\r\n".join(parts) + "\x1b[K\x1b[J")
        self.out.flush()


# ---------------------------------------------------------------------------
# the command


def run_once(socket: str | None, interval: float) -> TopModel:
    """Watch for ``interval`` seconds (rates and ETAs need some events), then read
    status once. SupervisorUnavailable if the supervisor cannot be reached."""
    model = TopModel()
    client = Client(socket, timeout=REQUEST_TIMEOUT)
    try:
        client.status()  # fail early, with the usual message and exit code
        watcher = Watcher(socket, model)
        if interval > 0:
            watcher.start()
            watcher.subscribed.wait(REQUEST_TIMEOUT)
            time.sleep(interval)  # the frame covers one interval of events
            watcher.stop()
        refresh(client, model)
        if model.error:
            raise SupervisorUnavailable(model.error)
        return model
    finally:
        client.close()


def run_live(socket: str | None, interval: float, infd: int | None = None,
             out: IO[str] | None = None) -> int:
    """The interactive view until q or Ctrl-C; returns the exit code."""
    infd = sys.stdin.fileno() if infd is None else infd
    out = sys.stdout if out is None else out
    model = TopModel()
    client = Client(socket, timeout=REQUEST_TIMEOUT)
    client.status()  # unreachable: fail before taking over the terminal
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    pending = threading.Event()

    def changed() -> None:
        if not pending.is_set():
            pending.set()
            try:
                os.write(wake_w, b"e")
            except OSError:
                pass

    model.on_change = changed
    watcher = Watcher(socket, model)
    watcher.start()
    watcher.subscribed.wait(REQUEST_TIMEOUT)
    label = client.socket_path
    try:
        with Screen(infd, out, wake_w) as screen:
            next_refresh = 0.0
            last_draw = 0.0
            dirty = True
            while True:
                now = time.monotonic()
                if now >= next_refresh:
                    refresh(client, model)
                    next_refresh = time.monotonic() + interval
                    dirty = True
                if dirty and now - last_draw >= MIN_REDRAW:
                    width, height = screen.size()
                    screen.draw(render(model, width, height, socket=label), width)
                    last_draw, dirty = time.monotonic(), False
                timeout = next_refresh - time.monotonic()
                if dirty:
                    timeout = min(timeout, last_draw + MIN_REDRAW - time.monotonic())
                try:
                    ready, _, _ = select.select([infd, wake_r], [], [], max(0.0, timeout))
                except InterruptedError:
                    ready = []
                if infd in ready:
                    keys = os.read(infd, 64)
                    if not keys or any(k in keys for k in (b"q", b"Q", b"\x03", b"\x04")):
                        return 0
                    if b" " in keys:
                        next_refresh = 0.0
                    dirty = True
                if wake_r in ready:
                    try:
                        woke = os.read(wake_r, 4096)
                    except BlockingIOError:
                        woke = b""
                    pending.clear()
                    dirty = True
                    if b"r" in woke:
                        last_draw = 0.0  # a new size: redraw now
    except KeyboardInterrupt:
        return 0
    finally:
        model.on_change = None
        watcher.stop()
        client.close()
        os.close(wake_r)
        os.close(wake_w)
