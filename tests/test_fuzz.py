"""Hostile clients (issue 5): fuzzing of the socket with hypothesis, deep nesting, huge
numbers, broken framing, a thousand idle connections, clients that never read their
replies or vanish mid-request, a peer of another uid, the audit log, and task names that
try to reach code no task module registers.

The fuzz tests run ``HQ_FUZZ_EXAMPLES`` examples each under ``-m torture`` (default 5000)
and a few hundred in the default run. What each test proves is in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, TASKS, Conn, HQEnv, Supervisor, error_code, ok, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from hostqueue.core.errors import ERROR_CODES

# Hypothesis keeps caches (unicode tables, constants) in ./.hypothesis even without an
# example database: keep them out of the repository.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "hostqueue-hypothesis")

MIB = 1024 * 1024
FUZZ_EXAMPLES = int(os.environ.get("HQ_FUZZ_EXAMPLES") or 5000)
PROBE = "probe\u2603"  # the id of the ping sent after each example (no generated id equals it)


def fuzz_settings(examples: int, derandomize: bool = True) -> Any:
    """The default run's fuzz is derandomized (the same examples every run: CI stays
    reproducible); the torture runs draw fresh ones. database=None: no .hypothesis
    directory in the repository."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n[reliability] {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# the op list, from docs/protocol.md


