"""pytest fixtures for code that uses hostqueue (enabled by the ``pytest11`` entry point).

Fixtures:

- ``hostqueue_supervisor``: a real supervisor (``python -m hostqueue run`` in a session of
  its own) on a temporary store and socket, with real worker processes; yields a
  ``HostqueueProcess`` with ``.client`` (a connected ``hostqueue.Client``), ``.socket``,
  ``.store``, ``.pid``, ``.directory`` and ``.log()``. Torn down even when the test fails:
  SIGTERM (drain), then SIGKILL of every process of its session after a timeout.
- ``hostqueue_client``: only that supervisor's client.
- ``hostqueue_immediate``: an immediate client (jobs run inline, hostqueue.immediate) for
  the same task modules.

Task modules and settings come from the marker, else the ini option::

    @pytest.mark.hostqueue(tasks=["myapp.tasks"], workers=2, grace=5, prefetch=1)
    def test_resize(hostqueue_client): ...

    # pytest.ini / [tool.pytest.ini_options]
    hostqueue_tasks = myapp.tasks          (one module a line)

The marker's other keywords are settings of ``hostqueue run`` (docs/configuration.md):
scalars become flags (``prefetch=1`` -> ``--prefetch 1``), ``config="path.toml"``
names a file, and tables (``queues``, ``limits``, ``schedules``) are written to a TOML
file for ``--config``. ``startup_timeout`` (default 30 s) bounds the wait for the
supervisor's workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported when a fixture is used: pytest sessions that use none pay nothing
    from hostqueue.client.sync import Client
    from hostqueue.client.immediate import ImmediateClient

__all__ = ["HostqueueProcess", "hostqueue_supervisor", "hostqueue_client", "hostqueue_immediate"]

DEFAULT_WORKERS = 2
DEFAULT_GRACE = 5.0
STARTUP_TIMEOUT = 30.0
# Variables of the test's environment that would steer the supervisor elsewhere.
_ENV_DROP = ("HOSTQUEUE_SOCKET", "HOSTQUEUE_STORE", "HOSTQUEUE_WORKERS", "HOSTQUEUE_TASKS",
             "HOSTQUEUE_CONFIG", "HOSTQUEUE_IMMEDIATE", "NOTIFY_SOCKET", "LISTEN_FDS",
             "LISTEN_PID", "WATCHDOG_USEC")
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


# ---------------------------------------------------------------------------
# hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("hostqueue_tasks", type="linelist", default=[],
                  help="hostqueue: task modules (names or .py paths) for the hostqueue_* "
                       "fixtures, one a line; @pytest.mark.hostqueue(tasks=...) overrides it")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "hostqueue(tasks=None, workers=2, **settings): task modules and `hostqueue run` "
        "settings for the hostqueue_supervisor, hostqueue_client and hostqueue_immediate fixtures",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


# ---------------------------------------------------------------------------
# settings


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    options: dict[str, Any] = {}
    # Closest marker wins: function over class over module.
    for marker in reversed(list(request.node.iter_markers("hostqueue"))):
        if marker.args:
            options["tasks"] = marker.args[0] if len(marker.args) == 1 else list(marker.args)
        options.update(marker.kwargs)
    tasks = options.get("tasks")
    if tasks is None:
        tasks = list(request.config.getini("hostqueue_tasks"))
    elif isinstance(tasks, str):
        tasks = [tasks]
    options["tasks"] = [str(t) for t in tasks]
    if not options["tasks"]:
        pytest.fail(
            f"{request.node.nodeid}: the hostqueue fixtures need task modules: "
            "@pytest.mark.hostqueue(tasks=['myapp.tasks']) or the ini option hostqueue_tasks",
            pytrace=False)
    return options


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def _toml(tables: Mapping[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for the marker's tables (queues, limits, schedules)."""
    plain = {k: v for k, v in tables.items() if not isinstance(v, Mapping)}
    nested = {k: v for k, v in tables.items() if isinstance(v, Mapping)}
    out = [f"[{prefix}]"] if prefix and (plain or not nested) else []
    out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in plain.items()]
    for key, value in nested.items():
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        out.append(_toml(value, name))
    return "\n".join(out) + "\n"


def _short_tempdir() -> Path:
    # A Unix socket path must fit in 107 bytes: prefer a short base directory.
    base = tempfile.gettempdir()
    if len(base) > 40 and os.path.isdir("/tmp"):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="hostqueue-", dir=base))


