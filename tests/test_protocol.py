"""The control socket under bad input: every mistake gets a clear error, and the
supervisor keeps serving with its store intact."""

from __future__ import annotations

import socket
import struct

import pytest

BOTH_STORES = True  # conftest: every test runs on SQLite and on PostgreSQL

from conftest import TASKS, Conn, Supervisor, error_code, ok, socket_mode

MIB = 1024 * 1024


def assert_healthy(sup: Supervisor) -> None:
    """Still serving, still running jobs, store not corrupted."""
    assert sup.proc.poll() is None, f"the supervisor exited:\n{sup.log_text()[-3000:]}"
    assert sup.ping()["pid"] == sup.pid
    job = sup.submit("add", {"a": 40, "b": 2})
    assert sup.wait_job(job["id"])["result"] == 42
    assert sup.integrity() == "ok"


@pytest.mark.timeout(30)
def test_invalid_json_is_bad_json(sup: Supervisor) -> None:
    with sup.conn() as c:
        for line, rid in ((b"{not json\n", None), (b'{"id": 1, "op": "ping"\n', 1),
                          (b'{"id": "a7", "op": [\n', "a7"), (b"\xff\xfe\n", None), (b"nul\n", None)):
            c.send_raw(line)
            reply = c.read()
            assert error_code(reply) == "bad_json", (line, reply)
            # The id is named when it leads the line, so a pipelining client can match it.
            assert reply["id"] == rid, (line, reply)
        # The same connection goes on.
        assert ok(c.request("ping"))["pong"]["pid"] == sup.pid
    assert_healthy(sup)


@pytest.mark.timeout(30)
def test_non_object_json_is_bad_json(sup: Supervisor) -> None:
    with sup.conn() as c:
        for line in (b'[{"op": "ping"}]\n', b'"ping"\n', b"42\n", b"null\n"):
            c.send_raw(line)
            assert error_code(c.read()) == "bad_json", line
        assert ok(c.request("ping"))
    assert_healthy(sup)


@pytest.mark.timeout(30)
def test_unknown_op(sup: Supervisor) -> None:
    with sup.conn() as c:
        reply = c.request("frobnicate")
        assert reply["id"] == c.next_id
        assert error_code(reply) == "unknown_op"
        assert "frobnicate" in reply["error"]["message"]
        c.send({"id": "no-op"})
        assert error_code(c.read()) == "bad_request"
    assert_healthy(sup)


@pytest.mark.timeout(30)
def test_missing_field_is_bad_request_naming_it(sup: Supervisor) -> None:
    cases = [("get", {}, "job"), ("submit", {"args": {}}, "task"), ("wait", {}, "job"),
             ("scale", {}, "n"), ("abort", {}, "job"), ("submit_many", {"task": f"{TASKS}.add"}, "args")]
    with sup.conn() as c:
        for op, fields, name in cases:
            reply = c.request(op, **fields)
            assert error_code(reply) == "bad_request", (op, reply)
            assert f"'{name}'" in reply["error"]["message"], (op, reply)
    assert_healthy(sup)


@pytest.mark.timeout(30)
def test_wrong_types_are_bad_request(sup: Supervisor) -> None:
    add = f"{TASKS}.add"
    cases = [
        ("get", {"job": "x"}, "job"),
        ("get", {"job": 1.5}, "job"),
        ("get", {"job": True}, "job"),
        ("submit", {"task": add, "args": {"a": 1, "b": 2}, "priority": True}, "priority"),
        ("submit", {"task": add, "args": [1, 2]}, "args"),
        ("submit", {"task": 7}, "task"),
        ("submit", {"task": add, "args": {}, "delay": "soon"}, "delay"),
        ("submit", {"task": add, "args": {}, "delay": -1}, "delay"),
        ("submit", {"task": add, "args": {}, "retries": -1}, "retries"),
        ("submit", {"task": add, "args": {}, "priority": 2**40}, "priority"),
        ("list", {"limit": 0}, "limit"),
    ]
    with sup.conn() as c:
        for op, fields, name in cases:
            reply = c.request(op, **fields)
            assert error_code(reply) == "bad_request", (op, fields, reply)
            assert name in reply["error"]["message"], (op, fields, reply)
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 0, "a refused submit was stored"
    assert_healthy(sup)


