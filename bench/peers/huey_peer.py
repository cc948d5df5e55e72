"""Huey: SqliteHuey (the default storage options: WAL, SQLite's default synchronous
mode) or RedisHuey (blocking dequeue; results polled, the default), run by
`huey_consumer -k process -w N` (process workers; Huey's default is one thread)."""

from __future__ import annotations

import os
import sqlite3
import sys

from runner import Adapter


class Huey(Adapter):
    bulk_api = None  # Huey has no call that enqueues many jobs at once

    def __init__(self, variant: str, workdir: str, redis_url: str | None) -> None:
        super().__init__(workdir, redis_url if variant == "redis" else None)
        self.variant = variant
        self.redis = variant == "redis"
        self.deep = variant == "sqlite"
        self.label = "Huey (SqliteHuey)" if variant == "sqlite" else "Huey (RedisHuey)"
        self.env["HQBENCH_HUEY"] = variant
        self.env["HQBENCH_HUEY_FILE"] = os.path.join(workdir, "huey.db")

    def setup_env(self) -> None:
        super().setup_env()
        import huey_tasks

        self.tasks = huey_tasks

    def worker_commands(self, n: int) -> list[list[str]]:
        consumer = os.path.join(os.path.dirname(sys.executable), "huey_consumer")
        return [[sys.executable, consumer, "huey_tasks.huey", "-k", "process", "-w", str(n), "-q"]]

    def enqueue_one(self) -> None:
        self.tasks.noop()

    def roundtrip(self) -> object:
        return self.tasks.noop().get(blocking=True, timeout=60)

    def flush(self) -> None:
        self.tasks.huey.flush()

    def fill_deep(self, n: int) -> None:
        """n rows of a Huey named 'deep' (no consumer) in the same SQLite file."""
        from huey import SqliteHuey

        deep = SqliteHuey("deep", filename=self.env["HQBENCH_HUEY_FILE"])

        @deep.task()
        def noop() -> bool:
            return True

        noop()
        db = sqlite3.connect(self.env["HQBENCH_HUEY_FILE"])
        try:
            row = db.execute("SELECT queue, data, priority FROM task WHERE queue = 'deep'").fetchone()
            with db:
                db.executemany("INSERT INTO task (queue, data, priority) VALUES (?, ?, ?)",
                               (row for _ in range(n - 1)))
            (count,) = db.execute("SELECT COUNT(*) FROM task WHERE queue = 'deep'").fetchone()
        finally:
            db.close()
        if count != n:
            raise RuntimeError(f"the deep queue holds {count} jobs, not {n}")


def make(variant: str, workdir: str, redis_url: str | None) -> Adapter:
    return Huey(variant or "sqlite", workdir, redis_url)
