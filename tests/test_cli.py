"""The command line, run as `python -m hostqueue ...` subprocesses against a real supervisor."""

from __future__ import annotations

import json
import os
import socket

import pytest

from conftest import TASKS, HQEnv, Supervisor, file_lines, wait_for


def cli_json(hq: HQEnv, sup: Supervisor, *args: str, code: int = 0) -> object:
    result = hq.cli(*args, socket_path=sup.socket)
    assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.mark.timeout(60)
def test_submit_wait_json_prints_the_job(hq: HQEnv, sup: Supervisor) -> None:
    result = hq.cli("submit", f"{TASKS}.add", '{"a":1,"b":2}', "--wait", "--json",
                    socket_path=sup.socket)
    assert result.returncode == 0, result
    job = json.loads(result.stdout)
    assert job["status"] == "completed" and job["result"] == 3 and job["attempts"] == 1
    for field in ("id", "task", "queue", "status", "args", "result", "error", "attempts",
                  "max_attempts", "priority", "progress", "progress_message", "key", "run_id",
                  "created_at", "started_at", "finished_at", "run_at"):
        assert field in job, field
    assert sup.db_job(job["id"])["status"] == "completed"

    # --socket instead of $HOSTQUEUE_SOCKET; without --wait it prints the id.
    result = hq.cli("submit", "--socket", str(sup.socket), f"{TASKS}.add", '{"a":5,"b":5}')
    assert result.returncode == 0, result
    job_id = int(result.stdout.strip())
    assert sup.wait_job(job_id)["result"] == 10


@pytest.mark.timeout(60)
def test_submit_wait_of_failing_job_exits_1(hq: HQEnv, sup: Supervisor) -> None:
    result = hq.cli("submit", f"{TASKS}.fail", '{"message": "nope"}', "--retries", "0", "--wait",
                    "--json", socket_path=sup.socket)
    assert result.returncode == 1, result
    job = json.loads(result.stdout)
    assert job["status"] == "failed" and job["error"]["message"] == "nope"


@pytest.mark.timeout(60)
def test_ctl_status_json_shape(hq: HQEnv, sup: Supervisor) -> None:
    st = cli_json(hq, sup, "ctl", "status", "--json")
    assert isinstance(st, dict)
    assert st["pid"] == sup.pid
    assert isinstance(st["uptime"], (int, float)) and st["uptime"] >= 0
    assert st["store"] == os.path.abspath(sup.store)
    assert st["socket"] == os.path.abspath(sup.socket)
    assert st["state"] == "running"
    assert st["paused"] == []
    assert len(st["workers"]) == 2
    for w in st["workers"]:
        assert {"pid", "state", "job", "rss", "cpu_percent"} <= set(w)
        assert w["state"] in ("idle", "busy", "retiring", "starting")
        assert isinstance(w["rss"], int) and w["rss"] > 0
        assert isinstance(w["cpu_percent"], (int, float))
    assert {w["pid"] for w in st["workers"]} == sup.worker_pids()


@pytest.mark.timeout(60)
def test_ctl_stats_json_shape(hq: HQEnv, sup: Supervisor) -> None:
    sup.wait_job(sup.submit("add", {"a": 1, "b": 1})["id"])
    sup.wait_job(sup.submit("fail", retries=0)["id"])
    sup.submit("add", {"a": 1, "b": 1}, delay=60)
    sup.submit("add", {"a": 1, "b": 1}, delay=60, queue="other")
    stats = cli_json(hq, sup, "ctl", "stats", "--json")
    names = ("pending", "scheduled", "running", "completed", "failed", "cancelled", "expired")
    assert {n: stats[n] for n in names} == {
        "pending": 0, "scheduled": 2, "running": 0, "completed": 1, "failed": 1,
        "cancelled": 0, "expired": 0,
    }
    assert set(stats["queues"]) == {"default", "other"}
    assert stats["queues"]["default"]["completed"] == 1
    assert stats["queues"]["default"]["scheduled"] == 1
    assert stats["queues"]["other"]["scheduled"] == 1
    for counts in stats["queues"].values():
        assert set(names) <= set(counts)


@pytest.mark.timeout(60)
def test_ctl_scale(hq: HQEnv, sup: Supervisor) -> None:
    result = hq.cli("ctl", "scale", "3", socket_path=sup.socket)
    assert result.returncode == 0, result
    assert len(sup.wait_workers(3)) == 3
    assert sup.status()["target_workers"] == 3
    assert hq.cli("ctl", "scale", "999", socket_path=sup.socket).returncode == 2