@pytest.mark.timeout(30)
def test_line_over_1mib_is_refused_and_connection_goes_on(sup: Supervisor) -> None:
    with sup.conn() as c:
        big = b'{"id": 1, "op": "submit", "task": "' + b"x" * (MIB + 100) + b'"}\n'
        c.send_raw(big)
        reply = c.read()
        assert error_code(reply) == "line_too_long"
        assert reply["id"] is None
        # The very next message is the pong: one error for the long line, and the
        # connection still serves.
        ping_id = c.send_op("ping")
        pong = c.read()
        assert pong["id"] == ping_id and ok(pong)["pong"]["pid"] == sup.pid, pong
        # Once more, with the rest of the long line arriving after the error.
        c.send_raw(b"y" * (2 * MIB))
        assert error_code(c.read()) == "line_too_long"
        c.send_raw(b"yyyy\n")
        ping_id = c.send_op("ping")
        pong = c.read()
        assert pong["id"] == ping_id and ok(pong), pong
    # Just under the limit is not refused for its length.
    with sup.conn() as c:
        padding = "p" * (MIB - 200)
        reply = c.request("submit", task=f"{TASKS}.noop", args={}, run_id=padding)
        assert error_code(reply) == "bad_request", reply  # run_id too long, not line_too_long
    assert_healthy(sup)


@pytest.mark.timeout(30)
def test_abrupt_disconnects(sup: Supervisor) -> None:
    # Half a line, then a normal close.
    c = Conn(sup.socket)
    c.send_raw(b'{"id": 1, "op": "sub')
    c.close()
    # Half a line, then a reset (SO_LINGER 0).
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sup.socket))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(b'{"id": 2, "op": "ping", "x": "' + b"z" * 300_000)
    s.close()
    # Requests whose replies come later: wait and watch, then gone before they are answered.
    job = sup.submit("slow", {"seconds": 0.6, "steps": 3})
    for op in ("wait", "watch"):
        c = Conn(sup.socket)
        c.send_op(op, job=job["id"])
        c.close()
    # Pipelined requests, closed before reading any reply.
    c = Conn(sup.socket)
    c.send_raw(b"".join(b'{"id": %d, "op": "status"}\n' % i for i in range(200)))
    c.close()
    assert sup.wait_job(job["id"])["status"] == "completed"
    assert_healthy(sup)


@pytest.mark.timeout(60)
def test_200_concurrent_idle_connections(sup: Supervisor) -> None:
    conns = [Conn(sup.socket) for _ in range(200)]
    try:
        assert_healthy(sup)  # a newcomer is served while 200 idle clients are connected
        for i, c in enumerate(conns):
            c.send({"id": i, "op": "ping"})
        for i, c in enumerate(conns):
            reply = c.read()
            assert reply["id"] == i and ok(reply)["pong"]["pid"] == sup.pid
    finally:
        for c in conns:
            c.close()
    assert_healthy(sup)


@pytest.mark.timeout(30)
def test_socket_is_mode_0600(sup: Supervisor) -> None:
    assert socket_mode(sup.socket) == 0o600


@pytest.mark.timeout(30)
def test_submit_replies_come_in_request_order(sup: Supervisor) -> None:
    with sup.conn() as c:
        ids = [c.send_op("submit", task=f"{TASKS}.add", args={"a": i, "b": 0}) for i in range(50)]
        replies = [c.read() for _ in ids]
    assert [r["id"] for r in replies] == ids
    job_ids = [ok(r)["job"]["id"] for r in replies]
    assert job_ids == sorted(job_ids) and len(set(job_ids)) == 50
