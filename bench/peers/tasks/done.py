"""Completion records: every peer's no-op task appends the time it finished to one
file (HQBENCH_DONE), 18 bytes a job, so that the benchmark sees the last completion
of every peer the same way, without asking the peer (see bench/common.py)."""

import os
import time

_fd = -1
_pid = -1


def record() -> None:
    global _fd, _pid
    pid = os.getpid()
    if pid != _pid:  # first job of this process (RQ forks one per job)
        _fd = os.open(os.environ["HQBENCH_DONE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _pid = pid
    os.write(_fd, b"%017.6f\n" % time.time())
