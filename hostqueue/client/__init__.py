"""Clients of the control socket: ``Client`` (sync.py), ``AsyncClient`` (aio.py),
immediate mode (immediate.py) and an embedded supervisor (embed.py)."""

from hostqueue.client.sync import FINAL_EVENTS, Client, EventStream, Job, JobHandle  # noqa: F401
