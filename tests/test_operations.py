"""Operations: systemd integration (sd_notify, socket activation, unit files), PID 1 in a
container, Prometheus metrics, log formats, the socket's group, `ctl top`.

Every test runs real supervisors (see conftest.py); waits have deadlines, never bare
sleeps. Tests that need something this machine may lack (unshare as root,
systemd-analyze, tmux) skip when it is absent.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL
from conftest import ROOT, HQEnv, Supervisor, ok, wait_for

# ---------------------------------------------------------------------------
# helpers


def spawn(hq: HQEnv, sup: Supervisor, cmd: list[str] | None = None, *,
          env: dict[str, str] | None = None, stderr: Path | None = None,
          pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start ``sup`` (or ``cmd`` standing for it) with extra environment variables,
    inherited descriptors, and stderr to a file of its own when asked. The process
    is registered with ``hq`` so that its cleanup kills whatever it started."""
    sup.starts += 1
    log_path = hq.dir / f"{sup.name}-{sup.starts}.log"
    sup.log_paths.append(log_path)
    with open(log_path, "wb") as out, (open(stderr, "wb") if stderr else contextlib.nullcontext(out)) as err:
        proc = subprocess.Popen(
            cmd or sup.command(), cwd=str(ROOT), env=hq.env(**(env or {})),
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            pass_fds=pass_fds,
        )
    hq.procs.append(proc)
    sup.proc = proc
    return proc


def connections(proc: psutil.Process, kind: str) -> list[Any]:
    method = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    return list(method(kind=kind))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NotifySocket:
    """What systemd listens on for sd_notify: an AF_UNIX datagram socket, read all
    the time by a thread, as systemd does (a receiver that stops reading fills the
    socket's small queue, and then the sender blocks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []  # (monotonic time, datagram)
        self.cond = threading.Condition()
        self.closing = False
        self.cursor = 0  # messages[:cursor] were looked at by wait_for
        self.thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closing:
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.cond:
                self.messages.append((time.monotonic(), data))
                self.cond.notify_all()

    def close(self) -> None:
        self.closing = True
        self.thread.join(5)
        self.sock.close()

    def wait_for(self, predicate: Any, timeout: float, what: str) -> str:
        """The first datagram after the last one found that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                while self.cursor < len(self.messages):
                    message = self.messages[self.cursor][1]
                    self.cursor += 1
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no sd_notify message {what} within {timeout} s; "
                                         f"got {[m for _, m in self.messages]}")
                self.cond.wait(remaining)

    def snapshot(self) -> list[tuple[float, str]]:
        with self.cond:
            return list(self.messages)

    def mark(self) -> int:
        """Where the next wait_for starts: after everything received so far."""
        with self.cond:
            self.cursor = len(self.messages)
            return self.cursor


def has(message: str, assignment: str) -> bool:
    return assignment in message.splitlines()


PROM_LINE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
    r'(?P<labels>\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(?:,|(?=\})))*\})?'
    r' (?P<value>[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|NaN|Inf))$'
)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, strictly: ``{'name{labels}': value}``; fails on a bad line."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    assert text.endswith("\n"), "the exposition must end with a newline"
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert line.split(" ", 3)[2].startswith("hostqueue_"), line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        assert not line.startswith("#"), f"unexpected comment: {line!r}"
        m = PROM_LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        assert m["name"].startswith("hostqueue_"), line
        base = re.sub(r"_(bucket|sum|count)$", "", m["name"])
        assert m["name"] in types or base in types, f"sample without # TYPE: {line!r}"
        samples[m["name"] + (m["labels"] or "")] = float(m["value"])
    return samples


# ---------------------------------------------------------------------------
# sd_notify


