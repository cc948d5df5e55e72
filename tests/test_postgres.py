"""The PostgreSQL store's own behaviour (the protocol, jobs, durability and
operations suites run on it too: their modules set BOTH_STORES).

Every test talks to a real server (conftest.postgres_dsn: $HOSTQUEUE_TEST_POSTGRES,
the local one, or a throwaway cluster; else they skip, saying why) in a schema
of its own, dropped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from conftest import TASKS, HQEnv, ok, pg_run, wait_for

pytestmark = pytest.mark.postgres


@pytest.mark.timeout(60)
def test_jobs_survive_the_loss_of_the_connection(pg: HQEnv) -> None:
    """The server ends the supervisor's connections (pg_terminate_backend, as a
    failover or an idle-connection killer would) while jobs run and clients submit:
    the supervisor connects again, takes its lock back, and every acknowledged
    job completes once; none is lost or run twice."""
    sup = pg.supervisor(workers=2)
    dsn = pg.pg_dsn or ""
    log = pg.path("runs.log")
    acked: list[int] = []
    with sup.conn(30) as c:
        for n in range(20):
            acked += ok(c.request("submit_many", task=f"{TASKS}.record",
                                  args=[{"log": log, "tag": f"a{n}-{i}"} for i in range(50)],
                                  reply="ids"))["ids"]
    killed = pg_run(dsn, None, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name LIKE 'hostqueue % pid %' AND pid <> pg_backend_pid()"
                    " AND application_name LIKE ?", (f"% pid {sup.pid} %",))
    assert killed, "no connection of the supervisor was found to end"
    # Submits after the loss: refused while it reconnects (store_error), or acknowledged.
    deadline = time.monotonic() + 20
    with sup.conn(30) as c:
        while len(acked) < 1500 and time.monotonic() < deadline:
            reply = c.request("submit_many", task=f"{TASKS}.record",
                              args=[{"log": log, "tag": f"b{len(acked)}-{i}"} for i in range(50)],
                              reply="ids")
            if reply.get("ok"):
                acked += reply["ids"]
    assert len(acked) >= 1500, "submits were refused for 20 s after the connection was lost"

    def done() -> bool:
        rows = sup.db_query("SELECT COUNT(*) FROM jobs WHERE status = 'completed'")
        return bool(rows[0][0] >= len(acked))

    wait_for(done, 40, "every acknowledged job to complete", interval=0.2)
    rows = sup.db_query("SELECT id, status FROM jobs")
    assert sorted(r[0] for r in rows) == sorted(acked)
    assert {r[1] for r in rows} == {"completed"}
    with open(log) as f:
        tags = [line.split()[0] for line in f if line.strip()]
    assert len(tags) == len(set(tags)) == len(acked), "a job ran twice, or not at all"
    assert "connected again" in sup.log_text()
    assert sup.proc is not None and sup.proc.poll() is None


@pytest.mark.timeout(30)
def test_a_schema_of_something_else_is_refused_untouched(pg: HQEnv) -> None:
    """A schema holding other tables is not a store: refused with a clear error, and
    nothing in it is changed."""
    sup = pg.supervisor(workers=1, start=False)
    dsn, schema = pg.pg_dsn or "", sup.pg_schema
    pg_run(dsn, None, f'CREATE SCHEMA "{schema}"')
    pg_run(dsn, schema, "CREATE TABLE invoices (id int)")
    sup.start(wait=False)
    assert sup.wait_exit(20) == 1
    text = sup.log_text()
    assert "not a hostqueue store" in text and "invoices" in text, text
    tables = pg_run(dsn, None, "SELECT tablename FROM pg_tables WHERE schemaname = ?", (schema,))
    assert sorted(r[0] for r in tables) == ["invoices", "schema_version"] or \
        sorted(r[0] for r in tables) == ["invoices"], tables


@pytest.mark.timeout(30)
def test_the_password_is_never_shown(pg: HQEnv) -> None:
    """A URL's password is kept out of the log, `status` and the process title."""
    dsn = (pg.pg_dsn or "").replace("postgres@", "postgres:s3cret-pw@")
    sup = pg.supervisor(workers=1, start=False)
    sup.store = dsn
    sup.start()
    status = sup.status()
    assert "s3cret-pw" not in str(status) and "***" in status["store"], status
    assert "s3cret-pw" not in sup.log_text()
    import psutil

    assert "s3cret-pw" not in " ".join(psutil.Process(sup.pid).cmdline()[:1])


@pytest.mark.timeout(30)
def test_an_unreachable_server_is_named(pg: HQEnv) -> None:
    """No server at the URL: the supervisor exits 1 saying what it tried and what to check."""
    sup = pg.supervisor(workers=1, start=False)
    sup.store = "postgresql://postgres@127.0.0.1:1/nothing"
    sup.start(wait=False)
    assert sup.wait_exit(30) == 1
    text = sup.log_text()
    assert "cannot connect to PostgreSQL store postgresql://postgres@127.0.0.1:1/nothing" in text, text
    assert "is the server running" in text


