"""The SQLite store: every SQL statement of hostqueue's SQLite engine, its
connections, pragmas and migrations, behind the interface of base.py.

WAL mode; the supervisor is the only writer. A ``WriteBatch`` commits in one
transaction: right on the loop's thread when it is small and the lock is free
(``apply_now()``: SQLite's busy timeout is 0 there, so a lock held by another
process is never waited for on the loop), else in the store's own thread
(``apply()``), which waits for a busy lock up to BUSY_WAIT and then refuses
with ``StoreBusy``. Point reads share the writer's connection; long reads
(counts, listings) and WAL checkpoints use a second connection in a thread of
its own, which sees only what is committed and never holds up a commit.

Each transition is written guarded by the state it leaves (``... WHERE status =
?``); writes that find their job in another state change nothing and are
counted (``refused_transitions()``).

Why no aiosqlite: a transaction of many statements must run in one hop to the
store's thread, and aiosqlite offers that only through private internals. The
store's threads are a single-thread executor each, as aiosqlite's are.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import grp
import logging
import os
import stat
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import orjson

from hostqueue.core.states import FINAL_STATES, JobStatus
from hostqueue.store.base import (
    JOB_COLUMNS, DispatchRow, Interrupted, PendingSet, Store, StoreBusy, StoreCorrupt, StoreError,
    job_row_to_dict, state_totals,
)
from hostqueue.store.batch import TRANSITION_WRITES, Op, WriteBatch
from hostqueue.store.lock import StoreLock, StoreLocked
from hostqueue.store.sqlite_schema import MIGRATIONS, WRITES

__all__ = [
    "JOB_COLUMNS", "DispatchRow", "PendingSet", "SQLiteStore", "StoreBusy", "StoreError",
    "StoreLock", "StoreLocked", "WriteBatch", "MIGRATIONS",
]

T = TypeVar("T")

log = logging.getLogger("hostqueue.store")

# A write batch of at most this many statements commits on the loop's thread (see
# SQLiteStore.can_apply_now); larger ones in the store's thread.
INLINE_WRITE_OPS = 48
# Reads of at most this many jobs by id run on the loop's thread too.
INLINE_READ_IDS = 64
# Estimated WAL pages between our checkpoints (SQLite's default is 1,000).
CHECKPOINT_PAGES = 1000
# How long the store's thread waits for a lock another process holds, before a
# write is refused with StoreBusy (the committer then retries it; submits are
# refused with store_busy meanwhile).
BUSY_WAIT = 5.0

_SELECT_JOB = "SELECT " + ", ".join(JOB_COLUMNS) + " FROM jobs"


def _ended_queues(conn: sqlite3.Connection, status: str) -> Iterator[str]:
    """The queues holding ended jobs in this state, one at a time: one search of
    jobs_ended per queue (it is ordered by state, then queue), not a read of every
    ended job."""
    row = conn.execute(
        "SELECT MIN(queue) FROM jobs WHERE finished_at IS NOT NULL AND status = ?", (status,)
    ).fetchone()
    while row[0] is not None:
        yield row[0]
        row = conn.execute(
            "SELECT MIN(queue) FROM jobs WHERE finished_at IS NOT NULL AND status = ? AND queue > ?",
            (status, row[0]),
        ).fetchone()



def _transaction(conn: sqlite3.Connection, ops: list[Op]) -> int:
    """Every write of a batch in one transaction; runs of one kind in one executemany.
    Returns how many guarded transitions found their job in another state."""
    if len(ops) == 1 and not conn.in_transaction:
        # One statement is its own transaction: no BEGIN and COMMIT to pay for.
        kind, params = ops[0]
        changed = conn.execute(WRITES[kind], params).rowcount
        return 1 - changed if kind in TRANSITION_WRITES else 0
    refused = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        i, n = 0, len(ops)
        while i < n:
            kind = ops[i][0]
            j = i + 1
            while j < n and ops[j][0] == kind:
                j += 1
            if j - i == 1:
                changed = conn.execute(WRITES[kind], ops[i][1]).rowcount
            else:
                changed = conn.executemany(WRITES[kind], [p for _, p in ops[i:j]]).rowcount
            if kind in TRANSITION_WRITES:
                refused += (j - i) - changed
            i = j
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return refused


_CORRUPT = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _CORRUPT:
        return True
    return "malformed" in str(exc) or "not a database" in str(exc)


def _store_error(path: str, exc: sqlite3.Error, what: str = "") -> StoreError:
    """A StoreError naming the store, and corruption as corruption."""
    if _is_corrupt(exc):
        return StoreCorrupt(
            f"{what}store {path} is corrupt ({exc}): restore it from a backup, or recover"
            f" what can be read (sqlite3 {path} .recover | sqlite3 recovered.db) and start"
            " on that"
        )
    return StoreError(f"{what}store {path}: {exc}")


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _patiently(fn: Callable[[sqlite3.Connection], T], conn: sqlite3.Connection,
               what: str) -> T:
    """fn(conn) in a store thread, again while another process holds the lock, up to
    BUSY_WAIT; then StoreBusy. Never on the event loop's thread."""
    deadline = time.monotonic() + BUSY_WAIT
    pause = 0.001
    while True:
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            if not _is_busy(exc):
                raise
            if time.monotonic() >= deadline:
                raise StoreBusy(
                    f"{what}: the store is locked by another process (a backup, a sqlite3"
                    f" shell?) for over {BUSY_WAIT:g} s; the write is retried, and submits are"
                    " refused meanwhile"
                ) from exc
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class NotOurs(sqlite3.DatabaseError):
    """The file is an SQLite database of something else."""


