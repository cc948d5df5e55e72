"""Prometheus text exposition of the supervisor's figures.

Served by the ``metrics`` op (``hostqueue ctl metrics``) and, with
``--metrics-port``, over HTTP on loopback for scraping (``GET /metrics``).
Every name starts with ``hostqueue_``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from typing import Any, Awaitable, Callable


log = logging.getLogger("hostqueue.metrics")

RUNTIME_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)
STATES = ("pending", "scheduled", "running", "completed", "failed", "cancelled", "expired")


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = RUNTIME_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out = []
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: dict[str, Any], store_bytes: int, counters: dict[str, int], runtime: Histogram,
           worker_states: list[str], target: int, ready: int, commits: int, up: bool) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}")

    jobs = []
    for queue, counts in sorted(stats["queues"].items()):
        for state in STATES:
            jobs.append((f'{{queue="{_label(queue)}",state="{state}"}}', counts.get(state, 0)))
    metric("hostqueue_jobs", "gauge", "Jobs in the store by queue and state.", jobs)
    for event, text in (
        ("submitted", "Jobs submitted since the supervisor started."),
        ("started", "Attempts started since the supervisor started."),
        ("completed", "Jobs completed since the supervisor started."),
        ("failed", "Jobs failed for good since the supervisor started."),
        ("retried", "Attempts that failed and were retried since the supervisor started."),
        ("cancelled", "Jobs cancelled since the supervisor started."),
        ("expired", "Jobs expired since the supervisor started."),
        ("recycled", "Workers replaced by max_jobs or max_memory since the supervisor started."),
    ):
        metric(f"hostqueue_{event}_total", "counter", text, [("", counters.get(event, 0))])
    lines.append("# HELP hostqueue_job_runtime_seconds Run time of finished attempts.")
    lines.append("# TYPE hostqueue_job_runtime_seconds histogram")
    lines.extend(runtime.lines("hostqueue_job_runtime_seconds"))
    states: dict[str, int] = {}
    for state in worker_states:
        states[state] = states.get(state, 0) + 1
    metric("hostqueue_workers", "gauge", "Worker processes by state.",
           [(f'{{state="{s}"}}', states.get(s, 0)) for s in ("starting", "idle", "busy", "retiring")])
    metric("hostqueue_workers_target", "gauge", "The pool's target size.", [("", target)])
    metric("hostqueue_ready_jobs", "gauge", "Jobs that could start now, waiting for a worker or a limit.",
           [("", ready)])
    metric("hostqueue_store_bytes", "gauge", "Size of the store's files (database, WAL, shared memory).",
           [("", store_bytes)])
    metric("hostqueue_store_commits_total", "counter", "Transactions committed since the supervisor started.",
           [("", commits)])
    metric("hostqueue_up", "gauge", "1 while the supervisor runs, 0 while it drains.",
           [("", 1 if up else 0)])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """A minimal HTTP/1.0 server for GET /metrics, on loopback by default."""

    def __init__(self, produce: Callable[[], Awaitable[str]], host: str, port: int) -> None:
        self.produce = produce
        self.host = host
        self.port = port
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] in ("/metrics", "/"):
                body = (await self.produce()).encode()
                head = "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            else:
                body = b"not found: try GET /metrics\n"
                head = "HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception:  # noqa: BLE001 - a scraper must never hurt the supervisor
            log.exception("error serving metrics")
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
