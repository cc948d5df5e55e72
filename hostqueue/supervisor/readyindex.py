"""The in-memory index of what can run: ready jobs by queue in dispatch order, and
the timers for jobs that become ready later or expire.

The store stays the truth: this index is rebuilt from it at start. It lets the
supervisor pick the next job without asking SQLite, in O(log n).

A ready job costs 8 bytes: ids sit in arrays per lane and priority, so a million
pending jobs cost megabytes, not hundreds of them.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass

PAYLOAD_CACHE = 50_000  # pending jobs whose row is kept in memory for dispatch
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1
_ID_BITS = 40
_ID_MASK = (1 << _ID_BITS) - 1


def pack(priority: int, job_id: int) -> int:
    """Smaller packs run first: higher priority, then lower id (submit order)."""
    return ((PRIORITY_MAX - priority) << _ID_BITS) | job_id


def unpack_id(packed: int) -> int:
    return packed & _ID_MASK


def unpack_priority(packed: int) -> int:
    return PRIORITY_MAX - (packed >> _ID_BITS)


Lane = tuple[str, str]  # (queue, task): limits apply per queue and per task


class _Fifo:
    """Job ids of one lane and priority, smallest first.

    Ids are handed out in increasing order, so new jobs append to a compact
    array (8 bytes a job); the few that come back out of order (retries, jobs
    returned by a worker, delayed jobs coming due) go to a small heap beside it.
    """

    __slots__ = ("ids", "head", "side")

    def __init__(self) -> None:
        self.ids = array("q")
        self.head = 0
        self.side: list[int] = []

    def __len__(self) -> int:
        return len(self.ids) - self.head + len(self.side)

    def add(self, job_id: int) -> None:
        ids = self.ids
        if len(ids) == self.head or job_id > ids[-1]:
            ids.append(job_id)
        else:
            heapq.heappush(self.side, job_id)

    def first(self) -> int:
        if self.head < len(self.ids):
            if self.side and self.side[0] < self.ids[self.head]:
                return self.side[0]
            return self.ids[self.head]
        return self.side[0]

    def take(self) -> int:
        if self.head < len(self.ids) and not (self.side and self.side[0] < self.ids[self.head]):
            job_id = self.ids[self.head]
            self.head += 1
            if self.head >= 4096 and self.head * 2 >= len(self.ids):
                del self.ids[: self.head]  # compact: keep memory proportional to what waits
                self.head = 0
            return job_id
        return heapq.heappop(self.side)


class _LaneQueue:
    """One lane: a FIFO per priority, the highest priority first."""

    __slots__ = ("fifos", "prios", "n")

    def __init__(self) -> None:
        self.fifos: dict[int, _Fifo] = {}
        self.prios: list[int] = []  # heap of -priority over non-empty fifos (lazy)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, priority: int, job_id: int) -> None:
        fifo = self.fifos.get(priority)
        if fifo is None:
            fifo = self.fifos[priority] = _Fifo()
        if not len(fifo):
            heapq.heappush(self.prios, -priority)
        fifo.add(job_id)
        self.n += 1

    def _best(self) -> tuple[int, _Fifo] | None:
        while self.prios:
            priority = -self.prios[0]
            fifo = self.fifos.get(priority)
            if fifo is not None and len(fifo):
                return priority, fifo
            heapq.heappop(self.prios)
            self.fifos.pop(priority, None)
        return None

    def first(self) -> int | None:
        if not self.n:
            return None
        best = self._best()
        return None if best is None else pack(best[0], best[1].first())

    def take(self) -> int:
        best = self._best()
        assert best is not None, "take() from an empty lane"
        self.n -= 1
        return pack(best[0], best[1].take())


class ReadyIndex:
    """Ready jobs in lanes, one per (queue, task); in each, higher priority first, then
    submit order. top()/pop() speak in packed keys (priority and id in one int)."""

    def __init__(self) -> None:
        self.lanes: dict[Lane, _LaneQueue] = {}
        # Entries taken out other than by popping (abort, expiry), as id -> how
        # many: skipped when they reach the front. The caller only discards a job
        # that it knows is in this index (not delayed, not claimed).
        self.removed: dict[int, int] = {}
        # How many of each lane's entries are such removed ones, so counts per
        # lane stay exact (None: a discard whose lane was not known).
        self.lane_removed: dict[Lane | None, int] = {}
        self.count = 0

    def _lane(self, lane: Lane) -> _LaneQueue:
        q = self.lanes.get(lane)
        if q is None:
            q = self.lanes[lane] = _LaneQueue()
        return q

    def push(self, lane: Lane, priority: int, job_id: int) -> None:
        self._lane(lane).add(priority, job_id)
        self.count += 1

    def push_back(self, lane: Lane, packed: int) -> None:
        """Return a popped entry (its claim did not happen)."""
        self.push(lane, unpack_priority(packed), unpack_id(packed))

    def bulk_load(self, rows: dict[Lane, dict[int, "array[int]"]]) -> None:
        """Take, per lane and priority, arrays of ids in increasing order (from the store)."""
        for lane, by_priority in rows.items():
            q = self._lane(lane)
            for priority, ids in by_priority.items():
                fifo = q.fifos.get(priority)
                if fifo is None or not len(fifo):
                    fifo = q.fifos[priority] = _Fifo()
                    heapq.heappush(q.prios, -priority)
                    fifo.ids = ids
                else:
                    for job_id in ids:
                        fifo.add(job_id)
                q.n += len(ids)
                self.count += len(ids)

    def discard(self, job_id: int, lane: Lane | None = None) -> None:
        """Forget a ready job lazily (give its lane when known, for exact counts per lane)."""
        self.removed[job_id] = self.removed.get(job_id, 0) + 1
        self.lane_removed[lane] = self.lane_removed.get(lane, 0) + 1
        self.count -= 1

    def top(self, lane: Lane) -> int | None:
        """The lane's next packed key, or None when it is empty (an empty lane is
        dropped: names with no job left cost nothing)."""
        q = self.lanes.get(lane)
        if q is None:
            return None
        removed = self.removed
        while True:
            packed = q.first()
            if packed is None:
                self._drop(lane)
                return None
            if not removed:
                return packed
            job_id = unpack_id(packed)
            if job_id not in removed:
                return packed
            q.take()
            if removed[job_id] == 1:
                del removed[job_id]
            else:
                removed[job_id] -= 1
            key = lane if self.lane_removed.get(lane) else None
            if self.lane_removed.get(key):
                self.lane_removed[key] -= 1
                if not self.lane_removed[key]:
                    del self.lane_removed[key]

    def pop(self, lane: Lane) -> int:
        """The packed key of the lane's next job (call top() first: it must not be empty)."""
        self.count -= 1
        q = self.lanes[lane]
        packed = q.take()
        if not len(q):
            self._drop(lane)
        return packed

    def _drop(self, lane: Lane) -> None:
        del self.lanes[lane]
        self.lane_removed.pop(lane, None)

    def size(self, lane: Lane) -> int:
        """Jobs waiting in the lane (exact when discards named their lane)."""
        q = self.lanes.get(lane)
        return max(0, (len(q) if q is not None else 0) - self.lane_removed.get(lane, 0))

    def available(self, paused: frozenset[str] | set[str]) -> int:
        """How many jobs wait in queues that are not paused (a hint: limits may hold them)."""
        if "*" in paused:
            return 0
        if not paused:
            return self.count
        return sum(self.size(lane) for lane in self.lanes if lane[0] not in paused)

    def waiting_by_queue(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lane in self.lanes:
            n = self.size(lane)
            if n:
                out[lane[0]] = out.get(lane[0], 0) + n
        return out

    def __len__(self) -> int:
        return self.count


class TimedHeap:
    """(when, job id) pairs, earliest first; the owner arms one loop timer for ``next_due``.

    Membership is exact (``job_id in heap``): a job is in at one time, its latest
    push. Entries left behind by discard() or a later push are skipped lazily.
    """

    def __init__(self) -> None:
        self.heap: list[tuple[float, int]] = []
        self.members: dict[int, float] = {}

    def push(self, when: float, job_id: int) -> None:
        if job_id in self.members:
            raise ValueError(f"job {job_id} is already timed")
        heapq.heappush(self.heap, (when, job_id))
        self.members[job_id] = when

    def discard(self, job_id: int) -> bool:
        return self.members.pop(job_id, None) is not None

    def __contains__(self, job_id: int) -> bool:
        return job_id in self.members

    def _stale(self, entry: tuple[float, int]) -> bool:
        return self.members.get(entry[1]) != entry[0]

    def next_due(self) -> float | None:
        heap = self.heap
        while heap and self._stale(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[int]:
        out = []
        heap = self.heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._stale(entry):
                continue
            del self.members[entry[1]]
            out.append(entry[1])
        return out

    def __len__(self) -> int:
        return len(self.members)

    def bulk_load(self, pairs: list[tuple[float, int]]) -> None:
        self.heap.extend(pairs)
        heapq.heapify(self.heap)
        self.members.update((job_id, when) for when, job_id in pairs)


@dataclass(slots=True)
class Payload:
    """What dispatch needs of a pending job, kept for jobs seen in this run."""

    task: str
    queue: str
    args: str
    attempts: int
    max_attempts: int
    timeout: float | None
    priority: int
    run_id: str | None
    key: str | None
    created_at: float
    run_at: float
    deadline: float | None
