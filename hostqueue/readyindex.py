"""The in-memory index of what can run: ready jobs by queue in dispatch order, and
the timers for jobs that become ready later or expire.

The store stays the truth: this index is rebuilt from it at start. It lets the
supervisor pick the next job without asking SQLite, in O(log n).

A ready job is one packed int per entry (priority and id), so a million pending
jobs cost tens of megabytes, not hundreds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

PAYLOAD_CACHE = 100_000  # pending jobs whose row is kept in memory for dispatch
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1
_ID_BITS = 40
_ID_MASK = (1 << _ID_BITS) - 1


def pack(priority: int, job_id: int) -> int:
    """Smaller packs run first: higher priority, then lower id (submit order)."""
    return ((PRIORITY_MAX - priority) << _ID_BITS) | job_id


def unpack_id(packed: int) -> int:
    return packed & _ID_MASK


Lane = tuple[str, str]  # (queue, task): limits apply per queue and per task


class ReadyIndex:
    """Ready jobs in lanes, one per (queue, task), each a heap of packed keys."""

    def __init__(self) -> None:
        self.lanes: dict[Lane, list[int]] = {}
        # Entries taken out other than by popping (abort, expiry), as id -> how
        # many: skipped when they reach the top of their heap. The caller only
        # discards a job that it knows is in this index (not delayed, not claimed).
        self.removed: dict[int, int] = {}
        # How many of each lane's heap entries are such removed ones, so counts
        # per lane stay exact (None: a discard whose lane was not known).
        self.lane_removed: dict[Lane | None, int] = {}
        self.count = 0

    def push(self, lane: Lane, priority: int, job_id: int) -> None:
        heap = self.lanes.get(lane)
        if heap is None:
            heap = self.lanes[lane] = []
        heapq.heappush(heap, pack(priority, job_id))
        self.count += 1

    def bulk_load(self, packed_by_lane: dict[Lane, list[int]]) -> None:
        """Take lists of packed keys (the lists become the heaps)."""
        for lane, packed in packed_by_lane.items():
            heap = self.lanes.setdefault(lane, [])
            heap.extend(packed)
            heapq.heapify(heap)
            self.count += len(packed)

    def discard(self, job_id: int, lane: Lane | None = None) -> None:
        """Forget a ready job lazily (give its lane when known, for exact counts per lane)."""
        self.removed[job_id] = self.removed.get(job_id, 0) + 1
        self.lane_removed[lane] = self.lane_removed.get(lane, 0) + 1
        self.count -= 1

    def top(self, lane: Lane) -> int | None:
        """The lane's next packed key, or None when it is empty."""
        heap = self.lanes[lane]
        removed = self.removed
        while heap and removed and unpack_id(heap[0]) in removed:
            job_id = unpack_id(heapq.heappop(heap))
            if removed[job_id] == 1:
                del removed[job_id]
            else:
                removed[job_id] -= 1
            key = lane if self.lane_removed.get(lane) else None
            if self.lane_removed.get(key):
                self.lane_removed[key] -= 1
        return heap[0] if heap else None

    def size(self, lane: Lane) -> int:
        """Jobs waiting in the lane (exact when discards named their lane)."""
        return max(0, len(self.lanes.get(lane, ())) - self.lane_removed.get(lane, 0))

    def pop(self, lane: Lane) -> int:
        """The packed key of the lane's next job (call top() first: it must not be empty)."""
        self.count -= 1
        return heapq.heappop(self.lanes[lane])

    def push_back(self, lane: Lane, packed: int) -> None:
        """Return a popped entry (its claim did not happen)."""
        heapq.heappush(self.lanes.setdefault(lane, []), packed)
        self.count += 1

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