def _child_env() -> dict[str, str]:
    """The test's environment, with PYTHONPATH holding the test process's sys.path, so
    that the supervisor and its workers import the same task modules the test can."""
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    # The interpreter's own directories (stdlib, site-packages) it finds by itself.
    own = tuple({os.path.join(os.path.abspath(p), "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    paths = [os.path.abspath(p or os.curdir) for p in sys.path if os.path.isdir(p or os.curdir)]
    paths = [p for p in paths if not os.path.join(p, "").startswith(own)]
    seen: list[str] = []
    for p in paths + env.get("PYTHONPATH", "").split(os.pathsep):
        if p and p not in seen:
            seen.append(p)
    env["PYTHONPATH"] = os.pathsep.join(seen)
    return env


def _session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (every process a supervisor started stays in it)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != sid:
                continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            found.append(pid)
    return found


# ---------------------------------------------------------------------------
# the supervisor process


class HostqueueProcess:
    """A ``python -m hostqueue run`` started for one test."""

    def __init__(self, options: Mapping[str, Any], directory: Path | None = None) -> None:
        options = dict(options)
        self.tasks: list[str] = list(options.pop("tasks"))
        self.workers: int = int(options.pop("workers", DEFAULT_WORKERS))
        self.grace: float = float(options.pop("grace", DEFAULT_GRACE))
        self.startup_timeout: float = float(options.pop("startup_timeout", STARTUP_TIMEOUT))
        self.directory = directory or _short_tempdir()
        self.store = str(options.pop("store", self.directory / "hostqueue.db"))
        self.socket = str(options.pop("socket", self.directory / "hostqueue.sock"))
        self.log_path = self.directory / "supervisor.log"
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self._client: Client | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "hostqueue", "run", "--store", self.store,
               "--socket", self.socket, "--workers", str(self.workers), "--grace", str(self.grace)]
        for module in self.tasks:
            cmd += ["--tasks", module]
        options = dict(self.options)
        tables = {k: options.pop(k) for k in list(options) if isinstance(options[k], Mapping)}
        config = options.pop("config", None)
        if tables:
            if config is not None:
                pytest.fail("@pytest.mark.hostqueue: give config= or tables "
                            f"({', '.join(tables)}), not both", pytrace=False)
            config_path = self.directory / "hostqueue.toml"
            config_path.write_text(_toml(tables))
            config = str(config_path)
        if config is not None:
            cmd += ["--config", str(config)]
        for name, value in options.items():
            if value is None:
                continue
            cmd += ["--" + name.replace("_", "-"), str(value)]
        return cmd

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def client(self) -> Client:
        """A client connected to the supervisor (made on first use, closed at teardown)."""
        if self._client is None:
            self._client = _real_client(self.socket, 30.0).connect()
        return self._client

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> HostqueueProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=os.getcwd(), env=_child_env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.wait_ready()
        self.client.connect()
        return self

    def wait_ready(self) -> None:
        """Until the socket answers and every worker of the pool is up and idle."""
        from hostqueue.core.errors import HostqueueError

        deadline = time.monotonic() + self.startup_timeout
        last: BaseException | str = "no answer yet"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"the hostqueue supervisor exited with code "
                                   f"{self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                with _real_client(self.socket, 5.0) as probe:
                    status = probe.status()
                workers = status["workers"]
                if (status["state"] == "running" and len(workers) == status["target_workers"]
                        and all(w["state"] == "idle" for w in workers)):
                    return
                last = f"{len(workers)} of {status['target_workers']} workers idle"
            except (HostqueueError, OSError) as exc:
                last = exc
            time.sleep(0.02)
        raise RuntimeError(f"the hostqueue supervisor was not ready within "
                           f"{self.startup_timeout:g} s ({last}):\n{self.log()[-4000:]}")

    def stop(self, timeout: float | None = None) -> int | None:
        """Drain (SIGTERM) and wait; then kill every process of its session. Returns the
        supervisor's exit code (None if it had to be killed)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        proc = self.process
        if proc is None:
            return None
        code: int | None = proc.poll()
        if code is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                code = proc.wait(self.grace + 10.0 if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                code = None
        for pid in [proc.pid] + _session_processes(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.poll() is None:
            proc.wait(10)
        end = time.monotonic() + 10
        while _session_processes(proc.pid) and time.monotonic() < end:
            time.sleep(0.02)
        return code

    def __repr__(self) -> str:
        state = "not started" if self.process is None else f"pid {self.process.pid}"
        return f"<HostqueueProcess {self.socket} {state}>"


def _real_client(socket: str, timeout: float) -> Client:
    """A Client of the socket even under HOSTQUEUE_IMMEDIATE=1 (which makes every
    ``Client(...)`` of the test process an immediate one)."""
    from hostqueue.client.sync import Client

    client = object.__new__(Client)
    client.__init__(socket, timeout)  # type: ignore[misc]
    return client


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture
def hostqueue_supervisor(request: pytest.FixtureRequest) -> Iterator[HostqueueProcess]:
    """A real supervisor and workers on a temporary store, stopped after the test."""
    sup = HostqueueProcess(_options(request))
    try:
        sup.start()
        yield sup
    finally:
        sup.stop()
        if _failed(request) or sup.process is None or sup.process.returncode not in (0, None):
            # Shown with the failed test's captured output.
            print(f"---- hostqueue supervisor log ({sup.log_path})\n{sup.log()[-8000:]}")
        else:
            shutil.rmtree(sup.directory, ignore_errors=True)


@pytest.fixture
def hostqueue_client(hostqueue_supervisor: HostqueueProcess) -> Client:
    """A hostqueue.Client connected to the test's supervisor."""
    return hostqueue_supervisor.client


@pytest.fixture
def hostqueue_immediate(request: pytest.FixtureRequest) -> Iterator[ImmediateClient]:
    """A client whose jobs run inline in the test process (hostqueue.immediate)."""
    from hostqueue.client.immediate import ImmediateClient, ImmediateSupervisor

    options = _options(request)
    workers = options.get("workers")
    supervisor = ImmediateSupervisor(options["tasks"],
                                     workers=1 if workers is None else int(workers))
    client = ImmediateClient(supervisor=supervisor)
    try:
        yield client
    finally:
        client.close()
