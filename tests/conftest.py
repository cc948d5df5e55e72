"""Shared fixtures and helpers for hostqueue's process tests.

Every test runs a real ``python -m hostqueue run`` in a session of its own, on a
store and socket in a fresh ``/tmp/hq-*`` directory, with the task module below
written into that directory. Nothing of hostqueue is mocked.

How processes are found and cleaned up: the supervisor is started with
``start_new_session=True``, so its session id is its pid. Workers are started in
their own process groups, but they stay in the supervisor's session, even once
orphaned. So "every process this supervisor ever started" is "every process whose
session id is the supervisor's pid", which the teardown kills, whatever happened.

Helpers:

- ``wait_for(predicate, timeout, message)``: retry quickly until truthy, else fail.
- ``Conn``: a raw newline-delimited JSON connection (``request``, ``send``,
  ``send_raw``, ``read``, ``events``).
- ``Supervisor``: start/stop/signal a supervisor, talk to it, read its store
  with sqlite3, list its workers with psutil.
- fixture ``hq``: an ``HQEnv`` (temp dir, task module, supervisor factory) that
  cleans up everything it started.

Both stores: a test module that sets ``BOTH_STORES = True`` runs each of its
tests twice, on a SQLite file and on a PostgreSQL schema of its own (dropped
after the test). The server is ``$HOSTQUEUE_TEST_POSTGRES`` (a URL), else the
local one if it answers on 127.0.0.1:5432 (database ``test``), else a
throwaway cluster made with ``initdb``/``pg_ctl`` when they are on PATH (not as
root: initdb refuses it), else those tests skip, saying why. ``db_query`` reads
either store: write its SQL with ``?`` placeholders. ``HQ_TEST_STORE=postgres``
runs every other test on PostgreSQL instead (by hand: most read the SQLite file).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASKS = "hqtasks"  # module name of the task file; task names are hqtasks.<function>
FINAL = ("completed", "failed", "cancelled", "expired")
WORKER_TITLE = re.compile(r"hostqueue[. ]worker")  # before and after setproctitle

TASKS_SOURCE = textwrap.dedent(
    '''
    """Tasks for hostqueue's test suite (written by tests/conftest.py)."""
    import os
    import time

    import hostqueue

    # Fast retries, so that tests of retries do not wait seconds of backoff.
    FAST = dict(backoff_base=0.05, backoff_cap=0.2)


    def _append(path, text):
        with open(path, "a") as f:
            f.write(text + "\\n")


    def _lines(path):
        try:
            with open(path) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []


    @hostqueue.task
    def noop(ctx):
        return None


    @hostqueue.task
    def add(ctx, a, b):
        return a + b


    @hostqueue.task(retries=3, **FAST)
    def fail(ctx, message="boom"):
        raise ValueError(message)


    @hostqueue.task(retries=3, **FAST)
    def permanent(ctx, message="bad input"):
        raise hostqueue.Permanent(message)


    @hostqueue.task
    def slow(ctx, seconds=1.0, steps=5):
        """Take `seconds` in `steps` steps, reporting progress after each."""
        for i in range(1, steps + 1):
            time.sleep(seconds / steps)
            ctx.progress(i / steps, f"step {i}/{steps}")
        return {"steps": steps}


    @hostqueue.task(**FAST)
    def block(ctx, marker, release, seconds=30.0):
        """Append "job attempt pid" to `marker` when it starts, then wait until the
        file `release` exists (or `seconds` pass)."""
        _append(marker, f"{ctx.job_id} {ctx.attempt} {os.getpid()}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if os.path.exists(release):
                return {"released": True, "pid": os.getpid()}
            time.sleep(0.01)
        return {"released": False, "pid": os.getpid()}


    @hostqueue.task
    def unserializable(ctx):
        return {1, 2, 3}


    @hostqueue.task
    def abortable(ctx, marker, seconds=30.0):
        """Say it started, then check for an abort every 10 ms for `seconds`."""
        _append(marker, f"{ctx.job_id} {ctx.attempt} {os.getpid()}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if ctx.aborted:
                ctx.check_abort()  # raises hostqueue.Aborted
            time.sleep(0.01)
        return "not aborted"


    @hostqueue.task(**FAST)
    def record(ctx, log, tag, sleep=0.0):
        """Append "tag job attempt pid" to `log`: one line per run (counts runs, shows order)."""
        if sleep:
            time.sleep(sleep)
        _append(log, f"{tag} {ctx.job_id} {ctx.attempt} {os.getpid()}")
        return tag


    @hostqueue.task(retries=3, **FAST)
    def flaky(ctx, log, fail_times=1):
        """Fail while `log` has at most `fail_times` runs in it (this one included)."""
        _append(log, f"{ctx.job_id} {ctx.attempt} {os.getpid()}")
        runs = len(_lines(log))
        if runs <= fail_times:
            raise ValueError(f"flaky: run {runs} fails")
        return {"runs": runs}


    # --- tasks of tests/test_lifecycle.py

    @hostqueue.task(retries=2, backoff_base=0.2, backoff_factor=2, backoff_cap=10)
    def backoff_fail(ctx):
        raise ValueError(f"backoff: attempt {ctx.attempt} fails")


    @hostqueue.task(retries=1, backoff_base=5, backoff_cap=60)
    def retry_later(ctx, delay=0.5):
        """Ask for a retry in `delay` s (the task's own backoff would wait >= 3.75 s)."""
        raise hostqueue.Retry(f"not yet (attempt {ctx.attempt})", delay=delay)


    @hostqueue.task(retries=3, backoff_base=60, backoff_cap=600)
    def retry_once(ctx, delay=5.0):
        """Retry in `delay` s at the first attempt; succeed from the second."""
        if ctx.attempt < 2:
            raise hostqueue.Retry("come back later", delay=delay)
        return {"attempt": ctx.attempt}


    @hostqueue.task(retries=2, **FAST)
    def fail_numbered(ctx):
        raise ValueError(f"failure of attempt {ctx.attempt}")


    @hostqueue.task
    def sleeper(ctx, seconds=5.0):
        time.sleep(seconds)
        return "woke"


    @hostqueue.task
    def stubborn(ctx, marker, catch="base", seconds=30.0):
        """Ignore the time limit: catch TimeLimit (as BaseException or by name), keep sleeping."""
        caught = BaseException if catch == "base" else hostqueue.TimeLimit
        _append(marker, f"{ctx.job_id} {ctx.attempt} {os.getpid()} started")
        try:
            time.sleep(seconds)
        except caught as exc:
            _append(marker, f"{ctx.job_id} {ctx.attempt} {os.getpid()} caught {type(exc).__name__}")
            time.sleep(seconds)
        return "survived"


    @hostqueue.task(retries=1, **FAST)
    def exit_code(ctx, code=3):
        os._exit(code)


    @hostqueue.task(retries=1, **FAST)
    def segfault(ctx):
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)


    @hostqueue.task
    def allocate(ctx, size=50_000_000, sleep=0.1):
        """Hold `size` bytes, every page touched, for `sleep` seconds."""
        data = bytearray(size)
        for i in range(0, size, 4096):
            data[i] = 1
        time.sleep(sleep)
        return len(data)


    @hostqueue.task
    def burn(ctx, seconds=0.2):
        """Busy-loop for `seconds` of wall time."""
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
        return n


    @hostqueue.task(retries=2)
    def retry_now(ctx):
        """Ask for an immediate retry every time (Retry(delay=0))."""
        raise hostqueue.Retry(f"again after attempt {ctx.attempt}", delay=0)


    # --- tasks of tests/test_recycling.py

    _HOARD = []  # what `hoard` keeps: it stays in the worker after the job


    @hostqueue.task
    def hoard(ctx, mb=100):
        """Allocate `mb` MB (every page written) and keep it in a module-level list."""
        _HOARD.append(b"\\x01" * (mb * 1024 * 1024))
        return {"pid": os.getpid(), "held_mb": sum(len(b) for b in _HOARD) // (1024 * 1024)}


    # --- tasks of tests/test_reliability.py, tests/test_store_faults.py, tests/test_fuzz.py

    @hostqueue.task(retries=100, **FAST)
    def runlog(ctx, log, token, sleep=0.003):
        """Append "token job attempt pid" to `log` with one O_APPEND write (whole lines, never
        interleaved, one per execution), then sleep. Many retries: a job may be interrupted
        by several supervisor kills in a row."""
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{token} {ctx.job_id} {ctx.attempt} {os.getpid()}\\n".encode())
        finally:
            os.close(fd)
        if sleep:
            time.sleep(sleep)
        return token


    @hostqueue.task
    def blob(ctx, data="", token=None, result_size=0, release=None):
        """Take a big argument; return its length (or, with result_size, that many bytes,
        once the file `release` exists if given)."""
        if release:
            end = time.monotonic() + 30
            while not os.path.exists(release) and time.monotonic() < end:
                time.sleep(0.01)
        return "r" * result_size if result_size else len(data)


    def _vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize in /proc/self/status")


    @hostqueue.task(retries=0)
    def memhog(ctx, marker, headroom_mb=64, chunk_mb=4):
        """Limit this process's address space (RLIMIT_AS) to what it uses plus `headroom_mb`,
        then allocate until the limit stops it (MemoryError, or the worker dies)."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _vm_size() + headroom_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        _append(marker, f"{ctx.job_id} {ctx.attempt} {os.getpid()} limit {limit}")
        hoard = []
        while True:
            hoard.append(bytearray(chunk_mb * 1024 * 1024))


    @hostqueue.task(retries=0)
    def close_stdout(ctx, marker, text="written to a closed stdout"):
        """Close file descriptor 1 under the worker, then print to it."""
        _append(marker, f"{ctx.job_id} {ctx.attempt} {os.getpid()}")
        os.close(1)
        print(text, flush=True)
        return "printed"


    @hostqueue.task
    def print_to(ctx, path, text):
        """Open `path`, print `text` to stdout, close `path`: what lands in the file is only
        what the task wrote to it (a stdout reusing a freed descriptor would leak into it)."""
        with open(path, "w") as f:
            print(text, flush=True)
            f.write("file content\\n")
        return {"pid": os.getpid()}
    '''
)


# ---------------------------------------------------------------------------
# waiting


def wait_for(predicate: Callable[[], Any], timeout: float, message: str,
             interval: float = 0.02) -> Any:
    """Call ``predicate`` until it returns something truthy (returned), else fail
    after ``timeout`` seconds. Exceptions count as "not yet" and the last one is
    shown on failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - "not yet"
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message} (last: {last!r})")
        time.sleep(interval)


def file_lines(path: str | Path) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------
# the wire


class Conn:
    """A raw connection to the control socket: one JSON object per line each way."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.next_id = 0
        self.stash: list[dict[str, Any]] = []  # messages read while looking for another id

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(json.dumps(message).encode() + b"\n")

    def send_op(self, op: str, /, **fields: Any) -> int:
        """Send a request with a fresh id; return the id."""
        self.next_id += 1
        self.send({"id": self.next_id, "op": op, **fields})
        return self.next_id

    def read_line(self, timeout: float | None = None) -> bytes:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the supervisor closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def read(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message on the connection (stashed ones first)."""
        if self.stash:
            return self.stash.pop(0)
        return json.loads(self.read_line(timeout))

    def read_for(self, request_id: Any, timeout: float | None = None) -> dict[str, Any]:
        """The next message tagged with ``request_id``; others are stashed."""
        for i, msg in enumerate(self.stash):
            if msg.get("id") == request_id:
                return self.stash.pop(i)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = json.loads(self.read_line(max(0.01, deadline - time.monotonic())))
            if msg.get("id") == request_id:
                return msg
            self.stash.append(msg)

    def request(self, op: str, /, reply_timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request; return its whole reply (``{"id", "ok", ...}``). (Not ``timeout``:
        that is a field of some ops.)"""
        rid = self.send_op(op, **fields)
        return self.read_for(rid, reply_timeout)

    def events(self, request_id: Any, timeout: float = 10.0) -> Iterator[dict[str, Any]]:
        """Messages of a stream, forever (the caller stops); each read waits at most
        ``timeout`` seconds."""
        while True:
            yield self.read_for(request_id, timeout)


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply.get("ok") is True, f"expected ok reply, got {reply}"
    return reply


def error_code(reply: dict[str, Any]) -> str:
    assert reply.get("ok") is False, f"expected an error reply, got {reply}"
    return str(reply["error"]["code"])


# ---------------------------------------------------------------------------
# processes


def session_processes(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session ``sid``."""
    found = []
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        try:
            if os.getsid(pid) != sid:
                continue
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has stopped running)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def integrity(store: str | Path) -> str:
    conn = sqlite3.connect(str(store), timeout=10)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# -- PostgreSQL ---------------------------------------------------------------------

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
_pg_server: dict[str, Any] = {}


def _pg_answers(dsn: str) -> str | None:
    """None when a server answers at dsn with a usable database, else why not."""
    import asyncio

    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[test]')"

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _throwaway_cluster() -> tuple[str | None, str]:
    """A PostgreSQL cluster of our own in a temp dir (initdb, pg_ctl); (dsn, why not)."""
    import glob
    import shutil as sh

    initdb = sh.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if initdb is None:
        return None, "no server answers on 127.0.0.1:5432 and initdb is not installed"
    if os.geteuid() == 0:
        return None, "no server answers on 127.0.0.1:5432, and initdb will not run as root"
    pg_ctl = os.path.join(os.path.dirname(initdb), "pg_ctl")
    data = tempfile.mkdtemp(prefix="hq-pg-")
    port = 25432 + os.getpid() % 1000
    subprocess.run([initdb, "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([pg_ctl, "-D", data, "-l", os.path.join(data, "log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=120)
    import atexit

    atexit.register(lambda: subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "stop"],
                                           capture_output=True, timeout=60))
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", ""