def protocol_ops() -> dict[str, list[str]]:
    """Every op documented in docs/protocol.md, with the names its section mentions (its fields,
    and a few values: extra fields are part of the fuzz)."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    sections = re.split(r"^### ", text.split("\n## Ops", 1)[1], flags=re.MULTILINE)[1:]
    ops: dict[str, list[str]] = {}
    for section in sections:
        heading, _, body = section.partition("\n")
        names = re.findall(r"`([a-z_]+)`", heading)
        fields = sorted(set(re.findall(r"`([a-z_]+)`", body)) - set(names) - {"id"})
        for name in names:
            ops[name] = fields
    return ops


OPS = protocol_ops()
# `stop` would end the supervisor and `reload` restarts every worker: they are exercised on
# their own (audit test), not thousands of times.
FUZZED_OPS = sorted(set(OPS) - {"stop", "reload"})


# ---------------------------------------------------------------------------------------------
# reading and checking replies


def check_message(msg: Any) -> None:
    """Every line the server sends is a JSON object: an event of a watch stream, a success, or
    an error with a documented code and a message. `internal` is a bug: a bad request must get
    a clear error (bad_request, not_found, ...), not an unexpected one."""
    assert isinstance(msg, dict), f"a reply that is not an object: {msg!r}"
    if "event" in msg:
        return
    assert msg.get("ok") in (True, False), f"a reply without ok: {msg!r}"
    if msg["ok"] is False:
        error = msg.get("error")
        assert isinstance(error, dict), msg
        assert error.get("code") in ERROR_CODES, f"undocumented error code: {msg!r}"
        assert isinstance(error.get("message"), str) and error["message"], msg
        assert error["code"] != "internal", f"the supervisor failed on a client's request: {msg!r}"


def read_message(conn: Conn, deadline: float) -> Any:
    msg = json.loads(conn.read_line(max(0.01, deadline - time.monotonic())))
    check_message(msg)
    return msg


def probe(conn: Conn, timeout: float = 10.0) -> list[Any]:
    """Ping on this connection; every (checked) message that came before the pong."""
    conn.send({"id": PROBE, "op": "ping"})
    deadline = time.monotonic() + timeout
    seen: list[Any] = []
    while True:
        msg = read_message(conn, deadline)
        if msg.get("id") == PROBE:
            assert msg["ok"] is True and "pong" in msg, msg
            return seen
        seen.append(msg)


def scalar_id(value: Any) -> bool:
    """Ids the reply must echo exactly (JSON numbers beyond 2**53 need not survive a codec)."""
    if value is None or isinstance(value, (str, bool)):
        return True
    if isinstance(value, int):
        return abs(value) <= 2**53
    return isinstance(value, float)


def assert_healthy(sup: Supervisor) -> None:
    assert sup.proc is not None and sup.proc.poll() is None, f"the supervisor exited:\n{sup.log_text()[-3000:]}"
    assert sup.ping()["pid"] == sup.pid
    # The fuzz may have paused queues or scaled the pool (to 0, say): undo both.
    ok(sup.request("resume"))
    ok(sup.request("scale", n=sup.workers_arg or 1))
    # Ahead of whatever the test left waiting (a resumed backlog of 200,000 jobs, say).
    job = sup.submit("add", {"a": 40, "b": 2}, priority=1_000_000)
    assert sup.wait_job(job["id"])["result"] == 42
    assert sup.integrity() == "ok"


# ---------------------------------------------------------------------------------------------
# strategies

SPECIAL = [0, -1, 1, 2, 255, 256, 257, 2**31, -(2**31) - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
           -(2**63), 1e308, -1e308, 5e-324, 0.5, "", " ", "x" * 300, "\u0000", "\ud7ff\ue000", [], {},
           True, False, None, f"{TASKS}.noop", f"{TASKS}.add", "default", "failed", "pending",
           "drain", "fast", "*"]
specials = st.sampled_from(SPECIAL)
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=30) | specials)


def nest(inner: Any) -> Any:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)


# Half of the values are boundary cases, the other half anything JSON can carry.
values = specials | st.recursive(scalars, nest, max_leaves=8)


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(FUZZED_OPS) | st.text(max_size=12))
    names = OPS.get(op, []) + ["zzz"]
    fields = draw(st.dictionaries(st.sampled_from(names), values, max_size=len(names)))
    if op in ("submit", "submit_many") and draw(st.booleans()):
        fields["task"] = draw(st.sampled_from([f"{TASKS}.noop", f"{TASKS}.add"]))
    if op == "submit_many" and draw(st.booleans()):
        fields["args"] = draw(st.lists(values, max_size=4))
    n = fields.get("n")
    if op == "scale" and isinstance(n, int) and not isinstance(n, bool) and 4 < n <= 256:
        fields["n"] = 257  # never ask a 2-core machine for hundreds of workers: out of range instead
    request: dict[str, Any] = {"op": op, **fields}
    if draw(st.booleans()):
        request["id"] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        del request["op"]
    return request


def encode(request: dict[str, Any]) -> bytes:
    # Python's encoder writes NaN/Infinity for such floats (invalid JSON: bad_json expected);
    # ensure_ascii escapes lone surrogates, which the server must refuse cleanly too.
    return json.dumps(request).encode()


# ---------------------------------------------------------------------------------------------
# 1. fuzzing


def fuzz_requests(sup: Supervisor, examples: int, derandomize: bool = True) -> int:
    count = 0

    @fuzz_settings(examples, derandomize)
    @given(request=requests())
    def example(request: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        line = encode(request)
        rid = request.get("id")
        with Conn(sup.socket, timeout=10) as conn:
            conn.send_raw(line + b"\n")
            seen = probe(conn)
            answered = [m for m in seen if "ok" in m]
            # One reply at most, tagged with the request's id (or null when it cannot be read).
            assert len(answered) <= 1, (request, answered)
            if answered and scalar_id(rid) and answered[0]["id"] is not None:
                assert answered[0]["id"] == rid, (request, answered)
            if not answered and request.get("op") != "wait":
                # Replies that wait for a commit or a read come a little later.
                deadline = time.monotonic() + 10
                while True:
                    msg = read_message(conn, deadline)
                    if "ok" in msg:
                        break

    example()
    return count


@pytest.mark.timeout(120)
def test_fuzz_every_op_with_random_fields(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    sup = hq.supervisor(workers=1)
    # The docs' op list is the server's.
    reply = sup.request("no-such-op")
    listed = re.search(r"ops are: (.*)$", reply["error"]["message"])
    assert listed and sorted(listed[1].split(", ")) == sorted(OPS), (sorted(OPS), reply)
    began = time.monotonic()
    n = fuzz_requests(sup, 300)
    assert_healthy(sup)
    report(capsys, f"fuzz: {n} random requests over {len(FUZZED_OPS)} ops in {time.monotonic() - began:.1f} s")


@pytest.mark.torture
@pytest.mark.timeout(120 + FUZZ_EXAMPLES // 20)
def test_fuzz_every_op_with_random_fields_long(hq: HQEnv, capsys: pytest.CaptureFixture[str]) -> None:
    sup = hq.supervisor(workers=1)
    began = time.monotonic()
    n = fuzz_requests(sup, FUZZ_EXAMPLES, derandomize=False)
    assert_healthy(sup)
    report(capsys, f"fuzz (long): {n} random requests in {time.monotonic() - began:.1f} s")


def fuzz_bytes(sup: Supervisor, examples: int, derandomize: bool = True) -> None:
    @fuzz_settings(examples, derandomize)
    @given(data=st.binary(max_size=3000), newline=st.booleans())
    def example(data: bytes, newline: bool) -> None:
        conn = Conn(sup.socket, timeout=10)
        try:
            if newline:
                conn.send_raw(data + b"\n")
                probe(conn)  # every reply to the random lines is checked on the way
            else:  # half a line, then gone
                conn.send_raw(data)
        finally:
            conn.close()
        if not newline:
            with Conn(sup.socket, timeout=10) as fresh:
                probe(fresh)

    example()


@pytest.mark.timeout(120)
def test_fuzz_random_bytes(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    fuzz_bytes(sup, 300)
    assert_healthy(sup)


@pytest.mark.torture
@pytest.mark.timeout(120 + FUZZ_EXAMPLES // 20)
def test_fuzz_random_bytes_long(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    fuzz_bytes(sup, FUZZ_EXAMPLES, derandomize=False)
    assert_healthy(sup)


@pytest.mark.timeout(120)
def test_fuzz_truncated_lines_are_bad_json(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)

    @fuzz_settings(200)
    @given(request=requests(), data=st.data())
    def example(request: dict[str, Any], data: Any) -> None:
        line = encode(request)
        cut = data.draw(st.integers(1, len(line) - 1))
        with Conn(sup.socket, timeout=10) as conn:
            conn.send_raw(line[:cut] + b"\n")
            seen = probe(conn)
            # A JSON object cut short is never valid JSON: exactly one bad_json, id null.
            assert len(seen) == 1 and error_code(seen[0]) == "bad_json" and seen[0]["id"] is None, (
                line[:cut], seen)

    example()
    assert_healthy(sup)
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 1, "a truncated line submitted a job"


@pytest.mark.timeout(120)
def test_fuzz_framing_around_the_line_limit(hq: HQEnv) -> None:
    """Pings padded to random lengths around the limit (4096 bytes here), the stream cut into
    random chunks: each line of at most 4096 bytes gets its pong, each longer one exactly one
    line_too_long, in order, and the connection goes on."""
    limit = 4096
    sup = hq.supervisor(workers=1, extra_args=("--max-line", str(limit)))

    @fuzz_settings(150)
    @given(lengths=st.lists(st.integers(20, 2 * limit) | st.sampled_from([limit - 1, limit, limit + 1]),
                            min_size=1, max_size=10),
           cuts=st.lists(st.integers(1, 20 * limit), max_size=12))
    def example(lengths: list[int], cuts: list[int]) -> None:
        lines, expected = [], []
        for i, length in enumerate(lengths):
            base = b'{"id": %d, "op": "ping"}' % i
            line = base + b" " * max(0, length - len(base))
            lines.append(line + b"\n")
            expected.append(("pong", i) if len(line) <= limit else ("line_too_long", None))
        stream = b"".join(lines)
        points = sorted({c for c in cuts if c < len(stream)})
        chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
        with Conn(sup.socket, timeout=10) as conn:
            for chunk in chunks:
                conn.send_raw(chunk)
            got = []
            deadline = time.monotonic() + 10
            for _ in expected:
                msg = read_message(conn, deadline)
                got.append(("pong", msg["id"]) if msg["ok"] else (msg["error"]["code"], msg["id"]))
            assert got == expected, (lengths, points)
            assert probe(conn) == []

    example()
    assert_healthy(sup)


# ---------------------------------------------------------------------------------------------
# 2. deep nesting and big numbers


@pytest.mark.timeout(60)
def test_100000_nested_lists_are_answered_and_the_server_goes_on(hq: HQEnv) -> None:
    """orjson parses deep nesting without recursing; what is not a request object is bad_json,
    and a deep value in a field the op ignores is no problem."""
    sup = hq.supervisor(workers=1)
    deep = 100_000
    with sup.conn() as conn:
        for line in (b"[" * deep + b"]" * deep, b'{"a":' * deep, b"{" * deep, b"[" * deep):
            conn.send_raw(line + b"\n")
            reply = json.loads(conn.read_line())
            assert error_code(reply) == "bad_json" and reply["id"] is None, (line[:20], reply)
            assert probe(conn) == []
        conn.send_raw(b'{"id": 2, "op": "ping", "x": ' + b"[" * deep + b"]" * deep + b"}\n")
        reply = json.loads(conn.read_line())
        # orjson before 3.10 parses any depth; later ones refuse past 1024 levels: either
        # the ping is answered, or the line is refused as bad_json naming the request.
        assert reply["id"] == 2 and (reply["ok"] or error_code(reply) == "bad_json"), reply
    assert_healthy(sup)


@pytest.mark.timeout(60)
def test_deeply_nested_field_values_are_bad_request(hq: HQEnv) -> None:
    """A list nested 1000 or 100000 deep where a field wants an integer or a string is a wrong
    type like any other: bad_request naming the field, not `internal`."""
    sup = hq.supervisor(workers=1)
    problems = []
    with sup.conn() as conn:
        for depth in (1000, 100_000):
            value = b"[" * depth + b"]" * depth
            for op, field, extra in (("get", "job", b""), ("scale", "n", b""), ("submit", "task", b""),
                                     ("pause", "queue", b""), ("wait", "timeout", b', "job": 1'),
                                     ("list", "status", b""), ("stop", "mode", b"")):
                rid = f"{op}-{field}-{depth}"
                conn.send_raw(b'{"id": "%s", "op": "%s", "%s": %s%s}\n'
                              % (rid.encode(), op.encode(), field.encode(), value, extra))
                reply = conn.read_for(rid)
                refused_line = depth > 1024 and error_code(reply) == "bad_json"  # newer orjson
                if not refused_line and (reply.get("ok") is not False or reply["error"]["code"] != "bad_request"
                                         or f"'{field}'" not in reply["error"]["message"]):
                    problems.append((depth, op, field, reply))
    assert not problems, "\n".join(map(str, problems))
    assert sup.status()["state"] == "running"
    assert_healthy(sup)


@pytest.mark.timeout(60)
def test_args_nested_too_deep_to_store_are_refused_cleanly(hq: HQEnv) -> None:
    """Arguments the server can parse but not store again (orjson writes at most 254 levels)
    must be refused with bad_request, like any other unusable argument, not `internal`."""
    sup = hq.supervisor(workers=1)
    problems = []
    with sup.conn() as conn:
        for depth in (300, 100_000):
            nested = b"[" * depth + b"1" + b"]" * depth
            for op, args in (("submit", b'{"a": ' + nested + b"}"), ("submit_many", b'[{"a": ' + nested + b"}]")):
                rid = f"{op}-{depth}"
                conn.send_raw(b'{"id": "%s", "op": "%s", "task": "%s.noop", "args": %s}\n'
                              % (rid.encode(), op.encode(), TASKS.encode(), args))
                reply = conn.read_for(rid)
                refused_line = depth > 1024 and error_code(reply) == "bad_json"  # newer orjson
                if not refused_line and (reply.get("ok") is not False or reply["error"]["code"] != "bad_request"
                                         or "args" not in reply["error"]["message"]):
                    problems.append((depth, op, reply))
    assert not problems, "\n".join(map(str, problems))
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 0
    assert_healthy(sup)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [2**63, 2**64 - 1], ids=["2^63", "2^64-1"])
def test_job_ids_beyond_64_bits_are_refused_cleanly(hq: HQEnv, value: int) -> None:
    """A job id SQLite cannot hold is no job: bad_request (or not_found), never `internal`."""
    sup = hq.supervisor(workers=1)
    cases = [("get", {"job": value}), ("wait", {"job": value, "timeout": 0}), ("abort", {"job": value}),
             ("retry", {"job": value}), ("watch", {"job": value}), ("list", {"before": value})]
    problems = []
    with sup.conn() as conn:
        for op, fields in cases:
            reply = conn.request(op, **fields)
            if reply.get("ok") is not False or reply["error"]["code"] not in ("bad_request", "not_found"):
                problems.append((op, fields, reply))
    assert not problems, "\n".join(map(str, problems))
    assert_healthy(sup)


# ---------------------------------------------------------------------------------------------
# 3. many clients, clients that do not read, clients that vanish


def settled_fds(proc: psutil.Process) -> int:
    """The supervisor's descriptor count once it stops changing (start-up ones come and go)."""
    last: list[int] = []

    def same() -> int | None:
        n = proc.num_fds()
        found = n if last and last[-1] == n else None
        last.append(n)
        return found

    return int(wait_for(same, 10, "the supervisor's descriptors to settle", interval=0.2))


