"""Progress: from ctx.progress() in a worker, through the shared-memory board, to watchers
and to the store."""

from __future__ import annotations

import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL

from conftest import FINAL, TASKS, Supervisor, ok


@pytest.mark.timeout(30)
def test_watch_streams_progress_until_completed(sup: Supervisor) -> None:
    steps = 6
    with sup.conn() as c:
        # Paused, so that the watch is in place before the job starts.
        ok(c.request("pause"))
        job = ok(c.request("submit", task=f"{TASKS}.slow", args={"seconds": 1.5, "steps": steps}))["job"]
        rid = c.send_op("watch", job=job["id"])
        first = c.read_for(rid)
        assert first == {"id": rid, "ok": True, "watching": job["id"]}
        ok(c.request("resume"))

        events = []
        for event in c.events(rid, timeout=10):
            assert event["job_id"] == job["id"]
            events.append(event)
            if event["event"] in FINAL:
                break

        # The stream has ended: the next message on this connection is the pong,
        # with no event of the finished stream before it.
        assert not c.stash, f"unexpected messages: {c.stash}"
        pong_id = c.send_op("ping")
        after = c.read(timeout=5)
        assert after["id"] == pong_id and "pong" in after, f"a message after the final event: {after}"

    kinds = [e["event"] for e in events]
    assert kinds[0] == "started"
    assert kinds[-1] == "completed"
    progress = [e for e in events if e["event"] == "progress"]
    fractions = [e["progress"] for e in progress]
    assert len(set(fractions)) >= 3, f"expected several distinct fractions, got {fractions}"
    assert fractions == sorted(fractions), f"progress went backwards: {fractions}"
    assert all(0 < f <= 1 for f in fractions)
    for e in progress:
        step = round(e["progress"] * steps)
        assert e["message"] == f"step {step}/{steps}", e

    final = events[-1]["job"]
    assert final["status"] == "completed" and final["result"] == {"steps": steps}
    assert final["progress"] == 1.0 and final["progress_message"] == f"step {steps}/{steps}"

    stored = sup.get(job["id"])
    assert stored["progress"] == 1.0 and stored["progress_message"] == f"step {steps}/{steps}"
    row = sup.db_job(job["id"])
    assert row["progress"] == 1.0 and row["progress_message"] == f"step {steps}/{steps}"


@pytest.mark.timeout(30)
def test_watch_of_a_finished_job_sends_its_final_event(sup: Supervisor) -> None:
    job = sup.submit("add", {"a": 1, "b": 1})
    sup.wait_job(job["id"])
    with sup.conn() as c:
        rid = c.send_op("watch", job=job["id"])
        assert ok(c.read_for(rid))["watching"] == job["id"]
        event = c.read_for(rid)
        assert event["event"] == "completed" and event["job"]["result"] == 2
        pong_id = c.send_op("ping")
        assert c.read(timeout=5)["id"] == pong_id


@pytest.mark.timeout(30)
def test_watch_shows_each_attempt_until_the_final_failure(sup: Supervisor) -> None:
    with sup.conn() as c:
        ok(c.request("pause"))
        job = ok(c.request("submit", task=f"{TASKS}.fail", retries=2))["job"]
        rid = c.send_op("watch", job=job["id"])
        assert ok(c.read_for(rid))["watching"] == job["id"]
        ok(c.request("resume"))
        seen = []
        for event in c.events(rid, timeout=10):
            seen.append((event["event"], event["job"]["status"], event["job"]["attempts"]))
            if event["event"] in FINAL:
                break
    assert seen == [
        ("started", "running", 1), ("retrying", "pending", 1),
        ("started", "running", 2), ("retrying", "pending", 2),
        ("started", "running", 3), ("failed", "failed", 3),
    ]
