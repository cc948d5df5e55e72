"""Developer experience: immediate mode, the pytest plugin, embedding, the examples, typing.

- immediate mode (hostqueue.immediate): jobs run inline with production's validation and
  outcome rules; one test runs the same scenario against a real supervisor and compares;
- the pytest plugin (hostqueue.pytest_plugin), run with pytester in a subprocess,
  including a failing test whose supervisor must still be cleaned up;
- hostqueue.Supervisor embedded in this process: with, start()/stop(), async with,
  the CLI connecting to it, a bad task module, the host's signals and title untouched;
- every example of examples/;
- a user's module type-checks with `mypy --strict`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hostqueue  # noqa: E402
from hostqueue.client.immediate import ImmediateClient, ImmediateSupervisor, reset_shared_supervisor  # noqa: E402


def _plugin_installed() -> bool:
    """The pytest11 entry point is registered when hostqueue is installed (then pytest
    loads the plugin itself, and naming it again would register it twice)."""
    try:
        eps = metadata.entry_points(group="pytest11")
    except Exception:  # pragma: no cover
        return False
    return any(ep.value == "hostqueue.pytest_plugin" for ep in eps)


PLUGIN_INSTALLED = _plugin_installed()
pytest_plugins = ["pytester"] + ([] if PLUGIN_INSTALLED else ["hostqueue.pytest_plugin"])
PLUGIN_ARGS: tuple[str, ...] = () if PLUGIN_INSTALLED else ("-p", "hostqueue.pytest_plugin")

FINAL = ("completed", "failed", "cancelled", "expired")
JOB_FIELDS = {"id", "task", "queue", "status", "args", "result", "error", "attempts",
              "max_attempts", "priority", "progress", "progress_message", "key", "run_id",
              "created_at", "started_at", "finished_at", "run_at", "deadline", "timeout",
              "abort_requested", "worker_pid"}

TASKS_SOURCE = textwrap.dedent('''
    """Tasks of tests/test_devx.py."""
    import os

    import hostqueue

    FAST = dict(backoff_base=0.01, backoff_cap=0.02)


    @hostqueue.task
    def add(ctx, a, b):
        ctx.progress(0.5, "half")
        ctx.progress(1.0, "done")
        return a + b


    @hostqueue.task
    def echo(ctx, **kwargs):
        return {"args": kwargs, "attempt": ctx.attempt, "max_attempts": ctx.max_attempts,
                "task": ctx.task, "job_id": ctx.job_id}


    @hostqueue.task(retries=3, **FAST)
    def flaky(ctx, fail_times=1):
        if ctx.attempt <= fail_times:
            raise hostqueue.Retry(f"attempt {ctx.attempt} not yet", delay=0.01)
        return {"attempt": ctx.attempt}


    @hostqueue.task(retries=2, **FAST)
    def fail(ctx, message="boom"):
        raise ValueError(message)


    @hostqueue.task(retries=3, **FAST)
    def permanent(ctx):
        raise hostqueue.Permanent("bad input")


    @hostqueue.task
    def unserializable(ctx):
        return {1, 2, 3}


    @hostqueue.task
    def aborts(ctx):
        raise hostqueue.Aborted("gave up")


    @hostqueue.task
    def pid(ctx):
        return os.getpid()


    @hostqueue.task
    def chain(ctx, n):
        """Submit a follow-up job from inside a job."""
        with hostqueue.Client() as c:
            return c.submit(__name__ + ".add", {"a": n, "b": 1}).result(timeout=10)
''')


@pytest.fixture(scope="module")
def tasks_file() -> Iterator[str]:
    directory = Path(tempfile.mkdtemp(prefix="hq-devx-", dir="/tmp"))
    path = directory / "devx_tasks.py"
    path.write_text(TASKS_SOURCE)
    yield str(path)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def imm(tasks_file: str) -> Iterator[ImmediateClient]:
    client = hostqueue.Client.immediate(tasks=[tasks_file])
    yield client
    client.close()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTQUEUE_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def session_pids(sid: int) -> list[int]:
    from hostqueue.pytest_plugin import _session_processes

    return _session_processes(sid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---------------------------------------------------------------------------
# immediate mode


def test_immediate_runs_a_job_inline_with_the_same_handle_api(imm: ImmediateClient) -> None:
    job = imm.submit("devx_tasks.add", {"a": 2, "b": 3})
    assert isinstance(job, hostqueue.JobHandle)
    assert job.job["status"] == "pending"  # the submit's reply, as from a supervisor
    assert job.status() == "completed"  # ...but it has already run
    assert job.result() == 5
    assert job.wait(timeout=1)["status"] == "completed"
    full = job.refresh()
    assert JOB_FIELDS <= set(full)
    assert full["attempts"] == 1 and full["max_attempts"] == 4
    assert full["progress"] == 1.0 and full["progress_message"] == "done"
    assert full["worker_pid"] == os.getpid() and full["finished_at"] >= full["started_at"]
    events = list(job.progress())
    assert [e["event"] for e in events] == ["started", "progress", "progress", "completed"]
    assert [(e.get("progress"), e.get("message")) for e in events[1:3]] == [(0.5, "half"), (1.0, "done")]
    assert events[-1]["job"]["result"] == 5 and all("at" in e for e in events)
    ctx_seen = imm.submit("devx_tasks.echo", {"x": [1, 2]}).result()
    assert ctx_seen["args"] == {"x": [1, 2]} and ctx_seen["attempt"] == 1
    assert ctx_seen["task"] == "devx_tasks.echo" and ctx_seen["max_attempts"] == 4
    # With wait, the submit's reply already shows the end, as in production.
    waited = imm.submit("devx_tasks.add", {"a": 1, "b": 1}, wait=True)
    assert waited.job["status"] == "completed" and waited.result() == 2
    with pytest.raises(hostqueue.ProtocolError) as bad:
        imm.request("submit", task="devx_tasks.add", args={"a": 1, "b": 1}, wait=-1)
    assert bad.value.code == "bad_request" and "'wait'" in bad.value.message


def test_immediate_retries_at_once_and_counts_attempts(imm: ImmediateClient) -> None:
    started = time.monotonic()
    job = imm.submit("devx_tasks.flaky", {"fail_times": 2})
    assert job.result() == {"attempt": 3}
    assert time.monotonic() - started < 1.0  # Retry(delay=...) is not waited for
    got = imm.get(job.id)
    assert got["attempts"] == 3
    assert [a["status"] for a in got["attempt_log"]] == ["retrying", "retrying", "completed"]
    assert [e["event"] for e in job.progress()] == [
        "started", "retrying", "started", "retrying", "started", "completed"]

    # max_attempts is respected: retries=3 means 4 attempts, then failed.
    job = imm.submit("devx_tasks.flaky", {"fail_times": 10})
    with pytest.raises(hostqueue.JobFailed) as failed:
        job.result()
    assert failed.value.job["status"] == "failed" and failed.value.job["attempts"] == 4
    assert failed.value.job["error"]["type"] == "Retry"

    # ... and so is a retries override at submit.
    job = imm.submit("devx_tasks.fail", {"message": "no"}, retries=0)
    assert job.wait()["attempts"] == 1 and job.job["max_attempts"] == 1
    err = job.job["error"]
    assert err["type"] == "ValueError" and err["message"] == "no" and "Traceback" in err["traceback"]

    # Permanent fails at once; Aborted cancels.
    job = imm.submit("devx_tasks.permanent")
    assert job.wait()["status"] == "failed" and job.job["attempts"] == 1
    assert imm.submit("devx_tasks.aborts").wait()["status"] == "cancelled"


def test_immediate_validates_like_production(imm: ImmediateClient) -> None:
    with pytest.raises(hostqueue.ProtocolError) as unknown:
        imm.submit("devx_tasks.nope")
    assert unknown.value.code == "unknown_task" and "devx_tasks.add" in unknown.value.message
    # What the wire cannot carry fails in the client, exactly as a real Client's does.
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        imm.submit("devx_tasks.echo", {"when": object()})
    with pytest.raises(TypeError):
        imm.submit("devx_tasks.echo", {1: "integer keys"})
    # The args go through JSON: a tuple arrives as a list.
    assert imm.submit("devx_tasks.echo", {"t": (1, 2)}).result()["args"] == {"t": [1, 2]}
    # Fields are checked by the supervisor's own code.
    for fields, code in [({"args": [1]}, "bad_request"), ({"priority": "high"}, "bad_request"),
                         ({"delay": -1}, "bad_request"), ({"retries": 5000}, "bad_request")]:
        with pytest.raises(hostqueue.ProtocolError) as bad:
            imm.request("submit", task="devx_tasks.echo", **fields)
        assert bad.value.code == code, fields
    with pytest.raises(hostqueue.ProtocolError) as op:
        imm.request("frobnicate")
    assert op.value.code == "unknown_op"
    # A result that is not JSON fails the job, as the worker does.
    job = imm.submit("devx_tasks.unserializable").wait()
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "not JSON-serializable" in job["error"]["message"]
    # Wrong arguments for the task's signature: failed at once, not retried.
    job = imm.submit("devx_tasks.add", {"a": 1}).wait()
    assert job["status"] == "failed" and job["attempts"] == 1 and job["error"]["type"] == "TypeError"
    # A request line over the supervisor's limit.
    small = ImmediateSupervisor([imm.supervisor.modules[0]], max_line=200).client()
    with pytest.raises(hostqueue.ProtocolError) as long_line:
        small.submit("devx_tasks.echo", {"text": "x" * 500})
    assert long_line.value.code == "line_too_long"


def test_immediate_abort_keys_pause_delay_stats(imm: ImmediateClient) -> None:
    done = imm.submit("devx_tasks.add", {"a": 1, "b": 1})
    with pytest.raises(hostqueue.ProtocolError) as ended:
        done.abort()
    assert ended.value.code == "invalid_state"
    with pytest.raises(hostqueue.ProtocolError) as missing:
        imm.get(999)
    assert missing.value.code == "not_found"

    # delay: runs at once (documented), its run_at kept.
    delayed = imm.submit("devx_tasks.add", {"a": 1, "b": 2}, delay=3600)
    assert delayed.status() == "completed"

    # A paused queue holds jobs pending: keys find them, abort cancels them, resume runs them.
    assert imm.pause("default") == ["default"]
    first = imm.submit("devx_tasks.add", {"a": 2, "b": 2}, key="k1")
    again = imm.submit("devx_tasks.add", {"a": 2, "b": 2}, key="k1")
    assert again.duplicate and again.id == first.id and first.status() == "pending"
    assert "paused" in imm.get(first.id)["waiting"]
    with pytest.raises(TimeoutError):
        first.wait(timeout=0.05)
    doomed = imm.submit("devx_tasks.add", {"a": 0, "b": 0})
    assert doomed.abort()["status"] == "cancelled"
    assert imm.stats()["pending"] == 1
    assert imm.resume() == []
    assert first.result() == 4
    # The key is free once its job ended; with key_ttl a completed one answers.
    assert not imm.submit("devx_tasks.add", {"a": 2, "b": 2}, key="k1").duplicate
    cached = imm.submit("devx_tasks.add", {"a": 2, "b": 2}, key="k1", key_ttl=60)
    assert cached.duplicate and cached.result() == 4

    # submit_many runs each in order; list_jobs filters in memory, newest first.
    handles = imm.submit_many("devx_tasks.add", [{"a": i, "b": i} for i in range(3)], run_id="r1")
    assert [h.result() for h in handles] == [0, 2, 4]
    listed = imm.list_jobs(run_id="r1")
    assert [j["id"] for j in listed] == sorted((h.id for h in handles), reverse=True)
    assert imm.list_jobs(status="cancelled")[0]["id"] == doomed.id
    assert imm.stats(run_id="r1")["completed"] == 3
    stats = imm.stats()
    assert stats["cancelled"] == 1 and stats["queues"]["default"]["completed"] >= 6

    # retry puts a failed job back and runs it.
    failed = imm.submit("devx_tasks.fail", retries=0)
    assert failed.wait()["status"] == "failed"
    assert imm.retry(failed.id)["status"] == "pending"
    assert failed.wait()["attempts"] == 1 and len(imm.get(failed.id)["attempt_log"]) == 2
    assert [e["event"] for e in failed.progress()] == ["started", "failed"]  # the new run's

    # scale(0) holds jobs as a pool of no workers would.
    imm.scale(0)
    held = imm.submit("devx_tasks.add", {"a": 5, "b": 5})
    assert held.status() == "pending"
    imm.scale(2)
    assert held.result() == 10
    assert imm.ping()["state"] == "running" and imm.status()["target_workers"] == 2


def test_immediate_every_job_watch_and_shared_supervisor(imm: ImmediateClient) -> None:
    other = imm.supervisor.client()
    with other.watch(task="devx_tasks.add") as stream:
        imm.submit("devx_tasks.add", {"a": 1, "b": 1})
        imm.submit("devx_tasks.echo")  # filtered out
        kinds = [e["event"] for e in iter(lambda: stream.next_event(timeout=0), None)]
    assert kinds == ["submitted", "started", "progress", "progress", "completed"]
    assert len(other.list_jobs()) == 2  # one supervisor, two clients


def test_immediate_from_the_environment(tasks_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """HOSTQUEUE_IMMEDIATE=1: code that makes its own Client gets an immediate one, and a
    job that submits a job reaches the same in-memory supervisor."""
    monkeypatch.setenv("HOSTQUEUE_IMMEDIATE", "1")
    monkeypatch.setenv("HOSTQUEUE_TASKS", tasks_file)
    reset_shared_supervisor()
    try:
        client = hostqueue.Client("/nonexistent/socket")
        assert isinstance(client, ImmediateClient)
        assert client.submit("devx_tasks.chain", {"n": 41}).result() == 42
        assert [j["task"] for j in hostqueue.Client().list_jobs()] == ["devx_tasks.add", "devx_tasks.chain"]
        monkeypatch.setenv("HOSTQUEUE_IMMEDIATE", "0")
        assert type(hostqueue.Client("/nonexistent/socket")) is hostqueue.Client
    finally:
        reset_shared_supervisor()


def _scenario(c: hostqueue.Client) -> list[Any]:
    """Requests whose outcomes must not depend on the supervisor being real."""
    out: list[Any] = []

    def ended(handle: hostqueue.JobHandle) -> dict[str, Any]:
        job = handle.wait(timeout=20)
        err = job["error"] or {}
        return {"status": job["status"], "result": job["result"], "attempts": job["attempts"],
                "max_attempts": job["max_attempts"], "error": (err.get("type"), err.get("message")),
                "progress": (job["progress"], job["progress_message"])}

    out.append(ended(c.submit("devx_tasks.add", {"a": 1, "b": 2})))
    out.append(ended(c.submit("devx_tasks.echo", {"t": (1, "x"), "n": None}, retries=1)))
    out.append(ended(c.submit("devx_tasks.flaky", {"fail_times": 1})))
    out.append(ended(c.submit("devx_tasks.flaky", {"fail_times": 9}, retries=1)))
    out.append(ended(c.submit("devx_tasks.fail")))
    out.append(ended(c.submit("devx_tasks.permanent")))
    out.append(ended(c.submit("devx_tasks.unserializable")))
    out.append(ended(c.submit("devx_tasks.aborts")))
    out.append(ended(c.submit("devx_tasks.add", {"a": 1})))
    out.append(ended(c.submit("devx_tasks.add", {"a": 1, "b": 2, "c": 3})))
    handle = c.submit("devx_tasks.add", {"a": 1, "b": 1})
    handle.wait(timeout=20)
    events = [e for e in handle.progress()]
    out.append([e["event"] for e in events][-1:])
    flaky = c.submit("devx_tasks.flaky", {"fail_times": 2})
    flaky.wait(timeout=20)
    out.append([(a["attempt"], a["status"], a["error"] and a["error"]["message"])
                for a in c.get(flaky.id)["attempt_log"]])
    try:
        c.submit("devx_tasks.fail", retries=0).result(timeout=20)
    except hostqueue.JobFailed as exc:
        out.append((str(exc), sorted(exc.job)))
    # A paused queue: keys, abort of a pending job, resume.
    out.append(c.pause("default"))
    first = c.submit("devx_tasks.add", {"a": 3, "b": 4}, key="same")
    second = c.submit("devx_tasks.add", {"a": 3, "b": 4}, key="same")
    out.append((second.duplicate, second.id == first.id, first.status()))
    doomed = c.submit("devx_tasks.add", {"a": 0, "b": 0})
    aborted = doomed.abort()
    out.append((aborted["status"], aborted["error"]))
    out.append({k: v for k, v in c.stats().items() if k in ("pending", "cancelled")})
    out.append(c.resume("default"))
    out.append(first.result(timeout=20))
    failed = c.submit("devx_tasks.fail", {"message": "again"}, retries=0)
    failed.wait(timeout=20)
    out.append(c.retry(failed.id)["status"] in ("pending", "running"))  # a worker may be quick
    out.append(ended(failed))
    ids = c.submit_many_ids("devx_tasks.add", [{"a": i, "b": 1} for i in range(3)])
    out.append(([i - ids[0] for i in ids], [c.wait(i, timeout=20)["result"] for i in ids]))
    for call in (lambda: c.submit("devx_tasks.nope"),
                 lambda: c.request("submit_many", task="devx_tasks.add", args=[{}], reply="all"),
                 lambda: c.request("submit", task="devx_tasks.add", args="nope"),
                 lambda: c.request("submit_many", task="devx_tasks.add", args=[{}], key="k"),
                 lambda: handle.abort(),
                 lambda: c.get(10_000),
                 lambda: c.retry(handle.id),
                 lambda: c.scale(1000),
                 lambda: c.list_jobs(status="weird")):
        try:
            call()
            out.append("no error")
        except hostqueue.ProtocolError as exc:
            out.append((exc.code, exc.message))
    try:
        c.submit("devx_tasks.add", {"a": {1, 2}})
        out.append("no error")
    except TypeError as exc:
        out.append(("TypeError", str(exc)))
    stats = c.stats()
    out.append({k: stats[k] for k in ("pending", "completed", "failed", "cancelled")})
    out.append(sorted(c.list_jobs(status="failed", limit=3)[0]))
    return out


def test_immediate_matches_a_real_supervisor(
    tasks_file: str, request: pytest.FixtureRequest, imm: ImmediateClient,
) -> None:
    # The marker the plugin's fixture reads (added here: the task file's path is made
    # by a fixture, and the plugin registers the marker only once this module loaded).
    request.node.add_marker(pytest.mark.hostqueue(tasks=[tasks_file], workers=1, grace=2))
    real = request.getfixturevalue("hostqueue_supervisor")
    production = _scenario(real.client)
    immediate = _scenario(imm)
    for i, (p, m) in enumerate(zip(production, immediate)):
        assert m == p, f"step {i}: immediate {m!r} != production {p!r}"
    assert len(production) == len(immediate)


# ---------------------------------------------------------------------------
# the pytest plugin


PLUGIN_TASKS = textwrap.dedent('''
    import os
    import time

    import hostqueue


    @hostqueue.task
    def add(ctx, a, b):
        return {"sum": a + b, "pid": os.getpid()}


    @hostqueue.task
    def steps(ctx, n=3):
        for i in range(n):
            time.sleep(0.1)
            ctx.progress((i + 1) / n, f"step {i + 1}")
        return n
''')

PLUGIN_TESTS = textwrap.dedent('''
    import json
    import os

    import psutil
    import pytest

    import hostqueue

    RECORD = os.environ["HQ_RECORD"]


    def record(sup):
        workers = [w["pid"] for w in sup.client.status()["workers"]]
        with open(RECORD, "a") as f:
            f.write(json.dumps({"pid": sup.pid, "workers": workers, "socket": sup.socket,
                                "dir": str(sup.directory)}) + "\\n")


    def test_from_the_ini_option(hostqueue_client):
        result = hostqueue_client.submit("ptasks.add", {"a": 1, "b": 2}).result(timeout=20)
        assert result["sum"] == 3 and result["pid"] != os.getpid()


    @pytest.mark.hostqueue(tasks=["ptasks"], workers=1, prefetch=1)
    def test_supervisor_object(hostqueue_supervisor):
        sup = hostqueue_supervisor
        record(sup)
        assert os.path.exists(sup.socket) and os.path.exists(sup.store)
        status = sup.client.status()
        assert status["pid"] == sup.pid and len(status["workers"]) == 1
        job = sup.client.submit("ptasks.steps", {"n": 3})
        events = [e["event"] for e in job.progress()]
        assert events[-1] == "completed"
        assert psutil.Process(sup.pid).is_running()


    @pytest.mark.hostqueue(tasks=["ptasks"])
    def test_immediate(hostqueue_immediate):
        job = hostqueue_immediate.submit("ptasks.steps", {"n": 2})
        assert job.result() == 2
        assert [e["event"] for e in job.progress()] == ["started", "progress", "progress", "completed"]


    @pytest.mark.hostqueue(tasks=["ptasks"], workers=2)
    def test_fails_on_purpose(hostqueue_supervisor):
        record(hostqueue_supervisor)
        hostqueue_supervisor.client.submit("ptasks.add", {"a": 1, "b": 1}).result(timeout=20)
        assert False, "failing on purpose"
''')


def subprocess_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pytester subprocess imports hostqueue from this checkout."""
    for name in [k for k in os.environ if k.startswith("HOSTQUEUE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])


def test_pytest_plugin_fixtures_and_cleanup_after_a_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = pytester.path / "record.jsonl"
    pytester.makepyfile(ptasks=PLUGIN_TASKS, test_hq=PLUGIN_TESTS)
    pytester.makeini("[pytest]\nhostqueue_tasks =\n    ptasks\n")
    subprocess_env(monkeypatch)
    monkeypatch.setenv("HQ_RECORD", str(record))
    # Even with every Client of the test process made immediate, the supervisor fixtures
    # talk to the real supervisor (test_from_the_ini_option checks the worker's pid).
    monkeypatch.setenv("HOSTQUEUE_IMMEDIATE", "1")
    result = pytester.runpytest_subprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider",
                                           "--strict-markers", timeout=120)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*failing on purpose*", "*hostqueue supervisor log*"])
    runs = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(runs) == 2 and all(len(r["workers"]) >= 1 for r in runs)
    for run in runs:  # every process of both supervisors is gone, the failed test's too
        for pid in [run["pid"], *run["workers"]]:
            assert not alive(pid), f"process {pid} of a test's supervisor is still alive"
        assert session_pids(run["pid"]) == []
        assert not os.path.exists(run["socket"])
    # The passing test's directory is removed; the failing one's keeps its log.
    passed_dir, failed_dir = runs[0]["dir"], runs[1]["dir"]
    assert not os.path.exists(passed_dir)
    assert os.path.exists(os.path.join(failed_dir, "supervisor.log"))
    shutil.rmtree(failed_dir, ignore_errors=True)


def test_pytest_plugin_needs_task_modules(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_none="def test_it(hostqueue_immediate):\n    pass\n")
    result = pytester.runpytest_inprocess(*PLUGIN_ARGS, "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*hostqueue fixtures need task modules*"])


