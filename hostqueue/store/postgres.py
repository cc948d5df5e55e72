"""The PostgreSQL store: every SQL statement of hostqueue's PostgreSQL engine, its
connections and migrations, behind the interface of base.py.

``--store postgresql://USER@HOST/DB`` (or ``postgres://``) selects it; its
tables live in the schema ``--pg-schema`` (default ``hostqueue``), made if
missing. The driver is asyncpg (bench/pg_drivers.py measured it against
psycopg 3 on the store's statements: a lone job's commit 0.42 ms against 0.67,
a transaction of 100 guarded updates 2.2 times as fast).

Two connections: the writer commits each WriteBatch in one transaction (runs
of one write kind as one statement over arrays: one round trip, and a count
of the rows changed, so guarded transitions that found their job in another
state are counted as on SQLite); the reader serves reads, so a long count
never holds up a commit. Neither blocks the event loop: asyncpg is asyncio's.

Several hosts share a schema (supervisor/cluster.py is the other half): a third
connection renews this host's lease, claims released jobs, takes id ranges and
LISTENs; every write transaction first checks the lease (``fence``), and sends
one NOTIFY for the other hosts when it released or ended jobs. If the writer's
connection is lost, writes fail with StoreError (the committer retries them,
submits are refused meanwhile) until a new connection is made.

Migrations run at open under a transaction-level advisory lock, each in its
own transaction, recorded in ``schema_version``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import orjson

from hostqueue.core.states import FINAL_STATES
from hostqueue.store.base import (
    JOB_COLUMNS, DispatchRow, Interrupted, PendingSet, SharedStore, StoreError, StoreFenced,
    StoreKeyTaken, job_row_to_dict, state_totals,
)
from hostqueue.store.batch import TRANSITION_WRITES, Op, WriteBatch
from hostqueue.store.postgres_schema import CLUSTER, MIGRATIONS, VERSION_TABLE, WRITES, batched

log = logging.getLogger("hostqueue.store")

DEFAULT_SCHEMA = "hostqueue"
# The advisory locks' first key (the second is the schema name's hash): "hq".
LOCK_SPACE = 0x6871
MIGRATION_SPACE = 0x6872
CAP_SPACE = 0x6873
CONNECT_TIMEOUT = 10.0
# A statement that takes longer fails (StoreError) instead of holding the writer for
# as long as the kernel takes to give up on a half-open connection.
COMMAND_TIMEOUT = 30.0
# The server notices a client gone silent (a host frozen, a network cut) within
# about 10 + 3 x 5 s, and ends its session: the advisory lock is freed with it.
KEEPALIVES = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5",
              "tcp_keepalives_count": "3",
              # A host frozen (SIGSTOP, a VM paused) inside a transaction keeps its
              # connection alive but would hold its locks, and so hold up the rescue
              # of its jobs: the server ends such a session after 2 s. Our
              # transactions never wait on anything but the server's answers.
              "idle_in_transaction_session_timeout": "2000"}
_SELECT_JOB = "SELECT " + ", ".join(JOB_COLUMNS) + " FROM jobs"
# Guarded updates batched over arrays (postgres_schema.batched).
_BATCHED = {kind: batched(kind) for kind in TRANSITION_WRITES | {"record_progress"}}


def safe_dsn(dsn: str) -> str:
    """The DSN with its password hidden, for logs and errors."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "postgresql://..."
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresStore(SharedStore):
    def __init__(self, dsn: str, schema: str = DEFAULT_SCHEMA) -> None:
        self.dsn = dsn
        self.schema = schema
        self.path = safe_dsn(dsn) + f" (schema {schema})"  # names the store in messages
        self._writer: Any = None
        self._reader: Any = None
        self._lock = asyncio.Lock()  # one transaction at a time on the writer
        self._read_lock = asyncio.Lock()
        self._refused = 0
        self._lost = False  # the writer's connection broke: reconnect before writing
        self._closed = False
        self._asyncpg: Any = None
        self._fenced: Callable[[StoreFenced], None] | None = None
        self._fenced_error: StoreFenced | None = None
        self._reconnecting = False
        # Several hosts (cluster part): this host's id once joined, the connection of
        # its lease, claims and LISTEN, and what it is told by NOTIFY.
        self._host: int | None = None
        self._cluster: Any = None
        self._cluster_lock = asyncio.Lock()
        self._notified: Callable[[dict[str, Any]], None] | None = None
        self._reconnected: Callable[[], None] | None = None
        self.channel = ("hostqueue_" + schema)[:63]
        self._gone_here: list[int] = []
        self._batches = 0  # write transactions numbered (hosts.last_batch)
        self._alone = False  # no other host alive: no NOTIFY (set_alone)

    # -- lifecycle ------------------------------------------------------------

    def _app_name(self, role: str) -> str:
        return f"hostqueue {role} pid {os.getpid()} on {socket.gethostname()}"[:63]

    async def _connect(self, role: str) -> Any:
        asyncpg = self._asyncpg
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        try:
            conn = await asyncpg.connect(
                self.dsn, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
                server_settings={
                    "search_path": self.schema,
                    "application_name": self._app_name(role),
                    **KEEPALIVES,
                },
            )
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(
                f"cannot connect to PostgreSQL store {safe_dsn(self.dsn)}: {exc or type(exc).__name__}"
                " (is the server running, and the URL's host, port, user and database right?)"
            ) from None
        if role == "supervisor":
            conn.add_termination_listener(self._writer_lost)
        return conn

    def _writer_lost(self, conn: Any) -> None:
        """The writer's connection ended (server restart, failover, a network cut seen):
        connect again at once rather than at the next write (whose fence then tells
        whether this host still holds its lease)."""
        if conn is not self._writer or self._closed:
            return
        self._lost = True
        if self._reconnecting:
            return
        self._reconnecting = True

        async def reconnect() -> None:
            delay = 0.05
            try:
                while not self._closed and self._lost and self._fenced_error is None:
                    try:
                        async with self._lock:
                            if self._lost and not self._closed:
                                await self._writer_conn()
                    except StoreError as exc:
                        if isinstance(exc, StoreFenced):
                            return
                        log.warning("store %s: connecting again failed (%s); next try in %.1f s",
                                    self.path, exc, delay)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
            finally:
                self._reconnecting = False

        asyncio.get_running_loop().create_task(reconnect())

    def on_fenced(self, callback: Callable[[StoreFenced], None]) -> None:
        self._fenced = callback

    async def open(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise StoreError(
                "the PostgreSQL store needs the asyncpg driver: pip install 'hostqueue[postgres]'"
            ) from None
        self._asyncpg = asyncpg
        try:
            self._writer = await self._connect("supervisor")
            await self._migrate(self._writer)
            self._reader = await self._connect("reader")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError) as exc:
            await self.close()
            raise StoreError(f"cannot open PostgreSQL store {self.path}: {exc}") from None
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, conn: Any) -> None:
        schema = _quote_ident(self.schema)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                               MIGRATION_SPACE, self.schema)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(VERSION_TABLE)
            version = await conn.fetchval("SELECT version FROM schema_version")
            if version is None:
                tables = await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1"
                    " AND tablename <> 'schema_version' LIMIT 5", self.schema)
                if tables:
                    raise StoreError(
                        f"schema {self.schema!r} of {safe_dsn(self.dsn)} holds tables of something"
                        f" else ({', '.join(r[0] for r in tables)}), not a hostqueue store; it was"
                        " left untouched: give --pg-schema a new name"
                    )
                await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                version = 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"store schema version {version} is newer than this hostqueue knows"
                f" ({len(MIGRATIONS)}); upgrade hostqueue"
            )
        for number in range(version, len(MIGRATIONS)):
            name, script = MIGRATIONS[number]
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                   MIGRATION_SPACE, self.schema)
                now = await conn.fetchval("SELECT version FROM schema_version FOR UPDATE")
                if now != number:
                    continue  # another supervisor applied it meanwhile
                log.info("store %s: migration %d: %s", self.path, number + 1, name)
                await conn.execute(script)
                await conn.execute("UPDATE schema_version SET version = $1", number + 1)

    async def close(self) -> None:
        self._closed = True
        for attr in ("_reader", "_writer", "_cluster"):
            conn = getattr(self, attr)
            setattr(self, attr, None)
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 5.0)
                except Exception:
                    conn.terminate()

    # -- connections ----------------------------------------------------------

    def _error(self, exc: BaseException, what: str) -> StoreError:
        return StoreError(f"{what}PostgreSQL store {self.path}: {exc or type(exc).__name__}")

    def _broken(self, exc: BaseException) -> bool:
        asyncpg = self._asyncpg
        return isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError,
                                asyncpg.PostgresConnectionError, asyncpg.AdminShutdownError,
                                asyncpg.CannotConnectNowError))

    async def _writer_conn(self) -> Any:
        """The writer, connected again after it broke (its first write checks that this
        host still holds its lease: fenced otherwise)."""
        if self._fenced_error is not None:
            raise self._fenced_error
        if self._writer is None or self._lost or self._writer.is_closed():
            if self._writer is not None:
                old, self._writer = self._writer, None
                old.terminate()
            conn = await self._connect("supervisor")
            try:
                if self._host is not None:
                    await conn.execute("SELECT set_config('hostqueue.host', $1, false)",
                                       str(self._host))
            except BaseException:
                conn.terminate()
                raise
            self._writer, self._lost = conn, False
            log.warning("store %s: connected again", self.path)
        return self._writer

    async def _reader_conn(self) -> Any:
        if self._reader is None or self._reader.is_closed():
            self._reader = await self._connect("reader")
        return self._reader

    async def _read(self, fn: Callable[[Any], Any]) -> Any:
        async with self._read_lock:
            return await self._on(self._reader_conn, fn, self._reader_broke, "read failed: ")

    async def _write(self, fn: Callable[[Any], Any]) -> Any:
        async with self._lock:
            return await self._on(self._writer_conn, fn, self._writer_broke, "store write failed: ")

    def _reader_broke(self) -> None:
        if self._reader is not None:
            self._reader.terminate()
            self._reader = None

    def _writer_broke(self) -> None:
        self._lost = True  # connected again before the next write

    async def _on(self, connection: Callable[[], Any], fn: Callable[[Any], Any],
                  broke: Callable[[], None], what: str) -> Any:
        """fn(connection) with the driver's errors as StoreError; a broken connection
        is noted (broke()) so that the next use connects again."""
        asyncpg = self._asyncpg
        try:
            return await fn(await connection())
        except StoreError:
            raise
        except Exception as exc:
            if self._broken(exc):
                broke()
            if isinstance(exc, asyncpg.UniqueViolationError) and exc.constraint_name == "jobs_key":
                detail = getattr(exc, "detail", "") or ""
                key = detail.split("=(", 1)[1].rsplit(") already", 1)[0] if "=(" in detail else None
                raise StoreKeyTaken(
                    f"{what}another host stored an unfinished job with the same key"
                    f" ({key!r}) meanwhile; nothing of this transaction was stored", key) from exc
            if isinstance(exc, (asyncpg.PostgresError, OSError, asyncpg.InterfaceError)):
                raise self._error(exc, what) from exc
            raise

    # -- writes -----------------------------------------------------------------

    def can_apply_now(self, size: int) -> bool:
        return False  # every write goes over the network: apply()

    def apply_now(self, batch: WriteBatch) -> bool:
        return False

    async def apply(self, batch: WriteBatch) -> None:
        if self._fenced_error is not None:
            raise self._fenced_error
        ops = batch.all_ops()
        notice = None if self._alone else _notice(ops, time.time(), self._host)
        self._batches += 1
        number = self._batches

        host = self._host

        async def transaction(conn: Any) -> int:
            if host is None:
                async with conn.transaction():
                    return await _apply_ops(conn, ops)
            # BEGIN and the fence in one round trip, the NOTIFY with COMMIT in another:
            # a transaction costs what it did on one host.
            if _rows(await conn.execute(CLUSTER["fence_batch"].format(batch=number, host=host))) != 1:
                await conn.execute("ROLLBACK")
                raise self.lease_lost()
            try:
                refused = await _apply_ops(conn, ops)
                await conn.execute("COMMIT" if notice is None
                                   else f"SELECT pg_notify('{self.channel}', {_dollar(notice)}); COMMIT")
            except BaseException:
                if not conn.is_closed() and conn.is_in_transaction():
                    try:
                        await conn.execute("ROLLBACK")
                    except Exception:  # noqa: BLE001 - the first error is the one to tell
                        pass
                raise
            return refused

        try:
            self._refused += await self._write(transaction)
        except StoreError as exc:
            if self._host is None or not self._lost or isinstance(exc, StoreFenced):
                raise
            # The connection broke: before COMMIT (nothing stored), or after it, its
            # answer lost (all stored). The batch's number in the store tells which.
            try:
                stored = await self._write(lambda c: c.fetchval(CLUSTER["last_batch"]))
            except StoreError:
                raise exc from None
            if stored != number:
                raise
            log.warning("store %s: the connection broke as a transaction committed; it was"
                        " stored (its number is in the store)", self.path)

    def lease_lost(self) -> StoreFenced:
        """This host's lease lapsed (it was frozen, or cut off from the database, for
        longer than the lease): another host may have taken its jobs over. Nothing it
        does may be stored any more."""
        if self._fenced_error is None:
            self._fenced_error = StoreFenced(
                f"this host's lease on {self.path} lapsed (it was frozen or cut off for longer"
                " than the lease): other hosts run its jobs again; it stops its jobs, stores"
                " nothing more, and must start again to rejoin")
            if self._fenced is not None:
                self._fenced(self._fenced_error)
        return self._fenced_error

    def refused_transitions(self) -> int:
        refused, self._refused = self._refused, 0
        return refused


    # -- several hosts ------------------------------------------------------------

    @property
    def host(self) -> int | None:
        return self._host

    async def _cluster_conn(self) -> Any:
        """The connection of the lease, claims, id ranges and LISTEN; connected again
        (and listening again) after it broke: reconnected() then runs, since
        notifications may have been missed meanwhile."""
        if self._cluster is None or self._cluster.is_closed():
            again = self._cluster is not None
            conn = await self._connect("host")
            try:
                if self._host is not None:
                    await conn.execute("SELECT set_config('hostqueue.host', $1, false)",
                                       str(self._host))
                if self._notified is not None:
                    await conn.add_listener(self.channel, self._on_notification)
            except BaseException:
                conn.terminate()
                raise
            self._cluster = conn
            if again and self._reconnected is not None:
                self._reconnected()
        return self._cluster

    def _cluster_broke(self) -> None:
        if self._cluster is not None:
            self._cluster.terminate()
            self._cluster = None

    async def _on_cluster(self, fn: Callable[[Any], Any]) -> Any:
        async with self._cluster_lock:
            return await self._on(self._cluster_conn, fn, self._cluster_broke, "")

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if self._notified is None:
            return
        try:
            notice = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.warning("store %s: a notification that is not ours on %s: %.80r",
                        self.path, channel, payload)
            return
        if isinstance(notice, dict) and notice.get("h") != self._host:
            self._notified(notice)

    async def join(self, name: str, pid: int, socket_path: str, workers: int, version: str,
                   lease: float, alive: Callable[[int], bool]) -> int:
        """Join the store as a host: a new hosts row and lease; returns its id. Hosts
        gone from this machine and socket (their PID no longer lives) are left for
        the next rescue() at once instead of after their lease."""
        try:
            pidns: int | None = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            pidns = None

        async def insert(conn: Any) -> tuple[int, list[int]]:
            gone = [r[0] for r in await conn.fetch(CLUSTER["same_place"], name, socket_path, pidns)
                    if not alive(r[1])] if pidns is not None else []
            host = await conn.fetchval(CLUSTER["join"], name, pid, socket_path, workers, version,
                                       lease, pidns)
            await conn.execute("SELECT set_config('hostqueue.host', $1, false)", str(host))
            return int(host), gone

        host, gone = await self._on_cluster(insert)
        self._host = host
        self._gone_here = gone

        async def own(conn: Any) -> None:
            await conn.execute("SELECT set_config('hostqueue.host', $1, false)", str(host))

        await self._write(own)
        return host

    def listen(self, notified: Callable[[dict[str, Any]], None] | None,
               reconnected: Callable[[], None]) -> None:
        """notified(notice) for each NOTIFY of another host (claims, ends, aborts);
        reconnected() when LISTEN was broken for a while."""
        self._notified = notified
        self._reconnected = reconnected

    async def start_listening(self) -> None:
        async def add(conn: Any) -> None:
            await conn.add_listener(self.channel, self._on_notification)

        await self._on_cluster(add)

    async def notify(self, notice: dict[str, Any]) -> None:
        body = dict(notice, h=self._host)
        await self._on_cluster(lambda c: c.execute(
            "SELECT pg_notify($1, $2)", self.channel, orjson.dumps(body).decode()))

    async def renew(self, lease: float, workers: int) -> tuple[float | None, bool, int]:
        """Renew this host's lease: the seconds it had left (None: it had lapsed),
        whether another host's lease has lapsed (rescue() then takes its jobs), and
        how many other hosts are alive."""
        row = await self._on_cluster(lambda c: c.fetchrow(
            CLUSTER["renew"], self._host, lease, workers))
        return (None if row[0] is None else float(row[0])), bool(row[1]), int(row[2])

    def set_alone(self, alone: bool) -> None:
        """No other host is alive: nobody listens, so transactions send no NOTIFY."""
        self._alone = alone

    async def try_lead(self) -> bool:
        """Whether this host does the schema's once-only work (schedules, retention):
        a session advisory lock on its connection, held while it stays connected."""
        return bool(await self._on_cluster(lambda c: c.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", LOCK_SPACE, self.schema)))

    async def rescue(self, now: float, decide: Callable[[Interrupted], tuple[str, Any]],
                     orphans: bool = False) -> tuple[list[tuple[int, str, int]], int, int, list[int]]:
        """Take over the jobs of hosts whose lease lapsed (and of hosts of this place
        found gone at join): their waiting jobs are released, their running ones
        interrupted (run again, uncharged, or failed after too many interruptions),
        in one transaction with a NOTIFY. With orphans, also the jobs of hosts with
        no row (a store of before several hosts). Returns (hosts gone, requeued,
        failed, failed ids)."""
        gone_here, self._gone_here = self._gone_here, []

        async def take(conn: Any) -> tuple[list[tuple[int, str, int]], int, int, list[int]]:
            async with conn.transaction():
                gone = [tuple(r) for r in await conn.fetch(CLUSTER["lapsed"], gone_here)]
                owners = [g[0] for g in gone]
                if orphans:
                    owners += [r[0] for r in await conn.fetch(
                        "SELECT DISTINCT owner FROM jobs WHERE owner IS NOT NULL"
                        " AND status IN ('pending', 'running')"
                        " AND owner NOT IN (SELECT id FROM hosts)")]
                elif not owners:
                    return [], 0, 0, []
                await conn.execute(CLUSTER["release_pending"], owners)
                rows = await conn.fetch(CLUSTER["interrupted"], owners)
                requeued, failed = await _interrupt(conn, rows, decide, now)
                await conn.execute("SELECT pg_notify($1, $2)", self.channel, orjson.dumps(
                    {"h": None, "r": 1,
                     "e": failed if len(failed) <= NOTICE_IDS else "*"}).decode())
                return gone, len(requeued), len(failed), failed

        return await self._on_cluster(take)

    async def claim(self, count: int, now: float, paused: list[str],
                    strict: list[str] | None = None) -> tuple[list[DispatchRow], float | None]:
        """Up to count released jobs that are due, now this host's (by priority, then
        age; with strict, the queues it names first, in its order); and, when fewer
        were found, when the next released job is due (None: none waits)."""
        async def take(conn: Any) -> tuple[list[DispatchRow], float | None]:
            if strict is None:
                rows = await conn.fetch(CLUSTER["claim"], self._host, now, paused, count)
            else:
                rows = await conn.fetch(CLUSTER["claim_strict"], self._host, now, paused,
                                        count, strict)
            due = None
            if len(rows) < count:
                try:  # the rows are this host's already: a failure here must not lose them
                    due = await conn.fetchval(CLUSTER["next_due"], now)
                except Exception as exc:  # noqa: BLE001
                    log.warning("store %s: cannot read when the next released job is due: %s",
                                self.path, exc)
            return [DispatchRow(*r) for r in rows], due

        return await self._on_cluster(take)

    async def claim_capped(self, queue: str, cap: int, count: int, now: float
                           ) -> tuple[list[DispatchRow], bool]:
        """Up to count released jobs of a queue whose cap holds across hosts, within
        the cap (jobs held or running on any host count). Returns them, and whether
        the cap was what stopped the claim."""
        async def take(conn: Any) -> tuple[list[DispatchRow], bool]:
            async with conn.transaction():
                if await conn.fetchval(CLUSTER["fence"]) is None:
                    raise self.lease_lost()
                await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                   CAP_SPACE, self.schema + "." + queue)
                active = await conn.fetchval(CLUSTER["queue_active"], queue)
                n = min(count, cap - active)
                if n <= 0:
                    return [], True
                rows = await conn.fetch(CLUSTER["claim_queue"], self._host, now, queue, n)
            return [DispatchRow(*r) for r in rows], len(rows) == n < count

        return await self._on_cluster(take)

    async def release(self, ids: list[int]) -> tuple[bool, float | None, float | None]:
        """Jobs this host owns and will not run (not started): released, with a NOTIFY.
        Returns whether some are ready, when the first delayed one is due, and the
        first deadline among them."""
        async def give(conn: Any) -> tuple[bool, float | None, float | None]:
            now = time.time()
            async with conn.transaction():
                rows = await conn.fetch(CLUSTER["release"], ids, self._host)
                later = [r[0] for r in rows if r[0] > now]
                deadlines = [r[1] for r in rows if r[1] is not None]
                notice: dict[str, Any] = {"h": self._host}
                if len(later) < len(rows):
                    notice["r"] = 1
                if later:
                    notice["d"] = min(later)
                if rows:
                    await conn.execute("SELECT pg_notify($1, $2)", self.channel,
                                       orjson.dumps(notice).decode())
                return (len(later) < len(rows), min(later) if later else None,
                        min(deadlines) if deadlines else None)

        return await self._on_cluster(give)  # type: ignore[no-any-return]

    async def expire_released(self, now: float, error: dict[str, Any]
                              ) -> tuple[list[int], float | None]:
        """Released jobs whose deadline passed unclaimed: expired (with a NOTIFY).
        Returns their ids and the next deadline of a released job."""
        async def expire(conn: Any) -> tuple[list[int], float | None]:
            async with conn.transaction():
                if await conn.fetchval(CLUSTER["fence"]) is None:
                    raise self.lease_lost()
                ids = [r[0] for r in await conn.fetch(
                    CLUSTER["expire_released"], now, orjson.dumps(error).decode())]
                if ids:
                    await conn.execute("SELECT pg_notify($1, $2)", self.channel, orjson.dumps(
                        {"h": self._host, "e": ids if len(ids) <= NOTICE_IDS else "*"}).decode())
                due = await conn.fetchval(CLUSTER["next_deadline"], now)
            return ids, due

        return await self._on_cluster(expire)

    async def released_by_queue(self, now: float) -> dict[str, int]:
        rows = await self._read(lambda c: c.fetch(CLUSTER["released_by_queue"], now))
        return {r[0]: r[1] for r in rows}

    async def reserve_ids(self, count: int) -> int:
        """count new job ids, consecutive: returns the first."""
        return int(await self._on_cluster(lambda c: c.fetchval(CLUSTER["ids"], count)))

    async def hosts(self) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: c.fetch(CLUSTER["hosts"]))
        return [{"id": r[0], "name": r[1], "pid": r[2], "socket": r[3], "workers": r[4],
                 "version": r[5], "started_at": r[6], "renewed_at": r[7],
                 "lease_left": round(r[8], 3), "alive": r[8] > 0} for r in rows]

    async def owners(self, ids: list[int]) -> dict[int, tuple[int | None, str]]:
        rows = await self._read(lambda c: c.fetch(CLUSTER["owners"], ids))
        return {r[0]: (r[1], r[2]) for r in rows}

    async def revive(self, job_id: int, status: str, now: float) -> bool:
        """An ended job back to pending, this host's (fenced, in a transaction of its
        own): False if it was no longer in that state (another host revived it)."""
        async def revive(conn: Any) -> bool:
            async with conn.transaction():
                if await conn.fetchval(CLUSTER["fence"]) is None:
                    raise self.lease_lost()
                return await conn.fetchval(CLUSTER["revive"], now, status, job_id) is not None

        return bool(await self._write(revive))

    async def cancel_released(self, job_id: int, now: float, error: dict[str, Any]) -> bool:
        """A released job (no host's), aborted before it started."""
        async def cancel(conn: Any) -> bool:
            async with conn.transaction():
                if await conn.fetchval(CLUSTER["fence"]) is None:
                    raise self.lease_lost()
                n = _rows(await conn.execute(CLUSTER["cancel_released"], now,
                                             orjson.dumps(error).decode(), job_id))
                if n:
                    await conn.execute("SELECT pg_notify($1, $2)", self.channel, orjson.dumps(
                        {"h": self._host, "e": [job_id]}).decode())
                return bool(n)

        return bool(await self._write(cancel))

    async def leave(self) -> None:
        """A clean stop: the jobs this host owns and did not start are released (with
        a NOTIFY), and its row goes; unless jobs it ran are still stored running
        (their ends were not stored): then its lease lapses and another host takes
        them over, as after a crash."""
        if self._host is None:
            return
        host = self._host

        async def go(conn: Any) -> None:
            async with conn.transaction():
                if await conn.fetchval(CLUSTER["fence"]) is None:
                    return
                released = _rows(await conn.execute(
                    "UPDATE jobs SET owner = NULL, worker_pid = NULL WHERE owner = $1"
                    " AND status = 'pending'", host))
                running = await conn.fetchval(
                    "SELECT COUNT(*) FROM jobs WHERE owner = $1 AND status = 'running'", host)
                if not running:
                    await conn.execute(CLUSTER["leave"], host)
                if released:
                    await conn.execute("SELECT pg_notify($1, $2)", self.channel,
                                       orjson.dumps({"h": host, "r": 1}).decode())

        try:
            await self._write(go)
        except StoreError as exc:
            log.warning("store %s: could not remove this host's row (%s); it lapses in a few"
                        " seconds", self.path, exc)

    # -- start-up -----------------------------------------------------------------

    async def recover_interrupted(
        self, now: float, decide: Callable[[Interrupted], tuple[str, Any]]
    ) -> tuple[int, int]:
        async def recover(conn: Any) -> tuple[int, int]:
            """Not used while the supervisor joins as a host (rescue() at join does this
            for the hosts gone from here); kept for the interface."""
            async with conn.transaction():
                # Rows held by a worker of the dead supervisor wait again, uncharged.
                await conn.execute("UPDATE jobs SET worker_pid = NULL WHERE status = 'pending'"
                                   " AND worker_pid IS NOT NULL")
                rows = await conn.fetch(
                    "SELECT id, attempts, interruptions, worker_pid, started_at FROM jobs"
                    " WHERE status = 'running' FOR UPDATE")
                requeued, failed = await _interrupt(conn, rows, decide, now)
            return len(requeued), len(failed)

        return await self._write(recover)

    async def load_pending(self, now: float) -> PendingSet:
        async def load(conn: Any) -> PendingSet:
            out = PendingSet()
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                cursor = conn.cursor(
                    "SELECT id, queue, task, priority, run_at, deadline, key FROM jobs"
                    " WHERE status = 'pending' ORDER BY queue, priority DESC, id",
                    prefetch=10_000)
                async for row in cursor:
                    out.add(row, now)
            return out

        return await self._read(load)

    async def last_job_id(self) -> int:
        return int(await self._read(lambda c: c.fetchval("SELECT COALESCE(MAX(id), 0) FROM jobs")))

    async def load_settings(self) -> dict[str, Any]:
        rows = await self._read(lambda c: c.fetch("SELECT name, value FROM settings"))
        return {name: orjson.loads(value) for name, value in rows}

    async def load_schedules(self) -> dict[str, tuple[float, float | None, int | None, str, str]]:
        rows = await self._read(lambda c: c.fetch(
            "SELECT name, next_run, last_run, last_job, cron, timezone FROM schedules"))
        return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows}

    # -- reads --------------------------------------------------------------------

    async def jobs_for_dispatch(self, ids: list[int]) -> dict[int, DispatchRow]:
        rows = await self._read(lambda c: c.fetch(
            "SELECT id, task, queue, args, attempts, max_attempts, timeout, abort_requested,"
            " run_id, priority, key, created_at, run_at, deadline FROM jobs"
            " WHERE id = ANY($1::bigint[]) AND status = 'pending'", ids))
        return {r[0]: DispatchRow(*r) for r in rows}

    async def get_jobs(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        id_list = list(ids)
        rows = await self._read(lambda c: c.fetch(
            _SELECT_JOB + " WHERE id = ANY($1::bigint[])", id_list))
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

        def param(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        for column, value in (("queue", queue), ("task", task), ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = {param(value)}")
        if status == "pending":
            where.append("status = 'pending'")
        elif status is not None:
            where.append(f"status = {param(status)}")
            if status in FINAL_STATES:
                where.append("finished_at IS NOT NULL")
        if before is not None:
            where.append(f"id < {param(before)}")
        sql = _SELECT_JOB + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY id DESC LIMIT {param(limit)}"
        rows = await self._read(lambda c: c.fetch(sql, *params))
        return [job_row_to_dict(r) for r in rows]

    async def unfinished_ids(self, run_id: str) -> list[int]:
        rows = await self._read(lambda c: c.fetch(
            "SELECT id FROM jobs WHERE run_id = $1 AND status IN ('pending', 'running')", run_id))
        return [r[0] for r in rows]

    async def ended_ids(self, status: str, queue: str | None = None,
                        task: str | None = None) -> list[int]:
        sql = "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND status = $1"
        params: list[Any] = [status]
        if queue is not None:
            params.append(queue)
            sql += f" AND queue = ${len(params)}"
        if task is not None:
            params.append(task)
            sql += f" AND task = ${len(params)}"
        rows = await self._read(lambda c: c.fetch(sql, *params))
        return [r[0] for r in rows]

    async def count_by_state(
        self, now: float, run_id: str | None = None, scheduled_ids: list[int] | None = None,
        running: Callable[[Callable[[], None]], tuple[dict[str, int], dict[str, int]]] | None = None,
    ) -> dict[str, Any]:
        """Counts by state and queue, from one snapshot; pending jobs due later count
        as 'scheduled' (with scheduled_ids, the only pending jobs that may be due
        later, only their rows are read). Running jobs are counted in the table (an
        index holds them: the supervisor's own count is for SQLite, see runcount.py)."""

        async def count(conn: Any) -> list[Any]:
            if run_id is not None:
                return list(await conn.fetch(
                    "SELECT queue, CASE WHEN status = 'pending' AND run_at > $1 THEN 'scheduled'"
                    " ELSE status END, COUNT(*) FROM jobs WHERE run_id = $2 GROUP BY 1, 2",
                    now, run_id))
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                rows = list(await conn.fetch(
                    "SELECT queue, status, COUNT(*) FROM jobs WHERE finished_at IS NOT NULL"
                    " GROUP BY status, queue"))
                rows += await conn.fetch(
                    "SELECT queue, 'running', COUNT(*) FROM jobs WHERE status = 'running'"
                    " GROUP BY queue")
                if scheduled_ids is None:  # every pending row read for its due time
                    rows += await conn.fetch(
                        "SELECT queue, CASE WHEN run_at > $1 THEN 'scheduled' ELSE 'pending' END,"
                        " COUNT(*) FROM jobs WHERE status = 'pending' GROUP BY 1, 2", now)
                    return rows
                # The supervisor knows the only jobs that may be due later: the pending
                # ones are counted from jobs_pending, and only those rows read.
                later = dict(await conn.fetch(
                    "SELECT queue, COUNT(*) FROM jobs WHERE id = ANY($1::bigint[])"
                    " AND status = 'pending' AND run_at > $2 GROUP BY queue",
                    scheduled_ids, now)) if scheduled_ids else {}
                for queue, n in await conn.fetch(
                        "SELECT queue, COUNT(*) FROM jobs WHERE status = 'pending' GROUP BY queue"):
                    rows.append((queue, "pending", n - later.get(queue, 0)))
                    if later.get(queue):
                        rows.append((queue, "scheduled", later[queue]))
                return rows

        rows = await self._read(count)
        return state_totals(rows)

    async def unfinished_with_key(self, key: str) -> int | None:
        """The unfinished job holding this key, whichever host stored it."""
        return await self._read(lambda c: c.fetchval(
            "SELECT id FROM jobs WHERE key = $1 AND status IN ('pending', 'running')", key))

    async def completed_with_key(self, key: str, since: float) -> dict[str, Any] | None:
        row = await self._read(lambda c: c.fetchrow(
            _SELECT_JOB + " WHERE key = $1 AND status = 'completed' AND finished_at >= $2"
            " ORDER BY finished_at DESC LIMIT 1", key, since))
        return job_row_to_dict(row) if row else None

    async def ended_before(self, cutoffs: dict[str, float], limit: int) -> list[tuple[int, str, float]]:
        async def fetch(conn: Any) -> list[tuple[int, str, float]]:
            out: list[tuple[int, str, float]] = []
            for status, cutoff in cutoffs.items():
                if len(out) >= limit:
                    break
                rows = await conn.fetch(
                    "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND status = $1"
                    " AND finished_at < $2 ORDER BY finished_at LIMIT $3",
                    status, cutoff, limit - len(out))
                out.extend((r[0], status, cutoff) for r in rows)
            return out

        return list(await self._read(fetch))

    async def oldest_finished(self, states: list[str]) -> dict[str, float]:
        rows = await self._read(lambda c: c.fetch(
            "SELECT status, MIN(finished_at) FROM jobs WHERE finished_at IS NOT NULL"
            " AND status = ANY($1::text[]) GROUP BY status", states))
        return {r[0]: float(r[1]) for r in rows if r[1] is not None}

    async def attempts_of(self, job_id: int) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: c.fetch(
            "SELECT attempt, status, error, worker_pid, started_at, finished_at,"
            " cpu_seconds, peak_rss FROM attempts WHERE job_id = $1 ORDER BY seq", job_id))
        return [
            {
                "attempt": attempt, "status": status,
                "error": orjson.loads(error) if error else None,
                "worker_pid": pid, "started_at": started, "finished_at": finished,
                "duration": (finished - started) if started and finished else None,
                "cpu_seconds": cpu, "peak_rss": rss,
            }
            for attempt, status, error, pid, started, finished, cpu, rss in rows
        ]

    async def file_size(self) -> int:
        """The bytes the schema's tables and indexes take."""
        return int(await self._read(lambda c: c.fetchval(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind = 'r'", self.schema)))


# Ended jobs named in one NOTIFY at most (its payload holds 8,000 bytes); more: "*".
NOTICE_IDS = 500
_ENDING = frozenset({"finish", "cancel_pending"})


def _notice(ops: list[Op], now: float, host: int | None) -> str | None:
    """The NOTIFY of a transaction (one at most), for other hosts: "r" released jobs
    are ready, "d" the earliest due time of released delayed jobs, "e" the jobs
    that ended (their waiters and watchers may be elsewhere)."""
    if host is None:
        return None
    ready = False
    due: float | None = None
    ended: list[int] = []
    for kind, params in ops:
        if kind in _ENDING:
            ended.append(params[-1])
        elif kind == "add_released":
            run_at = params[8]
            if run_at <= now:
                ready = True
            elif due is None or run_at < due:
                due = run_at
    if not ready and due is None and not ended:
        return None
    notice: dict[str, Any] = {"h": host}
    if ready:
        notice["r"] = 1
    if due is not None:
        notice["d"] = due
    if ended:
        notice["e"] = ended if len(ended) <= NOTICE_IDS else "*"
    return orjson.dumps(notice).decode()


async def _interrupt(conn: Any, rows: list[Any], decide: Callable[[Interrupted], tuple[str, Any]],
                     now: float) -> tuple[list[int], list[int]]:
    """Running jobs whose supervisor (host) died: each gets an interrupted attempt and
    runs again, uncharged, or fails (decide() says which). Returns (requeued, failed)."""
    requeued, failed = [], []
    for row in rows:
        job = Interrupted(*row)
        status, err = decide(job)
        err_text = orjson.dumps(err).decode() if err is not None else None
        await conn.execute(CLUSTER["interrupted_attempt"], job.id, job.attempts, err_text,
                           job.worker_pid, job.started_at, now)
        if status == "failed":
            failed.append(job.id)
            await conn.execute(CLUSTER["interrupted_fail"], now, err_text, job.id)
        else:
            requeued.append(job.id)
            await conn.execute(CLUSTER["interrupted_again"], now, job.id)
    return requeued, failed


def _dollar(text: str) -> str:
    """text as a dollar-quoted literal (whatever the server's string settings)."""
    tag = "$hq$"
    n = 0
    while tag in text:
        n += 1
        tag = f"$hq{n}$"
    return f"{tag}{text}{tag}"


def _clean(params: tuple[Any, ...]) -> tuple[Any, ...]:
    """PostgreSQL's text cannot hold NUL, which SQLite stores: a progress message or a
    name with one would fail its whole batch again and again. NUL becomes U+FFFD.
    (JSON texts never hold a raw NUL: orjson writes it as \u0000.)"""
    for p in params:
        if type(p) is str and "\x00" in p:
            return tuple(q.replace("\x00", "\ufffd") if type(q) is str else q for q in params)
    return params


async def _apply_ops(conn: Any, ops: list[Op]) -> int:
    """Every write of a batch, in the open transaction: runs of one guarded update as
    one statement over arrays, other runs by executemany. Returns how many guarded
    transitions found their job in another state."""
    refused = 0
    i, n = 0, len(ops)
    while i < n:
        kind = ops[i][0]
        j = i + 1
        while j < n and ops[j][0] == kind:
            j += 1
        run = [_clean(p) for _, p in ops[i:j]]
        if len(run) == 1:
            changed = _rows(await conn.execute(WRITES[kind], *run[0]))
        elif kind in _BATCHED:
            ids = [p[-1] for p in run]
            if len(set(ids)) == len(ids):
                columns = [list(c) for c in zip(*run)]
                changed = _rows(await conn.execute(_BATCHED[kind], *columns))
            else:
                # One job twice in the run (progress written twice, writes retried):
                # UPDATE ... FROM would apply one of them, not the last; in order instead.
                changed = 0
                for p in run:
                    changed += _rows(await conn.execute(WRITES[kind], *p))
        else:
            await conn.executemany(WRITES[kind], run)
            changed = j - i
        if kind in TRANSITION_WRITES:
            refused += (j - i) - changed
        i = j
    return refused


def _rows(status: str) -> int:
    """Rows changed, from a command status such as "UPDATE 3" or "INSERT 0 5"."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0

