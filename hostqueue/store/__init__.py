"""The store: every SQL statement of hostqueue lives in this package.

``base.py`` is the interface the supervisor talks to (intentions, not SQL),
``batch.py`` the write batch it fills, ``sqlite.py`` the SQLite engine.
"""

from __future__ import annotations

from hostqueue.store.base import (  # noqa: F401
    JOB_COLUMNS, DispatchRow, Interrupted, PendingSet, Store, StoreBusy, StoreCorrupt, StoreError,
)
from hostqueue.store.batch import WriteBatch  # noqa: F401
from hostqueue.store.lock import StoreLock, StoreLocked  # noqa: F401
from hostqueue.store.sqlite import SQLiteStore  # noqa: F401


def open_store(location: str, durability: str = "normal", group: str | None = None,
               check: bool = True) -> Store:
    """The store engine for a --store value (a SQLite file path); group: the group
    that may read and write its files (the socket's); check: check its integrity
    at open."""
    return SQLiteStore(location, durability, group, check)