@pytest.mark.timeout(60)
def test_a_restart_finds_the_jobs_and_settings_it_left(pg: HQEnv) -> None:
    """Pending jobs, a pause and the pool size kept in the schema come back after a
    restart, and ids go on from the highest stored."""
    sup = pg.supervisor(workers=2)
    assert sup.call("pause", "paused", queue="default") == ["default"]
    ids = ok(sup.request("submit_many", task=f"{TASKS}.add", args=[{"a": i, "b": 1} for i in range(30)],
                         reply="ids"))["ids"]
    assert ok(sup.request("scale", n=3))
    assert sup.stop() == 0
    sup.start(workers=None)
    status = sup.status()
    assert status["paused"] == ["default"] and status["target_workers"] == 3, status
    assert sup.call("resume", "paused", queue="default") == []
    for job_id, i in zip(ids, range(30)):
        assert sup.wait_job(job_id)["result"] == i + 1
    new = sup.submit("add", {"a": 1, "b": 1})
    assert new["id"] > max(ids)


@pytest.mark.timeout(60)
def test_stats_and_listing_read_the_schema(pg: HQEnv) -> None:
    """stats counts by state and queue; list filters by state; the attempt log
    keeps each failed attempt; retry brings a failed job back."""
    sup = pg.supervisor(workers=2)
    done = [sup.submit("add", {"a": i, "b": 0}, queue="q1")["id"] for i in range(5)]
    failed = sup.submit("fail", {"message": "nope"}, retries=1)["id"]
    for job_id in done:
        sup.wait_job(job_id)
    assert sup.wait_job(failed)["status"] == "failed"
    stats = sup.call("stats", "stats")
    assert stats["completed"] == 5 and stats["failed"] == 1, stats
    assert stats["queues"]["q1"]["completed"] == 5
    listed = sup.call("list", "jobs", status="failed")
    assert [j["id"] for j in listed] == [failed]
    shown = ok(sup.request("get", job=failed))["job"]
    assert [a["status"] for a in shown["attempt_log"]] == ["retrying", "failed"], shown
    assert ok(sup.request("retry", job=failed))
    assert sup.wait_job(failed)["status"] == "failed"


@pytest.mark.timeout(30)
def test_pg_schema_must_be_a_plain_name(pg: HQEnv) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hostqueue", "run", "--store", pg.pg_dsn or "", "--pg-schema", "x; drop",
         "--socket", pg.path("x.sock")], env=pg.env(), capture_output=True, text=True, timeout=20,
        cwd=str(pg.dir))
    assert result.returncode != 0
    assert "pg_schema must be a plain PostgreSQL name" in result.stdout + result.stderr


PROGRESS_TASKS = '''
import time

import hostqueue


@hostqueue.task
def nul_progress(ctx):
    ctx.progress(0.5, "half\\x00way")
    time.sleep(0.3)  # long enough for the progress sampler to store it
    return "done"
'''


@pytest.mark.timeout(60)
def test_a_nul_in_a_progress_message_does_not_wedge_the_store(pg: HQEnv) -> None:
    """PostgreSQL text cannot hold NUL (SQLite stores it): a progress message with one
    is stored with U+FFFD in its place, instead of failing its batch for ever (every
    submit refused until a restart, and the job run again after it)."""
    (pg.dir / "nultasks.py").write_text(PROGRESS_TASKS)
    sup = pg.supervisor(workers=1, start=False)
    sup.start("--tasks", str(pg.dir / "nultasks.py"))
    job = ok(sup.request("submit", task="nultasks.nul_progress", wait=True, timeout=20))["job"]
    assert job["status"] == "completed", job
    after = sup.submit("add", {"a": 1, "b": 2})
    assert sup.wait_job(after["id"])["result"] == 3
    stored = sup.db_job(job["id"])
    assert stored["status"] == "completed"
    assert stored["progress_message"] in ("half\ufffdway", None), stored
    assert "retrying in" not in sup.log_text()


