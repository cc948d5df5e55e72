"""What each of a job's writes costs SQLite, with and without each index of the store.

    python bench/store_costs.py

Creates a fresh store file under /tmp with hostqueue's schema (its migrations),
then per variant: 20 transactions of 1,000 INSERTs, of 1,000 starts and of 1,000
finishes (the store's own statements), and prints microseconds per job for each;
and, for a lone fast job, its two commits (added pending, then ended: its start
rides with its end), 2,000 times.
No supervisor: this is SQLite and Python's sqlite3 alone, the floor under the
supervisor's SQLite work.
"""

from __future__ import annotations

import os
import json
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hostqueue.store.sqlite_schema import MIGRATIONS, WRITES  # noqa: E402

ROWS = 1000
ROUNDS = 20


LONE_JOBS = 2000


def measure(drop: tuple[str, ...], directory: str) -> tuple[float, float, float, float]:
    path = os.path.join(directory, "costs.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    for _, script in MIGRATIONS:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    for index in drop:
        conn.execute(f"DROP INDEX {index}")
    now = time.time()
    spent = [0.0, 0.0, 0.0]
    first = 1
    args = json.dumps(["{}"] * ROWS)
    for _ in range(ROUNDS):
        ids = range(first, first + ROWS)
        batches = (
            (WRITES["add_jobs"], [(first, "t.noop", "default", 4, 0, None, None, now, now, None, None, args)]),
            (WRITES["start"], [(1, now, 4242, "pending", i) for i in ids]),
            (WRITES["finish"], [("completed", "true", None, now, None, None, 0.0, 1000, 1, now, 4242,
                                 "running", i) for i in ids]),
        )
        for k, (sql, rows) in enumerate(batches):
            t = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
            spent[k] += time.perf_counter() - t
        first += ROWS
    # A lone fast job (submitted to an idle pool): added pending, then ended (started
    # and ended in one write), each a commit of its own, as the supervisor writes them.
    one = json.dumps(["{}"])
    t = time.perf_counter()
    for job_id in range(first, first + LONE_JOBS):
        conn.execute(WRITES["add_jobs"], (job_id, "t.noop", "default", 4, 0, None, None, now, now,
                                          None, None, one))
        conn.execute(WRITES["finish"], ("completed", "true", None, now, None, None, 0.0, 1000, 1, now,
                                        4242, "pending", job_id))
    lone = time.perf_counter() - t
    conn.close()
    n = ROWS * ROUNDS
    return spent[0] / n * 1e6, spent[1] / n * 1e6, spent[2] / n * 1e6, lone / LONE_JOBS * 1e6


def main() -> int:
    variants: list[tuple[str, ...]] = [
        (), ("jobs_waiting",), ("jobs_ended",),
        ("jobs_key", "jobs_run", "jobs_key_completed"),
    ]
    print(f"{'without':40s} {'insert':>8s} {'start':>8s} {'finish':>8s} {'total':>8s} {'lone job':>9s}"
          "  (us per job; batches of 1,000, and a lone job's two commits)")
    with tempfile.TemporaryDirectory(prefix="hq-costs-") as directory:
        for drop in variants:
            ins, claim, fin, lone = measure(drop, directory)
            label = ", ".join(drop) or "(all indexes)"
            print(f"{label:40s} {ins:8.1f} {claim:8.1f} {fin:8.1f} {ins + claim + fin:8.1f} {lone:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