def postgres_dsn() -> str:
    """The test server's URL (see the module's docstring), or skip the test saying why."""
    if "dsn" not in _pg_server:
        dsn = os.environ.get("HOSTQUEUE_TEST_POSTGRES")
        why = None
        if dsn:
            why = _pg_answers(dsn)
            if why:
                why = f"HOSTQUEUE_TEST_POSTGRES={dsn} does not answer: {why}"
        else:
            why = _pg_answers(LOCAL_POSTGRES)
            if why is None:
                dsn = LOCAL_POSTGRES
            else:
                try:
                    dsn, why = _throwaway_cluster()
                except (subprocess.SubprocessError, OSError) as exc:
                    dsn, why = None, f"a throwaway cluster would not start: {exc}"
        _pg_server["dsn"], _pg_server["why"] = (dsn, None) if not why else (None, why)
    if _pg_server["dsn"] is None:
        pytest.skip(f"PostgreSQL tests need a server: {_pg_server['why']}")
    return str(_pg_server["dsn"])


def pg_run(dsn: str, schema: str | None, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """One statement on the test server, in schema (its search_path); ``?`` placeholders."""
    import asyncio

    import asyncpg

    n = 0

    def number(_: Any) -> str:
        nonlocal n
        n += 1
        return f"${n}"

    text = re.sub(r"\?", number, sql)

    async def run() -> list[Any]:
        settings = {"search_path": schema} if schema else {}
        conn = await asyncpg.connect(dsn, timeout=10, server_settings=settings)
        try:
            return list(await conn.fetch(text, *params))
        finally:
            await conn.close()

    return asyncio.run(run())


class Supervisor:
    """One supervisor (restartable) on a store and socket in the test's temp dir."""

    def __init__(self, env: "HQEnv", name: str, workers: int | None, grace: float,
                 store: Path | None = None, socket_path: Path | None = None) -> None:
        self.env = env
        self.name = name
        self.workers_arg = workers
        self.grace = grace
        # On PostgreSQL: the server's URL, and a schema of the test's own.
        self.pg_schema = f"{env.pg_prefix}_{name}" if env.pg_dsn and store is None else None
        self.store: Any = env.pg_dsn if self.pg_schema else (store or env.dir / f"{name}.db")
        self.socket = socket_path or env.dir / f"{name}.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.log_paths: list[Path] = []
        self.seen_workers: dict[int, psutil.Process] = {}
        self.extra_args: tuple[str, ...] = ()

    # -- life

    def command(self, extra_args: tuple[str, ...] = (), workers: Any = "default") -> list[str]:
        workers = self.workers_arg if workers == "default" else workers
        cmd = [
            sys.executable, "-m", "hostqueue", "run",
            "--store", str(self.store), "--socket", str(self.socket),
            "--tasks", str(self.env.tasks_path), "--grace", str(self.grace),
        ]
        if self.pg_schema:
            cmd += ["--pg-schema", self.pg_schema]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        return cmd + list(extra_args)

    def start(self, *extra_args: str, workers: Any = "default", wait: bool = True) -> "Supervisor":
        """Start (or restart) the supervisor; with ``wait``, until it answers ping
        and every worker it starts with is idle. Extra arguments are kept for the
        restarts that name none."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if extra_args:
            self.extra_args = extra_args
        extra_args = self.extra_args
        self.starts += 1
        log_path = self.env.dir / f"{self.name}-{self.starts}.log"
        self.log_paths.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = self.env.popen(self.command(extra_args, workers), log)
        if wait:
            self.wait_ready()
        return self

    def start_serving(self, timeout: float = 20.0) -> None:
        """(Re)start and wait until the socket answers in state running (not until every
        worker is idle, as ``start`` does: with a backlog they never all are)."""
        self.start(wait=False)

        def serving() -> str | bool:
            if self.proc is not None and self.proc.poll() is not None:
                return "exited"
            return self.ping()["state"] == "running"

        if wait_for(serving, timeout, "the supervisor to answer ping") == "exited":
            raise AssertionError(f"the supervisor exited at start:\n{self.log_text()[-3000:]}")

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log_text()}")
            st = self.status()
            if st["state"] != "running" or len(st["workers"]) != st["target_workers"]:
                return None
            return st if all(w["state"] == "idle" for w in st["workers"]) else None

        return wait_for(ready, timeout, "the supervisor to answer with every worker idle")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"supervisor {self.pid} did not exit within {timeout} s:\n{self.log_text()[-3000:]}"
            ) from None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_exit(10)

    def log_text(self) -> str:
        return "".join(
            f"--- {p.name}\n" + p.read_text(errors="replace") for p in self.log_paths if p.exists()
        )

    # -- talking

    def conn(self, timeout: float = 10.0) -> Conn:
        return Conn(self.socket, timeout)

    def request(self, op: str, /, reply_timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """One request on a connection of its own; the whole reply."""
        with self.conn(reply_timeout) as c:
            return c.request(op, **fields)

    def call(self, op: str, data_key: str, /, **fields: Any) -> Any:
        """One request that must succeed; the data under ``data_key``."""
        return ok(self.request(op, **fields))[data_key]

    def ping(self) -> dict[str, Any]:
        return self.call("ping", "pong")

    def status(self) -> dict[str, Any]:
        return self.call("status", "status")

    def submit(self, task: str, args: dict[str, Any] | None = None, /, **opts: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"task": TASKS + "." + task if "." not in task else task}
        if args is not None:
            fields["args"] = args
        fields.update(opts)
        return self.call("submit", "job", **fields)

    def get(self, job_id: int) -> dict[str, Any]:
        return self.call("get", "job", job=job_id)

    def wait_job(self, job_id: int, timeout: float = 20.0) -> dict[str, Any]:
        """The job once it has ended (op ``wait``); fails after ``timeout`` seconds."""
        with self.conn(timeout + 5) as c:
            rid = c.send_op("wait", job=job_id, timeout=timeout)
            reply = c.read_for(rid, timeout + 5)
        assert reply.get("ok") is True, f"wait for job {job_id} failed: {reply}"
        return reply["job"]

    # -- the store file

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.store), timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def db_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of one query of the store (SQLite or PostgreSQL), by index or by name."""
        if self.pg_schema:
            return pg_run(self.env.pg_dsn or "", self.pg_schema, sql, params)
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def db_job(self, job_id: int) -> dict[str, Any]:
        rows = self.db_query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        assert rows, f"job {job_id} is not in the store file"
        return dict(rows[0])

    def integrity(self) -> str:
        if self.pg_schema:  # the server keeps its own pages whole; the tables must answer
            self.db_query("SELECT COUNT(*) FROM jobs")
            return "ok"
        return integrity(self.store)

    # -- processes

    def workers(self) -> list[psutil.Process]:
        """Live worker processes: children of the supervisor titled as workers."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            if WORKER_TITLE.search(title(child)):
                found.append(child)
                self.seen_workers.setdefault(child.pid, child)
        return found

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.workers()}

    def wait_workers(self, n: int, timeout: float = 15.0) -> set[int]:
        """Wait until exactly ``n`` worker processes run; their pids."""
        def exactly() -> set[int] | bool:
            pids = self.worker_pids()
            return (pids or True) if len(pids) == n else False

        found = wait_for(exactly, timeout, f"exactly {n} worker processes")
        return found if isinstance(found, set) else set()

    def zombie_children(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.pid).children()
                    if c.status() == psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def session(self) -> list[psutil.Process]:
        """Every live process of the current run's session except the supervisor."""
        return [p for p in session_processes(self.pid) if p.pid != self.pid]


class HQEnv:
    """A test's temp dir, task module and the supervisors and processes it started."""

    def __init__(self, pg_dsn: str | None = None) -> None:
        # Short: Unix socket paths are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="hq-", dir="/tmp"))
        # PostgreSQL: the server, and the prefix of this test's schemas (dropped at cleanup).
        self.pg_dsn = pg_dsn
        self.pg_prefix = f"hqt_{os.getpid()}_{self.dir.name[3:].lower()}"
        self.tasks_path = self.dir / f"{TASKS}.py"
        self.tasks_path.write_text(TASKS_SOURCE)
        self.supervisors: list[Supervisor] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for name in ("HOSTQUEUE_SOCKET", "HOSTQUEUE_STORE", "HOSTQUEUE_WORKERS", "HOSTQUEUE_TASKS"):
            env.pop(name, None)
        env.update(extra)
        return env

    def popen(self, cmd: list[str], log: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd, cwd=str(ROOT), env=self.env(), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def supervisor(self, workers: int | None = 2, grace: float = 10.0, start: bool = True,
                   name: str | None = None, store: Path | None = None,
                   extra_args: tuple[str, ...] = ()) -> Supervisor:
        sup = Supervisor(self, name or f"s{len(self.supervisors) + 1}", workers, grace, store)
        self.supervisors.append(sup)
        if start:
            sup.start(*extra_args)
        return sup

    def cli(self, *args: str, socket_path: str | Path | None = None, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``python -m hostqueue ARGS`` (with $HOSTQUEUE_SOCKET when given)."""
        extra = {"HOSTQUEUE_SOCKET": str(socket_path)} if socket_path else {}
        return subprocess.run(
            [sys.executable, "-m", "hostqueue", *args], cwd=str(ROOT), env=self.env(**extra),
            capture_output=True, text=True, timeout=timeout, input=input,
        )

    def drop_schemas(self) -> None:
        if self.pg_dsn:
            for row in pg_run(self.pg_dsn, None, "SELECT nspname FROM pg_namespace WHERE nspname LIKE ?",
                              (self.pg_prefix + "%",)):
                pg_run(self.pg_dsn, None, f'DROP SCHEMA IF EXISTS "{row[0]}" CASCADE')

    def cleanup(self) -> list[str]:
        """Kill every process any of our supervisors started; return what was still alive."""
        leftovers = []
        sids = {p.pid for p in self.procs}
        # Politely first (a fast stop reaps the workers; orphans would become zombies of
        # an init that may not reap them), then by force.
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for sid in sids:
            for p in session_processes(sid):
                leftovers.append(f"{p.pid} {title(p)}")
                try:
                    p.kill()
                except psutil.Error:
                    pass
        for sup in self.supervisors:  # workers seen during the test, in case one left the session
            for p in sup.seen_workers.values():
                try:
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        p.kill()
                except psutil.Error:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                leftovers.append(f"{proc.pid} would not die")
        for sid in sids:
            try:
                wait_for(lambda: not session_processes(sid), 10, f"session {sid} to be empty")
            except AssertionError as exc:
                leftovers.append(str(exc))
        return leftovers


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module with BOTH_STORES = True runs each test on SQLite and on PostgreSQL."""
    if getattr(metafunc.module, "BOTH_STORES", False) and "hq" in metafunc.fixturenames:
        if metafunc.definition.get_closest_marker("sqlite_only"):
            return  # about the SQLite file itself
        metafunc.parametrize("hq", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                             indirect=True)


@pytest.fixture
def hq(request: pytest.FixtureRequest) -> Iterator[HQEnv]:
    # HQ_TEST_STORE=postgres runs the tests that are not parametrized on PostgreSQL
    # too (by hand: e.g. the crash torture).
    kind = getattr(request, "param", os.environ.get("HQ_TEST_STORE", "sqlite"))
    env = HQEnv(postgres_dsn() if kind == "postgres" else None)
    try:
        yield env
    finally:
        env.cleanup()
        env.drop_schemas()
        failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
                     for w in ("setup", "call"))
        if failed:
            for sup in env.supervisors:
                print(f"==== log of supervisor {sup.name} ({env.dir})")
                print(sup.log_text()[-6000:])
        else:
            shutil.rmtree(env.dir, ignore_errors=True)


@pytest.fixture
def pg(request: pytest.FixtureRequest) -> Iterator[HQEnv]:
    """An HQEnv whose supervisors use PostgreSQL (skips where no server can be had)."""
    env = HQEnv(postgres_dsn())
    try:
        yield env
    finally:
        env.cleanup()
        env.drop_schemas()
        if getattr(getattr(request.node, "rep_call", None), "failed", False):
            for sup in env.supervisors:
                print(f"==== log of supervisor {sup.name} ({env.dir})")
                print(sup.log_text()[-6000:])


@pytest.fixture
def sup(hq: HQEnv) -> Supervisor:
    """A running supervisor with 2 workers and a 10 s grace."""
    return hq.supervisor(workers=2)


def socket_mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)