def test_sd_notify_ready_status_watchdog_reload_stopping(hq: HQEnv) -> None:
    notify = NotifySocket(hq.dir / "notify.sock")
    try:
        sup = hq.supervisor(workers=2, grace=7.0, start=False)
        proc = spawn(hq, sup, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})

        ready = notify.wait_for(lambda m: has(m, "READY=1"), 20, "READY=1")
        t_ready = time.monotonic()
        first = notify.mark()
        # READY=1 only once the socket answers and the workers were started.
        assert sup.ping()["pid"] == proc.pid
        st = sup.status()
        assert len(st["workers"]) == st["target_workers"] == 2
        assert f"MAINPID={proc.pid}" in ready.splitlines()
        assert any(line.startswith("STATUS=") for line in ready.splitlines())

        # The watchdog: every WATCHDOG_USEC / 2 = 0.1 s, so at least 3 within about a second.
        def watchdogs() -> list[float]:
            return [t for t, m in notify.snapshot()[first:] if has(m, "WATCHDOG=1")]

        wait_for(lambda: len(watchdogs()) >= 3, 1.5, "3 WATCHDOG=1")
        assert watchdogs()[2] - t_ready < 1.2, f"3rd WATCHDOG=1 {watchdogs()[2] - t_ready:.2f} s after READY=1"

        # Pool changes send STATUS=.
        notify.mark()
        ok(sup.request("scale", n=3))
        notify.wait_for(lambda m: any(l.startswith("STATUS=3 workers") for l in m.splitlines()),
                        10, "STATUS= after scaling to 3")

        # Reload: RELOADING=1, then READY=1.
        notify.mark()
        ok(sup.request("reload"))
        notify.wait_for(lambda m: has(m, "RELOADING=1"), 10, "RELOADING=1")
        notify.wait_for(lambda m: has(m, "READY=1"), 10, "READY=1 after RELOADING=1")

        # SIGTERM: STOPPING=1 with a timeout extension covering the grace, then exit 0.
        mark = notify.mark()
        sup.signal(signal.SIGTERM)
        stopping = notify.wait_for(lambda m: has(m, "STOPPING=1"), 10, "STOPPING=1")
        extend = [l for l in stopping.splitlines() if l.startswith("EXTEND_TIMEOUT_USEC=")]
        assert extend, f"STOPPING=1 without EXTEND_TIMEOUT_USEC: {stopping!r}"
        assert int(extend[0].split("=", 1)[1]) >= 7_000_000  # at least the grace
        assert sup.wait_exit(15) == 0

        # The whole order: READY, RELOADING, READY, STOPPING; no READY after STOPPING.
        messages = [m for _, m in notify.snapshot()]
        kinds = [k for m in messages for k in ("READY=1", "RELOADING=1", "STOPPING=1") if has(m, k)]
        assert kinds == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], kinds
        assert not any(has(m, "READY=1") for m in messages[mark:])
    finally:
        notify.close()


def test_no_watchdog_pings_for_another_pid(hq: HQEnv) -> None:
    """WATCHDOG_PID names the process systemd watches; a supervisor that is not it
    sends no WATCHDOG=1 (here: the test's own pid)."""
    notify = NotifySocket(hq.dir / "notify.sock")
    try:
        sup = hq.supervisor(workers=1, start=False)
        spawn(hq, sup, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "100000",
                            "WATCHDOG_PID": str(os.getpid())})
        notify.wait_for(lambda m: has(m, "READY=1"), 20, "READY=1")
        # One that pinged would send one every 0.05 s: a stop right after 0.5 s more
        # of serving requests shows none came.
        end = time.monotonic() + 0.5
        wait_for(lambda: time.monotonic() >= end and sup.ping(), 5, "0.5 s of serving")
        assert sup.stop() == 0
        assert not any(has(m, "WATCHDOG=1") for _, m in notify.snapshot())
    finally:
        notify.close()


# ---------------------------------------------------------------------------
# socket activation

ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


ENV_TASKS = textwrap.dedent(
    '''
    import os

    import hostqueue


    @hostqueue.task
    def getenv(ctx, names):
        return [os.environ.get(name) for name in names]
    '''
)


