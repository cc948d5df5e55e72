"""A worker process: runs jobs the supervisor sends over its pipe, one at a time.

Started by the supervisor as ``python -m hostqueue.worker ...`` (a clean exec,
never a fork of the running supervisor), in its own process group, with the
pipe and the progress board passed as inherited descriptors. It never touches
the store.

Two channels from the supervisor: the job channel (jobs, then stop, in order)
is read by the main thread itself whenever it has nothing left to run, so a
job sent to an idle worker starts without a hand-off between threads; the
control channel (aborts, dropping queued jobs) is read by a thread of its own,
so that an abort reaches a running job. When either closes (the supervisor
died) the worker kills its whole process group: it finishes nothing more, and
programs its job started die with it. The kernel's parent-death signal covers
the case where neither can run.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import heapq
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable

import orjson

from hostqueue.core import registry

from hostqueue.core import wire
from hostqueue.core.board import SlotWriter
from hostqueue.core.context import JobContext
from hostqueue.core.exceptions import Aborted, Permanent, Retry, TimeLimit

log = logging.getLogger("hostqueue.worker")

PR_SET_PDEATHSIG = 1
# A worker that cannot import its task modules exits with this code, so the
# supervisor stops respawning instead of looping (gunicorn's WORKER_BOOT_ERROR).
EXIT_BOOT_ERROR = 3
# Outcomes of fast jobs are sent together, but never held longer than this.
OUTBOX_MAX_AGE = 0.001
OUTBOX_MAX = 8
RSS_EVERY = 0.1


def set_parent_death_signal() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe EOF still stops us
        pass


def set_title(text: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(text)
    except ImportError:  # pragma: no cover - a dependency, but titles are cosmetic
        pass


# After a job this long, the control channel's reader gets a moment before the next.
LONG_JOB = 0.02


class PeakMemory:
    """Peak RSS of this process since the last reset (Linux VmHWM, reset via clear_refs)."""

    def __init__(self) -> None:
        try:
            self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self._status = self._clear = -1
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._statm = -1
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.reset()

    def reset(self) -> None:
        if self._clear >= 0:
            try:
                os.write(self._clear, b"5")
            except OSError:
                self._clear = -1

    def current(self) -> int | None:
        if self._statm < 0:
            return None
        return int(os.pread(self._statm, 128, 0).split()[1]) * self._page

    def read(self) -> int | None:
        if self._status < 0:
            return None
        data = os.pread(self._status, 8192, 0)
        start = data.find(b"VmHWM:")
        if start < 0:
            return None
        return int(data[start + 6 : data.index(b"kB", start)]) * 1024


# Attempts shorter than this report CPU time but not peak memory: reading it
# costs more than a no-op job.
PEAK_MIN_DURATION = 0.001


class StdStreams:
    """Keeps stdout and stderr what they were at start, whatever a job does to fds 1
    and 2 (closes them, or lets a file it opens take their number)."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[int, tuple[int, int]]] = {}
        for fd in (1, 2):
            try:
                st = os.fstat(fd)
                self.saved[fd] = (os.dup(fd), (st.st_dev, st.st_ino))
            except OSError:
                pass

    def restore(self) -> None:
        for fd, (copy, ident) in self.saved.items():
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == ident:
                    continue
            except OSError:
                pass  # closed by the job
            os.dup2(copy, fd)
            stream = sys.stdout if fd == 1 else sys.stderr
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def error_dict(exc: BaseException, with_traceback: bool = True) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)) if with_traceback else None,
    }


