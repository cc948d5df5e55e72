"""asyncpg against psycopg 3 for the PostgreSQL store's statements, in one run.

What the store does on the path of every job, against the same server:

- ``submit_1000``: one INSERT of 1,000 jobs from a JSON array of their args (a
  bulk submit), committed; jobs per second.
- ``lone_commit``: one small transaction of two guarded UPDATEs (a start and an
  outcome of one job), as the group committer writes a lone job; its latency.
- ``batch_100``: one transaction of 100 guarded UPDATEs (the outcomes of a busy
  turn), with the number of rows each changed summed (the store counts
  transitions that found their job in another state); transactions per second.

Usage: python bench/pg_drivers.py [--dsn postgresql://127.0.0.1/test] [--rounds 5]
Prints a table, best of the rounds for each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

SCHEMA = "hq_driver_bench"
CREATE = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.jobs (
    id bigint PRIMARY KEY, task text NOT NULL, queue text NOT NULL, status text NOT NULL,
    args text NOT NULL, result text, attempts int NOT NULL DEFAULT 0, created_at float8 NOT NULL,
    started_at float8, finished_at float8, worker_pid int
);
"""
INSERT = (
    f"INSERT INTO {SCHEMA}.jobs (id, task, queue, status, args, created_at)"
    " SELECT $1 + t.n - 1, $2, $3, 'pending', t.v::text, $4"
    " FROM json_array_elements($5::json) WITH ORDINALITY AS t(v, n)"
)
START = (f"UPDATE {SCHEMA}.jobs SET status = 'running', attempts = $1, started_at = $2,"
         " worker_pid = $3 WHERE status = $4 AND id = $5")
FINISH = (f"UPDATE {SCHEMA}.jobs SET status = $1, result = $2, finished_at = $3"
          " WHERE status = $4 AND id = $5")


def pg_to_psycopg(sql: str) -> str:
    for n in range(9, 0, -1):
        sql = sql.replace(f"${n}", "%s")
    return sql


async def with_asyncpg(dsn: str, rounds: int) -> dict[str, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute(CREATE)
    out: dict[str, list[float]] = {"submit_1000": [], "lone_commit": [], "batch_100": []}
    next_id = 1
    args = json.dumps([{"i": i, "name": "x" * 20} for i in range(1000)])
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(20):
            await conn.execute(INSERT, next_id, "t.work", "default", time.time(), args)
            next_id += 1000
        out["submit_1000"].append(20_000 / (time.perf_counter() - t))
        lat = []
        for j in range(next_id - 20_000, next_id - 19_500):
            t = time.perf_counter()
            async with conn.transaction():
                await conn.execute(START, 1, time.time(), 123, "pending", j)
                await conn.execute(FINISH, "completed", "1", time.time(), "running", j)
            lat.append(time.perf_counter() - t)
        out["lone_commit"].append(statistics.median(lat) * 1000)
        t = time.perf_counter()
        base = next_id - 19_000
        for k in range(50):
            ids = range(base + k * 100, base + k * 100 + 100)
            async with conn.transaction():
                # executemany gives no row counts: one statement over arrays does
                status = await conn.execute(
                    f"UPDATE {SCHEMA}.jobs AS j SET status = 'running', attempts = 1,"
                    " started_at = v.t, worker_pid = v.p FROM unnest($1::bigint[], $2::float8[],"
                    " $3::int[]) AS v(id, t, p) WHERE j.status = 'pending' AND j.id = v.id",
                    list(ids), [time.time()] * 100, [1] * 100)
                assert status == "UPDATE 100", status
        out["batch_100"].append(50 / (time.perf_counter() - t))
    await conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    await conn.close()
    return {k: (max(v) if k != "lone_commit" else min(v)) for k, v in out.items()}


async def with_psycopg(dsn: str, rounds: int) -> dict[str, float]:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(CREATE)
    out: dict[str, list[float]] = {"submit_1000": [], "lone_commit": [], "batch_100": []}
    next_id = 1
    args = json.dumps([{"i": i, "name": "x" * 20} for i in range(1000)])
    ins, start, finish = pg_to_psycopg(INSERT), pg_to_psycopg(START), pg_to_psycopg(FINISH)
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(20):
            await conn.execute(ins, (next_id, "t.work", "default", time.time(), args), prepare=True)
            next_id += 1000
        out["submit_1000"].append(20_000 / (time.perf_counter() - t))
        lat = []
        for j in range(next_id - 20_000, next_id - 19_500):
            t = time.perf_counter()
            async with conn.transaction():
                await conn.execute(start, (1, time.time(), 123, "pending", j), prepare=True)
                await conn.execute(finish, ("completed", "1", time.time(), "running", j), prepare=True)
            lat.append(time.perf_counter() - t)
        out["lone_commit"].append(statistics.median(lat) * 1000)
        t = time.perf_counter()
        base = next_id - 19_000
        for k in range(50):
            ids = range(base + k * 100, base + k * 100 + 100)
            async with conn.transaction():
                async with conn.cursor() as cur:
                    # executemany runs in pipeline mode; rowcount sums the rows changed
                    await cur.executemany(start, [(1, time.time(), 1, "pending", j) for j in ids])
                    assert cur.rowcount == 100, cur.rowcount
        out["batch_100"].append(50 / (time.perf_counter() - t))
    await conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
    await conn.close()
    return {k: (max(v) if k != "lone_commit" else min(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1/test")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    results = {}
    for name, fn in (("asyncpg", with_asyncpg), ("psycopg 3", with_psycopg)):
        results[name] = asyncio.run(fn(opts.dsn, opts.rounds))
    print(f"{'driver':<10} {'submit 1000 (jobs/s)':>21} {'lone commit p50 (ms)':>21}"
          f" {'100 updates (txn/s)':>20}")
    for name, r in results.items():
        print(f"{name:<10} {r['submit_1000']:>21,.0f} {r['lone_commit']:>21.3f} {r['batch_100']:>20,.0f}")


if __name__ == "__main__":
    main()