@pytest.mark.timeout(60)
def test_one_job_twice_in_a_batch_keeps_the_last_write(pg: HQEnv) -> None:
    """Writes about one job can meet in one batch (progress stored twice while a commit
    waits; writes retried after a failure): the last one wins, as on SQLite
    (UPDATE ... FROM over arrays would apply one of them, not necessarily the last).
    The store is driven directly, on a real server."""
    import asyncio

    from hostqueue.store import WriteBatch
    from hostqueue.store.postgres import PostgresStore

    schema = f"{pg.pg_prefix}_direct"

    async def run() -> tuple[Any, int]:
        store = PostgresStore(pg.pg_dsn or "", schema)
        await store.open()
        try:
            first = WriteBatch()
            first.add_submit(1, 2, (1, "t.x", "default", 1, 0, None, None, 1.0, 1.0, None, None,
                                    '["{}", "{}"]'), [], lambda: None, lambda e: None)
            await store.apply(first)
            batch = WriteBatch()
            batch.add("start", (1, 2.0, 111, "pending", 1))
            batch.add("start", (1, 2.0, 111, "pending", 2))
            batch.add("record_progress", (0.1, "first", 1))
            batch.add("record_progress", (0.2, "other", 2))
            batch.add("record_progress", (0.9, "second", 1))
            batch.add("finish", ("completed", "1", None, 3.0, None, None, None, None, 1, 2.0,
                                 111, "running", 1))
            batch.add("finish", ("completed", "1", None, 3.0, None, None, None, None, 1, 2.0,
                                 111, "running", 1))  # again: refused by its guard
            await store.apply(batch)
            return await store.get_job(1), store.refused_transitions()
        finally:
            await store.close()

    job, refused = asyncio.run(run())
    assert job is not None
    assert (job["progress"], job["progress_message"]) == (0.9, "second"), job
    assert job["status"] == "completed"
    assert refused == 1


class CutAtCommit:
    """A TCP proxy to the PostgreSQL server that, once armed, breaks the connection
    when the server's answer to a statement with the given tag (b"COMMIT", b"INSERT
    ...") comes by: that answer never reaches the client (the server has done it)."""

    def __init__(self, host: str, port: int) -> None:
        import socket as socketlib
        import threading

        self.target = (host, port)
        self.listener = socketlib.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed: bytes | None = None
        self.cuts = 0
        self.threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()

    def _accept(self) -> None:
        import socket as socketlib
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socketlib.create_connection(self.target)
            for src, dst, parse in ((client, server, False), (server, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, parse, client, server),
                                     daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: Any, dst: Any, parse: bool, client: Any, server: Any) -> None:
        import struct

        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not parse:
                    dst.sendall(data)
                    continue
                buf += data
                out = b""
                while len(buf) >= 5:
                    kind, length = buf[:1], struct.unpack("!I", buf[1:5])[0]
                    if len(buf) < 1 + length:
                        break
                    message, buf = buf[:1 + length], buf[1 + length:]
                    if kind == b"C" and self.armed is not None and message[5:].startswith(self.armed):
                        self.armed = None
                        self.cuts += 1
                        dst.sendall(out)
                        raise ConnectionAbortedError("cut")
                    out += message
                dst.sendall(out)
        except OSError:
            pass
        finally:
            import socket as socketlib

            for s in (client, server):
                try:  # shutdown first: it wakes the other pump's recv, and sends FIN now
                    s.shutdown(socketlib.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.timeout(60)
def test_a_commit_whose_answer_is_lost_is_found_stored_or_not(pg: HQEnv) -> None:
    """The connection breaks as the server answers COMMIT (the batch is stored, the
    answer lost): apply() finds its number in the store and succeeds. Broken before
    COMMIT (after an INSERT's answer): apply() fails, and nothing was stored."""
    import asyncio
    from urllib.parse import urlsplit, urlunsplit

    from hostqueue.store import StoreError, WriteBatch
    from hostqueue.store.postgres import PostgresStore

    dsn = pg.pg_dsn or ""
    parts = urlsplit(dsn)
    proxy = CutAtCommit(parts.hostname or "127.0.0.1", parts.port or 5432)
    netloc = parts.netloc.rsplit("@", 1)
    via = urlunsplit(parts._replace(netloc=f"{netloc[0]}@127.0.0.1:{proxy.port}" if len(netloc) == 2
                                    else f"127.0.0.1:{proxy.port}"))
    via += ("&" if "?" in via else "?") + "sslmode=disable"
    schema = f"{pg.pg_prefix}_cut"

    def submit(first: int) -> WriteBatch:
        batch = WriteBatch()
        batch.add_submit(first, 1, (first, "t.x", "default", 1, 0, None, None, 1.0, 1.0, None,
                                    None, '["{}"]'), [], lambda: None, lambda e: None)
        return batch

    async def run() -> tuple[Any, Any, str]:
        store = PostgresStore(via, schema)
        await store.open()
        try:
            await store.join("test", os.getpid(), "/nowhere", 1, "test", 30.0, lambda pid: True)
            proxy.armed = b"COMMIT"
            await store.apply(submit(1))  # stored; its answer lost: no error
            proxy.armed = b"INSERT"
            error = ""
            try:
                await store.apply(submit(2))
            except StoreError as exc:
                error = str(exc)
            return await store.get_job(1), await store.get_job(2), error
        finally:
            await store.close()
            proxy.close()

    first, second, error = asyncio.run(run())
    assert proxy.cuts == 2
    assert first is not None and first["status"] == "pending"
    assert second is None and error and "lease" not in error, (second, error)