# ---------------------------------------------------------------------------
# embedding


def _title() -> str | None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover
        return None
    return setproctitle.getproctitle()


@pytest.fixture
def embed_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="hq-emb-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_embedded_with_block_cli_signals_and_title(tasks_file: str, embed_dir: Path) -> None:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                  signal.SIGCHLD, signal.SIGQUIT)}
    title = _title()
    with hostqueue.Supervisor(store=str(embed_dir / "e.db"), tasks=[tasks_file], workers=1,
                              log_level="warning") as sup:
        assert sup.running
        with sup.client(timeout=10) as c:
            job = c.submit("devx_tasks.pid")
            assert job.result(timeout=20) != os.getpid()  # a real worker process ran it
        # Another process reaches the embedded supervisor through its socket.
        done = subprocess.run(
            [sys.executable, "-m", "hostqueue", "ctl", "--socket", sup.socket, "status", "--json"],
            capture_output=True, text=True, env=child_env(), timeout=30)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["pid"] == os.getpid() and status["state"] == "running"
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        assert _title() == title
    assert sup.exit_code == 0 and not sup.running
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert _title() == title


def test_embedded_start_stop(tasks_file: str, embed_dir: Path) -> None:
    sup = hostqueue.Supervisor(store=str(embed_dir / "s.db"), tasks=[tasks_file], workers=1,
                               log_level="warning")
    assert sup.start() is sup
    try:
        with sup.client(timeout=10) as c:
            assert c.submit("devx_tasks.add", {"a": 20, "b": 22}).result(timeout=20) == 42
            workers = [w["pid"] for w in c.status()["workers"]]
    finally:
        code = sup.stop(timeout=30)
    assert code == 0
    assert not os.path.exists(sup.socket)
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, f"workers {workers} to exit")
    with pytest.raises(hostqueue.SupervisorFailed):
        sup.start()  # a Supervisor starts once


