"""Embedding: a supervisor owned by your program instead of `hostqueue run`.

    import hostqueue

    with hostqueue.Supervisor(store="jobs.db", tasks=["myapp.tasks"], workers=2) as sup:
        with sup.client() as c:
            print(c.submit("myapp.tasks.resize", {"path": "a.png"}).result(timeout=30))

    async with hostqueue.Supervisor(store="jobs.db", tasks=["myapp.tasks"]) as sup:
        async with sup.async_client() as c:
            ...

The supervisor is the same one `hostqueue run` starts: same store, same worker
processes, same socket, so other processes (the CLI, other programs) can still
connect. Used with ``with`` or ``start()``/``stop()`` it runs on its own event
loop in a background thread; used with ``async with`` it runs as a task on the
caller's loop. In both cases it leaves the program's signal handlers, process
title and logging alone: stopping it is the program's job (``stop()``, or
leaving the ``with`` block, drains it).
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from hostqueue.core.errors import HostqueueError
from hostqueue.core.settings import SupervisorConfig, from_environment

if TYPE_CHECKING:
    from hostqueue.client.aio import AsyncClient
    from hostqueue.client.sync import Client
    from hostqueue.supervisor.main import Supervisor as _Core


class SupervisorFailed(HostqueueError):
    """The embedded supervisor could not start, or ended with an error."""


class Supervisor:
    """A hostqueue supervisor inside this process (its workers are separate processes).

    Keyword arguments are the settings of `hostqueue run` (store, socket, workers,
    tasks, grace, prefetch, queues, limits, schedules, ...; see
    docs/configuration.md), and ``config`` names a TOML file as ``--config`` does.
    """

    def __init__(self, store: str = "./hostqueue.db", tasks: list[str] | tuple[str, ...] = (),
                 workers: int | None = None, socket: str | None = None,
                 config: str | None = None, **settings: Any) -> None:
        tables = {k: settings.pop(k) for k in ("queues", "limits", "schedules") if k in settings}
        base = from_environment(config, store=store, tasks=tuple(tasks), workers=workers,
                                socket=socket, **settings)
        for name, value in tables.items():
            setattr(base, name, value)
        self.config: SupervisorConfig = base.validate()
        self._core: _Core | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[int] | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.exit_code: int | None = None

    @property
    def socket(self) -> str:
        return self.config.socket_path

    @property
    def running(self) -> bool:
        return self._core is not None and self.exit_code is None

    def client(self, timeout: float | None = None) -> "Client":
        from hostqueue.client.sync import Client

        return Client(self.socket, timeout=timeout)

    def async_client(self, timeout: float | None = None) -> "AsyncClient":
        from hostqueue.client.aio import AsyncClient

        return AsyncClient(self.socket, timeout=timeout)

    # -- in a thread ------------------------------------------------------------------

    def _check_tasks(self) -> None:
        """Import the task modules here first, so a broken one is named in the error."""
        from hostqueue.core import registry

        try:
            registry.load_task_modules(self.config.tasks)
        except registry.TaskModuleError as exc:
            raise SupervisorFailed(f"the supervisor cannot start: {exc}") from None

    def start(self, timeout: float = 30.0) -> "Supervisor":
        """Start on a background thread; return once the socket answers."""
        if self._thread is not None or self._task is not None:
            raise SupervisorFailed("this supervisor was already started")
        self._check_tasks()
        self._thread = threading.Thread(target=self._run_thread, name="hostqueue-supervisor", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise SupervisorFailed(f"the supervisor did not start within {timeout:g} s")
        if self._error is not None or self.exit_code is not None:
            raise SupervisorFailed(
                f"the supervisor could not start (exit code {self.exit_code}): {self._error or 'see its log'}"
            )
        return self

    def _run_thread(self) -> None:
        import uvloop

        try:
            uvloop.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the caller of start()
            self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> int:
        from hostqueue.supervisor.main import Supervisor as Core

        self._loop = asyncio.get_running_loop()
        self._core = Core(self.config, embedded=True)
        run = asyncio.ensure_future(self._core.run())
        ready = asyncio.ensure_future(self._core.ready_event.wait())
        await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
        self._started.set()
        if not ready.done():
            ready.cancel()
        self.exit_code = await run
        return self.exit_code

    def stop(self, fast: bool = False, timeout: float | None = None) -> int:
        """Drain (running jobs get the grace period; ``fast``: none) and wait for the end."""
        core, loop = self._core, self._loop
        if self._thread is None:
            raise SupervisorFailed("stop() is for a supervisor started with start(); use `async with`")
        if core is not None and loop is not None and self.exit_code is None:
            try:
                loop.call_soon_threadsafe(core.begin_drain, 0.0 if fast else None)
            except RuntimeError:
                pass  # its loop has already ended
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise SupervisorFailed(f"the supervisor did not stop within {timeout:g} s")
        return self.exit_code if self.exit_code is not None else 1

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- on the caller's loop -------------------------------------------------------

    async def astart(self) -> "Supervisor":
        from hostqueue.supervisor.main import Supervisor as Core

        if self._thread is not None or self._task is not None:
            raise SupervisorFailed("this supervisor was already started")
        self._check_tasks()
        self._loop = asyncio.get_running_loop()
        self._core = Core(self.config, embedded=True)
        self._task = asyncio.ensure_future(self._core.run())
        ready = asyncio.ensure_future(self._core.ready_event.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self.exit_code = self._task.result()
            raise SupervisorFailed(f"the supervisor could not start (exit code {self.exit_code}); see its log")
        return self

    async def astop(self, fast: bool = False) -> int:
        if self._core is None or self._task is None:
            raise SupervisorFailed("astop() is for a supervisor started with astart() or `async with`")
        self._core.begin_drain(0.0 if fast else None)
        self.exit_code = await self._task
        return self.exit_code

    async def __aenter__(self) -> "Supervisor":
        return await self.astart()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.astop()
