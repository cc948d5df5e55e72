"""Celery: Redis as broker and result backend, `celery worker -c N` with the default
prefork pool and otherwise default settings (prefetch multiplier 4, late acks off,
results kept)."""

from __future__ import annotations

import os
import sys
import time

from common import wait_until
from runner import Adapter


class Celery(Adapter):
    label = "Celery (Redis)"
    bulk_api = "group(...).apply_async()"
    can_grow = True

    def setup_env(self) -> None:
        super().setup_env()
        import celery_tasks

        self.tasks = celery_tasks

    def worker_commands(self, n: int) -> list[list[str]]:
        celery = os.path.join(os.path.dirname(sys.executable), "celery")
        return [[sys.executable, celery, "-A", "celery_tasks", "worker", "-c", str(n),
                 "--loglevel", "WARNING", "-n", f"bench{time.monotonic_ns()}@%h"]]

    def enqueue_one(self) -> None:
        self.tasks.noop.delay()

    def enqueue_bulk(self, n: int) -> None:
        from celery import group

        group(self.tasks.noop.s() for _ in range(n)).apply_async()

    def roundtrip(self) -> object:
        return self.tasks.noop.delay().get(timeout=60)

    def flush(self) -> None:
        self.tasks.app.control.purge()

    def grow(self, to: int) -> float:
        """pool_grow on a running worker of 1, until its stats list `to` pool processes."""
        self.start_workers(1)
        app = self.tasks.app

        def processes() -> int:
            stats = app.control.inspect(timeout=0.5).stats() or {}
            return max((len(s.get("pool", {}).get("processes", [])) for s in stats.values()), default=0)

        wait_until(lambda: processes() == 1, 30, "celery's pool of 1")
        t0 = time.perf_counter()
        app.control.pool_grow(to - 1)
        wait_until(lambda: processes() >= to, 120, f"celery's pool of {to}", interval=0.01)
        return time.perf_counter() - t0


def make(variant: str, workdir: str, redis_url: str | None) -> Adapter:
    return Celery(workdir, redis_url)
