"""The task registry: ``@hostqueue.task`` and the loading of task modules.

Only functions registered here can run: a client names a task, never a module
or a function, so nothing a client sends can import code the configuration did
not name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_QUEUE = "default"
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class TaskSpec:
    name: str
    func: Callable[..., Any] = field(repr=False, compare=False)
    queue: str = DEFAULT_QUEUE
    retries: int = DEFAULT_RETRIES
    timeout: float | None = None
    priority: int = 0
    backoff_base: float = 1.0
    backoff_factor: float = 2.0
    backoff_cap: float = 300.0
    cron: str | None = None
    cron_timezone: str = "UTC"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "queue": self.queue,
            "retries": self.retries,
            "timeout": self.timeout,
            "priority": self.priority,
        }


_REGISTRY: dict[str, TaskSpec] = {}


class TaskModuleError(Exception):
    """A configured task module could not be imported."""


@overload
def task(func: F, /) -> F: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    retries: int = DEFAULT_RETRIES,
    timeout: float | None = None,
    priority: int = 0,
    backoff_base: float = 1.0,
    backoff_factor: float = 2.0,
    backoff_cap: float = 300.0,
    cron: str | None = None,
    cron_timezone: str = "UTC",
) -> Callable[[F], F]: ...


def task(
    func: F | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    retries: int = DEFAULT_RETRIES,
    timeout: float | None = None,
    priority: int = 0,
    backoff_base: float = 1.0,
    backoff_factor: float = 2.0,
    backoff_cap: float = 300.0,
    cron: str | None = None,
    cron_timezone: str = "UTC",
) -> Any:
    """Register a function as a task. Use as ``@task`` or ``@task(queue=..., retries=...)``.

    The task's name is ``module.function`` unless ``name`` is given. The function
    receives a ``JobContext`` first, then the job's arguments as keywords.
    ``cron="*/5 * * * *"`` (with ``cron_timezone``) also runs it on that schedule,
    without arguments; the schedule is named after the task.
    """

    def register(f: F) -> F:
        if retries < 0:
            raise ValueError(f"task {f.__qualname__}: retries must be >= 0, got {retries}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"task {f.__qualname__}: timeout must be > 0, got {timeout}")
        task_name = name or f"{f.__module__}.{f.__name__}"
        _REGISTRY[task_name] = TaskSpec(
            name=task_name,
            func=f,
            queue=queue,
            retries=retries,
            timeout=timeout,
            priority=priority,
            backoff_base=backoff_base,
            backoff_factor=backoff_factor,
            backoff_cap=backoff_cap,
            cron=cron,
            cron_timezone=cron_timezone,
        )
        f.task_name = task_name  # type: ignore[attr-defined]
        return f

    if func is not None:
        return register(func)
    return register


def registered() -> dict[str, TaskSpec]:
    return dict(_REGISTRY)


def get(name: str) -> TaskSpec | None:
    return _REGISTRY.get(name)


def _append_path(directory: str) -> None:
    """Put a directory of task modules on sys.path, after everything else."""
    if directory not in sys.path and not (directory == os.getcwd() and "" in sys.path):
        sys.path.append(directory)


def _import_one(spec: str) -> None:
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise TaskModuleError(f"task module file {spec!r} does not exist")
        directory, filename = os.path.split(path)
        module_name = filename[:-3] if filename.endswith(".py") else filename
        # The directory goes on sys.path so the module imports under its plain name,
        # the same in the supervisor and in every worker: last, so that nothing in it
        # shadows the standard library or an installed package.
        _append_path(directory)
        spec = module_name
    if spec in sys.modules:
        importlib.reload(sys.modules[spec])
    else:
        importlib.import_module(spec)


def load_task_modules(modules: list[str] | tuple[str, ...]) -> dict[str, TaskSpec]:
    """Import (or re-import, on reload) the task modules; return the registry.

    Raises TaskModuleError naming the module and the cause.
    """
    _REGISTRY.clear()
    # Task modules in the working directory load by name, but the directory comes
    # last: a file planted there (orjson.py, say) never shadows a real module.
    _append_path(os.getcwd())
    for spec in modules:
        try:
            _import_one(spec)
        except TaskModuleError:
            raise
        except Exception as exc:
            raise TaskModuleError(
                f"cannot import task module {spec!r}: {type(exc).__name__}: {exc}"
            ) from exc
    return registered()


# -- in this process (immediate mode) ---------------------------------------------

TaskModule = str | ModuleType


def _module_name(spec: str) -> str:
    """The module name of a --tasks entry (a module name or a .py path), as
    _import_one resolves it (a file's directory goes on sys.path)."""
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise TaskModuleError(f"task module file {spec!r} does not exist")
        directory, filename = os.path.split(path)
        _append_path(directory)
        return filename[:-3] if filename.endswith(".py") else filename
    return spec


def _defined_in(spec: TaskSpec, module: str) -> bool:
    defined = getattr(spec.func, "__module__", None) or ""
    return defined == module or defined.startswith(module + ".")


def load_tasks(modules: Iterable[TaskModule]) -> dict[str, TaskSpec]:
    """The tasks that the given modules register, like ``hostqueue run --tasks``.

    Unlike the supervisor, a module that is already imported is not re-imported (a
    test's monkeypatches and the identity of its classes survive), unless the
    registry no longer holds its tasks (``load_task_modules`` clears it,
    e.g. for an embedded supervisor in the same process).
    """
    _append_path(os.getcwd())
    found: dict[str, TaskSpec] = {}
    for entry in modules:
        if isinstance(entry, ModuleType):
            name, label = entry.__name__, entry.__name__
        else:
            name, label = _module_name(entry), entry
        for attempt in ("import", "reload"):
            before = registered()
            try:
                if name not in sys.modules:
                    importlib.import_module(name)
                elif attempt == "reload":
                    importlib.reload(sys.modules[name])
            except TaskModuleError:
                raise
            except Exception as exc:
                raise TaskModuleError(
                    f"cannot import task module {label!r}: {type(exc).__name__}: {exc}"
                ) from exc
            after = registered()
            mine = {k: s for k, s in after.items() if before.get(k) is not s or _defined_in(s, name)}
            if mine:
                break
        found.update(mine)
    return found