def test_embedded_async_with(tasks_file: str, embed_dir: Path) -> None:
    handler = signal.getsignal(signal.SIGTERM)

    async def main() -> tuple[Any, int | None]:
        async with hostqueue.Supervisor(store=str(embed_dir / "a.db"), tasks=[tasks_file],
                                        workers=1, log_level="warning") as sup:
            async with sup.async_client(timeout=10) as c:
                job = await c.submit("devx_tasks.add", {"a": 1, "b": 2})
                result = await job.result(timeout=20)
        return result, sup.exit_code

    assert asyncio.run(main()) == (3, 0)
    assert signal.getsignal(signal.SIGTERM) == handler


def test_embedded_bad_task_module_fails_start(embed_dir: Path) -> None:
    broken = embed_dir / "broken_tasks.py"
    broken.write_text("import hostqueue\nraise RuntimeError('broken on purpose')\n")
    handler, title = signal.getsignal(signal.SIGTERM), _title()
    sup = hostqueue.Supervisor(store=str(embed_dir / "b.db"), tasks=[str(broken)], workers=1,
                               log_level="error")
    with pytest.raises(hostqueue.SupervisorFailed):
        sup.start(timeout=20)
    missing = hostqueue.Supervisor(store=str(embed_dir / "m.db"), tasks=["no_such_module_xyz"],
                                   workers=1, log_level="error")
    with pytest.raises(hostqueue.SupervisorFailed):
        missing.start(timeout=20)
    assert signal.getsignal(signal.SIGTERM) == handler and _title() == title


