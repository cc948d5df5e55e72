"""The peers hostqueue is measured against, and how to get them.

They are installed from PyPI at benchmark time into a virtualenv under /tmp
(never into the project's environment; they are not dependencies of hostqueue),
at the versions below so that runs compare like with like. A local
`redis-server` from the OS packages serves the peers that need Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

# What the peers' virtualenv gets (pip install, pinned).
REQUIREMENTS = [
    "huey==3.5.4",
    "celery[redis]==5.7.0",
    "rq==3.0.0",
    "dramatiq[redis]==2.2.1",
    "redis==8.1.0",
    "psutil==7.2.2",
]


@dataclass(frozen=True)
class Peer:
    name: str  # as given to --peers and to runner.py
    label: str
    redis: bool
    setup: str  # what runs, and which defaults apply (for the report)


PEERS = [
    Peer("huey-sqlite", "Huey (SqliteHuey)", False,
         "huey_consumer -k process -w N; SqliteHuey defaults (WAL, SQLite's default"
         " synchronous=FULL, consumer polls from 0.1 s backing off to 10 s; result.get() polls"
         " from 50 ms)"),
    Peer("huey-redis", "Huey (RedisHuey)", True,
         "huey_consumer -k process -w N; RedisHuey defaults (blocking dequeue, results polled)"),
    Peer("celery", "Celery (Redis)", True,
         "celery worker -c N, prefork pool; Redis broker and result backend; defaults"
         " (prefetch multiplier 4, early acks, results stored)"),
    Peer("rq", "RQ", True,
         "N x `rq worker`, the default Worker (a forked work horse per job); defaults"),
    Peer("dramatiq", "Dramatiq (Redis)", True,
         "dramatiq --processes N --threads 1; Redis broker, Results middleware on Redis;"
         " default middleware"),
]

BY_NAME = {p.name: p for p in PEERS}
