"""The peers' virtualenv and a throwaway redis-server (run from the project's Python)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import BenchError, free_port, wait_until

from . import REQUIREMENTS

VENV = "/tmp/hostqueue-bench-peers"


def ensure_venv(path: str = VENV, log=print) -> str:
    """A virtualenv with the peers at the pinned versions; returns its python.

    Reused while its requirements are unchanged (a marker file holds their hash)."""
    python = os.path.join(path, "bin", "python")
    want = hashlib.sha256("\n".join(REQUIREMENTS).encode()).hexdigest()
    marker = os.path.join(path, ".hostqueue-bench")
    try:
        with open(marker) as f:
            if f.read().strip() == want and os.path.exists(python):
                return python
    except FileNotFoundError:
        pass
    log(f"installing the peers into {path} (pip, from PyPI): {' '.join(REQUIREMENTS)}")
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    result = subprocess.run(  # noqa: PLW1510 - the return code is checked below
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise BenchError(f"pip could not install the peers:\n{result.stdout}\n{result.stderr}")
    with open(marker, "w") as f:
        f.write(want)
    return python


def peer_versions(python: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in"
            " ('huey', 'celery', 'kombu', 'rq', 'dramatiq', 'redis')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    import json

    versions: dict[str, str] = json.loads(out)
    return versions


def find_redis(install: bool, log=print) -> str | None:
    """The redis-server binary; installed with apt-get when asked, as root, if missing."""
    path = shutil.which("redis-server")
    if path or not install:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("redis-server is not installed (and this is not root with apt-get): skipping the Redis peers")
        return None
    log("installing redis-server from the OS packages (apt-get install -y redis-server)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", "redis-server"],
                ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "redis-server"]):
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
        if done.returncode == 0 and cmd[1] == "install":
            break
    # The package may start a system instance; ours is separate (own port, own dir).
    return shutil.which("redis-server")


class RedisServer:
    """redis-server on 127.0.0.1 and a free port, in a temporary directory, with its
    built-in defaults otherwise (RDB snapshots by the default save rules, no AOF)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="hqbench-redis-", dir="/tmp")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], check=False, capture_output=True, text=True).stdout
        return out.split("v=")[1].split()[0] if "v=" in out else out.strip()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

        def answers() -> bool:
            import socket

            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"redis-server exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(answers, 20, "redis-server to answer", interval=0.05)

    def flush(self) -> None:
        """Empty every database between peers, so each starts from nothing."""
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def run_peer(python: str, peer: str, spec: dict, redis: RedisServer | None, timeout: float) -> dict:
    """One round of one peer (bench/peers/runner.py in the peers' virtualenv)."""
    import json

    workdir = tempfile.mkdtemp(prefix=f"hqbench-{peer}-", dir="/tmp")
    cmd = [python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py"), peer,
           "--workdir", workdir, "--spec", json.dumps(spec)]
    if redis is not None:
        redis.flush()
        cmd += ["--redis", redis.url, "--redis-pid", str(redis.pid)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        return {"ok": False, "error": f"no answer within {timeout:.0f} s"}
    finally:
        kill_tree(proc.pid)  # anything the runner left behind
        shutil.rmtree(workdir, ignore_errors=True)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"runner exited {proc.returncode}: {stderr[-2000:]}"}
    result: dict = json.loads(lines[-1])
    result["seconds"] = time.monotonic() - t0
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant it still has (by pid, never by name)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