@pytest.mark.timeout(60)
def test_job_show_and_list(hq: HQEnv, sup: Supervisor) -> None:
    good = sup.wait_job(sup.submit("add", {"a": 2, "b": 2})["id"])
    bad = [sup.wait_job(sup.submit("fail", {"message": f"bad {i}"}, retries=0)["id"]) for i in range(2)]

    shown = cli_json(hq, sup, "job", "show", str(good["id"]), "--json")
    assert shown["id"] == good["id"] and shown["result"] == 4 and shown["status"] == "completed"

    listed = cli_json(hq, sup, "job", "list", "--status", "failed", "--json")
    assert [j["id"] for j in listed] == sorted((j["id"] for j in bad), reverse=True)
    assert all(j["status"] == "failed" for j in listed)

    missing = hq.cli("job", "show", "9999", "--json", socket_path=sup.socket)
    assert missing.returncode == 1 and "9999" in missing.stderr


@pytest.mark.timeout(60)
def test_job_abort(hq: HQEnv, sup: Supervisor) -> None:
    job = sup.submit("add", {"a": 1, "b": 2}, delay=60)
    result = hq.cli("job", "abort", str(job["id"]), socket_path=sup.socket)
    assert result.returncode == 0, result
    assert sup.get(job["id"])["status"] == "cancelled"
    assert sup.db_job(job["id"])["status"] == "cancelled"
    again = hq.cli("job", "abort", str(job["id"]), socket_path=sup.socket)
    assert again.returncode == 1, again


@pytest.mark.timeout(60)
def test_job_retry_puts_failed_job_back(hq: HQEnv, sup: Supervisor) -> None:
    log = hq.path("runs.log")
    job = sup.wait_job(sup.submit("flaky", {"log": log, "fail_times": 1}, retries=0)["id"])
    assert job["status"] == "failed" and len(file_lines(log)) == 1

    sup.call("pause", "paused")  # so that "back to pending" can be seen before it runs
    result = hq.cli("job", "retry", str(job["id"]), "--json", socket_path=sup.socket)
    assert result.returncode == 0, result
    retried = json.loads(result.stdout)
    assert retried["id"] == job["id"] and retried["status"] == "pending"
    row = sup.db_job(job["id"])
    assert row["status"] == "pending" and row["attempts"] == 0 and row["error"] is None

    sup.call("resume", "paused")
    done = sup.wait_job(job["id"])
    assert done["status"] == "completed" and done["result"] == {"runs": 2}
    assert done["attempts"] == 1
    assert len(file_lines(log)) == 2

    # A completed job cannot be retried.
    assert hq.cli("job", "retry", str(job["id"]), socket_path=sup.socket).returncode == 1


@pytest.mark.timeout(60)
def test_unreachable_socket_exits_3(hq: HQEnv) -> None:
    nowhere = hq.path("nowhere.sock")
    for args in (("ctl", "status", "--json"), ("submit", f"{TASKS}.add", '{"a":1,"b":2}'),
                 ("job", "show", "1")):
        result = hq.cli(*args, socket_path=nowhere)
        assert result.returncode == 3, (args, result)
        assert nowhere in result.stderr
    result = hq.cli("ctl", "--socket", nowhere, "status")
    assert result.returncode == 3, result
    # A stale socket file that nobody listens on (left by a killed supervisor).
    stale = hq.path("stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()
    result = hq.cli("job", "list", "--json", socket_path=stale)
    assert result.returncode == 3, result


@pytest.mark.timeout(60)
def test_bad_args_json_exits_2(hq: HQEnv, sup: Supervisor) -> None:
    for bad in ("{bad", "[1, 2]", '"text"'):
        result = hq.cli("submit", f"{TASKS}.add", bad, socket_path=sup.socket)
        assert result.returncode == 2, (bad, result)
        assert "ARGS_JSON" in result.stderr
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 0


@pytest.mark.timeout(60)
def test_unknown_task_exits_1(hq: HQEnv, sup: Supervisor) -> None:
    result = hq.cli("submit", f"{TASKS}.nope", "{}", socket_path=sup.socket)
    assert result.returncode == 1, result
    assert "unknown_task" in result.stderr
    wait_for(lambda: sup.ping(), 5, "the supervisor to answer")
