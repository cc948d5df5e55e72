"""A reply that an operation gives later, written in the loop turn it is settled in.

An operation that must wait (for its commit, for a job to end) could return an
asyncio future or a coroutine; but every future callback, every task step and
every ``wait_for`` costs a loop turn of its own, and a submit-and-wait crossed
five of them between its job's commit and its reply. A ``DeferredReply`` calls
its callbacks at once, in the turn that settles it: the commit's, or the one in
which the job's end is committed.

It has the part of the future interface that the control connection uses
(``add_done_callback``, ``result``, ``exception``, ``cancel``), and it can be
awaited by a coroutine that needs its result.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Generator

log = logging.getLogger("hostqueue.control")

Callback = Callable[[Any], None]


def _copy_outcome(source: Any, cancel: Callable[[], object],
                  fail: Callable[[BaseException], object], resolve: Callable[[Any], object]) -> None:
    """Settle a target (by its three setters) as a settled future or reply is."""
    if source.cancelled():
        cancel()
    elif source.exception() is not None:
        fail(source.exception())
    else:
        resolve(source.result())


class DeferredReply:
    __slots__ = ("_done", "_cancelled", "_result", "_exception", "_callbacks", "_cleanups")

    def __init__(self) -> None:
        self._done = False
        self._cancelled = False
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callback] = []
        # Run once it is settled or cancelled: a waiter unregistered, a timer stopped.
        self._cleanups: list[Callable[[], object]] = []

    # -- settling ---------------------------------------------------------------

    def resolve(self, result: Any) -> None:
        if not self._done:
            self._result = result
            self._settle()

    def fail(self, exc: BaseException) -> None:
        if not self._done:
            self._exception = exc
            self._settle()

    def cancel(self) -> bool:
        """The reply is no longer wanted (its client left): nothing is written."""
        if self._done:
            return False
        self._cancelled = True
        self._settle()
        return True

    def follow(self, future: asyncio.Future[Any] | DeferredReply) -> None:
        """Settle as this future (or reply) does; cancelling this reply cancels it."""
        future.add_done_callback(lambda f: _copy_outcome(f, self.cancel, self.fail, self.resolve))
        self.on_settled(future.cancel)

    def on_settled(self, cleanup: Callable[[], object]) -> None:
        if self._done:
            cleanup()
        else:
            self._cleanups.append(cleanup)

    def _settle(self) -> None:
        self._done = True
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - the others must still run
                log.exception("error cleaning up after a reply")
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - the others must still run
                log.exception("error delivering a reply")

    # -- the future interface the connection uses --------------------------------

    def add_done_callback(self, callback: Callback) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def exception(self) -> BaseException | None:
        if self._cancelled:
            raise asyncio.CancelledError()
        return self._exception

    def result(self) -> Any:
        if self._cancelled:
            raise asyncio.CancelledError()
        if self._exception is not None:
            raise self._exception
        return self._result

    def __await__(self) -> Generator[Any, None, Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def copy(reply: DeferredReply) -> None:
            if not future.done():  # cancelled by the awaiting task
                _copy_outcome(reply, future.cancel, future.set_exception, future.set_result)

        self.add_done_callback(copy)
        return future.__await__()
