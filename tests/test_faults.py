"""Workers that stop answering: an abort must reach the job it names, and jobs handed to a
worker that never starts them must run elsewhere (issue: reliability under careless and
hostile clients, items 1 and 9).

Real supervisors and workers; the worker is frozen with SIGSTOP or by a task that holds
the interpreter in C (``ctypes.PyDLL(None).sleep``), so that neither its main thread nor
its control thread can answer.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

import pytest

from conftest import TASKS, HQEnv, Supervisor, file_lines, ok, wait_for

FAULT_TASKS = textwrap.dedent(
    '''
    """Tasks of tests/test_faults.py."""
    import ctypes
    import os

    import hostqueue


    @hostqueue.task(retries=0)
    def c_sleep(ctx, marker, seconds=0.0):
        """Append to marker, then sleep in C with the interpreter held: no thread of the
        worker runs meanwhile."""
        with open(marker, "a") as f:
            f.write(f"{ctx.job_id}\\n")
        if seconds:
            ctypes.PyDLL(None).sleep(int(seconds))
        return ctx.job_id
    '''
)


def fault_supervisor(hq: HQEnv, workers: int) -> Supervisor:
    path = hq.dir / "faulttasks.py"
    path.write_text(FAULT_TASKS)
    sup = hq.supervisor(workers=workers, start=False)
    sup.start("--tasks", str(path))
    return sup


def teach_fast(sup: Supervisor, marker: str, n: int = 5) -> None:
    """Run a few quick jobs of c_sleep, so that dispatch knows it as fast and hands
    several at once."""
    for _ in range(n):
        sup.wait_job(sup.submit("faulttasks.c_sleep", {"marker": marker})["id"])


@pytest.mark.timeout(60)
def test_an_abort_of_a_held_job_never_costs_the_running_job(hq: HQEnv) -> None:
    """One worker runs a job that holds the interpreter in C for 12 s and holds a second
    job behind it; the second is aborted. Its worker cannot answer, but it is not running
    that job: no worker is replaced after the 10 s abort grace, the running job completes,
    and the aborted one ends cancelled without ever running. (Before: after 10 s the
    worker was killed for "ignoring its abort", the running job, which nobody aborted,
    ended cancelled, and the aborted one ran and completed. The log also said the worker
    died "while running job 0".)"""
    sup = fault_supervisor(hq, workers=1)
    warm, marker = hq.path("warm"), hq.path("ran")
    teach_fast(sup, warm)
    running, held = sup.call("submit_many", "jobs", task="faulttasks.c_sleep",
                             args=[{"marker": marker, "seconds": 12}, {"marker": marker}])
    wait_for(lambda: file_lines(marker), 10, "the long job to start")
    [pid] = sup.worker_pids()
    wait_for(lambda: sup.status()["workers"][0]["held"] == 1, 10,
             "the worker to hold the second job, not started")
    ok(sup.request("abort", job=held["id"]))
    done = sup.wait_job(running["id"], timeout=30)
    assert done["status"] == "completed" and done["result"] == running["id"], done
    aborted = sup.wait_job(held["id"], timeout=10)
    assert aborted["status"] == "cancelled" and aborted["started_at"] is None, aborted
    assert file_lines(marker) == [str(running["id"])], "the aborted job ran"
    assert sup.worker_pids() == {pid}, "a worker was replaced"
    log = sup.log_text()
    assert "ignored its abort" not in log and "while running job 0" not in log, log[-2000:]


@pytest.mark.timeout(60)
def test_jobs_handed_to_a_stopped_worker_run_elsewhere(hq: HQEnv) -> None:
    """Two workers, one frozen with SIGSTOP while idle; 20 jobs with a 1 s time limit are
    submitted at once. The frozen worker is handed some and starts none: within a few
    seconds it is replaced and they run on the other worker, uncharged. (Before: they
    sat `running` for 20 s and more: a time limit counts from a job's start, and these
    never started.)"""
    sup = fault_supervisor(hq, workers=2)
    marker = hq.path("ran")
    teach_fast(sup, hq.path("warm"))
    frozen = min(sup.worker_pids())
    os.kill(frozen, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        jobs = sup.call("submit_many", "jobs", task="faulttasks.c_sleep",
                        args=[{"marker": marker}] * 20, timeout=1)
        ids = [j["id"] for j in jobs]
        ended = {}
        for job_id in ids:
            ended[job_id] = sup.wait_job(job_id, timeout=20)
        took = time.monotonic() - t0
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert all(j["status"] == "completed" and j["attempts"] == 1 for j in ended.values()), ended
    assert took < 10, f"the 20 jobs took {took:.1f} s with one worker frozen"
    assert sorted(int(x) for x in file_lines(marker)) == ids, "a job ran twice or not at all"
    wait_for(lambda: frozen not in sup.worker_pids() and len(sup.worker_pids()) == 2, 10,
             "the frozen worker to be replaced")
    assert "started none of the" in sup.log_text()


PLANTED = '''
import os
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "PLANTED-RAN"), "w") as f:
    f.write(str(os.getpid()))
raise ImportError("a planted module")
'''


@pytest.mark.timeout(60)
def test_a_module_planted_in_the_working_directory_shadows_nothing(hq: HQEnv) -> None:
    """`hostqueue run` started from a directory others can write to: a file planted there
    under the name of a module that hostqueue imports (orjson.py, psutil.py, json.py) is
    never imported by a worker or the supervisor, while a task module in that directory
    still loads by its plain name (the README relies on it). (Before: workers ran as
    `python -m hostqueue.worker` with the working directory first on sys.path, and the
    planted orjson.py ran in every worker.)"""
    import shutil
    import subprocess
    import sys

    work = hq.dir / "shared"
    work.mkdir()
    for name in ("orjson", "psutil", "json", "setproctitle"):
        (work / f"{name}.py").write_text(PLANTED)
    (work / "mytasks.py").write_text(textwrap.dedent('''
        import hostqueue

        @hostqueue.task
        def hello(ctx, name):
            return f"hello {name}"
    '''))
    script = shutil.which("hostqueue", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the hostqueue command is not installed next to this python")
    sock, store = str(work / "q.sock"), str(work / "q.db")
    log = open(hq.dir / "planted.log", "wb")
    env = hq.env()
    env.pop("PYTHONPATH", None)  # as a user's shell has it: the installed hostqueue
    proc = subprocess.Popen([script, "run", "--store", store, "--socket", sock, "--tasks", "mytasks",
                             "--workers", "2"], cwd=str(work), env=env, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hq.procs.append(proc)
    sup = Supervisor(hq, "planted", 2, 10.0, store=work / "q.db", socket_path=work / "q.sock")
    sup.proc = proc
    wait_for(lambda: len(sup.status()["workers"]) == 2 and all(
        w["state"] == "idle" for w in sup.status()["workers"]), 20, "two idle workers")
    job = sup.submit("mytasks.hello", {"name": "world"})
    assert sup.wait_job(job["id"])["result"] == "hello world"
    assert not (work / "PLANTED-RAN").exists(), "a module planted in the working directory ran"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


@pytest.mark.timeout(60)
def test_the_store_files_are_private_whatever_the_umask(hq: HQEnv) -> None:
    """The store holds job arguments (a password, say): the database, its -wal and -shm
    files are 0600, like the socket and the lock, under a umask of 022 (before: 0644,
    readable by every user); a store made readable by others is set back to 0600."""
    import stat as st

    old = os.umask(0o022)
    try:
        sup = hq.supervisor(workers=1)
        sup.wait_job(sup.submit("add", {"a": 1, "b": 2})["id"])
        for suffix in ("", "-wal", "-shm", ".lock"):
            path = str(sup.store) + suffix
            assert st.S_IMODE(os.stat(path).st_mode) == 0o600, (path, oct(os.stat(path).st_mode))
        assert st.S_IMODE(os.stat(sup.socket).st_mode) == 0o600
        assert sup.stop() == 0
        os.chmod(sup.store, 0o644)
        sup.start()
        assert st.S_IMODE(os.stat(sup.store).st_mode) == 0o600, "an existing store stays readable"
    finally:
        os.umask(old)


@pytest.mark.timeout(60)
def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(hq: HQEnv) -> None:
    """A symlink planted as `<store>.lock` (to a file of root's, say) makes the supervisor
    refuse to start, naming it, and leaves the target as it was (before: the target was
    truncated to the supervisor's PID)."""
    target = hq.dir / "precious"
    target.write_text("do not truncate me\n")
    sup = hq.supervisor(workers=1, start=False)
    os.symlink(target, str(sup.store) + ".lock")
    sup.start(wait=False)
    assert sup.wait_exit(15) == 1
    assert target.read_text() == "do not truncate me\n"
    assert "symbolic link" in sup.log_text(), sup.log_text()[-2000:]


@pytest.mark.timeout(60)
def test_a_foreign_sqlite_file_is_refused_and_left_as_it_was(hq: HQEnv) -> None:
    """An SQLite file of another program (it has a `jobs` table of its own) given as the
    store is refused with a message that says so, and not modified at all: not even
    switched to WAL mode (before: refused, but switched to WAL first)."""
    import sqlite3

    path = hq.dir / "other.db"
    conn = sqlite3.connect(str(path))
    conn.execute("CREATE TABLE jobs (name TEXT)")
    conn.execute("INSERT INTO jobs VALUES ('mine')")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    sup = hq.supervisor(workers=1, store=path, start=False)
    sup.start(wait=False)
    assert sup.wait_exit(15) == 1
    assert path.read_bytes() == before, "the refused file was modified"
    assert not os.path.exists(str(path) + "-wal")
    with sqlite3.connect(str(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert "not a hostqueue store" in sup.log_text(), sup.log_text()[-2000:]


@pytest.mark.timeout(60)
def test_a_worker_whose_supervisor_is_gone_exits_without_a_traceback(hq: HQEnv) -> None:
    """A worker that writes to its supervisor after the supervisor died (the pipe is
    broken: here, from its first message) exits at once and quietly, killing what it
    started (before: a BrokenPipeError traceback on the log it shares with the
    supervisor)."""
    import socket
    import subprocess
    import sys

    ours, theirs = socket.socketpair()
    control_ours, control_theirs = socket.socketpair()
    ours.shutdown(socket.SHUT_RD)  # nothing it writes can be read: EPIPE on its first send
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "hostqueue.worker", "--fd", str(theirs.fileno()),
         "--control-fd", str(control_theirs.fileno()), "--parent", str(os.getpid())],
        pass_fds=(theirs.fileno(), control_theirs.fileno()), env=hq.env(), cwd=str(hq.dir),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        process_group=0,
    )
    theirs.close()
    control_theirs.close()
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        ours.close()
        control_ours.close()
    text = out.decode(errors="replace")
    assert "Traceback" not in text and "BrokenPipeError" not in text, text


@pytest.mark.timeout(60)
def test_a_member_of_the_socket_group_by_a_supplementary_group_may_connect(hq: HQEnv) -> None:
    """With `--socket-group G`, a process whose supplementary groups include G (systemd's
    SupplementaryGroups=, `sg G`) may use the socket (0660, group G), although G's member
    list in /etc/group does not name its user (before: refused as `forbidden`)."""
    import grp
    import pwd
    import subprocess
    import sys

    if os.getuid() != 0:
        pytest.skip("needs root, to run a client as another user with a supplementary group")
    try:
        group = grp.getgrnam("daemon")
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("needs the group daemon and the user nobody")
    if "nobody" in group.gr_mem:
        pytest.skip("nobody is a listed member of daemon here")
    os.chmod(hq.dir, 0o711)  # the socket's directory: others may pass through
    sup = hq.supervisor(workers=1, start=False)
    sup.start("--socket-group", "daemon")
    client = textwrap.dedent(f'''
        import json, os, socket, sys
        os.setgroups([{group.gr_gid}])
        os.setgid({nobody.pw_gid})
        os.setuid({nobody.pw_uid})
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(sup.socket)!r})
        s.sendall(b'{{"id": 1, "op": "ping"}}\\n')
        print(s.makefile().readline().strip())
    ''')
    done = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply.get("ok") is True, reply


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(90)
def test_clients_that_wait_and_hang_up_free_their_descriptors_at_once(hq: HQEnv) -> None:
    """300 clients send `wait` (or `submit` with `wait`) on a job that runs for a minute,
    and close: the supervisor notices each hang-up and frees its descriptor within a few
    seconds, not when the job ends (before: 1,100 of them exhausted a 1,024-descriptor
    limit; new clients were refused and workers could not start). A client that only
    shuts its sending half (`echo ... | socat`) still gets its reply."""
    import socket

    sup = hq.supervisor(workers=1)
    marker, release = hq.path("started"), hq.path("release")
    long_job = sup.submit("block", {"marker": marker, "release": release, "seconds": 60})
    wait_for(lambda: file_lines(marker), 10, "the long job to start")
    baseline = open_fds(sup.pid)
    for i in range(300):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sup.socket))
        if i % 2:
            s.sendall(b'{"id": 1, "op": "wait", "job": %d}\n' % long_job["id"])
        else:
            s.sendall(b'{"id": 1, "op": "submit", "task": "%s.block", "args": {"marker": "%s",'
                      b' "release": "%s", "seconds": 60}, "wait": 120}\n'
                      % (TASKS.encode(), marker.encode(), release.encode()))
        s.close()
    wait_for(lambda: open_fds(sup.pid) <= baseline + 5, 5,
             "the descriptors of the clients that hung up to be closed")
    half = socket.socket(socket.AF_UNIX)
    half.connect(str(sup.socket))
    half.sendall(b'{"id": 7, "op": "ping"}\n')
    half.shutdown(socket.SHUT_WR)
    half.settimeout(10)
    assert json.loads(half.makefile("rb").readline())["id"] == 7, "a half-closed client got no reply"
    half.close()
    open(release, "w").close()
    assert sup.wait_job(long_job["id"])["status"] == "completed"


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """A figure for the person running the tests (shown even with -q)."""
    with capsys.disabled():
        print(f"\n[reliability] {text}", flush=True)


