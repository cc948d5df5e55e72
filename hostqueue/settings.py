"""The supervisor's settings: one table feeds the CLI, the environment and validation.

Precedence: command-line flag, then environment variable, then the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STORE = "./hostqueue.db"
DEFAULT_GRACE = 30.0
DEFAULT_MAX_LINE = 1024 * 1024
MAX_WORKERS = 256
MAX_PREFETCH = 8


def default_socket_for(store: str) -> str:
    """The socket sits next to the store: ./hostqueue.db -> ./hostqueue.sock."""
    base, ext = os.path.splitext(store)
    return (base if ext else store) + ".sock"


def resolve_store(store: str | None) -> str:
    return store or os.environ.get("HOSTQUEUE_STORE") or DEFAULT_STORE


def resolve_socket(socket: str | None, store: str | None = None) -> str:
    """--socket, else $HOSTQUEUE_SOCKET, else next to the store (--store, $HOSTQUEUE_STORE, ./hostqueue.db)."""
    return socket or os.environ.get("HOSTQUEUE_SOCKET") or default_socket_for(resolve_store(store))


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    env: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("store", str, DEFAULT_STORE, "HOSTQUEUE_STORE", "path of the SQLite store"),
    Setting("socket", str, None, "HOSTQUEUE_SOCKET", "path of the control socket (default: next to the store)"),
    Setting("workers", int, None, "HOSTQUEUE_WORKERS", "worker processes (default: the size kept in the store, else the CPU count)"),
    Setting("tasks", list, (), "HOSTQUEUE_TASKS", "task modules to import (module names or .py paths; comma-separated in the environment)"),
    Setting("grace", float, DEFAULT_GRACE, "HOSTQUEUE_GRACE", "seconds running jobs get to finish on SIGTERM"),
    Setting("prefetch", int, MAX_PREFETCH, "HOSTQUEUE_PREFETCH", "jobs a worker may hold at once (1..8); 1 for long jobs"),
    Setting("durability", str, "normal", "HOSTQUEUE_DURABILITY", "'normal' (WAL, synchronous=NORMAL) or 'full' (fsync every commit)"),
    Setting("max_line", int, DEFAULT_MAX_LINE, "HOSTQUEUE_MAX_LINE", "longest request line the socket accepts, in bytes"),
    Setting("log_level", str, "info", "HOSTQUEUE_LOG_LEVEL", "debug, info, warning or error"),
)


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the setting."""


@dataclass
class SupervisorConfig:
    store: str = DEFAULT_STORE
    socket: str | None = None
    workers: int | None = None
    tasks: tuple[str, ...] = ()
    grace: float = DEFAULT_GRACE
    prefetch: int = MAX_PREFETCH
    durability: str = "normal"
    max_line: int = DEFAULT_MAX_LINE
    log_level: str = "info"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def socket_path(self) -> str:
        return self.socket or default_socket_for(self.store)

    def validate(self) -> "SupervisorConfig":
        if self.workers is not None and not 0 <= self.workers <= MAX_WORKERS:
            raise SettingsError(f"workers must be between 0 and {MAX_WORKERS}, got {self.workers}")
        if self.grace < 0:
            raise SettingsError(f"grace must be >= 0 seconds, got {self.grace}")
        if not 1 <= self.prefetch <= MAX_PREFETCH:
            raise SettingsError(f"prefetch must be between 1 and {MAX_PREFETCH}, got {self.prefetch}")
        if self.durability not in ("normal", "full"):
            raise SettingsError(f"durability must be 'normal' or 'full', got {self.durability!r}")
        if self.max_line < 1024:
            raise SettingsError(f"max_line must be at least 1024 bytes, got {self.max_line}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if len(os.fsencode(os.path.abspath(self.socket_path))) > 107:
            raise SettingsError(
                f"socket path {self.socket_path!r} is too long for a Unix socket (107 bytes at most); "
                "pass a shorter --socket"
            )
        return self


def from_environment(**flags: Any) -> SupervisorConfig:
    """Build a config from flags (None = not given) over $HOSTQUEUE_* over defaults."""
    values: dict[str, Any] = {}
    for s in SETTINGS:
        flag = flags.get(s.name)
        if flag is not None and flag != ():
            values[s.name] = tuple(flag) if s.type is list else flag
            continue
        raw = os.environ.get(s.env)
        if raw is None or raw == "":
            continue
        try:
            if s.type is list:
                values[s.name] = tuple(p.strip() for p in raw.split(",") if p.strip())
            else:
                values[s.name] = s.type(raw)
        except ValueError:
            raise SettingsError(f"${s.env} must be a {s.type.__name__}, got {raw!r}") from None
    return SupervisorConfig(**values).validate()