# ---------------------------------------------------------------------------
# examples


EXAMPLES = ROOT / "examples"


def read_ppm_size(path: Path) -> tuple[int, int]:
    magic, size, maxval = path.read_bytes().split(b"\n", 3)[:3]
    assert magic == b"P6" and maxval == b"255"
    w, h = size.split()
    return int(w), int(h)


def test_example_thumbnails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "thumbnails" / "run.py"), "--count", "3",
         "--size", "160x120", "--width", "40", "--out", str(out)],
        capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 of 3 thumbnails" in done.stdout and "[#####" in done.stdout
    for i in range(1, 4):
        assert read_ppm_size(out / f"image-{i}.thumb.ppm") == (40, 30)
    # The same task in immediate mode, for a unit test of its own.
    client = hostqueue.Client.immediate(tasks=[str(EXAMPLES / "thumbnails" / "thumbs.py")])
    sys.path.insert(0, str(EXAMPLES / "thumbnails"))
    try:
        import thumbs
    finally:
        sys.path.remove(str(EXAMPLES / "thumbnails"))
    thumbs.make_sample(str(tmp_path / "a.ppm"), 64, 32)
    job = client.submit("thumbs.thumbnail", {"src": str(tmp_path / "a.ppm"),
                                             "dst": str(tmp_path / "b.ppm"), "width": 16})
    assert job.result()["height"] == 8 and read_ppm_size(tmp_path / "b.ppm") == (16, 8)
    progress = [e["progress"] for e in job.progress() if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) == 8
    missing = client.submit("thumbs.thumbnail", {"src": "/nonexistent.ppm", "dst": "x"}).wait()
    assert missing["status"] == "failed" and missing["attempts"] == 1  # Permanent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_example_webapp_streams_progress_with_sse() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "webapp" / "app.py"), "--host", "127.0.0.1",
         "--port", str(port), "--quiet", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
        start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"serving on http://127.0.0.1:{port}/" in line, line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        page = conn.getresponse()
        assert page.status == 200 and b"EventSource" in page.read()
        conn.request("POST", "/jobs", body=json.dumps({"steps": 4, "delay": 0.1}),
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 201
        job = json.loads(reply.read())
        conn.close()
        stream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        stream.request("GET", job["events"], headers={"Accept": "text/event-stream"})
        response = stream.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        events = []
        while True:
            raw = response.fp.readline()
            assert raw, f"the stream ended before the final event: {events}"
            if raw.startswith(b"data: "):
                events.append(json.loads(raw[6:]))
                if events[-1]["event"] in FINAL:
                    break
        stream.close()
        assert events[-1]["event"] == "completed"
        assert events[-1]["job"]["result"]["steps"] == 4
        fractions = [e["progress"] for e in events if e["event"] == "progress"]
        assert fractions and fractions == sorted(fractions)
        missing = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        missing.request("GET", "/jobs/999/events")
        assert missing.getresponse().status == 404
        missing.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            for pid in session_pids(proc.pid):
                os.kill(pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert session_pids(proc.pid) == []


def test_example_cleanup_schedule_deletes_old_files() -> None:
    work = Path(tempfile.mkdtemp(prefix="hq-clean-", dir="/tmp"))
    try:
        for name in ("hostqueue.toml", "cleanup_tasks.py"):
            shutil.copy(EXAMPLES / "cleanup" / name, work / name)
        scratch = work / "scratch"
        scratch.mkdir()
        old = time.time() - 3600
        for name in ("old-1.log", "old-2.log"):
            (scratch / name).write_text("old")
            os.utime(scratch / name, (old, old))
        (scratch / "new.log").write_text("new")
        log = open(work / "supervisor.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "hostqueue", "run", "--config", "hostqueue.toml"],
                                cwd=work, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for(lambda: not (scratch / "old-1.log").exists() or proc.poll() is not None,
                     15, "the schedule to delete the old files")
            assert proc.poll() is None, (work / "supervisor.log").read_text()
            assert sorted(os.listdir(scratch)) == ["new.log"]
            with hostqueue.Client(str(work / "cleanup.sock"), timeout=10) as c:
                [schedule] = c.request("schedules")["schedules"]
                assert schedule["name"] == "cleanup" and schedule["cron"] == "*/2 * * * * *"
                job = c.wait(schedule["last_job"], timeout=10)
            assert job["status"] == "completed" and job["task"] == "cleanup_tasks.cleanup"
            assert job["result"]["kept"] == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            finally:
                for pid in session_pids(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                log.close()
        assert proc.returncode == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_example_socat() -> None:
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed")
    done = subprocess.run(
        ["sh", str(EXAMPLES / "socat" / "run.sh")], capture_output=True, text=True, timeout=60,
        env=child_env(HOSTQUEUE=f"{sys.executable} -m hostqueue"), start_new_session=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ended: completed" in done.stdout and "completed jobs: 1" in done.stdout
    assert '"op": "stats"' in done.stderr and '"ok":true' in done.stderr


def test_examples_readme_names_each_example() -> None:
    text = (EXAMPLES / "README.md").read_text()
    for command in ("python examples/thumbnails/run.py", "python examples/webapp/app.py",
                    "hostqueue run --config hostqueue.toml", "sh examples/socat/run.sh"):
        assert command in text


# ---------------------------------------------------------------------------
# typing


USER_MODULE = textwrap.dedent('''
    """A user's module: tasks, a client, an embedded supervisor, an immediate client."""
    from __future__ import annotations

    import hostqueue


    @hostqueue.task(retries=2, timeout=30)
    def resize(ctx: hostqueue.JobContext, path: str, width: int = 128) -> dict[str, object]:
        ctx.progress(0.5, "half")
        if ctx.aborted:
            raise hostqueue.Aborted()
        return {"path": path, "width": width}


    @hostqueue.task
    def ping(ctx: hostqueue.JobContext) -> str:
        return "pong"


    def submit(socket: str) -> object:
        with hostqueue.Client(socket, timeout=5.0) as c:
            job: hostqueue.JobHandle = c.submit("usermod.resize", {"path": "a.png"}, retries=1)
            for event in job.progress():
                print(event["event"])
            stats: dict[str, object] = c.stats()
            print(stats, job.status())
            return job.result(timeout=30)


    def embedded() -> int:
        with hostqueue.Supervisor(store="jobs.db", tasks=["usermod"], workers=2) as sup:
            with sup.client() as c:
                c.submit("usermod.ping").wait(timeout=10)
        return sup.stop()


    async def embedded_async() -> object:
        async with hostqueue.Supervisor(store="jobs.db", tasks=["usermod"]) as sup:
            async with sup.async_client() as c:
                job = await c.submit("usermod.ping")
                return await job.result(timeout=10)


    def immediate() -> object:
        c = hostqueue.Client.immediate(tasks=["usermod"])
        try:
            return c.submit("usermod.resize", {"path": "b.png"}).result()
        except (hostqueue.JobFailed, hostqueue.ProtocolError, hostqueue.SupervisorFailed) as exc:
            return exc
        finally:
            c.close()

''')

MISUSE = textwrap.dedent('''
    from __future__ import annotations

    import hostqueue


    @hostqueue.task(retries=2)
    def resize(ctx: hostqueue.JobContext, path: str) -> int:
        return len(path)


    def wrong() -> str:
        return resize(None, path=3)
''')


@pytest.mark.timeout(300)
def test_user_code_passes_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    (tmp_path / "misuse.py").write_text(MISUSE)
    cache = Path(tempfile.gettempdir()) / "hostqueue-devx-mypy-cache"
    env = child_env(MYPYPATH=str(ROOT))
    # --follow-imports=silent: hostqueue's own modules are checked as for an installed
    # package (py.typed), where mypy reports only the user's files.
    base = [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
            "--cache-dir", str(cache), "--no-error-summary", "--hide-error-context"]
    done = subprocess.run([*base, "usermod.py", "misuse.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)
    lines = [ln for ln in done.stdout.splitlines() if ": error:" in ln]
    assert not [ln for ln in lines if ln.startswith("usermod.py")], done.stdout + done.stderr
    # The decorator keeps the function's type: misuse is caught.
    bad_line = MISUSE.splitlines().index("    return resize(None, path=3)") + 1
    assert any(ln.startswith(f"misuse.py:{bad_line}:") for ln in lines), done.stdout + done.stderr
    assert all(ln.startswith("misuse.py") for ln in lines), done.stdout
