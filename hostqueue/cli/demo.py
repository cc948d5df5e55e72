"""``hostqueue demo``: a supervisor on a temporary store, jobs with live progress, a pool
resized midway, then a drain and a clean exit. Everything it does goes through the
public surface (the ``hostqueue run`` command and the socket), so it doubles as a
smoke test of a build.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import IO, Any

import hostqueue
from hostqueue.cli.commands import format_bar, format_stats
from hostqueue.client.sync import Client, EventStream
from hostqueue.core.errors import HostqueueError, SupervisorUnavailable

TASK = "hostqueue.demo_tasks.thumbnail"
READY_TIMEOUT = 30.0  # seconds for the supervisor to answer ping
STALL_TIMEOUT = 60.0  # seconds without a finished job before the demo gives up
EXIT_TIMEOUT = 60.0  # seconds for the supervisor to exit after `stop`
SUBMIT_BATCH = 1000  # jobs per submit_many: keeps each request line well under 1 MiB
RUNNING_LINES = 8  # running jobs shown under the overall bar


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


class DemoError(Exception):
    """The demo could not go on; the message says why."""


class Board:
    """The live display: an overall bar and the running jobs' bars, redrawn in place
    with ANSI on a terminal, or a plain line every second otherwise."""

    def __init__(self, total: int, out: IO[str], tty: bool) -> None:
        self.total = total
        self.out = out
        self.tty = tty
        self.completed = 0
        self.failed = 0  # failed, cancelled or expired
        self.retries = 0
        self.workers = 0
        self.running: dict[int, dict[str, Any]] = {}
        self.started = time.monotonic()
        self._drawn = 0  # lines of the block currently on screen
        self._last_render = 0.0

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    def apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        job_id = event.get("job_id")
        if not isinstance(job_id, int):
            return
        job = event.get("job")
        if kind == "started" and isinstance(job, Mapping):
            args = job.get("args") or {}
            self.running[job_id] = {"image": args.get("image", ""), "progress": 0.0,
                                    "message": "started", "pid": job.get("worker_pid")}
        elif kind == "progress":
            entry = self.running.setdefault(job_id, {"image": "", "pid": None})
            entry["progress"] = event.get("progress") or 0.0
            entry["message"] = event.get("message") or ""
            entry["active"] = True
        elif kind == "retrying":
            self.running.pop(job_id, None)
            self.retries += 1
        elif kind == "completed":
            self.running.pop(job_id, None)
            self.completed += 1
        elif kind in ("failed", "cancelled", "expired"):
            self.running.pop(job_id, None)
            self.failed += 1

    def reconcile(self, stats: Mapping[str, Any]) -> None:
        """Take the store's counts if they are ahead of the events seen."""
        completed = int(stats.get("completed", 0))
        failed = sum(int(stats.get(k, 0)) for k in ("failed", "cancelled", "expired"))
        if completed + failed > self.finished:
            self.completed, self.failed = completed, failed
            if self.finished >= self.total:
                self.running.clear()

    def _lines(self, width: int) -> list[str]:
        elapsed = time.monotonic() - self.started
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        fraction = self.finished / self.total
        head = (f"jobs {format_bar(fraction, 30)} {self.finished:>{len(str(self.total))}}/"
                f"{self.total} {fraction * 100:3.0f}%  failed {self.failed}  "
                f"retried {self.retries}  {rate:6.1f} jobs/s  {_workers(self.workers)}")
        lines = [head]
        # A worker claims several jobs ahead (prefetch); those that have reported
        # progress are the ones actually executing.
        active = sorted(j for j, r in self.running.items() if r.get("active"))
        for job_id in active[:RUNNING_LINES]:
            r = self.running[job_id]
            lines.append(f"  job {job_id:<6} {r.get('image', ''):<16} "
                         f"{format_bar(r.get('progress'), 10)} {r.get('progress', 0) * 100:3.0f}% "
                         f"{r.get('message', '')}")
        more = len(active) - RUNNING_LINES
        waiting = len(self.running) - len(active)
        notes = [f"{more} more running"] if more > 0 else []
        if waiting > 0:
            notes.append(f"{waiting} claimed by workers, waiting their turn")
        if notes:
            lines.append("  ... " + ", ".join(notes))
        return [line[: width - 1] for line in lines]  # a wrapped line would break the redraw

    def render(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_render < 0.08:
                return
            self._last_render = now
            width = shutil.get_terminal_size((100, 24)).columns
            lines = self._lines(width)
            self._erase()
            self.out.write("".join(line + "\n" for line in lines))
            self._drawn = len(lines)
        else:
            if not force and now - self._last_render < 1.0:
                return
            self._last_render = now
            elapsed = now - self.started
            active = sum(1 for r in self.running.values() if r.get("active"))
            self.out.write(f"[{elapsed:6.1f}s] {self.finished}/{self.total} finished "
                           f"({self.failed} failed, {self.retries} retried), "
                           f"{active} running, {_workers(self.workers)}\n")
        self.out.flush()

    def _erase(self) -> None:
        if self._drawn:
            # Up to the block's first line, then clear everything below it.
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def log(self, message: str) -> None:
        """Print a line above the live block."""
        if self.tty:
            self._erase()
        self.out.write(message + "\n")
        self.out.flush()
        if self.tty:
            self.render(force=True)


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(hostqueue.__file__ or "")))


