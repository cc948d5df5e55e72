"""One supervisor per SQLite store: an exclusive flock on ``<store>.lock`` holding its PID."""

from __future__ import annotations

import errno
import fcntl
import os
import stat


class StoreLocked(Exception):
    """Another supervisor holds this store (or its lock file cannot be used)."""


class StoreLock:
    """One supervisor per store: an exclusive flock on ``<store>.lock`` holding its PID."""

    def __init__(self, store_path: str) -> None:
        self.store_path = store_path
        self.path = store_path + ".lock"
        self.fd = -1

    def acquire(self) -> None:
        try:
            # O_NOFOLLOW: a symlink planted in a shared directory must not make us
            # truncate its target (a root-owned file, say).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreLocked(
                    f"the lock file {self.path} is a symbolic link; refusing to write through"
                    " it (someone may have planted it): remove it, and check who can write to"
                    " the store's directory"
                ) from None
            raise StoreLocked(
                f"cannot open the lock file {self.path} next to the store: {exc.strerror};"
                " the store's directory must exist and be writable by this user"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreLocked(
                f"the lock file {self.path} is not a regular file; remove it, and check who can"
                " write to the store's directory"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"store {os.path.abspath(self.store_path)} is in use by the supervisor with PID"
                f" {holder}; stop it first (kill -TERM {holder}) or use another --store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