@pytest.fixture
def many_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.timeout(60)
def test_a_thousand_idle_connections(hq: HQEnv, capsys: pytest.CaptureFixture[str], many_files: None) -> None:
    sup = hq.supervisor(workers=1)
    proc = psutil.Process(sup.pid)
    fds = settled_fds(proc)
    conns = [Conn(sup.socket, timeout=10) for _ in range(1000)]
    try:
        wait_for(lambda: proc.num_fds() >= fds + 1000, 10, "the supervisor to accept 1000 connections")
        latencies = []
        for _ in range(20):
            t = time.monotonic()
            sup.ping()
            latencies.append(time.monotonic() - t)
        assert max(latencies) < 0.5, f"a ping took {max(latencies):.3f} s with 1000 idle clients"
        assert sup.wait_job(sup.submit("add", {"a": 1, "b": 1})["id"])["result"] == 2
        for i, conn in enumerate(conns):
            conn.send({"id": i, "op": "ping"})
        for i, conn in enumerate(conns):
            reply = conn.read()
            assert reply["id"] == i and ok(reply)
    finally:
        for conn in conns:
            conn.close()
    wait_for(lambda: proc.num_fds() <= fds, 10, "the supervisor to close the 1000 connections")
    report(capsys, f"1000 idle connections: another client's ping took at most {max(latencies) * 1000:.1f} ms")
    assert_healthy(sup)


