"""The worker pool: starting, watching and stopping worker processes.

A worker is a clean ``python -m hostqueue.worker`` process (never a fork of the
supervisor, which has threads), in its own process group, with one end of two
socketpairs (its pipe: the job channel, which its main thread reads between
jobs, and the control channel for aborts and drops, which a thread of its own
reads) and the progress board's memfd as inherited descriptors. The
supervisor learns of a worker's death from a pidfd (the process sentinel)
watched by the loop, reaps it with waitpid, and names the cause from the exit
status. No SIGCHLD handler: uvloop keeps SIGCHLD for itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import psutil

from hostqueue.core import wire
from hostqueue.core.board import Board
from hostqueue.core.states import SupervisorState, WorkerState
from hostqueue.supervisor.background import spawn

log = logging.getLogger("hostqueue.pool")

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def describe_exit(status: int) -> str:
    """'worker exited with code N' or 'worker killed by signal SIGKILL' from a wait status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        text = f"worker killed by signal {name}"
        if signum == signal.SIGKILL:
            text += " (out of memory, a time limit, or killed by someone?)"
        return text
    if os.WIFEXITED(status):
        return f"worker exited with code {os.WEXITSTATUS(status)}"
    return f"worker ended with wait status {status}"


class _PipeProtocol(asyncio.Protocol):
    def __init__(self, worker: "WorkerHandle") -> None:
        self.worker = worker

    def data_received(self, data: bytes) -> None:
        try:
            self.worker.decoder.feed(data)
        except ValueError as exc:
            log.error("worker %d sent a bad frame (%s); stopping it", self.worker.pid, exc)
            self.worker.kill(signal.SIGKILL)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.pipe_open = False
        if self.worker.on_pipe_closed is not None:
            self.worker.on_pipe_closed()


@dataclass(eq=False)
class WorkerHandle:
    number: int
    pid: int
    slot: int
    popen: subprocess.Popen[bytes] = field(repr=False)
    decoder: wire.FrameDecoder = field(repr=False)
    state: WorkerState = WorkerState.STARTING
    started_at: float = field(default_factory=time.monotonic)
    transport: asyncio.Transport | None = field(default=None, repr=False)
    # The control channel (aborts, drops): read by a thread of the worker's own.
    control: asyncio.Transport | None = field(default=None, repr=False)
    pidfd: int = -1
    pipe_open: bool = True
    jobs_done: int = 0
    exit_status: int | None = None
    process: psutil.Process | None = field(default=None, repr=False)
    kill_deadline: asyncio.TimerHandle | None = field(default=None, repr=False)
    on_pipe_closed: Callable[[], None] | None = field(default=None, repr=False)
    # Why the supervisor killed it ("drain", "abort", "timeout"), to name the cause.
    killed_for: str | None = None
    kill_error: dict[str, Any] | None = None
    # The job its board slot named as running when it died (0: none).
    running_job: int = 0
    idle_since: float | None = None
    rss_now: int | None = None
    state_at_exit: WorkerState = WorkerState.STARTING

    @property
    def connected(self) -> bool:
        return self.transport is not None

    def send(self, message: dict[str, Any]) -> None:
        """On the job channel: jobs and stop, which the worker reads between jobs."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(wire.encode(message))

    def send_control(self, message: dict[str, Any]) -> None:
        """On the control channel: aborts and drops, which reach a running job."""
        if self.control is not None and not self.control.is_closing():
            self.control.write(wire.encode(message))

    def ask_to_stop(self, drop_queued: bool) -> None:
        """Finish what it holds (with drop_queued: only the running job, the others
        go back), then exit."""
        if drop_queued:
            self.send_control({"t": "drop"})
        self.send({"t": "stop"})

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group (its job's children too)."""
        if self.exit_status is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def resources(self) -> tuple[int | None, float | None]:
        """(RSS in bytes, CPU percent since the last call) from psutil."""
        try:
            if self.process is None:
                self.process = psutil.Process(self.pid)
                self.process.cpu_percent(None)
            with self.process.oneshot():
                return self.process.memory_info().rss, self.process.cpu_percent(None)
        except (psutil.Error, OSError):
            return None, None