def _start_supervisor(directory: str, workers: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    # The demo passes every setting it needs as a flag; settings meant for the user's
    # own supervisor ($HOSTQUEUE_PREFETCH, ...) stay out of it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTQUEUE_")}
    # The child must import this same hostqueue, also when it runs from a checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "hostqueue", "run",
           "--store", os.path.join(directory, "demo.db"),
           "--socket", os.path.join(directory, "demo.sock"),
           "--workers", str(workers), "--tasks", "hostqueue.demo_tasks"]
    # A session of its own: a Ctrl-C in the terminal reaches the demo, which then
    # stops the supervisor itself, not both at once.
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _wait_ready(proc: subprocess.Popen[bytes], socket_path: str) -> dict[str, Any]:
    """Connect until ping answers: the supervisor answers only once it is ready."""
    deadline = time.monotonic() + READY_TIMEOUT
    pause = 0.01
    while True:
        if proc.poll() is not None:
            raise DemoError(f"the supervisor exited with code {proc.returncode} before it answered")
        try:
            with Client(socket_path, timeout=5.0) as client:
                return client.ping()
        except SupervisorUnavailable:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"the supervisor did not answer on {socket_path} "
                            f"within {READY_TIMEOUT:.0f} s")
        time.sleep(pause)  # a back-off between attempts; ping is what synchronises
        pause = min(pause * 2, 0.2)


def _show_workers(board: Board, client: Client, label: str) -> None:
    status = client.status()
    workers = status.get("workers") or []
    board.workers = len(workers)
    pids = ", ".join(f"{w.get('pid')} ({w.get('state')})" for w in workers) or "none"
    board.log(f"{label}: {_workers(len(workers))}: {pids}")


