"""The Python clients (hostqueue.Client, hostqueue.AsyncClient) against a real supervisor."""

from __future__ import annotations

import json

import asyncio

import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL

import hostqueue
from conftest import FINAL, TASKS, HQEnv, Supervisor


@pytest.mark.timeout(30)
def test_client_submit_and_result(sup: Supervisor) -> None:
    with hostqueue.Client(str(sup.socket), timeout=10) as c:
        job = c.submit(f"{TASKS}.add", {"a": 3, "b": 4})
        assert isinstance(job.id, int) and job.duplicate is False
        assert job.result(timeout=10) == 7
        assert job.status() == "completed"

        failing = c.submit(f"{TASKS}.fail", {"message": "no"}, retries=0)
        with pytest.raises(hostqueue.JobFailed):
            failing.result(timeout=10)

        with pytest.raises(hostqueue.ProtocolError) as info:
            c.submit(f"{TASKS}.nope")
        assert info.value.code == "unknown_task"
    assert sup.db_job(job.id)["result"] == "7"


@pytest.mark.timeout(30)
def test_client_submit_with_wait_needs_one_request(sup: Supervisor) -> None:
    with hostqueue.Client(str(sup.socket), timeout=10) as c:
        job = c.submit(f"{TASKS}.add", {"a": 3, "b": 4}, wait=True)
        assert job.job["status"] == "completed"
        sent = c._next_id
        assert job.result() == 7 and job.wait()["result"] == 7
        assert c._next_id == sent, "result() asked again for a job known to have ended"

        failing = c.submit(f"{TASKS}.fail", {"message": "no"}, retries=0, wait=10)
        with pytest.raises(hostqueue.JobFailed):
            failing.result()

        running = c.submit(f"{TASKS}.slow", {"seconds": 0.6, "steps": 2}, wait=0.1)
        assert running.job["status"] in ("pending", "running")
        assert running.result(timeout=10) == {"steps": 2}  # asks, as for any submit

        with pytest.raises(ValueError, match="wait"):
            c.submit(f"{TASKS}.add", {"a": 1, "b": 1}, wait=-1)


@pytest.mark.timeout(30)
def test_async_client_submit_with_wait(sup: Supervisor) -> None:
    async def main() -> None:
        async with hostqueue.AsyncClient(str(sup.socket), timeout=10) as c:
            job = await c.submit(f"{TASKS}.add", {"a": 1, "b": 2}, wait=True)
            assert job.job["status"] == "completed"
            assert await job.result() == 3

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_client_progress_yields_events_until_the_end(sup: Supervisor) -> None:
    with hostqueue.Client(str(sup.socket), timeout=10) as c:
        job = c.submit(f"{TASKS}.slow", {"seconds": 1.2, "steps": 4})
        events = list(job.progress())
    assert events, "no events"
    assert events[-1]["event"] == "completed"
    assert all(e["event"] not in FINAL for e in events[:-1])
    fractions = [e["progress"] for e in events if e["event"] == "progress"]
    assert len(set(fractions)) >= 2, events
    assert events[-1]["job"]["result"] == {"steps": 4}


@pytest.mark.timeout(30)
def test_client_submit_many(sup: Supervisor) -> None:
    with hostqueue.Client(str(sup.socket), timeout=10) as c:
        handles = c.submit_many(f"{TASKS}.add", [{"a": i, "b": i} for i in range(10)], run_id="r1")
        assert len(handles) == 10 and len({h.id for h in handles}) == 10
        assert [h.result(timeout=10) for h in handles] == [2 * i for i in range(10)]
        assert c.stats("r1")["completed"] == 10
    rows = sup.db_query("SELECT COUNT(*) FROM jobs WHERE run_id = 'r1' AND status = 'completed'")
    assert rows[0][0] == 10


@pytest.mark.timeout(30)
def test_client_submit_many_ids_answers_with_ids_only(sup: Supervisor) -> None:
    with hostqueue.Client(str(sup.socket), timeout=10) as c:
        ids = c.submit_many_ids(f"{TASKS}.add", [{"a": i, "b": 1} for i in range(50)], run_id="r2")
        assert len(ids) == 50 and ids == sorted(set(ids))
        assert [c.wait(i, timeout=10)["result"] for i in ids] == [i + 1 for i in range(50)]
        reply = c.request("submit_many", task=f"{TASKS}.add", args=[{"a": 1, "b": 1}], reply="ids")
        assert set(reply) == {"id", "ok", "ids"}, "no job objects in an ids reply"
        assert c.request("submit_many", task=f"{TASKS}.add", args=[], reply="ids")["ids"] == []
        with pytest.raises(hostqueue.ProtocolError, match="'jobs' or 'ids'"):
            c.request("submit_many", task=f"{TASKS}.add", args=[{}], reply="everything")
    stored = sup.db_query("SELECT id, args FROM jobs WHERE run_id = 'r2' ORDER BY id")
    assert [(r[0], json.loads(r[1])["a"]) for r in stored] == list(zip(ids, range(50)))


@pytest.mark.timeout(30)
def test_client_key_scale_and_status(hq: HQEnv, sup: Supervisor) -> None:
    with hostqueue.Client(str(sup.socket), timeout=10) as c:
        first = c.submit(f"{TASKS}.add", {"a": 1, "b": 1}, key="k", delay=60)
        second = c.submit(f"{TASKS}.add", {"a": 1, "b": 1}, key="k", delay=60)
        assert second.duplicate is True and second.id == first.id
        assert c.scale(3) == {"previous": 2, "target": 3}
        assert c.status()["target_workers"] == 3
    assert len(sup.wait_workers(3)) == 3


@pytest.mark.timeout(30)
def test_async_client_submit_and_result(sup: Supervisor) -> None:
    async def main() -> tuple[int, list[int], list[str]]:
        async with hostqueue.AsyncClient(str(sup.socket), timeout=10) as c:
            job = await c.submit(f"{TASKS}.add", {"a": 20, "b": 22})
            result = await job.result(timeout=10)
            # Several coroutines share one connection.
            jobs = await asyncio.gather(*(c.submit(f"{TASKS}.add", {"a": i, "b": 1}) for i in range(5)))
            results = await asyncio.gather(*(j.result(timeout=10) for j in jobs))
            slow = await c.submit(f"{TASKS}.slow", {"seconds": 0.6, "steps": 3})
            kinds = [e["event"] async for e in slow.progress()]
            return result, list(results), kinds

    result, results, kinds = asyncio.run(main())
    assert result == 42
    assert results == [1, 2, 3, 4, 5]
    assert kinds[-1] == "completed"