class Spawner:
    """Starts worker processes and wires them to the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        board: Board,
        on_message: Callable[[WorkerHandle, dict[str, Any]], None],
        on_exit: Callable[[WorkerHandle], None],
        log_level: str = "info",
        log_format: str = "text",
    ) -> None:
        self.loop = loop
        self.board = board
        self.on_message = on_message
        self.on_exit = on_exit
        self.log_level = log_level
        self.log_format = log_format
        self._numbers = 0

    def spawn_worker(self, task_modules: tuple[str, ...]) -> WorkerHandle:
        self._numbers += 1
        number = self._numbers
        slot = self.board.allocate()
        env = dict(os.environ)
        env["PYTHONPATH"] = _PACKAGE_PARENT + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        socks: list[socket.socket] = []
        try:
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socks += (parent_sock, child_sock)
            control_sock, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socks += (control_sock, child_control)
            cmd = [
                # -P: the working directory is not put first on sys.path (a module
                # planted there must not shadow a real one); task modules in it still
                # load: the registry puts it last.
                sys.executable, "-P", "-m", "hostqueue.worker",
                "--fd", str(child_sock.fileno()),
                "--control-fd", str(child_control.fileno()),
                "--board-fd", str(self.board.fd),
                "--slot", str(slot),
                "--number", str(number),
                "--parent", str(os.getpid()),
                "--log-level", self.log_level,
                "--log-format", self.log_format,
            ]
            for module in task_modules:
                cmd += ["--tasks", module]
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                pass_fds=(child_sock.fileno(), child_control.fileno(), self.board.fd),
                process_group=0,
                env=env,
            )
        except BaseException:
            for sock in socks:
                sock.close()
            self.board.release(slot)
            raise
        child_sock.close()  # the worker has them now
        child_control.close()
        handle: WorkerHandle
        handle = WorkerHandle(
            number=number,
            pid=popen.pid,
            slot=slot,
            popen=popen,
            decoder=wire.FrameDecoder(lambda m: self.on_message(handle, m)),
        )
        parent_sock.setblocking(False)
        control_sock.setblocking(False)
        handle.pidfd = os.pidfd_open(popen.pid)
        self.loop.add_reader(handle.pidfd, self._reap, handle)
        spawn(self._connect(handle, parent_sock, control_sock), "connect a worker")
        return handle

    async def _connect(self, handle: WorkerHandle, sock: socket.socket,
                       control_sock: socket.socket) -> None:
        control: asyncio.BaseTransport | None = None
        try:
            control, _ = await self.loop.connect_accepted_socket(asyncio.Protocol, control_sock)
            transport, _ = await self.loop.connect_accepted_socket(
                lambda: _PipeProtocol(handle), sock
            )
        except OSError as exc:
            log.error("cannot watch the pipe of worker %d: %s", handle.pid, exc)
            if control is not None:
                control.close()
            else:
                control_sock.close()
            sock.close()
            handle.kill(signal.SIGKILL)
            return
        if handle.exit_status is not None:
            transport.close()
            control.close()
            return
        handle.control = control  # type: ignore[assignment]
        handle.transport = transport  # type: ignore[assignment]

    def _reap(self, handle: WorkerHandle) -> None:
        try:
            pid, status = os.waitpid(handle.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = handle.pid, 0
        if pid == 0:
            return  # readable, but not yet reapable: wait for the next wake-up
        self.loop.remove_reader(handle.pidfd)
        os.close(handle.pidfd)
        handle.pidfd = -1
        handle.exit_status = status
        handle.popen.returncode = os.waitstatus_to_exitcode(status)
        handle.state_at_exit = handle.state
        handle.state = WorkerState.EXITED
        # Programs the job started die with it: they share the worker's process group.
        try:
            os.killpg(handle.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if handle.kill_deadline is not None:
            handle.kill_deadline.cancel()
        # Outcomes the worker sent just before it died may still sit in the pipe:
        # let the transport read them (until EOF) before the exit is handled.
        if handle.pipe_open and handle.transport is not None:
            timer = self.loop.call_later(1.0, self._finish_exit, handle)

            def closed() -> None:
                timer.cancel()
                self._finish_exit(handle)

            handle.on_pipe_closed = closed
        else:
            self._finish_exit(handle)

    def _finish_exit(self, handle: WorkerHandle) -> None:
        if handle.slot < 0:
            return
        handle.on_pipe_closed = None
        if handle.transport is not None:
            handle.transport.close()
        if handle.control is not None:
            handle.control.close()
        # Which held job was running when it died: the others never started.
        reading = self.board.read(handle.slot)
        handle.running_job = reading.job_id if reading is not None else 0
        self.board.release(handle.slot)
        handle.slot = -1
        self.on_exit(handle)


class Pool:
    """The workers: their processes and states, and the target size the pool
    converges to. Only the pool adds or removes a worker; others ask it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, spawner: Spawner,
                 task_modules: Callable[[], tuple[str, ...]],
                 state: Callable[[], SupervisorState],
                 holds: Callable[[int], int]) -> None:
        self.loop = loop
        self.spawner = spawner
        self._task_modules = task_modules
        self._state = state
        self._holds = holds  # how many jobs a worker holds (the job book knows)
        self.workers: dict[int, WorkerHandle] = {}
        self.target = 0
        self.spawn_failures = 0
        self.spawn_blocked_until = 0.0
        self.error: str | None = None
        self._spawn_timer: asyncio.TimerHandle | None = None

    def get(self, pid: int) -> WorkerHandle | None:
        return self.workers.get(pid)

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(list(self.workers.values()))

    def __len__(self) -> int:
        return len(self.workers)

    def __contains__(self, pid: int) -> bool:
        return pid in self.workers

    def live(self) -> list[WorkerHandle]:
        """Workers that count toward the target (not retiring, not exited)."""
        return [w for w in self.workers.values()
                if w.state in (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)]

    def idle(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state is WorkerState.IDLE and w.connected]

    def any_idle(self) -> bool:
        for w in self.workers.values():
            if w.state is WorkerState.IDLE and w.connected:
                return True
        return False

    def busy(self) -> int:
        return sum(1 for w in self.workers.values() if self._holds(w.pid))

    def converge(self) -> None:
        """Start or retire workers until the live ones match the target."""
        if self._state() is not SupervisorState.RUNNING:
            return
        live = self.live()
        excess = len(live) - self.target
        if excess > 0:
            order = {WorkerState.IDLE: 0, WorkerState.STARTING: 1, WorkerState.BUSY: 2}
            live.sort(key=lambda w: (order[w.state], self._holds(w.pid)))
            for worker in live[:excess]:
                self.retire(worker)
        elif excess < 0:
            now = time.monotonic()
            if now < self.spawn_blocked_until:
                if self._spawn_timer is None:
                    self._spawn_timer = self.loop.call_later(
                        self.spawn_blocked_until - now, self._spawn_timer_fired
                    )
                return
            for _ in range(-excess):
                try:
                    worker = self.spawner.spawn_worker(self._task_modules())
                except OSError as exc:
                    log.error("cannot start a worker: %s", exc)
                    self.note_spawn_failure(str(exc))
                    break
                self.workers[worker.pid] = worker

    def _spawn_timer_fired(self) -> None:
        self._spawn_timer = None
        self.converge()

    def note_spawn_failure(self, reason: str) -> None:
        self.spawn_failures += 1
        delay = min(30.0, 0.25 * 2 ** (self.spawn_failures - 1))
        self.spawn_blocked_until = time.monotonic() + delay
        self.error = f"{reason}; next start in {delay:.1f} s"

    def reset_failures(self) -> None:
        self.spawn_failures = 0
        self.spawn_blocked_until = 0.0
        self.error = None

    def retire(self, worker: WorkerHandle, drop_queued: bool = True) -> None:
        """Let it finish its running job (the jobs it has not started come back), then exit."""
        if worker.state in (WorkerState.RETIRING, WorkerState.EXITED):
            return
        worker.state = WorkerState.RETIRING
        if worker.transport is None:
            # Not connected yet: nothing it holds; stop it with a polite signal.
            worker.kill(signal.SIGTERM)
        else:
            worker.ask_to_stop(drop_queued)

    def connected_ready(self, worker: WorkerHandle) -> bool:
        """Its "ready" message: True when it starts serving (starting -> idle)."""
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.IDLE
            self.reset_failures()
            return True
        if worker.state is WorkerState.RETIRING:
            worker.ask_to_stop(drop_queued=True)
        return False

    def exited(self, worker: WorkerHandle, clean: bool, boot_error: bool, cause: str) -> None:
        """Forget an exited worker; a worker that cannot start slows the next starts."""
        self.workers.pop(worker.pid, None)
        if boot_error:
            log.error("worker %d could not import the task modules; see its log above", worker.pid)
            self.note_spawn_failure("workers cannot import the task modules")
        elif not clean and worker.killed_for is None:
            log.warning("worker %d exited: %s", worker.pid, cause)
            if worker.state_at_exit is WorkerState.STARTING:
                self.note_spawn_failure(f"a worker died at start: {cause}")

    def stop_timers(self) -> None:
        if self._spawn_timer is not None:
            self._spawn_timer.cancel()
            self._spawn_timer = None
