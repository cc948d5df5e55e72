"""hostqueue on PostgreSQL beside procrastinate, on the same server, in one run.

    python bench/pg_peers.py [--dsn postgresql://postgres@127.0.0.1/test] [--runs 3]
                             [--jobs 5000] [--workers 2] [--latency 200] [--hosts 1,2]

hostqueue runs with 1 and (--hosts) 2 hosts: supervisors of --workers workers
each on one schema, the clients talking to the first.

Both get the same server, the same number of worker processes (one job at a
time each) and a no-op task; rounds alternate (hostqueue, procrastinate, then
procrastinate, hostqueue, ...) and the figures are medians [range]:

- end to end: from the first submit to the last completion of --jobs jobs, the
  jobs submitted in bulk (hostqueue: `submit_many` of 1,000; procrastinate:
  `batch_defer` of 1,000) while the workers run;
- submit-to-result latency p50/p99 over --latency jobs one after the other
  (hostqueue: `submit` with `wait`; procrastinate has no result API: `defer`,
  then the job's status read every 0.5 ms until `succeeded`);
- CPU seconds and wake-ups of the workers (and hostqueue's supervisor) in 3 s
  of idleness.

procrastinate (3.10.0, with psycopg 3) is installed with pip into a virtualenv
under /tmp (it is not a dependency of hostqueue); it gets a database of its own,
``hqbench_procrastinate``, made afresh each round on the same server
(`procrastinate schema --apply`); its workers are N processes of
`procrastinate worker --concurrency 1` with their defaults (LISTEN/NOTIFY and a
5 s poll). hostqueue gets a fresh schema of the given database each round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import hq  # noqa: E402
from common import cpu_and_switches, tree  # noqa: E402

VENV = "/tmp/hostqueue-bench-procrastinate"
REQUIREMENTS = ["procrastinate==3.10.0", "psycopg[binary,pool]==3.3.9", "psutil==7.2.2"]
DB = "hqbench_procrastinate"

TASKS = textwrap.dedent('''
    import os

    from procrastinate import App, PsycopgConnector

    app = App(connector=PsycopgConnector(conninfo=os.environ["HQB_DSN"]))


    @app.task(queue="bench", name="noop")
    def noop():
        return True
''')

# Runs in procrastinate's virtualenv: the client side of one round, JSON out.
CLIENT = textwrap.dedent('''
    import json, os, statistics, sys, time

    import psycopg
    from proctasks import app, noop

    n, latency_n = int(sys.argv[1]), int(sys.argv[2])
    out = {}
    with app.open(), psycopg.connect(os.environ["HQB_DSN"], autocommit=True) as db:
        def succeeded():
            return db.execute("SELECT COUNT(*) FROM procrastinate_jobs"
                              " WHERE status = 'succeeded'").fetchone()[0]
        # warm: the workers run jobs
        for _ in range(10):
            noop.defer()
        while succeeded() < 10:
            time.sleep(0.005)
        base = succeeded()
        t0 = time.time()
        for k in range(0, n, 1000):
            noop.batch_defer(*[{}] * min(1000, n - k))
        while succeeded() < base + n:
            time.sleep(0.05)  # a count every 50 ms: little load on the shared server
        out["e2e_bulk"] = n / (time.time() - t0)
        samples = []
        for _ in range(latency_n):
            t = time.perf_counter()
            job_id = noop.defer()
            while db.execute("SELECT status FROM procrastinate_jobs WHERE id = %s",
                             (job_id,)).fetchone()[0] != "succeeded":
                time.sleep(0.0005)
            samples.append(time.perf_counter() - t)
        samples.sort()
        out["lat_p50"] = statistics.median(samples) * 1000
        out["lat_p99"] = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000
    print(json.dumps(out))
''')


def with_database(dsn: str, db: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + db))


def ensure_venv() -> str:
    python = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, "requirements.txt")
    want = "\n".join(REQUIREMENTS)
    if os.path.exists(stamp) and open(stamp).read() == want:
        return python
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    with open(stamp, "w") as f:
        f.write(want)
    return python


def idle_figures(procs: list[Any], seconds: float = 3.0) -> dict[str, float]:
    time.sleep(1.0)  # the last jobs' writes and replies settle first, for both
    cpu0, sw0 = cpu_and_switches(procs)
    time.sleep(seconds)
    cpu1, sw1 = cpu_and_switches(procs)
    return {"idle_cpu": cpu1 - cpu0, "idle_wakeups": float(sw1 - sw0)}


def procrastinate_round(python: str, dsn: str, workers: int, jobs: int, latency_n: int) -> dict[str, float]:
    hq.pg_execute(dsn, f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    hq.pg_execute(dsn, f"CREATE DATABASE {DB}")
    url = with_database(dsn, DB)
    work = tempfile.mkdtemp(prefix="hqbench-proc-")
    with open(os.path.join(work, "proctasks.py"), "w") as f:
        f.write(TASKS)
    with open(os.path.join(work, "client.py"), "w") as f:
        f.write(CLIENT)
    env = dict(os.environ, HQB_DSN=url, PYTHONPATH=work)
    cli = os.path.join(VENV, "bin", "procrastinate")
    subprocess.run([cli, "--app=proctasks.app", "schema", "--apply"], env=env, cwd=work, check=True,
                   capture_output=True)
    log = open(os.path.join(work, "workers.log"), "ab")  # noqa: SIM115 - for the workers' lifetime
    procs = [subprocess.Popen([cli, "--app=proctasks.app", "worker", "--concurrency", "1",
                               "--queues", "bench"], env=env, cwd=work, stdout=log, stderr=log,
                              start_new_session=True) for _ in range(workers)]
    try:
        time.sleep(1.0)  # the workers connect and LISTEN
        result = subprocess.run([python, os.path.join(work, "client.py"), str(jobs), str(latency_n)],
                                env=env, cwd=work, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"procrastinate's client failed: {result.stderr[-2000:]}")
        figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
        figures.update(idle_figures(tree(p.pid for p in procs)))
        return figures
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()
        hq.pg_execute(dsn, f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


def hostqueue_round(dsn: str, workers: int, jobs: int, latency_n: int,
                    hosts: int = 1) -> dict[str, float]:
    """hosts supervisors of `workers` workers each on one schema; the clients talk
    to the first (its submits are kept or released, and every host claims)."""
    hq.PG_URL = dsn
    sup = hq.Supervisor(os.path.dirname(HERE), workers)
    others = []
    try:
        sup.start()
        for _ in range(hosts - 1):
            other = hq.Supervisor(os.path.dirname(HERE), workers)
            other.pg_schema = sup.pg_schema
            others.append(other)
            other.start()
        figures = hq.end_to_end_bulk(sup, jobs)
        lat = hq.latency(sup, latency_n, one_request=True)
        figures["lat_p50"] = lat["lat1_p50"]
        figures["lat_p99"] = lat["lat1_p99"]
        procs = []
        for s in (sup, *others):
            supervisor, worker_procs = s.processes()
            procs += [supervisor, *worker_procs]
        figures.update(idle_figures(procs))
        for s in (*others, sup):
            s.stop()
        return figures
    finally:
        for s in (*others, sup):
            s.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--latency", type=int, default=200)
    parser.add_argument("--hosts", default="1,2",
                        help="hostqueue with these numbers of hosts (supervisors of --workers workers"
                             " each on one schema), comma-separated (default 1,2)")
    opts = parser.parse_args()
    python = ensure_venv()
    host_counts = [int(h) for h in opts.hosts.split(",")]
    names = [("hostqueue" if h == 1 else f"hostqueue, {h} hosts") for h in host_counts]
    rounds: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    rounds["procrastinate"] = []
    for i in range(opts.runs):
        order = names + ["procrastinate"] if i % 2 == 0 else ["procrastinate"] + names[::-1]
        for name in order:
            print(f"[{time.strftime('%H:%M:%S')}] round {i + 1}/{opts.runs}: {name}", flush=True)
            if name.startswith("hostqueue"):
                rounds[name].append(hostqueue_round(opts.dsn, opts.workers, opts.jobs, opts.latency,
                                                    host_counts[names.index(name)]))
            else:
                rounds[name].append(procrastinate_round(python, opts.dsn, opts.workers, opts.jobs,
                                                        opts.latency))
    rows = [("end to end, bulk submits (jobs/s)", "e2e_bulk", "{:,.0f}"),
            ("submit-to-result p50 (ms)", "lat_p50", "{:.2f}"),
            ("submit-to-result p99 (ms)", "lat_p99", "{:.2f}"),
            ("CPU while idle, 3 s (s)", "idle_cpu", "{:.2f}"),
            ("wake-ups while idle, 3 s", "idle_wakeups", "{:.0f}")]
    print(f"\n{opts.workers} workers, {opts.jobs:,} jobs end to end, {opts.latency} for latency,"
          f" {opts.runs} rounds each on {hq.pg_safe(opts.dsn)}; median [min-max]\n")
    columns = names + ["procrastinate"]
    print(f"{'figure':<36} " + " ".join(f"{n:>28}" for n in columns) + f" {'ratio':>8}")
    for label, key, fmt in rows:
        cells = []
        meds = []
        for name in columns:
            values = [r[key] for r in rounds[name]]
            med = statistics.median(values)
            meds.append(med)
            cells.append(f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]")
        ratio = ""  # the first hostqueue column against procrastinate
        if meds[-1] and meds[0] and key == "e2e_bulk":
            ratio = f"{meds[0] / meds[-1]:.1f}x"
        elif meds[0] and meds[-1] and key.startswith("lat"):
            ratio = f"{meds[-1] / meds[0]:.1f}x"
        print(f"{label:<36} " + " ".join(f"{c:>28}" for c in cells) + f" {ratio:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