def run_attempt(
    call: Callable[[], Any], task_name: str, timeout: float | None = None
) -> tuple[dict[str, Any], BaseException | None]:
    """Run one attempt's task call and say how it ended, by the rules every runner shares
    (the worker, and immediate mode): outcome fields "s", and "r", "e", "d" as they apply,
    with the exception that ended it (None when it returned)."""
    out: dict[str, Any] = {}
    try:
        result = call()
        try:
            out["r"] = orjson.dumps(result).decode()
        except TypeError as exc:
            raise Permanent(
                f"task {task_name} returned a result that is not JSON-serializable: {exc}"
            ) from None
        out["s"] = "ok"
        return out, None
    except Retry as exc:
        out.update(s="retry", d=exc.delay, e=error_dict(exc, with_traceback=False))
        return out, exc
    except Permanent as exc:
        out.update(s="permanent", e=error_dict(exc))
        return out, exc
    except Aborted as exc:
        out.update(s="aborted", e=error_dict(exc, with_traceback=False))
        return out, exc
    except TimeLimit as exc:
        limit = f" after {float(timeout):g} s" if timeout else ""
        out.update(s="timeout", e={"type": "TimeLimit", "message": f"time limit exceeded{limit}",
                                   "traceback": traceback.format_exc()})
        return out, exc
    except TypeError as exc:
        # Wrong arguments for the function's signature will never succeed on retry.
        tb = exc.__traceback__
        frames = 0
        while tb is not None:
            frames += 1
            tb = tb.tb_next
        # raised by the call itself (call() -> func(**args)): two frames deep at most
        permanent = frames <= 2 and "argument" in str(exc)
        out.update(s="permanent" if permanent else "error", e=error_dict(exc))
        return out, exc
    except BaseException as exc:  # noqa: BLE001 - a job's failure must not end its runner
        out.update(s="error", e=error_dict(exc))
        return out, exc


def _order(job: dict[str, Any]) -> tuple[Any, ...]:
    """The supervisor's order key of a job (smaller runs first)."""
    return (tuple(job.get("o") or ()), job["id"])


def _supervisor_gone() -> None:
    """A channel closed: the supervisor is gone. Stop now, with everything we started."""
    os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(1)


