"""The group commit's write batches, applied to a real SQLite store.

A batch puts writes about jobs older than its new ones first, a write about a
new job right after that job's submit, and split() commits a backlog of submits
in several transactions. These tests check that every write still lands on a
row that exists, in the order it was made, whatever the cut.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from typing import Callable

import orjson
import pytest

from hostqueue.store import SQLiteStore as Store, StoreError, WriteBatch

pytestmark = pytest.mark.timeout(60)

NOW = time.time()


def add(batch: WriteBatch, first: int, n: int, ok: Callable[[], None] = lambda: None,
        fail: Callable[[BaseException], None] = lambda e: None) -> None:
    """The jobs first .. first + n - 1 of one submit, as Actions.submit_jobs adds them."""
    texts = orjson.dumps([orjson.dumps({"i": i}).decode() for i in range(first, first + n)]).decode()
    params = (first, "t.noop", "default", 4, 0, None, None, NOW, NOW, None, None, texts)
    batch.add_submit(first, n, params, [], ok, fail)


def claim(job_id: int, attempt: int = 1) -> tuple[object, ...]:
    """A job's start (held -> running), guarded by the pending state it leaves."""
    return (attempt, NOW, 4242, "pending", job_id)


def finish(job_id: int) -> tuple[object, ...]:
    """Its end (running -> completed), guarded by the running state it leaves."""
    return ("completed", "true", None, NOW, None, None, 0.0, 1000, 1, NOW, 4242, "running", job_id)


