"""PID 1 duty: reap every zombie, not only our workers.

In a container hostqueue may be PID 1, and orphans of the jobs' programs are
then reparented to it. uvloop keeps SIGCHLD for itself (it refuses a handler),
so when we are PID 1 SIGCHLD is blocked before any thread starts and one thread
waits for it with sigwait(); it only tells the loop, and the loop reaps the
zombies that are not workers (workers are reaped through their pidfds, which
name their exit cause). Outside PID 1 orphans are not ours, and nothing here runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Callable

log = logging.getLogger("hostqueue.reaper")


def block_sigchld() -> None:
    """Call before any thread starts, so every thread inherits the blocked mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})


def unblock_sigchld() -> None:
    """A worker starts with its parent's mask: give it back an ordinary SIGCHLD."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def zombie_children() -> list[int]:
    """Our children that have exited and wait to be reaped, from /proc."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == me:
            out.append(int(name))
    return out


class ZombieReaper:
    def __init__(self, loop: asyncio.AbstractEventLoop, is_worker: Callable[[int], bool]) -> None:
        self.loop = loop
        self.is_worker = is_worker
        self.reaped = 0
        self._thread = threading.Thread(target=self._wait_for_signals, name="sigchld", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _wait_for_signals(self) -> None:
        while True:
            signal.sigwait({signal.SIGCHLD})
            try:
                self.loop.call_soon_threadsafe(self.reap)
            except RuntimeError:  # the loop is closed: we are exiting
                return

    def reap(self) -> None:
        for pid in zombie_children():
            if self.is_worker(pid):
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
                self.reaped += 1
            except ChildProcessError:
                pass
        if self.reaped:
            log.debug("reaped %d orphaned processes so far", self.reaped)