def _run_jobs(client: Client, stream: EventStream, jobs: int, workers: int, out: IO[str],
              run_id: str) -> Board:
    board = Board(jobs, out, out.isatty())
    rng = random.Random(7)
    args = [{"image": f"photo-{i:04d}.jpg", "steps": rng.randint(3, 6),
             "delay": round(rng.uniform(0.01, 0.02), 3)} for i in range(jobs)]
    _show_workers(board, client, "pool")
    for start in range(0, jobs, SUBMIT_BATCH):
        client.submit_many(TASK, args[start:start + SUBMIT_BATCH], run_id=run_id)
    board.log(f"submitted {jobs} jobs of {TASK} (run {run_id})")

    # Resize the pool a third of the way and back at two thirds, to show both.
    big = max(4, 2 * workers)
    plan = [(jobs // 3, big, "scaled up"), ((2 * jobs) // 3, workers, "scaled down")]
    last_finish = time.monotonic()
    while board.finished < jobs:
        event = stream.next_event(timeout=1.0)
        before = board.finished
        if event is None:
            # A quiet second: recount from the store, in case an event went missing.
            board.reconcile(client.stats(run_id))
        else:
            board.apply(event)
        now = time.monotonic()
        if board.finished > before:
            last_finish = now
        elif now - last_finish > STALL_TIMEOUT:
            raise DemoError(f"no job finished in {STALL_TIMEOUT:.0f} s")
        while plan and board.finished >= plan[0][0] and board.finished < jobs:
            _, target, label = plan.pop(0)
            change = client.scale(target)
            label += f" {change.get('previous')} -> {change.get('target')}"
            _show_workers(board, client, label)
        board.render()
    board.render(force=True)
    _show_workers(board, client, "pool at the end")
    return board


def _stop(client: Client, proc: subprocess.Popen[bytes], out: IO[str]) -> int:
    client.stop()
    out.write("stop (drain) sent; waiting for the supervisor to exit... ")
    out.flush()
    try:
        code = proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DemoError(f"the supervisor did not exit within {EXIT_TIMEOUT:.0f} s "
                        "of `stop`") from None
    out.write(f"exited with code {code}\n")
    return code


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop a supervisor the demo is abandoning: TERM (drain), then KILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read()[-20000:].decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_demo(jobs: int = 300, workers: int = 2, keep: bool = False,
             out: IO[str] | None = None) -> int:
    """Run the demo; returns the exit code (0 when everything went as it should)."""
    out = out or sys.stdout
    directory = tempfile.mkdtemp(prefix="hostqueue-demo-")
    store = os.path.join(directory, "demo.db")
    socket_path = os.path.join(directory, "demo.sock")
    log_path = os.path.join(directory, "supervisor.log")
    run_id = f"demo-{os.getpid()}"
    proc: subprocess.Popen[bytes] | None = None
    code = 1
    try:
        with open(log_path, "wb") as log:
            proc = _start_supervisor(directory, workers, log)
        pong = _wait_ready(proc, socket_path)
        out.write(f"supervisor {pong.get('pid')} (hostqueue {pong.get('version')}) is up\n"
                  f"  store  {store}\n  socket {socket_path}\n  log    {log_path}\n")
        started = time.monotonic()
        # Two connections: the watch stream gets one to itself, so the control calls
        # made while it flows never wait behind its events.
        with Client(socket_path) as client, Client(socket_path) as watcher:
            # Subscribed before submitting, so no event of the run is missed.
            with watcher.watch(run_id=run_id) as stream:
                board = _run_jobs(client, stream, jobs, workers, out, run_id)
            elapsed = time.monotonic() - started
            out.write(f"\n{board.finished} jobs in {elapsed:.1f} s "
                      f"({board.finished / elapsed:.0f} jobs/s): {board.completed} completed, "
                      f"{board.failed} did not, {board.retries} retries\n\n")
            out.write(format_stats(client.stats(run_id)) + "\n\n")
            exit_code = _stop(client, proc, out)
        code = 0 if exit_code == 0 and board.failed == 0 else 1
    except KeyboardInterrupt:
        out.write("\ninterrupted; stopping the supervisor\n")
        code = 130
    except (DemoError, HostqueueError) as exc:
        out.write(f"\ndemo failed: {exc}\n")
        tail = _tail(log_path)
        if tail:
            out.write(f"last lines of {log_path}:\n{tail}\n")
    finally:
        if proc is not None:
            _kill(proc)
        if code not in (0, 130):
            out.write(f"kept {directory} to look into\n")  # the evidence stays
        elif keep:
            out.write(f"store kept: {store} (log: {log_path})\n  look inside: "
                      f"hostqueue run --store {store} --tasks hostqueue.demo_tasks &\n"
                      f"               hostqueue job --socket {socket_path} list\n")
        else:
            shutil.rmtree(directory, ignore_errors=True)
            out.write(f"store was {store}; deleted (--keep keeps it)\n")
        out.flush()
    return code
