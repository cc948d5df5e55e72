"""The store: every SQL statement of hostqueue lives in this package.

``base.py`` is the interface the supervisor talks to (intentions, not SQL),
``batch.py`` the write batch it fills, ``sqlite.py`` the SQLite engine,
``postgres.py`` the PostgreSQL engine (asyncpg, imported when used).
"""

from __future__ import annotations

from hostqueue.store.base import (  # noqa: F401
    JOB_COLUMNS, DispatchRow, Interrupted, PendingSet, Store, StoreBusy, StoreCorrupt, StoreError,
    StoreFenced,
)
from hostqueue.store.batch import WriteBatch  # noqa: F401
from hostqueue.store.lock import StoreLock, StoreLocked  # noqa: F401
from hostqueue.store.sqlite import SQLiteStore  # noqa: F401


def is_postgres(location: str) -> bool:
    """A --store value that names a PostgreSQL database (else: a SQLite file path)."""
    return location.startswith(("postgresql://", "postgres://"))


def display_name(location: str) -> str:
    """How logs, the process title and `status` name the store: a SQLite file's
    absolute path; a PostgreSQL URL without its password."""
    if is_postgres(location):
        from hostqueue.store.postgres import safe_dsn

        return safe_dsn(location)
    import os

    return os.path.abspath(location)


def open_store(location: str, durability: str = "normal", group: str | None = None,
               check: bool = True, pg_schema: str = "hostqueue") -> Store:
    """The store engine for a --store value: a PostgreSQL URL (postgresql://...,
    tables in pg_schema) or a SQLite file path; group: the group that may read and
    write its files (the socket's); check: check its integrity at open."""
    if is_postgres(location):
        from hostqueue.store.postgres import PostgresStore

        return PostgresStore(location, pg_schema)
    return SQLiteStore(location, durability, group, check)


class NoFileLock:
    """A PostgreSQL store has no lock file: several hosts share it, each under a lease
    (supervisor/cluster.py)."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def store_lock(location: str) -> "StoreLock | NoFileLock":
    """One supervisor per SQLite store: its lock file (none for PostgreSQL)."""
    return NoFileLock() if is_postgres(location) else StoreLock(location)
