"""Error codes of the control protocol, in one table, and the exceptions that carry them.

A reply that failed is ``{"id": ..., "ok": false, "error": {"code": C, "message": M}}``
where C is one of ERROR_CODES and M says what was wrong and what to do.
"""

from __future__ import annotations

from typing import Any

ERROR_CODES: dict[str, str] = {
    "bad_json": "the line is not a JSON object",
    "line_too_long": "the line is longer than the server's limit (1 MiB by default)",
    "unknown_op": "the op is not one the server knows",
    "bad_request": "a field is missing, has the wrong type or is out of range",
    "unknown_task": "no configured task module registers a task of that name",
    "not_found": "no job has that id",
    "invalid_state": "the job is not in a state that allows the operation",
    "draining": "the supervisor is draining and takes no new jobs",
    "timeout": "the operation did not finish within the time asked for",
    "forbidden": "the connecting user may not use this socket",
    "store_error": "the store could not commit the change; nothing was acknowledged",
    "store_busy": "another process holds the store's lock (a backup, a sqlite3 shell); nothing was"
                  " acknowledged: submit again shortly",
    "too_many_clients": "the supervisor serves as many clients as its open-files limit allows",
    "internal": "an unexpected error in the supervisor; the request was not carried out",
}


class HostqueueError(Exception):
    """Base class of every error hostqueue raises to its users."""


class ProtocolError(HostqueueError):
    """An error with a protocol code: raised by the server's handlers, and by
    clients when a reply says ``ok: false``."""

    def __init__(self, code: str, message: str) -> None:
        # Codes outside ERROR_CODES are allowed, so an older client can carry a
        # newer server's error; the server itself only uses codes in the table.
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class SupervisorUnavailable(HostqueueError):
    """The client cannot reach a supervisor on the socket."""


class JobFailed(HostqueueError):
    """``JobHandle.result()`` on a job that ended other than completed."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        err = job.get("error") or {}
        detail = err.get("message") if isinstance(err, dict) else err
        text = f"job {job.get('id')} ended {job.get('status')}"
        if detail:
            text += f": {err.get('type', 'Error')}: {detail}" if isinstance(err, dict) else f": {detail}"
        super().__init__(text)