class Worker:
    def __init__(self, sock: socket.socket, control: socket.socket,
                 slot: SlotWriter | None, number: int) -> None:
        self.sock = sock
        self.control = control
        self.slot = slot
        self.number = number
        # Jobs held, not started: a heap by the supervisor's order key (priority, then
        # queue order or weights, then submit order), so a job sent later that should
        # go first never waits behind those sent before it.
        self.jobs: list[tuple[tuple[float, ...], int, dict[str, Any]]] = []
        # The job channel, read by the main thread: frames decoded, not yet handled.
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.decoder = wire.FrameDecoder(self.inbox.append)
        # recv() of a large size maps and unmaps a fresh block on every read: read
        # into this one instead.
        self.chunk = memoryview(bytearray(1 << 20))
        # Written to wake the main thread while it waits for jobs (TERM, a drop).
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Held while reading the job channel (its frame decoder is not shared).
        self.read_lock = threading.Lock()
        self.terminated = False  # TERM: the running job ends, the queued ones go back
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)
        self.aborts: set[int] = set()
        self.current_abort = threading.Event()
        self.current_id = 0
        self.stopping = False
        self.start_one = False  # stopping, but the next job sent to this idle worker starts
        self.lock = threading.Lock()  # jobs, aborts, stopping: shared with the control reader
        self.send_lock = threading.Lock()
        self.outbox: list[dict[str, Any]] = []
        self.out_lock = threading.Lock()
        self.outbox_waiting = threading.Event()
        self.peak = PeakMemory()
        self.rss_read_at = -RSS_EVERY
        self.std = StdStreams()

    # -- pipe ---------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        data = wire.encode(message)
        with self.send_lock:
            try:
                self.sock.sendall(data)
            except OSError:  # the supervisor is gone (a broken pipe): stop, quietly
                _supervisor_gone()

    def flush_outbox(self) -> None:
        with self.out_lock:
            if self.outbox:
                batch, self.outbox = self.outbox, []
                # Current RSS rides along, so the supervisor can recycle a bloated
                # worker: after any job long enough to have grown, else at most every
                # RSS_EVERY seconds (a read of /proc costs more than a no-op job).
                message: dict[str, Any] = {"t": "done", "o": batch}
                now = time.monotonic()
                if now - self.rss_read_at >= RSS_EVERY or any("rss" in o for o in batch):
                    self.rss_read_at = now
                    message["mem"] = self.peak.current()
                self.send(message)

    def add_outcome(self, outcome: dict[str, Any]) -> None:
        """Outcomes of fast jobs share a message; none waits longer than OUTBOX_MAX_AGE,
        even when the next job is slow: the flusher thread sends it."""
        with self.out_lock:
            self.outbox.append(outcome)
            first = len(self.outbox) == 1
            full = len(self.outbox) >= OUTBOX_MAX
        if full or not self.jobs:
            self.flush_outbox()
        elif first:
            self.outbox_waiting.set()

    def flush_loop(self) -> None:
        while True:
            self.outbox_waiting.wait()
            self.outbox_waiting.clear()
            time.sleep(OUTBOX_MAX_AGE)
            self.flush_outbox()

    def wake(self) -> None:
        """Wake the main thread if it waits for jobs (safe in a signal handler)."""
        try:
            os.write(self.wake_w, b"w")
        except OSError:  # full: a wake-up is pending already
            pass

    def control_loop(self) -> None:
        """The control channel's reader thread: aborts and drops, at any time."""
        decoder = wire.FrameDecoder(self._on_control)
        while True:
            try:
                data = self.control.recv(65536)
            except OSError:
                data = b""
            if not data:
                _supervisor_gone()
            decoder.feed(data)

    def _on_control(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "abort":
            self.abort(message["id"])
        elif kind == "drop":
            self.drop_queued()
        elif kind == "give_back":
            self.give_back(message.get("ids"))

    def abort(self, job_id: int) -> None:
        """The running job sees its abort flag; a job not started yet ends at once
        (aborted), so that it does not wait behind a long one, whose worker the
        supervisor would replace when the abort is not honoured in time."""
        self._take_in_unread()
        with self.lock:
            if job_id == self.current_id:
                self.current_abort.set()
                return
            queued = self._remove_queued({job_id})
            if not queued:
                self.aborts.add(job_id)  # still on its way: it ends as it starts
                return
        # No "st"/"ft": it never ran, and must not teach the task's run time.
        self.add_outcome({"id": job_id, "s": "aborted",
                          "e": error_dict(Aborted(f"job {job_id} was aborted before it started"),
                                          with_traceback=False)})

    def _remove_queued(self, ids: set[int] | None) -> list[dict[str, Any]]:
        """Take these jobs (None: all) out of the queue; the caller holds the lock."""
        if ids is None:
            out = [job for _, _, job in self.jobs]
            self.jobs.clear()
            return out
        out = [job for _, _, job in self.jobs if job["id"] in ids]
        if out:
            self.jobs = [entry for entry in self.jobs if entry[2]["id"] not in ids]
            heapq.heapify(self.jobs)
        return out

    def _queue(self, jobs: list[dict[str, Any]]) -> None:
        for job in jobs:
            key = _order(job)
            heapq.heappush(self.jobs, (key[0], key[1], job))

    def drop_queued(self) -> None:
        """Stop after the running job; jobs not started yet go back to the supervisor,
        to run elsewhere: those queued here, and those still unread in the job
        channel (read here unless the main thread is reading it: then it is idle,
        and returns them itself on its way out). A worker that runs nothing at that
        moment starts the first job it was sent: handed to an idle worker, that job
        was starting (a drain right after a submit lets it run)."""
        with self.lock:
            self.stopping = True
            queued = self._remove_queued(None)
            if self.current_id == 0 and not self.terminated:
                if queued:
                    first = min(queued, key=_order)
                    queued.remove(first)
                    self._queue([first])
                else:
                    self.start_one = True  # the next job read from the channel
        self._return(queued)
        self._take_in_unread()
        self.wake()

    def give_back(self, ids: list[int] | None) -> None:
        """Return jobs not started yet (these ids, or all) and keep working: the
        supervisor hands them to a worker that is free (fairness), or expires them
        (a deadline)."""
        self._take_in_unread()
        with self.lock:
            queued = self._remove_queued(set(ids) if ids is not None else None)
        self._return(queued)

    def _take_in_unread(self) -> bool:
        """Read what waits in the job channel, unless the main thread is reading it
        (then it is idle and sees it at once), and handle it; whether there was any."""
        read = False
        if self.read_lock.acquire(blocking=False):
            try:
                read = self._take_in(block=False)
            finally:
                self.read_lock.release()
        while True:
            try:
                message = self.inbox.popleft()
            except IndexError:
                break
            self._on_job_message(message)
        return read

    def _read_jobs(self, block: bool) -> None:
        """Take in what the job channel has; with block, wait for it (or a wake-up)."""
        with self.read_lock:
            self._take_in(block)

    def _take_in(self, block: bool) -> bool:
        """Whether the job channel had anything (a wake-up is not counted)."""
        read = False
        for fd, _ in self.poller.poll(None if block else 0):
            if fd == self.wake_r:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                try:
                    size = self.sock.recv_into(self.chunk)
                except OSError:
                    size = 0
                if not size:
                    _supervisor_gone()
                self.decoder.feed(self.chunk[:size])
                read = True
        return read

    def _on_job_message(self, message: dict[str, Any]) -> None:
        kind = message.get("t")
        with self.lock:
            if kind == "run" and self.stopping:
                jobs = message["jobs"]
                if self.start_one and jobs and not self.terminated:
                    self.start_one = False
                    first = min(jobs, key=_order)
                    self._queue([first])
                    jobs = [j for j in jobs if j is not first]
                self._return(jobs)
            elif kind == "run":
                self._queue(message["jobs"])
            elif kind == "stop":
                self.stopping = True

    def _return(self, jobs: list[dict[str, Any]]) -> None:
        """Jobs that will not start here (we stop): back to the supervisor."""
        if jobs:
            self.send({"t": "done", "o": [{"id": j["id"], "s": "returned"} for j in jobs]})

    # -- jobs ---------------------------------------------------------------

    def next_job(self) -> dict[str, Any] | None:
        while True:
            if self.terminated and (self.jobs or not self.stopping):
                self.drop_queued()
            with self.lock:
                if self.jobs:
                    return heapq.heappop(self.jobs)[2]
                if self.stopping:
                    return None
            if not self.inbox:
                self._read_jobs(block=True)
            while self.inbox:
                self._on_job_message(self.inbox.popleft())

    def return_unread(self) -> None:
        """On the way out (stopping): jobs still in the job channel go back, not started."""
        while self._take_in_unread():
            pass

    def run_forever(self) -> None:
        set_title(f"hostqueue worker {self.number} [idle]")
        while True:
            job = self.next_job()
            if job is None:
                self.flush_outbox()
                self.return_unread()
                return
            began = time.monotonic()
            self.add_outcome(self.run_job(job))
            if not self.jobs:
                set_title(f"hostqueue worker {self.number} [idle]")
            elif time.monotonic() - began > LONG_JOB:
                # A long job may have held the interpreter (C code) while control messages
                # came: their reader thread waits for it. Let it run before the next job
                # starts, so that a job aborted meanwhile does not start (0.5 ms, after a
                # job of 20 ms or more: nothing a fast job pays).
                time.sleep(0.0005)

    def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id: int = job["id"]
        task_name: str = job["task"]
        started = time.time()
        deadline = job.get("dl")
        with self.lock:
            if job_id in self.aborts or job.get("abort"):
                self.aborts.discard(job_id)
                # Aborted while it waited in this worker: it never starts.
                return {"id": job_id, "s": "aborted",
                        "e": error_dict(Aborted(f"job {job_id} was aborted before it started"),
                                        with_traceback=False)}
            if deadline is not None and started >= deadline:
                return {"id": job_id, "s": "expired"}  # a deadline bounds every start
            self.current_id = job_id
            self.current_abort.clear()
        set_title(f"hostqueue worker {self.number} [job {job_id} {task_name}]")
        if self.slot is not None:
            self.slot.begin(job_id)
        if job.get("rs"):
            # A job not known to be fast: its start is told now (it is `running` from
            # here). A fast job's start rides with its outcome.
            with self.out_lock:
                self.outbox.append({"id": job_id, "s": "started", "st": started})
            self.flush_outbox()
        cpu_started = time.process_time()
        outcome: dict[str, Any] = {"id": job_id, "st": started}
        ctx: JobContext | None = None
        timeout = job.get("timeout")
        def attempt() -> Any:
            nonlocal ctx
            spec = registry.get(task_name)
            if spec is None:
                raise Permanent(f"task {task_name!r} is not registered in this worker")
            args = orjson.loads(job["args"]) if isinstance(job["args"], str) else job["args"]
            ctx = JobContext(
                job_id, task_name, job.get("attempt", 1), job.get("max_attempts", 1),
                args, self.slot, self.current_abort,
            )
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, float(timeout))
            try:
                return spec.func(ctx, **args)
            finally:
                if timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)

        try:
            fields, _ = run_attempt(attempt, task_name, timeout)
            outcome.update(fields)
        finally:
            with self.lock:
                self.current_id = 0
            self.std.restore()
        finished = outcome["ft"] = time.time()
        outcome["cpu"] = time.process_time() - cpu_started
        if finished - started >= PEAK_MIN_DURATION:
            outcome["rss"] = self.peak.read()
            self.peak.reset()
        if ctx is not None:
            outcome["p"], outcome["pm"] = ctx.last_progress
        if self.slot is not None:
            self.slot.end()
        return outcome