class _Thread:
    """One thread that owns a connection: work goes to it in one hop and comes back
    as an awaitable (aiosqlite's design, without its private internals)."""

    def __init__(self, name: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class SQLiteStore(Store):
    def __init__(self, path: str, durability: str = "normal", group: str | None = None,
                 check: bool = True) -> None:
        self.path = path
        self.durability = durability
        self.group = group  # the group that may read and write the store's files (0660)
        self.check = check  # PRAGMA quick_check at open
        self._conn: sqlite3.Connection | None = None
        self._thread: _Thread | None = None
        # One transaction or read at a time in the store's thread.
        self._lock = asyncio.Lock()
        # Held by whichever thread uses the writer's connection: the store's, or the
        # loop's for a small write (see apply_now()).
        self._conn_lock = threading.Lock()
        # WAL pages written since the last checkpoint, estimated: checkpoints run on
        # the second connection, never inside a commit on the loop's thread.
        self._wal_pages = 0
        self._checkpointing = False
        # A second connection (and thread) for long reads (counts, listings) and for
        # checkpoints: WAL lets it read committed data while writes go on.
        self._reader: sqlite3.Connection | None = None
        self._reader_thread: _Thread | None = None
        self._read_lock = asyncio.Lock()
        self._refused = 0

    # -- lifecycle ------------------------------------------------------------

    def _secure_files(self) -> None:
        """The store holds job arguments and results (passwords, say): its files are
        0600 (0660 with a group: the socket's), whatever the umask. A new store file is
        made so before SQLite opens it (SQLite gives its -wal and -shm files the main
        file's permissions); existing ones are set so."""
        mode = 0o660 if self.group is not None else 0o600
        gid = grp.getgrnam(self.group).gr_gid if self.group is not None else -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError:
            return  # SQLite says what is wrong, with the path
        for suffix in ("", "-wal", "-shm"):
            path = self.path + suffix
            try:
                st = os.stat(path, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(path, mode)
                if gid >= 0 and st.st_gid != gid:
                    os.chown(path, -1, gid)
            except OSError:
                pass  # not there (yet), or not ours to change

    async def open(self) -> None:
        try:
            self._secure_files()
            self._thread = _Thread("hostqueue-store")
            # check_same_thread=False: small writes run on the loop's thread, one
            # thread at a time under _conn_lock (see apply_now()).
            self._conn = await self._thread.run(self._connect)
            await self._run(self._prepare)
            # Opened now, so that the set of descriptors stays the same while we run.
            self._reader_thread = _Thread("hostqueue-reader")
            self._reader = await self._reader_thread.run(self._connect_reader)
        except (sqlite3.Error, StoreError) as exc:
            await self.close()  # its threads must not keep the process alive
            if isinstance(exc, StoreBusy):
                raise StoreBusy(f"cannot open store {self.path}: {exc}") from exc
            cause = exc.__cause__ if isinstance(exc, StoreError) and exc.__cause__ else exc
            if isinstance(cause, NotOurs):
                raise StoreError(str(cause)) from None
            if isinstance(exc, StoreCorrupt) or (isinstance(cause, sqlite3.Error) and _is_corrupt(cause)):
                corrupt = _store_error(self.path, cause if isinstance(cause, sqlite3.Error)
                                       else sqlite3.DatabaseError(str(cause)), "cannot open: ")
                hint = "" if "--store-check off" in str(corrupt) else (
                    "; to serve it as it is anyway, start with --store-check off")
                raise StoreCorrupt(f"{corrupt}{hint}") from None
            raise StoreError(
                f"cannot open store {self.path}: {cause} (is it a hostqueue SQLite file,"
                " and are it and its directory writable?)"
            ) from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # 0: a lock held by another process is never waited for inside SQLite (it
        # would be on the loop's thread for a small write); the store's thread
        # retries instead (_patiently).
        conn.execute("PRAGMA busy_timeout = 0")
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")  # its own thread: waiting blocks nothing
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()  # opens the WAL
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        # Read before anything is written: a file that is not a hostqueue store is
        # refused as it is (not even switched to WAL mode).
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' LIMIT 5")]
            if tables:
                raise NotOurs(
                    f"{self.path} is an SQLite file of something else (it has tables:"
                    f" {', '.join(tables)}), not a hostqueue store; it was left untouched: give"
                    " --store a new file, or a store hostqueue made"
                )
        if self.check and version:
            # A damaged page is found now, and named, rather than by some write later.
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(
                    f"database disk image is malformed (quick_check: {'; '.join(problems)[:500]})")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"store cannot use WAL mode (journal_mode is {mode})")
        sync = "FULL" if self.durability == "full" else "NORMAL"
        conn.execute(f"PRAGMA synchronous = {sync}")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA cache_size = -8000")  # 8 MB: the hot rows fit; memory stays small
        conn.execute("PRAGMA foreign_keys = ON")
        # Checkpoints run on the second connection when the WAL has grown
        # (_maybe_checkpoint()), never inside a commit that may run on the loop's thread.
        if self.durability != "full":
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        if version > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"store schema version {version} is newer than this hostqueue knows"
                f" ({len(MIGRATIONS)}); upgrade hostqueue"
            )
        for number in range(version, len(MIGRATIONS)):
            name, script = MIGRATIONS[number]
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        # The store must take writes: refused here, at start, rather than at the first
        # job (SQLite opens a read-only file read-only and says so only when written).
        conn.execute("DELETE FROM settings WHERE 0")

    async def close(self) -> None:
        if self._reader is not None and self._reader_thread is not None:
            reader, self._reader = self._reader, None
            try:
                await self._reader_thread.run(reader.close)
            except sqlite3.Error:
                pass
        if self._conn is not None and self._thread is not None:
            conn, self._conn = self._conn, None
            async with self._lock:
                await self._thread.run(lambda: self._close_writer(conn))
        for thread in (self._reader_thread, self._thread):
            if thread is not None:
                thread.shutdown()
        self._reader_thread = self._thread = None

    def _close_writer(self, conn: sqlite3.Connection) -> None:
        with self._conn_lock:
            conn.close()

    async def _run(self, fn: Callable[[sqlite3.Connection], T], inline: bool = False) -> T:
        """Run fn(connection) in the store's thread, alone: one hop for a whole
        transaction, waiting there while another process holds the lock. With
        inline=True (a read known to be quick), it runs right here on the loop's
        thread when the connection is free and unlocked. Errors come out as StoreError."""
        conn = self._conn
        if conn is None or self._thread is None:
            raise StoreError(f"store {self.path} is not open")
        conn_lock = self._conn_lock
        if inline:  # a quick read: here if the connection is free, else on the reader
            if not self._lock.locked() and conn_lock.acquire(blocking=False):
                try:
                    return fn(conn)
                except sqlite3.Error as exc:
                    if not _is_busy(exc):
                        raise _store_error(self.path, exc) from exc
                    # Locked by another process: read in the reader's thread instead.
                finally:
                    conn_lock.release()
            if self._reader is not None:
                return await self._read(fn)

        def alone() -> T:
            with conn_lock:
                return _patiently(fn, conn, f"store {self.path}")

        async with self._lock:
            try:
                return await self._thread.run(alone)
            except sqlite3.Error as exc:
                raise _store_error(self.path, exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a long read on the second connection: it sees what is committed, and a
        count over a million rows does not hold up our commits meanwhile."""
        reader, thread = self._reader, self._reader_thread
        if reader is None or thread is None:
            return await self._run(fn)
        async with self._read_lock:
            try:
                return await thread.run(lambda: fn(reader))
            except sqlite3.Error as exc:
                raise _store_error(self.path, exc) from exc

    # -- writes -----------------------------------------------------------------

    def can_apply_now(self, size: int) -> bool:
        """Whether apply_now() may take a batch of this many writes: a small one,
        with the connection free, and commits that do not fsync."""
        return (
            size <= INLINE_WRITE_OPS and self.durability != "full" and self._conn is not None
            and not self._lock.locked() and not self._conn_lock.locked()
        )

    def apply_now(self, batch: WriteBatch) -> bool:
        """Apply a small batch right here on the loop's thread (see can_apply_now());
        False, with nothing done, if the store's thread holds the connection or
        another process holds the lock (busy timeout 0: the loop never waits for
        it). A commit without fsync (WAL, synchronous=NORMAL) of a few rows costs
        tens of us; a hop to a thread and back about as much again, on the path of
        every job."""
        conn = self._conn
        if conn is None or not self._conn_lock.acquire(blocking=False):
            return False
        try:
            self._refused += _transaction(conn, batch.all_ops())
        except sqlite3.Error as exc:
            if _is_busy(exc):
                return False  # nothing was written: the store's thread waits for the lock
            raise _store_error(self.path, exc, "store write failed: ") from exc
        finally:
            self._conn_lock.release()
        self._maybe_checkpoint(len(batch))
        return True

    async def apply(self, batch: WriteBatch) -> None:
        """Apply every write of the batch in one transaction, in the store's thread,
        where SQLite runs beside the loop and waits out another process's lock (a
        small batch, when the connection is free, goes to apply_now() instead);
        raise StoreError (StoreBusy) on failure."""
        ops = batch.all_ops()
        try:
            self._refused += await self._run(lambda conn: _transaction(conn, ops))
        except (StoreBusy, StoreCorrupt):
            raise
        except StoreError as exc:
            raise StoreError(f"store write failed: {exc.__cause__ or exc}") from exc
        self._maybe_checkpoint(len(batch))

    def refused_transitions(self) -> int:
        refused, self._refused = self._refused, 0
        return refused

    def _maybe_checkpoint(self, ops: int) -> None:
        """Checkpoint once about CHECKPOINT_PAGES were written, on a connection of its
        own, beside our writes. SQLite's automatic checkpoint is off: it would run
        inside a commit, on the loop's thread for small writes, and stop writes
        while it fsyncs."""
        if self.durability == "full":
            return  # SQLite's automatic checkpoint stays on: every commit is in the thread
        # An upper estimate: a small transaction touches a few pages per row, a large
        # one shares pages between rows.
        self._wal_pages += 2 + min(ops, 64) * 3 + max(ops - 64, 0) // 4
        if self._checkpointing or self._wal_pages < CHECKPOINT_PAGES:
            return
        self._checkpointing = True
        self._wal_pages = 0
        asyncio.get_running_loop().create_task(self._checkpoint())

    async def _checkpoint(self) -> None:
        try:
            await self._read(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        except (StoreError, ValueError) as exc:  # ValueError: closed meanwhile
            log.warning("checkpoint failed (retried after more writes): %s", exc)
        finally:
            self._checkpointing = False

    # -- start-up -----------------------------------------------------------------

    async def recover_interrupted(
        self, now: float, decide: Callable[[Interrupted], tuple[str, Any]]
    ) -> tuple[int, int]:
        """Jobs left running by a supervisor that died, found by one scan of the table
        (no index holds running jobs: it would cost every job a write when it starts
        and one when it ends; 0.1-0.2 s per million rows, at start only). decide(job)
        names what each becomes: ("pending", error) runs it again, uncharged (its
        interruption counted); ("failed", error) ends it. Each interrupted attempt is
        recorded in the attempt log. Returns (requeued, failed)."""

        def recover(conn: sqlite3.Connection) -> tuple[int, int]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = []
                held = []
                # One scan finds the running jobs and the rows held by a worker of the
                # dead supervisor; those wait again (back in jobs_waiting), uncharged:
                # they never started.
                for status, *row in conn.execute(
                    "SELECT status, id, attempts, interruptions, worker_pid, started_at FROM jobs"
                    " WHERE status = 'running' OR (status = 'pending' AND worker_pid IS NOT NULL)"
                ):
                    if status == "running":
                        found.append(Interrupted(*row))
                    else:
                        held.append((row[0],))
                conn.executemany("UPDATE jobs SET worker_pid = NULL WHERE id = ?", held)
                requeued = failed = 0
                for job in found:
                    status, err = decide(job)
                    err_text = orjson.dumps(err).decode() if err is not None else None
                    conn.execute(
                        "INSERT INTO attempts (job_id, attempt, status, error, worker_pid,"
                        " started_at, finished_at) VALUES (?, ?, 'interrupted', ?, ?, ?, ?)",
                        (job.id, job.attempts, err_text, job.worker_pid, job.started_at, now),
                    )
                    if status == JobStatus.FAILED.value:
                        failed += 1
                        conn.execute(
                            "UPDATE jobs SET status = 'failed', finished_at = ?, error = ?,"
                            " interruptions = interruptions + 1 WHERE status = 'running' AND id = ?",
                            (now, err_text, job.id),
                        )
                    else:
                        requeued += 1
                        conn.execute(
                            "UPDATE jobs SET status = 'pending', attempts = MAX(attempts - 1, 0),"
                            " interruptions = interruptions + 1, run_at = MIN(run_at, ?),"
                            " started_at = NULL, worker_pid = NULL WHERE status = 'running' AND id = ?",
                            (now, job.id),
                        )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return requeued, failed

        return await self._run(recover)

    async def load_pending(self, now: float) -> "PendingSet":
        """Every pending job, in the compact shapes the ready index keeps, read in chunks
        so a million rows never exist as Python objects at once."""

        def load(conn: sqlite3.Connection) -> PendingSet:
            out = PendingSet()
            cursor = conn.execute(
                "SELECT id, queue, task, priority, run_at, deadline, key FROM jobs"
                " WHERE status = 'pending' AND worker_pid IS NULL"  # recovery cleared held rows
            )
            while True:
                rows = cursor.fetchmany(10_000)
                if not rows:
                    return out
                add = out.add
                for row in rows:
                    add(row, now)

        return await self._run(load)

    async def last_job_id(self) -> int:
        def last(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT MAX(id) FROM jobs").fetchone()
            return int(row[0] or 0)

        return await self._run(last)

    async def load_settings(self) -> dict[str, Any]:
        def load(conn: sqlite3.Connection) -> dict[str, Any]:
            rows = conn.execute("SELECT name, value FROM settings").fetchall()
            return {name: orjson.loads(value) for name, value in rows}

        return await self._run(load)

    async def load_schedules(self) -> dict[str, tuple[float, float | None, int | None, str, str]]:
        """name -> (next_run, last_run, last_job, cron, timezone) as last committed."""

        def load(conn: sqlite3.Connection) -> dict[str, tuple[float, float | None, int | None, str, str]]:
            return {
                r[0]: (r[1], r[2], r[3], r[4], r[5])
                for r in conn.execute(
                    "SELECT name, next_run, last_run, last_job, cron, timezone FROM schedules"
                )
            }

        return await self._run(load)

    # -- reads --------------------------------------------------------------------

    async def jobs_for_dispatch(self, ids: list[int]) -> dict[int, DispatchRow]:
        def fetch(conn: sqlite3.Connection) -> dict[int, DispatchRow]:
            out: dict[int, DispatchRow] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for r in conn.execute(
                    "SELECT id, task, queue, args, attempts, max_attempts, timeout,"
                    " abort_requested, run_id, priority, key, created_at, run_at, deadline"
                    f" FROM jobs WHERE id IN ({marks}) AND +status = 'pending'",  # + keeps the primary key in use
                    chunk,
                ):
                    out[r[0]] = DispatchRow(
                        r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), *r[8:]
                    )
            return out

        return await self._run(fetch, inline=len(ids) <= INLINE_READ_IDS)

    async def get_jobs(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        id_list = list(ids)

        def fetch(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            rows: list[tuple[Any, ...]] = []
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows.extend(conn.execute(_SELECT_JOB + f" WHERE id IN ({marks})", chunk))
            return rows

        rows = await self._run(fetch, inline=len(id_list) <= INLINE_READ_IDS)
        return {r[0]: job_row_to_dict(r) for r in rows}

    async def list_jobs(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        run_id: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("queue", queue), ("task", task), ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if status == "pending":
            where.append("status = 'pending'")
        elif status is not None:
            where.append("status = ?")
            params.append(status)
            if status in FINAL_STATES:
                where.append("finished_at IS NOT NULL")  # the index of ended jobs applies
        if before is not None:
            where.append("id < ?")
            params.append(before)
        sql = _SELECT_JOB + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)

        def fetch(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, params).fetchall()

        return [job_row_to_dict(r) for r in await self._read(fetch)]

    async def unfinished_ids(self, run_id: str) -> list[int]:
        def fetch(conn: sqlite3.Connection) -> list[int]:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE run_id = ? AND status IN ('pending', 'running')",
                    (run_id,),
                )
            ]

        return await self._run(fetch)

    async def ended_ids(
        self, status: str, queue: str | None = None, task: str | None = None
    ) -> list[int]:
        # Ended jobs only (finished_at set): the index of ended jobs has them.
        sql = "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND status = ?"
        params: list[Any] = [status]
        if queue is not None:
            sql += " AND queue = ?"
            params.append(queue)
        if task is not None:
            sql += " AND task = ?"
            params.append(task)

        def fetch(conn: sqlite3.Connection) -> list[int]:
            return [r[0] for r in conn.execute(sql, params)]

        return await self._run(fetch)

    async def count_by_state(
        self, now: float, run_id: str | None = None, scheduled_ids: list[int] | None = None,
        running: Callable[[Callable[[], None]], tuple[dict[str, int], dict[str, int]]] | None = None,
    ) -> dict[str, Any]:
        """Counts by state and queue; pending jobs due later count as 'scheduled'.

        With scheduled_ids (the only pending jobs that may be due later, as the
        supervisor knows them), the pending jobs are counted from the index alone,
        and only those rows are read for their due time: 0.1 s instead of 0.7 s
        with 1,000,000 pending. With running, running jobs are not counted in the
        table (no index holds them): running(open_snapshot) opens the read
        snapshot and returns the running jobs by queue as of it (runcount.py)."""

        def count(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            if run_id is not None:
                rows: list[tuple[str, str, int]] = conn.execute(
                    "SELECT queue, CASE WHEN status = 'pending' AND run_at > ? THEN 'scheduled'"
                    " ELSE status END, COUNT(*) FROM jobs WHERE run_id = ? GROUP BY 1, 2",
                    (now, run_id),
                ).fetchall()
                return rows
            if conn.in_transaction:
                return count_all(conn)
            conn.execute("BEGIN")  # one snapshot for the counts
            try:
                rows = count_all(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return rows

        def count_all(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
            running_now = held_now = None
            if running is not None:  # first: it opens the snapshot everything is read in

                def open_snapshot() -> None:
                    conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

                running_now, held_now = running(open_snapshot)
            rows: list[tuple[str, str, int]] = conn.execute(
                "SELECT queue, status, COUNT(*) FROM jobs WHERE finished_at IS NOT NULL"
                " GROUP BY status, queue"  # jobs_ended's order: no sort
            ).fetchall()
            if running_now is None:
                rows += conn.execute(
                    "SELECT queue, 'running', COUNT(*) FROM jobs WHERE status = 'running'"
                    " GROUP BY queue"
                ).fetchall()
            else:
                rows += [(queue, "running", n) for queue, n in running_now.items()]
            if scheduled_ids is None or held_now is None:  # every pending row read for its due time
                rows += conn.execute(
                    "SELECT queue, CASE WHEN run_at > ? THEN 'scheduled' ELSE 'pending' END,"
                    " COUNT(*) FROM jobs WHERE status = 'pending' GROUP BY 1, 2",
                    (now,),
                ).fetchall()
                return rows
            later: dict[str, int] = {}
            if scheduled_ids:
                later = dict(conn.execute(
                    "SELECT queue, COUNT(*) FROM jobs WHERE id IN (SELECT value FROM json_each(?))"
                    " AND status = 'pending' AND run_at > ? GROUP BY queue",
                    (orjson.dumps(scheduled_ids).decode(), now),
                ).fetchall())
            # Waiting rows from jobs_waiting alone; held rows (few) as the supervisor
            # counts them, as of this snapshot. Held jobs are due: never "later".
            waiting = dict(conn.execute(
                "SELECT queue, COUNT(*) FROM jobs WHERE status = 'pending' AND worker_pid IS NULL"
                " GROUP BY queue"
            ).fetchall())
            for queue, n in held_now.items():
                waiting[queue] = waiting.get(queue, 0) + n
            for queue, n in waiting.items():
                rows.append((queue, "pending", n - later.get(queue, 0)))
                if later.get(queue):
                    rows.append((queue, "scheduled", later[queue]))
            return rows

        rows = await self._read(count)
        return state_totals(rows)

    async def completed_with_key(self, key: str, since: float) -> dict[str, Any] | None:
        """The newest job with this key that completed at or after ``since`` (result caching)."""

        def fetch(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                _SELECT_JOB + " WHERE key = ? AND status = 'completed' AND finished_at >= ?"
                " ORDER BY finished_at DESC LIMIT 1",
                (key, since),
            ).fetchone()
            return row

        row = await self._run(fetch)
        return job_row_to_dict(row) if row else None

    async def ended_before(self, cutoffs: dict[str, float], limit: int) -> list[tuple[int, str, float]]:
        """Up to ``limit`` ended jobs older than their state's cutoff, as (id, status,
        cutoff): the forget_ended write deletes each only if it still is so."""

        def fetch(conn: sqlite3.Connection) -> list[tuple[int, str, float]]:
            out: list[tuple[int, str, float]] = []
            for status, cutoff in cutoffs.items():
                for queue in _ended_queues(conn, status):
                    if len(out) >= limit:
                        return out
                    out.extend(
                        (r[0], status, cutoff)
                        for r in conn.execute(
                            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND status = ?"
                            " AND queue = ? AND finished_at < ? LIMIT ?",
                            (status, queue, cutoff, limit - len(out)),
                        )
                    )
            return out

        return await self._read(fetch)  # committed rows, beside the writes

    async def oldest_finished(self, states: list[str]) -> dict[str, float]:
        """The oldest finished_at of each given state that has finished jobs."""

        def fetch(conn: sqlite3.Connection) -> dict[str, float]:
            out = {}
            for status in states:
                oldest = [
                    conn.execute(
                        "SELECT MIN(finished_at) FROM jobs WHERE finished_at IS NOT NULL"
                        " AND status = ? AND queue = ?",
                        (status, queue),
                    ).fetchone()[0]
                    for queue in _ended_queues(conn, status)
                ]
                if oldest:
                    out[status] = float(min(oldest))
            return out

        return await self._read(fetch)

    async def attempts_of(self, job_id: int) -> list[dict[str, Any]]:
        def fetch(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(
                "SELECT attempt, status, error, worker_pid, started_at, finished_at,"
                " cpu_seconds, peak_rss FROM attempts WHERE job_id = ? ORDER BY seq",
                (job_id,),
            ).fetchall()

        out = []
        for attempt, status, error, pid, started, finished, cpu, rss in await self._read(fetch):
            out.append(
                {
                    "attempt": attempt,
                    "status": status,
                    "error": orjson.loads(error) if error else None,
                    "worker_pid": pid,
                    "started_at": started,
                    "finished_at": finished,
                    "duration": (finished - started) if started and finished else None,
                    "cpu_seconds": cpu,
                    "peak_rss": rss,
                }
            )
        return out

    async def file_size(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total


UNFINISHED = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
