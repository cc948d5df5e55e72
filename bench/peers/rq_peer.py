"""RQ: N `rq worker` processes with the default worker class (it forks a work horse
for every job), default result TTL; results waited for with latest_result(timeout)."""

from __future__ import annotations

import os
import sys
import time

from common import wait_until
from runner import Adapter


class RQ(Adapter):
    label = "RQ"
    bulk_api = "Queue.enqueue_many()"
    can_grow = True

    def setup_env(self) -> None:
        super().setup_env()
        import rq_tasks
        from redis import Redis
        from rq import Queue

        self.tasks = rq_tasks
        self.redis_conn = Redis.from_url(self.redis_url)
        self.queue = Queue("bench", connection=self.redis_conn)

    def worker_commands(self, n: int) -> list[list[str]]:
        rq = os.path.join(os.path.dirname(sys.executable), "rq")
        return [[sys.executable, rq, "worker", "--url", self.redis_url, "--quiet", "bench"]
                for _ in range(n)]

    def enqueue_one(self) -> None:
        self.queue.enqueue(self.tasks.noop)

    def enqueue_bulk(self, n: int) -> None:
        from rq import Queue

        self.queue.enqueue_many([Queue.prepare_data(self.tasks.noop) for _ in range(n)])

    def roundtrip(self) -> object:
        job = self.queue.enqueue(self.tasks.noop)
        result = job.latest_result(timeout=60)
        return None if result is None else result.return_value

    def flush(self) -> None:
        self.queue.empty()

    def grow(self, to: int) -> float:
        """Start to-1 more worker processes next to one, until RQ lists `to` workers."""
        from rq import Worker

        self.start_workers(1)
        wait_until(lambda: Worker.count(connection=self.redis_conn) == 1, 30, "one RQ worker")
        t0 = time.perf_counter()
        self.start_more(to - 1)
        wait_until(lambda: Worker.count(connection=self.redis_conn) >= to, 120, f"{to} RQ workers",
                   interval=0.01)
        return time.perf_counter() - t0

    def start_more(self, n: int) -> None:
        import subprocess

        for cmd in self.worker_commands(n):
            self.procs.append(subprocess.Popen(
                cmd, cwd=self.env["PYTHONPATH"], env=self.env, stdout=self.log, stderr=self.log,
                start_new_session=True,
            ))


def make(variant: str, workdir: str, redis_url: str | None) -> Adapter:
    return RQ(workdir, redis_url)