def statuses(path: str) -> dict[int, tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        return {i: (s, a) for i, s, a in conn.execute("SELECT id, status, attempts FROM jobs")}


def apply_all(path: str, batches: list[WriteBatch]) -> None:
    async def go() -> None:
        store = Store(path)
        await store.open()
        try:
            for batch in batches:
                await store.apply(batch)
        finally:
            await store.close()

    asyncio.run(go())


def test_writes_about_older_jobs_go_first_and_new_jobs_follow_their_submit(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "q.db")
    apply_all(path, [_batch_with((1, 3))])  # jobs 1-3 exist already
    done: list[str] = []
    batch = WriteBatch()
    add(batch, 10, 5, lambda: done.append("submit 10"))
    add(batch, 20, 5, lambda: done.append("submit 20"))
    batch.add("start", claim(1))  # an old job: needs none of the inserts
    batch.add("start", claim(12))  # a job of the first submit
    batch.add("start", claim(22))
    batch.after_commit(lambda: done.append("hand over 1"), [1])
    batch.after_commit(lambda: done.append("hand over 12"), [12])
    batch.after_commit(lambda: done.append("barrier"))
    ops = batch.all_ops()
    assert ops[0] == ("start", claim(1)), "the old job's claim is not held behind the inserts"
    assert ops.index(("start", claim(12))) == 2, "job 12's claim follows its submit's rows"
    assert ops.index(("start", claim(22))) == len(ops) - 1
    apply_all(path, [batch])
    for callback in batch.callbacks():
        callback()
    assert done == ["submit 10", "submit 20", "hand over 1", "hand over 12", "barrier"]
    got = statuses(path)
    assert got[1] == got[12] == got[22] == ("running", 1)
    assert got[11] == ("pending", 0)


def test_hand_overs_run_first_and_stay_first_when_a_failed_batch_is_retried() -> None:
    """Jobs go to their workers before a commit's other callbacks (submits'
    replies included), also when their batch failed and is retried with the next."""
    done: list[str] = []
    failed = WriteBatch()
    add(failed, 10, 1, lambda: done.append("submit 10"))
    failed.add("start", claim(10))
    failed.after_commit(lambda: done.append("announce 10"), [10])
    failed.after_commit(lambda: done.append("hand over 10"), [10], first=True)
    for callback in failed.callbacks():
        callback()
    assert done == ["hand over 10", "submit 10", "announce 10"]

    done.clear()
    nxt = WriteBatch()
    add(nxt, 20, 1, lambda: done.append("submit 20"))
    nxt.add("start", claim(5))  # an older job: an early write
    nxt.after_commit(lambda: done.append("announce 5"), [5])
    nxt.after_commit(lambda: done.append("hand over 5"), [5], first=True)
    nxt.after_commit(lambda: done.append("hand over 20"), [20], first=True)
    # failed's submit was refused; its claim and callbacks are retried first
    nxt.prepend(failed, [op for op in failed.all_ops() if op[0] == "start"])
    for callback in nxt.callbacks():
        callback()
    assert done == ["hand over 10", "hand over 5", "hand over 20", "submit 20", "announce 10",
                    "announce 5"]


def _batch_with(new: tuple[int, int]) -> WriteBatch:
    batch = WriteBatch()
    add(batch, new[0], new[1])
    return batch


def test_split_cuts_a_backlog_at_whole_submits_and_keeps_each_write_after_its_row(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "q.db")
    apply_all(path, [_batch_with((1, 10))])
    batch = WriteBatch()
    for first in (100, 1100, 2100, 3100):
        add(batch, first, 1000)
    batch.add("start", claim(5))
    batch.add("start", claim(150))
    batch.add("start", claim(2150))
    late: list[int] = []
    batch.after_commit(lambda: late.append(2150), [2150])
    batch.after_commit(lambda: late.append(150), [150])
    rest = batch.split(1500)
    assert batch.new_rows == 2000 and rest.new_rows == 2000, "whole submits, at least 1500 rows"
    head_ops = batch.all_ops()
    assert ("start", claim(5)) in head_ops and ("start", claim(150)) in head_ops
    assert ("start", claim(2150)) in rest.all_ops()
    assert batch.callbacks_without_submits() and rest.callbacks_without_submits()
    # Writes that arrive while the head commits: about old and new jobs alike.
    rest.add("finish", finish(5))
    rest.add("start", claim(3150))
    assert rest.all_ops()[0] == ("finish", finish(5)), "the head's jobs count as old for the rest"
    apply_all(path, [batch])
    got = statuses(path)
    assert 2150 not in got and got[150] == ("running", 1), "the head: its submits and their writes"
    apply_all(path, [rest])
    got = statuses(path)
    assert got[5] == ("completed", 1)
    assert got[150] == got[2150] == got[3150] == ("running", 1)
    assert len(got) == 4010


def test_a_small_batch_is_not_split() -> None:
    batch = WriteBatch()
    add(batch, 1, 10, lambda: None)
    add(batch, 11, 10, lambda: None)
    assert len(batch.split(100)) == 0 and len(batch) == 20
    one = WriteBatch()
    add(one, 1, 5000)
    assert len(one.split(100)) == 0, "one submit is never cut: all or none"


def test_after_a_failed_batch_retried_writes_keep_their_order(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "q.db")
    apply_all(path, [_batch_with((1, 3))])
    failed = WriteBatch()
    refused: list[BaseException] = []
    add(failed, 10, 2, fail=refused.append)
    failed.add("start", claim(1))
    handed: list[int] = []
    failed.after_commit(lambda: handed.append(1), [1])
    nxt = WriteBatch()
    nxt.add("finish", finish(1))  # arrived while the failed batch was in flight
    kept = [op for op in failed.all_ops() if op[0] != "add_jobs"]
    nxt.prepend(failed, kept)
    nxt.add("request_abort", (2,))
    assert nxt.all_ops() == [("start", claim(1)), ("finish", finish(1)), ("request_abort", (2,))]
    apply_all(path, [nxt])
    for callback in nxt.callbacks():
        callback()
    assert handed == [1]
    assert statuses(path)[1] == ("completed", 1)
    assert 10 not in statuses(path)


def test_a_failing_store_refuses_the_whole_batch(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "q.db")
    apply_all(path, [_batch_with((1, 3))])
    batch = WriteBatch()
    add(batch, 3, 2, lambda: None)  # id 3 exists: the insert fails
    with pytest.raises(StoreError, match="store write failed"):
        apply_all(path, [batch])
    assert sorted(statuses(path)) == [1, 2, 3], "nothing of the failed transaction stays"


def test_retention_keeps_a_job_retried_after_it_was_found(tmp_path: str) -> None:
    """Retention reads the ended jobs past their cutoff, then deletes them in a later
    transaction; a job an operator retried in between (revived: pending again) must
    stay. The delete is guarded by the state and end time it read."""
    path = os.path.join(str(tmp_path), "q.db")
    apply_all(path, [_batch_with((1, 2))])
    ended = WriteBatch()
    for job_id in (1, 2):
        ended.add("start", claim(job_id))
        ended.add("finish", ("failed", None, '{"type": "E"}', NOW - 100, None, None, None, None,
                             1, NOW - 101, 4242, "running", job_id))
    apply_all(path, [ended])

    async def sweep() -> None:
        store = Store(path)
        await store.open()
        try:
            found = await store.ended_before({"failed": NOW - 10}, 100)
            assert sorted(job_id for job_id, _, _ in found) == [1, 2]
            revive = WriteBatch()  # job 2 is retried by an operator meanwhile
            revive.add("revive", (NOW, "failed", 2))
            await store.apply(revive)
            forget = WriteBatch()
            for job_id, status, cutoff in found:
                forget.add("forget_ended", (job_id, status, cutoff))
                forget.add("forget_attempts", (job_id, job_id))
            await store.apply(forget)
        finally:
            await store.close()

    asyncio.run(sweep())
    assert statuses(path) == {2: ("pending", 0)}, "the retried job was deleted"


@pytest.mark.parametrize("where", ["the store's thread", "the loop's thread"])
def test_an_unexpected_error_in_a_commit_answers_the_submit_and_is_logged(
        tmp_path: str, caplog: pytest.LogCaptureFixture, where: str) -> None:
    """The group commit runs in a background task: an error other than a StoreError
    (a bug: here a write of a kind the store does not know) must not end that task
    silently, losing the batch and leaving its client without a reply. The submit is
    refused, the error logged, and the committer goes on."""
    from hostqueue.supervisor.committer import GroupCommitter

    path = os.path.join(str(tmp_path), "q.db")
    outcome: list[object] = []

    async def go() -> None:
        store = Store(path)
        await store.open()
        committer = GroupCommitter(store, asyncio.get_running_loop())
        try:
            texts = orjson.dumps([orjson.dumps({"i": 1}).decode()]).decode()
            params = (1, "t.noop", "default", 4, 0, None, None, NOW, NOW, None, None, texts)
            # Too many writes for the loop's thread, or a few.
            for n in range(60 if where == "the store's thread" else 2):
                committer.add("save_setting", (f"s{n}", "1"))
            committer.add_submit(1, 1, params, lambda: outcome.append("stored"), outcome.append,
                                 [("no_such_write", ())])
            for _ in range(200):
                if outcome:
                    break
                await asyncio.sleep(0.01)
        finally:
            committer.batch = WriteBatch()  # the bad write is not retried at close
            await store.close()

    with caplog.at_level("ERROR"):
        asyncio.run(go())
    assert len(outcome) == 1 and isinstance(outcome[0], StoreError), outcome
    assert "no_such_write" in str(outcome[0])
    assert any("unexpected error" in r.getMessage() for r in caplog.records), caplog.text
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


def test_background_tasks_are_held_and_their_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    from hostqueue.supervisor import background

    async def fails() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom in the background")

    async def go() -> None:
        task = background.spawn(fails(), "a failing chore")
        assert background.pending() >= 1, "the task is held until it ends"
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)

    with caplog.at_level("ERROR"):
        asyncio.run(go())
    assert any("a failing chore" in r.getMessage() and r.exc_info for r in caplog.records), caplog.text
