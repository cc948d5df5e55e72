"""The supervisor's settings: one table feeds the CLI, the environment and validation.

Precedence: command-line flag, then environment variable, then the default.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STORE = "./hostqueue.db"
DEFAULT_GRACE = 30.0
DEFAULT_MAX_LINE = 1024 * 1024
MAX_WORKERS = 256
MAX_PREFETCH = 256
DEFAULT_PREFETCH = 256


def default_socket_for(store: str) -> str:
    """The socket sits next to the store: ./hostqueue.db -> ./hostqueue.sock; with a
    PostgreSQL store, ./hostqueue.sock in the working directory."""
    if store.startswith(("postgresql://", "postgres://")):
        return "./hostqueue.sock"
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
    toml: str = ""  # "section.key" in the configuration file


SETTINGS: tuple[Setting, ...] = (
    Setting("store", str, DEFAULT_STORE, "HOSTQUEUE_STORE", "path of the SQLite store, or a PostgreSQL URL (postgresql://USER@HOST/DB)", "store.path"),
    Setting("pg_schema", str, "hostqueue", "HOSTQUEUE_PG_SCHEMA", "PostgreSQL store: the schema that holds its tables (made if missing)", "store.pg_schema"),
    Setting("pg_lease", float, 5.0, "HOSTQUEUE_PG_LEASE", "PostgreSQL store: seconds a host's lease lasts unrenewed (renewed every fifth of it); a host silent longer has its jobs run by others", "store.pg_lease"),
    Setting("pg_notify", str, "on", "HOSTQUEUE_PG_NOTIFY", "PostgreSQL store: 'on' (hosts wake each other by LISTEN/NOTIFY) or 'off' (poll every pg_poll seconds: PgBouncer in transaction mode)", "store.pg_notify"),
    Setting("pg_poll", float, 1.0, "HOSTQUEUE_PG_POLL", "PostgreSQL store with pg_notify off: seconds between looks for released jobs and ended ones", "store.pg_poll"),
    Setting("socket", str, None, "HOSTQUEUE_SOCKET", "path of the control socket (default: next to the store)", "socket.path"),
    Setting("workers", int, None, "HOSTQUEUE_WORKERS", "worker processes (default: the size kept in the store, else the CPU count)", "workers.count"),
    Setting("tasks", list, (), "HOSTQUEUE_TASKS", "task modules to import (module names or .py paths; comma-separated in the environment)", "tasks.modules"),
    Setting("grace", float, DEFAULT_GRACE, "HOSTQUEUE_GRACE", "seconds running jobs get to finish on SIGTERM", "shutdown.grace"),
    Setting("prefetch", int, DEFAULT_PREFETCH, "HOSTQUEUE_PREFETCH", "jobs a worker may hold at once (1..256), fast ones only; 1 for long jobs", "workers.prefetch"),
    Setting("durability", str, "normal", "HOSTQUEUE_DURABILITY", "'normal' (WAL, synchronous=NORMAL) or 'full' (fsync every commit)", "store.durability"),
    Setting("store_check", str, "quick", "HOSTQUEUE_STORE_CHECK", "check the store at start: 'quick' (SQLite's quick_check: about 1 s per GB) or 'off'", "store.check"),
    Setting("max_line", int, DEFAULT_MAX_LINE, "HOSTQUEUE_MAX_LINE", "longest request line the socket accepts, in bytes", "socket.max_line"),
    Setting("log_level", str, "info", "HOSTQUEUE_LOG_LEVEL", "debug, info, warning or error", "logging.level"),
    Setting("workers_min", int, None, "HOSTQUEUE_WORKERS_MIN", "autoscale: fewest workers (with workers_max)", "workers.min"),
    Setting("workers_max", int, None, "HOSTQUEUE_WORKERS_MAX", "autoscale: most workers; the pool grows while jobs wait", "workers.max"),
    Setting("idle_timeout", float, 60.0, "HOSTQUEUE_IDLE_TIMEOUT", "autoscale: seconds a worker stays idle before the pool shrinks", "workers.idle_timeout"),
    Setting("max_jobs_per_worker", int, None, "HOSTQUEUE_MAX_JOBS_PER_WORKER", "replace a worker after this many jobs", "workers.max_jobs"),
    Setting("max_memory_per_worker", int, None, "HOSTQUEUE_MAX_MEMORY_PER_WORKER", "replace a worker whose RSS exceeds this many MB after a job", "workers.max_memory"),
    Setting("metrics_port", int, None, "HOSTQUEUE_METRICS_PORT", "serve Prometheus metrics over HTTP on this port (off by default)", "metrics.port"),
    Setting("metrics_host", str, "127.0.0.1", "HOSTQUEUE_METRICS_HOST", "address for --metrics-port (loopback by default)", "metrics.host"),
    Setting("log_format", str, "text", "HOSTQUEUE_LOG_FORMAT", "'text' (human) or 'json' (one object a line, for log shippers)", "logging.format"),
    Setting("socket_group", str, None, "HOSTQUEUE_SOCKET_GROUP", "group allowed to use the socket (mode 0660)", "socket.group"),
    Setting("socket_mode", str, None, "HOSTQUEUE_SOCKET_MODE", "the socket's permissions, octal (default 0600, or 0660 with a group)", "socket.mode"),
    Setting("retention_completed", float, 86400.0, "HOSTQUEUE_RETENTION_COMPLETED", "seconds a completed job is kept (0: forever)", "retention.completed"),
    Setting("retention_failed", float, 7 * 86400.0, "HOSTQUEUE_RETENTION_FAILED", "seconds a failed job is kept (0: forever)", "retention.failed"),
    Setting("retention_cancelled", float, 86400.0, "HOSTQUEUE_RETENTION_CANCELLED", "seconds a cancelled job is kept (0: forever)", "retention.cancelled"),
    Setting("retention_expired", float, 86400.0, "HOSTQUEUE_RETENTION_EXPIRED", "seconds an expired job is kept (0: forever)", "retention.expired"),
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
    prefetch: int = DEFAULT_PREFETCH
    durability: str = "normal"
    store_check: str = "quick"
    pg_schema: str = "hostqueue"
    pg_lease: float = 5.0
    pg_notify: str = "on"
    pg_poll: float = 1.0
    max_line: int = DEFAULT_MAX_LINE
    log_level: str = "info"
    workers_min: int | None = None
    workers_max: int | None = None
    idle_timeout: float = 60.0
    max_jobs_per_worker: int | None = None
    max_memory_per_worker: int | None = None
    socket_group: str | None = None
    socket_mode: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"
    queues: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    schedules: dict[str, Any] = field(default_factory=dict)
    retention_completed: float = 86400.0
    retention_failed: float = 7 * 86400.0
    retention_cancelled: float = 86400.0
    retention_expired: float = 86400.0
    config_path: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)

    @property
    def socket_path(self) -> str:
        return self.socket or default_socket_for(self.store)

    def retention(self) -> dict[str, float]:
        """Seconds each final state is kept, for the states not kept forever."""
        out = {}
        for state in ("completed", "failed", "cancelled", "expired"):
            seconds = float(getattr(self, f"retention_{state}"))
            if seconds > 0:
                out[state] = seconds
        return out

    def validate(self) -> "SupervisorConfig":
        if self.workers is not None and not 0 <= self.workers <= MAX_WORKERS:
            raise SettingsError(f"workers must be between 0 and {MAX_WORKERS}, got {self.workers}")
        if self.grace < 0:
            raise SettingsError(f"grace must be >= 0 seconds, got {self.grace}")
        if not 1 <= self.prefetch <= MAX_PREFETCH:
            raise SettingsError(f"prefetch must be between 1 and {MAX_PREFETCH}, got {self.prefetch}")
        if self.durability not in ("normal", "full"):
            raise SettingsError(f"durability must be 'normal' or 'full', got {self.durability!r}")
        if self.store_check not in ("quick", "off"):
            raise SettingsError(f"store.check must be 'quick' or 'off', got {self.store_check!r}")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.pg_schema):
            raise SettingsError(
                f"pg_schema must be a plain PostgreSQL name (lowercase letters, digits, _;"
                f" at most 63), got {self.pg_schema!r}")
        if not 0.5 <= self.pg_lease <= 600:
            raise SettingsError(f"pg_lease must be between 0.5 and 600 seconds, got {self.pg_lease}")
        if self.pg_notify not in ("on", "off"):
            raise SettingsError(f"pg_notify must be 'on' or 'off', got {self.pg_notify!r}")
        if not 0.05 <= self.pg_poll <= 60:
            raise SettingsError(f"pg_poll must be between 0.05 and 60 seconds, got {self.pg_poll}")
        if self.max_line < 1024:
            raise SettingsError(f"max_line must be at least 1024 bytes, got {self.max_line}")
        if (self.workers_min is None) != (self.workers_max is None):
            raise SettingsError("workers.min and workers.max go together (autoscale); give both or neither")
        if self.workers_min is not None and self.workers_max is not None:
            if not 0 <= self.workers_min <= self.workers_max <= MAX_WORKERS:
                raise SettingsError(
                    f"autoscale needs 0 <= workers.min <= workers.max <= {MAX_WORKERS}, got {self.workers_min} and {self.workers_max}"
                )
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise SettingsError(f"metrics.port must be between 1 and 65535, got {self.metrics_port}")
        if self.log_format not in ("text", "json"):
            raise SettingsError(f"logging.format must be 'text' or 'json', got {self.log_format!r}")
        if self.idle_timeout <= 0:
            raise SettingsError(f"workers.idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        if self.max_jobs_per_worker is not None and self.max_jobs_per_worker < 1:
            raise SettingsError(f"workers.max_jobs must be >= 1, got {self.max_jobs_per_worker}")
        if self.max_memory_per_worker is not None and self.max_memory_per_worker < 16:
            raise SettingsError(f"workers.max_memory must be at least 16 (MB), got {self.max_memory_per_worker}")
        if self.socket_mode is not None:
            try:
                mode = int(self.socket_mode, 8)
            except ValueError:
                raise SettingsError(f"socket.mode must be octal like \"0660\", got {self.socket_mode!r}") from None
            if mode & ~0o777 or not mode & 0o600 == 0o600:
                raise SettingsError(f"socket.mode {self.socket_mode} must keep read and write for the owner (0600 at least)")
        if self.socket_group is not None:
            import grp

            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise SettingsError(f"socket.group {self.socket_group!r} is not a group on this system") from None
        from hostqueue.supervisor.schedules import ScheduleError, parse as parse_schedules
        from hostqueue.supervisor.shaping import ShapingConfig, ShapingError

        try:
            ShapingConfig.parse(self.queues, self.limits)
            parse_schedules(self.schedules)
        except (ShapingError, ScheduleError) as exc:
            raise SettingsError(str(exc)) from None
        for state in ("completed", "failed", "cancelled", "expired"):
            if getattr(self, f"retention_{state}") < 0:
                raise SettingsError(f"retention_{state} must be >= 0 seconds (0 keeps forever)")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if len(os.fsencode(os.path.abspath(self.socket_path))) > 107:
            raise SettingsError(
                f"socket path {self.socket_path!r} is too long for a Unix socket (107 bytes at most); "
                "pass a shorter --socket"
            )
        return self


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML file, by setting name. Raises SettingsError naming the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"configuration file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(f"cannot read configuration file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"configuration file {path} is not valid TOML: {exc}") from None
    by_key = {s.toml: s for s in SETTINGS}
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise SettingsError(f"{path}{_line_of(path, '', section)}: '{section}' must be a table like [{section}]")
        if section in TABLE_SECTIONS:
            values[section] = table
            continue
        for key, value in table.items():
            dotted = f"{section}.{key}"
            setting = by_key.get(dotted)
            where = f"{path}{_line_of(path, section, key)}: '{dotted}'"
            if setting is None:
                known = ", ".join(sorted(by_key) + [f"[{t}...]" for t in TABLE_SECTIONS])
                raise SettingsError(f"{where} is not a known key; known keys: {known}")
            values[setting.name] = _coerce(setting, value, where)
    return values


# Sections that are tables of named entries, checked by their own modules.
TABLE_SECTIONS = ("queues", "limits", "schedules")


def _normal(header: str) -> str:
    """`limits."app.send"` and `limits.app.send` name the same table here."""
    return header.replace('"', "").replace("'", "").replace(" ", "")


def _line_of(path: str, section: str, key: str) -> str:
    """' line N' where key is assigned in [section] of the file (or the section's
    header when the key is not there), to point at the error."""
    current = ""
    header_line = 0
    want = _normal(section)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if text.startswith("[") and "]" in text:
                    current = _normal(text.strip("[]"))
                    if not section and current.split(".")[0] == key:
                        return f" line {number}"
                    if current == want:
                        header_line = number
                    continue
                if current == want and (text.startswith(key + " ") or text.startswith(key + "=")):
                    return f" line {number}"
    except OSError:
        pass
    return f" line {header_line}" if header_line else ""


_UNKNOWN = re.compile(r"unknown key\(s\) ([^,;\s]+)")


def _error_place(message: str) -> tuple[str, str]:
    """(section, key) named at the start of a queues/limits/schedules error message."""
    if message.startswith('limits."'):
        end = message.index('"', len('limits."'))
        section = message[: end + 1]
        rest = message[end + 1 :]
    else:
        head = message.split(" ")[0].rstrip(":")
        section, _, key = head.rpartition(".")
        rest = message[len(head):]
        if rest.startswith(":"):  # "queues.default: unknown key(s) burst"
            section, rest = head, rest
        else:
            return section, key
    unknown = _UNKNOWN.search(rest)
    if unknown:
        return section, unknown.group(1)
    if rest.startswith("."):
        return section, rest[1:].split(" ")[0]
    return section, ""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list of strings"}


def _coerce(setting: Setting, value: Any, where: str) -> Any:
    if setting.type is list:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise SettingsError(f"{where} must be a list of strings, got {value!r}")
    if setting.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, setting.type) or isinstance(value, bool):
        raise SettingsError(f"{where} must be {_TYPE_NAMES[setting.type]}, got {value!r}")
    return value


def from_environment(config: str | None = None, **flags: Any) -> SupervisorConfig:
    """Build a config: flags (None = not given) over $HOSTQUEUE_* over the file over defaults."""
    config_path = config or os.environ.get("HOSTQUEUE_CONFIG") or None
    values: dict[str, Any] = read_config_file(config_path) if config_path else {}
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    for s in SETTINGS:
        flag = given.get(s.name)
        if flag is not None:
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
            raise SettingsError(f"${s.env} must be {_TYPE_NAMES[s.type]}, got {raw!r}") from None
    try:
        return SupervisorConfig(**values, config_path=config_path, flags=given).validate()
    except SettingsError as exc:
        text = str(exc)
        if config_path and text.startswith(("queues.", "limits.", "schedules.")):
            section, key = _error_place(text)
            raise SettingsError(f"{config_path}{_line_of(config_path, section, key)}: {exc}") from None
        named = next((s for s in SETTINGS if text.startswith(s.toml + " ")), None)
        if config_path and named is not None and named.name in values and named.name not in given:
            section, _, key = named.toml.partition(".")
            raise SettingsError(f"{config_path}{_line_of(config_path, section, key)}: {exc}") from None
        raise


def reread(config: SupervisorConfig) -> SupervisorConfig:
    """The configuration again, as at start (same flags), with the file read anew (SIGHUP)."""
    return from_environment(config.config_path, **config.flags)


def reference_table() -> str:
    """The settings table of docs/configuration.md (regenerated by tests/test_docs.py)."""
    rows = ["| file key | environment | flag | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        if s.name == "socket":
            default = "next to the store (`hostqueue.sock` for `hostqueue.db`; `./hostqueue.sock` with PostgreSQL)"
        elif s.default is None or s.default == ():
            default = "-"
        elif isinstance(s.default, float):
            default = f"{s.default:g}"
        else:
            default = str(s.default)
        flag = "--" + s.name.replace("_", "-")
        rows.append(f"| `{s.toml}` | `{s.env}` | `{flag}` | {default} | {s.help} |")
    return "\n".join(rows)
