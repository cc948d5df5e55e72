"""The progress board: one fixed-size shared-memory slot per worker.

The supervisor creates the board as a memfd (an anonymous file with no name in
/dev/shm, so nothing can leak however the supervisor exits) and passes its
descriptor to each worker. A worker writes its slot with ``struct.pack_into``
on the mapping: no syscall, no store write. The supervisor samples slots while
jobs run.

Slot layout (little-endian, SLOT_SIZE = 160 bytes):

    offset  type     field
    0       u64      seq          seqlock: odd while the worker writes
    8       i64      job_id       0 when idle
    16      f64      fraction     0..1, NaN before the first progress call
    24      f64      updated      wall-clock time of the last write
    32      f64      started      wall-clock time the current job started
    40      u16      msg_len      bytes of message used
    42      118s     message      UTF-8, truncated to 118 bytes
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import time
from dataclasses import dataclass

SEQ = struct.Struct("<Q")
BODY = struct.Struct("<qdddH118s")
SLOT_SIZE = 160
MESSAGE_BYTES = 118
assert SEQ.size + BODY.size <= SLOT_SIZE
BOARD_SLOTS = 1024  # 256 workers, plus room for replacements during a reload


@dataclass(frozen=True)
class SlotReading:
    seq: int
    job_id: int
    fraction: float | None
    updated: float
    started: float
    message: str | None


def _encode_message(message: str | None) -> bytes:
    if not message:
        return b""
    raw = message.encode("utf-8", "replace")[:MESSAGE_BYTES]
    # Never cut a multi-byte character in half.
    return raw.decode("utf-8", "ignore").encode("utf-8")


class Board:
    """The supervisor's side: owns the memfd and reads slots."""

    def __init__(self, slots: int = BOARD_SLOTS) -> None:
        self.slots = slots
        self.fd = os.memfd_create("hostqueue-progress", 0)
        os.ftruncate(self.fd, slots * SLOT_SIZE)
        self._map = mmap.mmap(self.fd, slots * SLOT_SIZE)
        self._free = list(range(slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("progress board is full")
        slot = self._free.pop()
        self._map[slot * SLOT_SIZE : (slot + 1) * SLOT_SIZE] = bytes(SLOT_SIZE)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def read(self, slot: int) -> SlotReading | None:
        """A consistent reading of the slot, or None if the worker is mid-write."""
        base = slot * SLOT_SIZE
        for _ in range(3):
            (seq1,) = SEQ.unpack_from(self._map, base)
            if seq1 & 1:
                continue
            job_id, fraction, updated, started, msg_len, msg = BODY.unpack_from(
                self._map, base + SEQ.size
            )
            (seq2,) = SEQ.unpack_from(self._map, base)
            if seq1 != seq2:
                continue
            return SlotReading(
                seq=seq1,
                job_id=job_id,
                fraction=None if math.isnan(fraction) else fraction,
                updated=updated,
                started=started,
                message=msg[:msg_len].decode("utf-8", "replace") if msg_len else None,
            )
        return None

    def close(self) -> None:
        try:
            self._map.close()
        finally:
            os.close(self.fd)


class SlotWriter:
    """A worker's side: writes its one slot."""

    def __init__(self, fd: int, slot: int) -> None:
        self._map = mmap.mmap(fd, BOARD_SLOTS * SLOT_SIZE)
        os.close(fd)
        self._base = slot * SLOT_SIZE
        self._seq = SEQ.unpack_from(self._map, self._base)[0] & ~1
        self._job_id = 0
        self._started = 0.0

    def _write(self, fraction: float, message: bytes) -> None:
        self._seq += 1
        SEQ.pack_into(self._map, self._base, self._seq)
        BODY.pack_into(
            self._map,
            self._base + SEQ.size,
            self._job_id,
            fraction,
            time.time(),
            self._started,
            len(message),
            message,
        )
        self._seq += 1
        SEQ.pack_into(self._map, self._base, self._seq)

    def begin(self, job_id: int) -> None:
        self._job_id = job_id
        self._started = time.time()
        self._write(math.nan, b"")

    def progress(self, fraction: float, message: str | None) -> None:
        self._write(fraction, _encode_message(message))

    def end(self) -> None:
        self._job_id = 0
        self._write(math.nan, b"")