def test_socket_activation(hq: HQEnv) -> None:
    path = hq.dir / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    early = None
    try:
        # A client that connects before any supervisor runs waits in the backlog.
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        early.settimeout(20)
        early.connect(str(path))
        early.sendall(b'{"id": "early", "op": "ping"}\n')

        (hq.dir / "envtasks.py").write_text(ENV_TASKS)
        sup = hq.supervisor(workers=1, start=False)
        sup.socket = path

        def start() -> subprocess.Popen[bytes]:
            cmd = [sys.executable, "-c", ACTIVATE, str(listener.fileno()),
                   *sup.command(("--tasks", str(hq.dir / "envtasks.py")))]
            return spawn(hq, sup, cmd, pass_fds=(listener.fileno(),))

        proc = start()
        reply = json.loads(early.makefile("rb").readline())
        assert reply == {"id": "early", "ok": True, "pong": reply["pong"]}
        assert reply["pong"]["pid"] == proc.pid  # the wrapper exec'd the supervisor
        st = sup.wait_ready()
        assert st["socket"] == str(path)
        # LISTEN_* were for the supervisor, not for its workers (and the jobs' programs).
        job = sup.submit("envtasks.getenv", {"names": ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]})
        assert sup.wait_job(job["id"])["result"] == [None, None, None]

        assert sup.stop() == 0
        # systemd owns the socket: the supervisor leaves the file (and the listener) alone.
        assert stat.S_ISSOCK(os.lstat(path).st_mode)

        # A client that comes while no supervisor runs is answered by the next one.
        between = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        between.settimeout(20)
        between.connect(str(path))
        between.sendall(b'{"id": 2, "op": "ping"}\n')
        proc2 = start()
        reply = json.loads(between.makefile("rb").readline())
        between.close()
        assert reply["ok"] is True and reply["pong"]["pid"] == proc2.pid
        assert sup.stop() == 0
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        if early is not None:
            early.close()
        listener.close()


# ---------------------------------------------------------------------------
# PID 1

ORPHAN_TASKS = textwrap.dedent(
    '''
    import subprocess

    import hostqueue


    @hostqueue.task
    def orphan(ctx, seconds=0.3):
        """Leave a grandchild behind: sh starts sleep in the background and exits, so
        sleep is reparented to PID 1 (the supervisor). Returns sleep's pid."""
        out = subprocess.run(["sh", "-c", f"sleep {seconds} </dev/null >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
        return int(out.stdout)
    '''
)


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_pid1_reaps_orphans_and_drains(hq: HQEnv) -> None:
    if not _unshare_works():
        pytest.skip("unshare --pid --fork --mount-proc does not work here (needs root)")
    (hq.dir / "orphans.py").write_text(ORPHAN_TASKS)
    sup = hq.supervisor(workers=1, grace=5.0, start=False)
    cmd = ["unshare", "--pid", "--fork", "--mount-proc",
           *sup.command(("--tasks", str(hq.dir / "orphans.py")))]
    unshare = spawn(hq, sup, cmd)

    def supervisor_pid() -> int | None:
        children = psutil.Process(unshare.pid).children()
        return children[0].pid if children else None

    host_pid = wait_for(supervisor_pid, 15, "the supervisor to start inside the namespace")
    st = wait_for(lambda: sup.status() if len(sup.status()["workers"]) == 1 else None, 20,
                  "the supervisor to answer")
    assert st["pid"] == 1
    supervisor = psutil.Process(host_pid)

    job = sup.submit("orphans.orphan", {"seconds": 0.3})
    done = sup.wait_job(job["id"])
    assert done["status"] == "completed", done

    def sleepers() -> list[psutil.Process]:
        return [c for c in supervisor.children() if c.name() == "sleep"]

    # The orphan was reparented to the supervisor (PID 1)...
    orphan = sleepers()
    assert orphan, "the orphaned sleep should be a child of the supervisor (PID 1) while it runs"
    # ...and once it exits, it does not stay a zombie.
    wait_for(lambda: not sleepers(), 10, "the orphaned sleep to exit and be reaped")
    zombies = wait_for(
        lambda: [c.pid for c in supervisor.children() if c.status() == psutil.STATUS_ZOMBIE] or True,
        5, "the supervisor's children")
    assert zombies is True, f"zombie children of the PID-1 supervisor: {zombies}"

    # SIGTERM to its host pid drains and exits 0 within the grace.
    started = time.monotonic()
    os.kill(host_pid, signal.SIGTERM)
    assert unshare.wait(15) == 0
    assert time.monotonic() - started < 5.0
    assert not psutil.pid_exists(host_pid) or psutil.Process(host_pid).status() == psutil.STATUS_ZOMBIE