def flood(sup: Supervisor, payload: bytes, window: float = 30.0) -> dict[str, Any]:
    """Send ``payload`` (pipelined requests) on a connection that never reads its replies,
    while another client pings. Ends once the flooder cannot send more (or sent it all) and
    the supervisor has been idle for a second, or the window closed."""
    proc = psutil.Process(sup.pid)
    base = proc.memory_info().rss
    flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flooder.connect(str(sup.socket))
    flooder.setblocking(False)
    sent, peak, latencies = 0, base, []
    cpu_mark, cpu_at = sum(proc.cpu_times()[:2]), time.monotonic()
    began = time.monotonic()
    pause = threading.Event()
    try:
        with sup.conn(timeout=30) as other:
            while time.monotonic() - began < window:
                stuck = False
                if sent < len(payload):
                    try:
                        sent += flooder.send(payload[sent:sent + 65536])
                    except BlockingIOError:
                        stuck = True
                peak = max(peak, proc.memory_info().rss)
                t = time.monotonic()
                ok(other.request("ping"))
                latencies.append(time.monotonic() - t)
                cpu = sum(proc.cpu_times()[:2])
                if cpu - cpu_mark > 0.05:
                    cpu_mark, cpu_at = cpu, time.monotonic()
                if (stuck or sent == len(payload)) and time.monotonic() - cpu_at > 1.0:
                    break
                pause.wait(0.02)  # sampling interval
            job = sup.submit("add", {"a": 2, "b": 3})  # other clients are served meanwhile
            assert sup.wait_job(job["id"])["result"] == 5
    finally:
        flooder.close()
    return {"sent": sent, "growth": peak - base, "base": base, "latency": max(latencies),
            "took": time.monotonic() - began}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["status", "get-32k"])
