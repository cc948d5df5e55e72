"""Dramatiq: the Redis broker, the Results middleware on Redis, `dramatiq --processes N
--threads 1` (N worker processes of one thread each; Dramatiq's default is one process
per CPU with 8 threads each), otherwise the default middleware."""

from __future__ import annotations

import os
import sys

from runner import Adapter


class Dramatiq(Adapter):
    label = "Dramatiq (Redis)"
    bulk_api = "group(...).run()"

    def setup_env(self) -> None:
        super().setup_env()
        import dramatiq_tasks

        self.tasks = dramatiq_tasks

    def worker_commands(self, n: int) -> list[list[str]]:
        dramatiq = os.path.join(os.path.dirname(sys.executable), "dramatiq")
        return [[sys.executable, dramatiq, "dramatiq_tasks", "--processes", str(n), "--threads", "1"]]

    def enqueue_one(self) -> None:
        self.tasks.noop.send()

    def enqueue_bulk(self, n: int) -> None:
        from dramatiq import group

        group(self.tasks.noop.message() for _ in range(n)).run()

    def roundtrip(self) -> object:
        return self.tasks.noop.send().get_result(block=True, timeout=60_000)

    def flush(self) -> None:
        self.tasks.broker.flush_all()


def make(variant: str, workdir: str, redis_url: str | None) -> Adapter:
    return Dramatiq(workdir, redis_url)