def _raise_time_limit(signum: int, frame: Any) -> None:
    raise TimeLimit("time limit exceeded")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostqueue-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--board-fd", type=int, default=-1)
    parser.add_argument("--slot", type=int, default=-1)
    parser.add_argument("--number", type=int, default=0)
    parser.add_argument("--parent", type=int, default=0)
    parser.add_argument("--tasks", action="append", default=[])
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    opts = parser.parse_args(argv)

    set_parent_death_signal()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})  # blocked in a PID-1 supervisor
    if opts.parent and os.getppid() != opts.parent:
        return 1  # the supervisor died before we could ask to die with it
    # TERM: finish the running job, give back the others, exit. INT: a terminal's
    # Ctrl-C reaches the whole group; the supervisor decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _raise_time_limit)
    from hostqueue.core.logs import setup_logging

    setup_logging(opts.log_level, opts.log_format, prefix=f"worker {opts.number} [{os.getpid()}] ")
    sock = socket.socket(fileno=opts.fd)
    sock.setblocking(True)
    control = socket.socket(fileno=opts.control_fd)
    control.setblocking(True)
    slot = SlotWriter(opts.board_fd, opts.slot) if opts.board_fd >= 0 else None
    set_title(f"hostqueue worker {opts.number} [starting]")
    try:
        registry.load_task_modules(opts.tasks)
    except registry.TaskModuleError as exc:
        log.error("%s", exc)
        return EXIT_BOOT_ERROR
    worker = Worker(sock, control, slot, opts.number)

    def on_term(signum: int, frame: Any) -> None:
        # Only flags here: the main thread returns what it has not started, after
        # the running job. Whichever thread the kernel picked, the wake-up fd
        # wakes a main thread that waits for jobs; the write here covers a task
        # that changed the wake-up fd (an event loop of its own).
        worker.terminated = True
        worker.wake()

    signal.signal(signal.SIGTERM, on_term)
    signal.set_wakeup_fd(worker.wake_w, warn_on_full_buffer=False)
    threading.Thread(target=worker.control_loop, name="control-reader", daemon=True).start()
    threading.Thread(target=worker.flush_loop, name="outbox-flusher", daemon=True).start()
    worker.send({"t": "ready", "pid": os.getpid()})
    worker.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