def test_a_client_that_never_reads_costs_bounded_memory(
        hq: HQEnv, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """10000 pipelined requests, replies never read. `status` replies are written at once;
    `get` replies of a job with 32 KiB of arguments come from store reads. Either way the
    server must stop taking requests from that client (docs/protocol.md: it stops reading
    once 4 MiB of replies wait), so its memory stays bounded, and others are served."""
    sup = hq.supervisor(workers=2)
    if kind == "status":
        payload = b"".join(b'{"id": %d, "op": "status"}\n' % i for i in range(10_000))
        bound = 32 * MIB
    else:
        job = sup.submit("blob", {"data": "x" * 32 * 1024}, delay=3600)["id"]
        payload = b"".join(b'{"id": %d, "op": "get", "job": %d}\n' % (i, job) for i in range(10_000))
        # 4 MiB of unsent replies, the 64 MiB point where the server drops a client, slack.
        bound = 96 * MIB
    result = flood(sup, payload)
    report(capsys, (
        f"non-reading client ({kind}, 10000 requests): sent {result['sent']} of {len(payload)} bytes,"
        f" supervisor RSS {result['base'] / MIB:.1f} MiB + {result['growth'] / MIB:.1f} MiB at the peak;"
        f" another client's ping took at most {result['latency'] * 1000:.0f} ms"))
    assert result["latency"] < 5.0, "other clients were not served while one did not read"
    assert result["growth"] <= bound, (
        f"one client that does not read its replies grew the supervisor by"
        f" {result['growth'] / MIB:.0f} MiB (bound {bound / MIB:.0f} MiB)")
    assert_healthy(sup)


@pytest.mark.timeout(120)
def test_a_client_pipelining_big_submits_is_held_back_not_dropped(hq: HQEnv) -> None:
    """40 submit_many of 5,000 jobs sent back to back (their replies: ~2 MB each,
    80 MB in all). The server must stop reading this client's requests while
    their replies are due (docs/protocol.md), not take them all, then drop the
    client at 64 MiB of unsent replies. Every request is answered, in full."""
    sup = hq.supervisor(workers=1)
    sup.call("pause", "paused", queue="bulk")
    n, per = 40, 5000
    args = b"[" + b",".join([b'{"a": 1, "b": 2}'] * per) + b"]"
    payload = b"".join(
        b'{"id": %d, "op": "submit_many", "task": "%s.add", "queue": "bulk", "args": %s}\n'
        % (i, TASKS.encode(), args) for i in range(n))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(sup.socket))
    sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
    # Hold SQLite's write lock (as a slow disk would), so that no reply can be
    # written yet: the server would read all 40 requests if only written
    # replies held it back. Released well within the store's 5 s busy timeout.
    lock = sqlite3.connect(str(sup.store), timeout=10)
    lock.execute("BEGIN IMMEDIATE")
    try:
        sender.start()
        sender.join(2.0)
        took_all = not sender.is_alive()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    replies = []
    with client.makefile("rb") as lines:
        for _ in range(n):
            line = lines.readline()
            assert line, f"the server closed the connection after {len(replies)} replies"
            replies.append(json.loads(line))
    sender.join(30)
    client.close()
    assert not took_all, "the server took all 40 requests while none of their replies could be written"
    assert [r["id"] for r in replies] == list(range(n))
    assert all(r["ok"] and len(r["jobs"]) == per for r in replies), [r.get("error") for r in replies]
    assert sup.db_query("SELECT COUNT(*) FROM jobs WHERE queue = 'bulk'")[0][0] == n * per
    assert_healthy(sup)


