"""Framing of the supervisor <-> worker pipe: a 4-byte big-endian length, then an orjson body.

Messages are small dicts with a type in "t". A worker has two channels:

    job channel, supervisor -> worker      {"t": "run", "jobs": [{"id", "task", "args" (JSON text), "attempt", "timeout"}, ...]}
                                           {"t": "stop"}          finish what you hold, then exit
    control channel, supervisor -> worker  {"t": "abort", "id": JOB_ID}
                                           {"t": "drop"}          stop after the running job; return the rest
    job channel, worker -> supervisor      {"t": "ready", "pid": PID}
                                           {"t": "done", "o": [OUTCOME, ...]}

An OUTCOME is {"id", "s": "ok" | "error" | "retry" | "permanent" | "aborted" | "timeout",
"r": result as JSON text or null, "e": {"type", "message", "traceback"} or null,
"d": retry delay in seconds or null, "st": started, "ft": finished,
"p": last progress fraction or null, "pm": last progress message or null,
"cpu": CPU seconds of the attempt, "rss": peak RSS in bytes (attempts over 1 ms) or absent}.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

import orjson

HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    body = orjson.dumps(message)
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Feeds bytes in, calls on_message for every complete frame."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None]) -> None:
        self._buf = bytearray()
        self._on_message = on_message

    def feed(self, data: bytes | memoryview) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds the limit")
            if end - pos - 4 < size:
                break
            message = orjson.loads(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
            self._on_message(message)
        if pos:
            del buf[:pos]