@pytest.mark.timeout(120)
def test_silent_watchers_cannot_exhaust_memory(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    silent_watchers(hq, capsys, 10)


@pytest.mark.torture
@pytest.mark.timeout(300)
def test_fifty_silent_watchers_cannot_exhaust_memory(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    silent_watchers(hq, capsys, 50)


def silent_watchers(hq: HQEnv, capsys: pytest.CaptureFixture[str], n: int) -> None:
    """10 clients watch every event and never read, while 4,000 jobs with 10 KB of
    arguments each go through (events of 40 MB for each watcher, with only the
    submitted and final ones): all clients together may leave only so much unsent;
    the slowest are cut off, the supervisor's memory stays bounded and is given back,
    and it goes on serving (before: each watcher could pile up 64 MiB; 10 of them drove
    the supervisor to 807 MiB, and 675 MiB were still held 30 s later)."""
    import socket

    import psutil

    sup = hq.supervisor(workers=2)
    proc = psutil.Process(sup.pid)
    rss0 = proc.memory_info().rss
    watchers = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(sup.socket))
        s.sendall(b'{"id": 1, "op": "watch"}\n')
        watchers.append(s)
    big = "x" * 10_000
    peak = 0
    with sup.conn(60) as c:
        for _ in range(80):  # lines of 500 KB (the limit is 1 MiB)
            ok(c.request("submit_many", task=f"{TASKS}.blob",
                         args=[{"data": big}] * 50, reply="ids"))
            peak = max(peak, proc.memory_info().rss)
    wait_for(lambda: sup.call("stats", "stats")["completed"] >= 4000, 60, "the 4,000 jobs to complete")
    peak = max(peak, proc.memory_info().rss)
    grew = (peak - rss0) / 2**20
    assert grew < 300, f"the supervisor grew by {grew:.0f} MiB with {n} silent watchers"
    t0 = time.monotonic()
    wait_for(lambda: (proc.memory_info().rss - rss0) / 2**20 < 100, 30,
             "the memory of the cut-off watchers to be given back")
    back = time.monotonic() - t0
    cut = sup.log_text().count("cutting off a client")
    assert cut
    report(capsys, f"{n} silent watchers of every event, 4,000 jobs of 10 KB: the supervisor grew"
                   f" by {grew:.0f} MiB at most, {cut} watchers cut off, back within 100 MiB of"
                   f" its start {back:.1f} s after the jobs ended")
    assert sup.ping()["state"] == "running"
    for s in watchers:
        s.close()


@pytest.mark.timeout(120)
def test_descriptors_are_kept_for_workers_when_clients_take_the_rest(hq: HQEnv) -> None:
    """Under a hard limit of 1,024 open files, 1,100 idle clients connect: the supervisor
    takes clients only up to a reserve it keeps for its workers (the others are refused
    at once with too_many_clients), so it can still start workers; once clients leave,
    new ones are served again (before: the clients took every descriptor, new clients
    were refused and workers could not be started: "Too many open files")."""
    import resource
    import socket
    import subprocess
    import sys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip("this test needs 1,300 open files of its own")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    sup = hq.supervisor(workers=1, start=False)
    wrapper = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024));"
               " os.execv(sys.executable, [sys.executable, '-m', 'hostqueue', *sys.argv[1:]])")
    cmd = sup.command()
    log = open(hq.dir / "fds.log", "wb")
    proc = subprocess.Popen([cmd[0], "-c", wrapper, *cmd[3:]], cwd=str(hq.dir), env=hq.env(),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    hq.procs.append(proc)
    sup.proc = proc
    sup.log_paths.append(hq.dir / "fds.log")
    sup.wait_ready()
    admin = sup.conn(30)  # one connection kept to steer it
    clients, refused = [], 0
    try:
        for _ in range(1100):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sup.socket))
            s.sendall(b'{"id": 1, "op": "ping"}\n')
            clients.append(s)
        for s in clients:
            s.settimeout(10)
            line = s.makefile("rb").readline()
            if b"too_many_clients" in line:
                refused += 1
        assert 0 < refused < 200, f"{refused} of 1,100 clients refused"
        ok(admin.request("scale", n=4))
        wait_for(lambda: sum(w["state"] == "idle" for w in ok(admin.request("status"))["status"]["workers"]) == 4,
                 20, "4 idle workers, started while clients hold most descriptors")
        assert "Too many open files" not in sup.log_text()
    finally:
        for s in clients:
            s.close()
        admin.close()
    wait_for(lambda: sup.ping()["state"] == "running", 10, "a new client to be served again")