@pytest.mark.timeout(60)
def test_clients_vanishing_mid_request_and_mid_wait_leak_nothing(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    proc = psutil.Process(sup.pid)
    fds = settled_fds(proc)
    marker, release = hq.path("started"), hq.path("release")
    running = sup.submit("block", {"marker": marker, "release": release})["id"]
    wait_for(lambda: os.path.exists(marker), 10, "the long job to start")
    for i in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sup.socket))
        # A wait, a submit waiting for its commit, a stream, and half a request; then gone.
        s.sendall(b'{"id": 1, "op": "wait", "job": %d}\n'
                  b'{"id": 2, "op": "submit", "task": "%s.add", "args": {"a": %d, "b": 0}}\n'
                  b'{"id": 3, "op": "watch"}\n{"id": 4, "op": "watch", "job": %d}\n{"id": 5, "op": "get", "jo'
                  % (running, TASKS.encode(), i, running))
        s.close()
    wait_for(lambda: proc.num_fds() <= fds, 10, "the supervisor to drop every vanished client")
    open(release, "w").close()
    assert sup.wait_job(running)["status"] == "completed"
    wait_for(lambda: sup.db_query("SELECT COUNT(*) FROM jobs WHERE status != 'completed'")[0][0] == 0, 20,
             "every job submitted by a vanished client to complete")
    stored = sorted(int(r[0]) for r in sup.db_query(
        "SELECT json_extract(args, '$.a') FROM jobs WHERE task = ?", (f"{TASKS}.add",)))
    assert len(stored) == len(set(stored)) and set(stored) <= set(range(200)), stored
    assert_healthy(sup)
    wait_for(lambda: proc.num_fds() <= fds, 10, "no descriptor left behind")


