"""Logging set-up: human-readable by default, JSON lines for log shippers, and no
timestamp of our own under systemd's journal (JOURNAL_STREAM set)."""

from __future__ import annotations

import logging
import os

import orjson


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, fmt: str = "text", prefix: str = "") -> None:
    """Human-readable by default; JSON lines on request; under systemd's journal
    (JOURNAL_STREAM set) no timestamp of our own, since the journal adds one."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter(f"%(levelname)s {prefix}%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