# ---------------------------------------------------------------------------
# metrics


def test_metrics_text_and_http(hq: HQEnv) -> None:
    port = free_port()
    sup = hq.supervisor(workers=2, extra_args=("--metrics-port", str(port)))

    first = hq.cli("ctl", "metrics", socket_path=sup.socket)
    assert first.returncode == 0, first.stderr
    before = parse_metrics(first.stdout)
    for name in ("hostqueue_completed_total", "hostqueue_failed_total", "hostqueue_up",
                 'hostqueue_workers{state="idle"}', "hostqueue_job_runtime_seconds_count"):
        assert name in before, f"{name} missing from:\n{first.stdout}"

    ids = [sup.submit("noop")["id"] for _ in range(3)]
    failed = sup.submit("permanent", {"message": "nope"})["id"]
    for job_id in ids + [failed]:
        sup.wait_job(job_id)

    after = parse_metrics(hq.cli("ctl", "metrics", socket_path=sup.socket).stdout)
    assert after["hostqueue_completed_total"] == before["hostqueue_completed_total"] + 3
    assert after["hostqueue_failed_total"] == before["hostqueue_failed_total"] + 1
    assert after['hostqueue_jobs{queue="default",state="completed"}'] == 3
    assert after['hostqueue_jobs{queue="default",state="failed"}'] == 1
    assert after["hostqueue_job_runtime_seconds_count"] >= before["hostqueue_job_runtime_seconds_count"] + 4
    assert after["hostqueue_up"] == 1

    as_json = json.loads(hq.cli("ctl", "metrics", "--json", socket_path=sup.socket).stdout)
    assert {"name": "hostqueue_completed_total", "labels": {}, "value": 3.0} in as_json

    # The same text over HTTP, on loopback only.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        served = parse_metrics(response.read().decode())
    assert served.keys() == after.keys()
    assert served["hostqueue_completed_total"] == 3
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert err.value.code == 404

    listening = [c for c in connections(psutil.Process(sup.pid), "inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            with pytest.raises(OSError):
                s.connect((address, port))


# ---------------------------------------------------------------------------
# logs


def _run_jobs_and_stop(hq: HQEnv, sup: Supervisor) -> tuple[int, list[int]]:
    """20 jobs that complete and one that fails; a reload; SIGTERM. Returns the ids."""
    good = [sup.submit("noop")["id"] for _ in range(20)]
    bad = sup.submit("permanent", {"message": "the input is bad"})["id"]
    for job_id in good + [bad]:
        sup.wait_job(job_id)
    ok(sup.request("reload"))
    assert sup.stop() == 0
    return bad, good


def test_json_logs(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2, start=False)
    errors = hq.dir / "stderr.log"
    spawn(hq, sup, sup.command(("--log-format", "json")), stderr=errors)
    sup.wait_ready()
    bad, good = _run_jobs_and_stop(hq, sup)

    lines = errors.read_text().splitlines()
    assert lines, "the supervisor logged nothing"
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        assert isinstance(entry["time"], (int, float)) and abs(entry["time"] - time.time()) < 600
        entries.append(entry)
    failures = [e for e in entries if f"job {bad}" in e["message"]]
    assert failures, f"no log line about failed job {bad}: {lines}"
    assert "hqtasks.permanent" in failures[0]["message"]
    assert "the input is bad" in failures[0]["message"]
    assert failures[0]["level"] in ("warning", "error")
    _no_line_per_success(good, [e["message"] for e in entries])


def _no_line_per_success(good: list[int], messages: list[str]) -> None:
    per_job = [m for m in messages for job_id in good if re.search(rf"\bjob {job_id}\b", m)]
    assert not per_job, f"log lines about successful jobs: {per_job}"
    assert len(messages) < len(good), f"{len(messages)} log lines for {len(good)} jobs"


def test_journal_logs_have_no_timestamp(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2, start=False)
    errors = hq.dir / "stderr.log"
    spawn(hq, sup, env={"JOURNAL_STREAM": "8:1234"}, stderr=errors)
    sup.wait_ready()
    bad, good = _run_jobs_and_stop(hq, sup)

    lines = errors.read_text().splitlines()
    assert lines
    for line in lines:
        assert re.match(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ", line), line
        assert not re.search(r"\d{4}-\d\d-\d\d|\d\d:\d\d:\d\d", line), f"a timestamp: {line!r}"
    failures = [l for l in lines if f"job {bad}" in l]
    assert failures and "hqtasks.permanent" in failures[0] and "the input is bad" in failures[0]
    _no_line_per_success(good, lines)


TALKING_TASKS = textwrap.dedent(
    '''
    import logging

    import hostqueue


    @hostqueue.task
    def talk(ctx):
        logging.getLogger("talking").warning("a task speaks")
    '''
)


def test_task_logs_follow_the_log_format(hq: HQEnv) -> None:
    (hq.dir / "talking.py").write_text(TALKING_TASKS)
    sup = hq.supervisor(workers=1, start=False)
    errors = hq.dir / "stderr.log"
    spawn(hq, sup, sup.command(("--log-format", "json", "--tasks", str(hq.dir / "talking.py"))),
          stderr=errors)
    sup.wait_ready()
    assert sup.wait_job(sup.submit("talking.talk")["id"])["status"] == "completed"
    assert sup.stop() == 0
    lines = errors.read_text().splitlines()
    assert any("a task speaks" in line for line in lines)
    for line in lines:
        assert isinstance(json.loads(line), dict), line


# ---------------------------------------------------------------------------
# the socket's group


def test_socket_group(hq: HQEnv) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    sup = hq.supervisor(workers=1, extra_args=("--socket-group", group))
    info = os.stat(sup.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == os.getgid()
    assert sup.ping()["pid"] == sup.pid


# ---------------------------------------------------------------------------
# ctl top


def _wait_progress(sup: Supervisor, job_id: int) -> dict[str, Any]:
    return wait_for(lambda: (j := sup.get(job_id))["status"] == "running" and (j["progress"] or 0) > 0
                    and j, 15, f"job {job_id} to report progress")


def test_top_once(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    job = sup.submit("slow", {"seconds": 20, "steps": 200})
    _wait_progress(sup, job["id"])

    shown = hq.cli("ctl", "top", "--once", "--interval", "0.5", socket_path=sup.socket)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"supervisor {sup.pid}" in text and "running" in text
    assert "workers 2/2" in text
    for pid in sup.worker_pids():
        assert re.search(rf"^\s*{pid}\s", text, re.MULTILINE), f"worker {pid} not shown:\n{text}"
    row = next((l for l in text.splitlines() if re.search(rf"\b{job['id']}\s+hqtasks\.slow\b", l)), None)
    assert row is not None, f"job {job['id']} not shown:\n{text}"
    m = re.search(r"\[#*\.*\]\s+(\d+)% step (\d+)/200", row)
    assert m and int(m[1]) >= 0 and int(m[2]) >= 1, row
    assert re.search(r"\d+(\.\d+)?s\s+\[", row), f"no ETA before the bar: {row!r}"
    assert "QUEUE" in text and re.search(r"^default\s+0\s+0\s+0\s+1\s", text, re.MULTILINE), text
    assert "throughput" in text

    # --json: the same data for scripts, with the ETA estimated from the progress rate.
    data = json.loads(hq.cli("ctl", "top", "--json", "--interval", "0.5", socket_path=sup.socket).stdout)
    assert data["status"]["pid"] == sup.pid
    (running,) = data["jobs"]
    assert running["id"] == job["id"] and running["task"] == "hqtasks.slow"
    assert 0 < running["progress"] < 1 and running["message"].startswith("step ")
    assert running["eta"] is not None and 0 < running["eta"] < 40


def test_top_throughput_counts_completions(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=2)
    ok(sup.request("pause", queue="default"))
    ids = [j["id"] for j in sup.call("submit_many", "jobs", task="hqtasks.noop", args=[{}] * 40)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostqueue", "ctl", "top", "--json", "--interval", "2"],
        cwd=str(ROOT), env=hq.env(HOSTQUEUE_SOCKET=str(sup.socket)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # Once the view watches (its watch is in place in the supervisor: status counts
        # the streams open), let the jobs run.
        wait_for(lambda: sup.status()["watchers"] >= 1 or proc.poll() is not None, 10,
                 "ctl top to watch")
        ok(sup.request("resume", queue="default"))
        for job_id in ids:
            sup.wait_job(job_id)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    data = json.loads(out)
    throughput = data["throughput"]
    assert throughput["completed"] == 40, throughput
    assert throughput["completed_per_second"] > 0
    assert data["stats"]["completed"] == 40


def test_top_model_eta_rates_and_small_screens() -> None:
    """The view's arithmetic and layout, without a supervisor."""
    from hostqueue.cli.top import TopModel, render

    now = 1000.0
    model = TopModel(clock=lambda: now)
    model.opened = 990.0
    model.completed.since = model.failed.since = model.submitted.since = 990.0
    job = {"id": 7, "task": "t.resize", "queue": "default", "started_at": 990.0}
    model.on_event({"event": "started", "job_id": 7, "job": job, "at": 990.0})
    model.on_event({"event": "progress", "job_id": 7, "progress": 0.25, "message": "a", "at": 994.0})
    model.on_event({"event": "progress", "job_id": 7, "progress": 0.5, "message": "b", "at": 998.0})
    eta = model.jobs[7].eta(now)
    assert eta is not None and abs(eta - 6.0) < 1e-6  # 0.5 left at 1/16 per s, 2 s since the sample
    for i in range(20):
        model.on_event({"event": "completed", "job_id": 100 + i, "at": 991.0 + i * 0.4})
    assert model.completed.total == 20
    assert abs((model.completed.per_second(now) or 0) - 2.0) < 1e-6  # 20 in 10 s
    workers = [{"pid": 10 + i, "number": i + 1, "state": "idle", "job": None, "rss": 2**24,
                "cpu_percent": 0.0} for i in range(30)]
    workers[0].update(state="busy", job=7)
    model.set_status({"pid": 1, "state": "running", "uptime": 5, "workers": workers,
                      "target_workers": 30, "waiting_by_queue": {"default": 3}},
                     {"queues": {"default": {"pending": 3, "running": 1}, "b": {}}})
    lines = render(model, width=50, height=12, now=now)
    assert len(lines) == 12 and all(len(text) <= 50 for text, _ in lines)
    texts = [text for text, _ in lines]
    assert any("more workers" in t for t in texts) and "q quit" in texts[-1]
    assert any(t.startswith("QUEUE") for t in texts)
    full = "\n".join(text for text, _ in render(model, now=now))
    assert "t.resize" in full and "50% b" in full and "6.00s" in full and "2.0/s" in full


def test_top_cannot_reach(hq: HQEnv) -> None:
    shown = hq.cli("ctl", "top", "--once", socket_path=hq.dir / "nobody.sock")
    assert shown.returncode == 3
    assert "nobody.sock" in shown.stderr


def test_top_needs_a_terminal(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    shown = hq.cli("ctl", "top", socket_path=sup.socket)
    assert shown.returncode == 2 and "--once" in shown.stderr


class Tmux:
    """A tmux server of our own (its own socket), so nothing else is touched."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "tmux.sock"

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", str(self.socket), *args],
                              capture_output=True, text=True, timeout=10, check=False)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def flag(self, name: str) -> str:
        return self("display-message", "-p", "-t", "top", "#{" + name + "}").strip()

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10, check=False)


@pytest.fixture
def tmux(hq: HQEnv) -> Iterator[Tmux]:
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    t = Tmux(hq.dir)
    try:
        yield t
    finally:
        t.kill()


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_top_interactive(hq: HQEnv, tmux: Tmux, key: str) -> None:
    sup = hq.supervisor(workers=2)
    job = sup.submit("slow", {"seconds": 30, "steps": 300})
    _wait_progress(sup, job["id"])
    env = hq.env()
    command = (f"cd {ROOT} && env PYTHONPATH={env['PYTHONPATH']} {sys.executable} -m hostqueue "
               f"ctl --socket {sup.socket} top --interval 0.3; echo EXIT=$?; sleep 60")
    tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "30", command)

    def screen_with(*parts: str) -> Any:
        def check() -> str | None:
            text = tmux.screen()
            return text if all(p in text for p in parts) else None
        return check

    screen = wait_for(screen_with("hqtasks.slow", "% step"), 15, "the live view to show the job")
    assert f"supervisor {sup.pid}" in screen and "q quit" in screen
    assert tmux.flag("alternate_on") == "1" and tmux.flag("cursor_flag") == "0"

    def percent() -> int | None:
        m = re.search(r"(\d+)% step", tmux.screen())
        return int(m[1]) if m else None

    shown = percent()
    wait_for(lambda: (p := percent()) is not None and shown is not None and p > shown, 10,
             "the progress to move on screen")

    # A resize redraws the frame at the new size.
    tmux("resize-window", "-t", "top", "-x", "60", "-y", "12")
    small = wait_for(screen_with("…", "q quit"), 10, "a frame cut to 60x12")
    lines = small.splitlines()
    assert len(lines) <= 12 and all(len(l) <= 60 for l in lines), small
    assert lines and "q quit" in lines[-1], small

    tmux("send-keys", "-t", "top", key)
    wait_for(lambda: "EXIT=0" in tmux.screen(), 10, "the view to quit with status 0")
    assert tmux.flag("alternate_on") == "0", "the terminal is still on the alternate screen"
    assert tmux.flag("cursor_flag") == "1", "the cursor is still hidden"
    assert "hostqueue top" not in tmux.screen()  # the normal screen is back


# ---------------------------------------------------------------------------
# systemd units

UNITS = ROOT / "systemd"


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_service_unit_settings() -> None:
    for name in ("hostqueue.service", "hostqueue@.service"):
        svc = _unit(UNITS / name)["Service"]
        one = {k: v[-1] for k, v in svc.items()}
        assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
        assert one["WatchdogSec"] == "30"
        assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert one["KillMode"] == "mixed"
        found = re.search(r"--grace (\d+)", one["ExecStart"])
        grace = float(found[1]) if found else 30.0  # the template takes it from the file
        assert float(one["TimeoutStopSec"]) > grace
        assert one["User"] == one["Group"] == "hostqueue"
        assert one["StateDirectory"] == "hostqueue" and one["RuntimeDirectory"] == "hostqueue"
        assert one["RuntimeDirectoryPreserve"] == "yes"
        for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                       "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                       "RestrictNamespaces", "LockPersonality"):
            assert one[option] == "yes", option
        assert one["ProtectSystem"] == "strict"
        assert one["SystemCallArchitectures"] == "native"
        assert set(one["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
        assert "MemoryDenyWriteExecute" not in svc
        assert "MemoryDenyWriteExecute" in (UNITS / name).read_text()  # the comment saying why
    tmpl = {k: v[-1] for k, v in _unit(UNITS / "hostqueue@.service")["Service"].items()}
    assert "/var/lib/hostqueue/%i.db" in tmpl["ExecStart"]
    assert "/run/hostqueue/%i.sock" in tmpl["ExecStart"]
    assert "/etc/hostqueue/%i.toml" in tmpl["ExecStart"]
    sock = {k: v[-1] for k, v in _unit(UNITS / "hostqueue.socket")["Socket"].items()}
    assert sock["ListenStream"] == "/run/hostqueue/hostqueue.sock"
    assert sock["SocketMode"] == "0600"
    assert sock["SocketUser"] == sock["SocketGroup"] == "hostqueue"
    assert int(sock["Backlog"]) >= 1024


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The units name /usr/local/bin/hostqueue, which verify wants to exist: point
    # copies at a stand-in.
    stand_in = tmp_path / "hostqueue"
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m hostqueue \"$@\"\n")
    stand_in.chmod(0o755)
    names = ["hostqueue.service", "hostqueue.socket", "hostqueue@.service"]
    for name in names:
        text = (UNITS / name).read_text().replace("/usr/local/bin/hostqueue", str(stand_in))
        (tmp_path / name).write_text(text)
    (tmp_path / "hostqueue@main.service").symlink_to(tmp_path / "hostqueue@.service")
    done = subprocess.run(
        [analyze, "verify", "--man=no",
         *(str(tmp_path / n) for n in ("hostqueue.service", "hostqueue.socket", "hostqueue@main.service"))],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if line.strip() and "hostqueue" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