# ---------------------------------------------------------------------------------------------
# 4. peers, audit, task names


def connect_as(uid: int, gid: int, path: str, payload: bytes, timeout: float = 10.0) -> tuple[str, bytes]:
    """In a forked child running as uid:gid: connect, send payload, read until the server
    closes. Returns ("ok" | "error: ...", bytes read)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest here, only the socket
        status, data = b"ok", b""
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(path)
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed first: what it wrote is still to be read
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
        except BaseException as exc:  # noqa: BLE001
            status = f"error: {type(exc).__name__}: {exc}".encode()
        os.write(w, status + b"\n" + data)
        os._exit(0)
    os.close(w)
    out = b""
    deadline = time.monotonic() + timeout + 5
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.01, deadline - time.monotonic()))
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        os.close(r)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    status, _, data = out.partition(b"\n")
    return status.decode(), data


@pytest.mark.timeout(60)
def test_a_peer_of_another_uid_is_refused_before_any_op(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    # Let the other user reach the socket file (as a wrong mode or group would): the server's
    # own check of the peer (SO_PEERCRED) must still refuse it.
    os.chmod(hq.dir, 0o711)
    os.chmod(sup.socket, 0o666)
    status, data = connect_as(65534, 65534, str(sup.socket),
                              b'{"id": 1, "op": "scale", "n": 0}\n{"id": 2, "op": "ping"}\n'
                              b'{"id": 3, "op": "stop"}\n')
    assert status == "ok", status
    lines = data.splitlines()
    assert len(lines) == 1, f"expected only the forbidden line, then the end: {data!r}"
    reply = json.loads(lines[0])
    assert reply["id"] is None and error_code(reply) == "forbidden", reply
    assert "65534" in reply["error"]["message"]
    # Nothing it sent was carried out.
    status_now = sup.status()
    assert status_now["state"] == "running" and status_now["target_workers"] == 1
    assert "hostqueue.audit" not in sup.log_text()
    wait_for(lambda: "refused a client" in sup.log_text() and "uid 65534" in sup.log_text(), 5,
             "the refusal to be logged")
    assert_healthy(sup)


@pytest.mark.timeout(60)
def test_operations_that_change_things_are_audited(hq: HQEnv) -> None:
    sup = hq.supervisor(workers=1)
    me = f"by pid {os.getpid()} uid {os.getuid()} ({os.path.realpath('/proc/self/exe')})"
    with sup.conn(timeout=20) as conn:
        job = ok(conn.request("submit", task=f"{TASKS}.add", args={"a": 1, "b": 1}, delay=3600,
                              run_id="r1"))["job"]["id"]
        for op, fields in [("ping", {}), ("status", {}), ("stats", {}), ("get", {"job": job}),
                           ("list", {}), ("metrics", {})]:
            ok(conn.request(op, **fields))
        changes: list[tuple[str, dict[str, Any], str]] = [
            ("scale", {"n": 2}, "scale to 2"),
            ("pause", {"queue": "default"}, "pause default"),
            ("resume", {"queue": "default"}, "resume default"),
            ("abort", {"job": job}, f"abort job {job}"),
            ("retry", {"job": job}, f"retry job {job}"),
            ("abort_run", {"run_id": "r1"}, "abort run 'r1'"),
            ("retry_all", {"status": "cancelled"}, "retry all cancelled jobs"),
            ("reload", {}, "reload"),
            ("stop", {}, "stop (drain)"),
        ]
        for op, fields, _ in changes:
            ok(conn.request(op, **fields))
    assert sup.wait_exit(20) == 0
    audit = [line for line in sup.log_text().splitlines() if "hostqueue.audit" in line]
    assert len(audit) == len(changes), "\n".join(audit)
    for (op, _, what), line in zip(changes, audit):
        assert line.endswith(f"{what} {me}"), (op, line, me)


@pytest.mark.timeout(60)
def test_task_names_reach_only_registered_tasks(hq: HQEnv) -> None:
    marker = hq.path("imported")
    (hq.dir / "evil.py").write_text(
        "import hostqueue\n"
        f"open({marker!r}, 'a').write(__name__ + '\\n')\n"
        "@hostqueue.task\ndef boom(ctx):\n    return 'boom'\n")
    os.makedirs(hq.dir / "evilpkg", exist_ok=True)
    (hq.dir / "evilpkg" / "__init__.py").write_text(f"open({marker!r}, 'a').write(__name__ + '\\n')\n")
    sup = hq.supervisor(workers=1)
    names = ["os.system", "builtins.eval", "hostqueue.worker.main", "hostqueue.demo_tasks.sleep",
             "../../etc/passwd", "/etc/passwd", "evil.boom", "evil", str(hq.dir / "evil.py"),
             f"{hq.dir}/evil.boom", "evilpkg.boom", "evilpkg", f"{TASKS}._append", f"{TASKS}.os.system",
             f"{TASKS}.hostqueue.task", f"{TASKS}.noop.__globals__", f"{TASKS}", "HQTASKS.NOOP",
             f"{TASKS}.noop ", f"{TASKS}.noop\u0000", f"{TASKS}..noop", "__import__", "eval"]
    with sup.conn() as conn:
        for name in names:
            for op, args in (("submit", {}), ("submit_many", [{}])):
                reply = conn.request(op, task=name, args=args)
                assert error_code(reply) == "unknown_task", (op, name, reply)
    # The same task module's registered task is known (the names above were refused for what
    # they are, not because nothing works).
    assert sup.wait_job(sup.submit("noop")["id"])["status"] == "completed"
    assert not os.path.exists(marker), f"a module was imported: {Path(marker).read_text()!r}"
    assert sup.db_query("SELECT COUNT(*) FROM jobs")[0][0] == 1
    assert_healthy(sup)
    assert not os.path.exists(marker)
