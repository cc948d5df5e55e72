"""Fast unit tests of pure logic: limits and queue order (shaping), cron schedules,
the ready index and timed heaps, and the configuration file. No processes; every
time is an injected ``now``."""

from __future__ import annotations

import math
import os
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from array import array

from hostqueue.core import settings
from hostqueue.supervisor.readyindex import ReadyIndex, TimedHeap, pack, unpack_id
from hostqueue.supervisor.schedules import ScheduleError, ScheduleSpec, ScheduleState, parse, plan_start
from hostqueue.core.settings import SettingsError, from_environment, read_config_file
from hostqueue.supervisor.shaping import Limiter, LimitSpec, Shaper, ShapingConfig, ShapingError

pytestmark = pytest.mark.timeout(20)


# ---------------------------------------------------------------------------
# LimitSpec.parse


@pytest.mark.parametrize(
    "rate, expected",
    [
        ("10/60", (10, 60.0)),
        ("100/1m", (100, 60.0)),
        ("5/1h", (5, 3600.0)),
        ("3/2.5", (3, 2.5)),
        (" 3 / 2.5 s ", (3, 2.5)),
        ("1/0.5m", (1, 30.0)),
    ],
)
def test_limitspec_parses_rates(rate: str, expected: tuple[int, float]) -> None:
    spec = LimitSpec.parse({"rate": rate}, "queues.q")
    assert spec.rate == expected
    assert spec.concurrency is None and spec.min_interval is None
    assert not spec.empty


def test_limitspec_parses_all_keys_and_describes_them() -> None:
    spec = LimitSpec.parse({"concurrency": 2, "min_interval": 1, "rate": "10/1m"}, "queues.q")
    assert spec.concurrency == 2
    assert spec.min_interval == 1.0 and isinstance(spec.min_interval, float)
    assert spec.rate == (10, 60.0)
    assert spec.describe() == {"concurrency": 2, "min_interval": 1.0, "rate": "10/60"}
    assert LimitSpec.parse({}, "queues.q").empty
    assert LimitSpec().describe() == {}


@pytest.mark.parametrize(
    "table, key",
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -1}, "concurrency"),
        ({"concurrency": 1.5}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"concurrency": "2"}, "concurrency"),
        ({"min_interval": 0}, "min_interval"),
        ({"min_interval": -0.5}, "min_interval"),
        ({"min_interval": False}, "min_interval"),
        ({"min_interval": "1s"}, "min_interval"),
        ({"rate": "fast"}, "rate"),
        ({"rate": "0/10"}, "rate"),
        ({"rate": "5/0"}, "rate"),
        ({"rate": "5/10d"}, "rate"),
        ({"rate": 5}, "rate"),
        ({"rate": "-1/10"}, "rate"),
    ],
)
def test_limitspec_refuses_bad_values_naming_the_key(table: dict, key: str) -> None:
    with pytest.raises(ShapingError) as info:
        LimitSpec.parse(table, 'limits."app.send"')
    assert str(info.value).startswith(f'limits."app.send".{key} ')


# ---------------------------------------------------------------------------
# Limiter


def test_limiter_concurrency_holds_until_a_job_ends() -> None:
    lim = Limiter(LimitSpec(concurrency=2), "queue q")
    assert lim.free_at(100.0) == 100.0
    lim.started(100.0)
    assert lim.free_at(100.0) == 100.0
    lim.started(100.0)
    assert lim.free_at(100.0) == math.inf
    assert lim.free_at(1e9) == math.inf, "time alone must not free a concurrency slot"
    assert lim.why(100.0) == "queue q: concurrency limit 2 reached"
    lim.finished()
    assert lim.free_at(100.5) == 100.5
    assert lim.why(100.5) is None
    lim.finished()
    lim.finished()  # one too many: never below zero
    assert lim.running == 0


def test_limiter_min_interval() -> None:
    lim = Limiter(LimitSpec(min_interval=2.0), "queue q")
    assert lim.free_at(10.0) == 10.0, "the first start is free"
    lim.started(10.0)
    lim.finished()  # ending does not shorten the interval
    assert lim.free_at(10.0) == 12.0
    assert lim.free_at(11.5) == 12.0
    assert lim.free_at(12.0) == 12.0
    assert lim.free_at(13.0) == 13.0
    why = lim.why(11.0)
    assert why is not None and "2 s between starts" in why and "next start in 1.00 s" in why
    assert lim.why(12.0) is None


def test_limiter_rate_is_a_sliding_window() -> None:
    lim = Limiter(LimitSpec(rate=(3, 10.0)), "task t")
    for t in (0.0, 1.0, 2.0):
        assert lim.free_at(t) == t
        lim.started(t)
    # Three starts in the window: the fourth waits until the first leaves it.
    assert lim.free_at(2.0) == 10.0
    why = lim.why(5.0)
    assert why is not None and why.startswith("task t: rate 3/10 s") and "next start in 5.00 s" in why
    assert lim.free_at(9.999) == 10.0
    assert lim.free_at(10.0) == 10.0
    lim.started(10.0)
    # Window (1, 11]: starts at 1, 2, 10 -> the next one when 1 leaves, at 11.
    assert lim.free_at(10.0) == 11.0
    lim.started(11.0)
    assert lim.free_at(11.0) == 12.0
    lim.started(12.0)
    # Starts 10, 11, 12: free at 20.
    assert lim.free_at(12.0) == 20.0
    # Never more than 3 starts in any 10 s window, checked over everything allowed.
    starts = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    for i in range(len(starts) - 3):
        assert starts[i + 3] - starts[i] >= 10.0


def test_limiter_rate_after_a_long_pause_allows_a_full_burst() -> None:
    lim = Limiter(LimitSpec(rate=(2, 1.0)), "queue q")
    lim.started(0.0)
    lim.started(0.0)
    assert lim.free_at(0.5) == 1.0
    assert lim.free_at(100.0) == 100.0
    lim.started(100.0)
    assert lim.free_at(100.0) == 100.0
    lim.started(100.0)
    assert lim.free_at(100.0) == 101.0
    assert len(lim.starts) == 2, "old starts must be trimmed from the window"


def test_limiter_combines_concurrency_interval_and_rate() -> None:
    lim = Limiter(LimitSpec(concurrency=1, min_interval=1.0, rate=(2, 10.0)), "queue q")
    lim.started(0.0)
    assert lim.free_at(0.5) == math.inf
    lim.finished()
    assert lim.free_at(0.5) == 1.0  # min_interval
    lim.started(1.0)
    lim.finished()
    assert lim.free_at(2.5) == 10.0  # rate: 2 starts in [0, 10)
    why = lim.why(2.5)
    assert why is not None and "rate 2/10 s" in why


# ---------------------------------------------------------------------------
# ShapingConfig.parse


def test_shapingconfig_parses_queues_and_limits_in_file_order() -> None:
    cfg = ShapingConfig.parse(
        {"order": "strict", "high": {"concurrency": 2, "weight": 3}, "low": {"rate": "1/1"}},
        {"app.send": {"min_interval": 0.5}},
    )
    assert cfg.order == "strict"
    assert [q.name for q in cfg.queues] == ["high", "low"]
    assert cfg.queues[0].weight == 3.0 and cfg.queues[0].limit.concurrency == 2
    assert cfg.queues[1].weight == 1.0 and cfg.queues[1].limit.rate == (1, 1.0)
    assert cfg.tasks["app.send"].min_interval == 0.5
    default = ShapingConfig.parse(None, None)
    assert default.order == "priority" and default.queues == () and default.tasks == {}


@pytest.mark.parametrize(
    "queues, limits, start",
    [
        ({"order": "fifo"}, None, "queues.order "),
        ({"q": 3}, None, "queues.q "),
        ({"q": {"burst": 3}}, None, "queues.q: unknown key(s) burst"),
        ({"q": {"weight": 0}}, None, "queues.q.weight "),
        ({"q": {"weight": True}}, None, "queues.q.weight "),
        ({"q": {"weight": "2"}}, None, "queues.q.weight "),
        ({"q": {"concurrency": 0}}, None, "queues.q.concurrency "),
        (None, {"app.x": {"weight": 2}}, 'limits."app.x": unknown key(s) weight'),
        (None, {"app.x": 1}, 'limits."app.x" '),
        (None, {"app.x": {"rate": "1/0"}}, 'limits."app.x".rate '),
    ],
)
def test_shapingconfig_refuses_bad_tables(queues: dict | None, limits: dict | None, start: str) -> None:
    with pytest.raises(ShapingError) as info:
        ShapingConfig.parse(queues, limits)
    assert str(info.value).startswith(start), str(info.value)


# ---------------------------------------------------------------------------
# Shaper


def shaper(queues: dict | None = None, limits: dict | None = None) -> Shaper:
    return Shaper(ShapingConfig.parse(queues, limits))


def test_shaper_applies_queue_and_task_limits_together() -> None:
    s = shaper({"q": {"min_interval": 1.0}}, {"slow": {"concurrency": 1}, "rated": {"rate": "1/5"}})
    a, b, c = ("q", "slow"), ("q", "fast"), ("other", "slow")
    assert s.free_at(a, 0.0) == 0.0
    s.started(a, 0.0)
    # The queue's interval holds every lane of q; the task's cap holds "slow" everywhere.
    assert s.free_at(b, 0.5) == 1.0
    assert s.free_at(a, 0.5) == math.inf
    assert s.free_at(c, 0.5) == math.inf
    assert s.free_at(("other", "fast"), 0.5) == 0.5, "unlimited lanes must be free"
    why = s.why_waiting(a, 0.5)
    assert why is not None and "queue q: 1 s between starts" in why and "task slow: concurrency limit 1 reached" in why
    assert s.why_waiting(("other", "fast"), 0.5) is None
    s.finished(a)
    assert s.free_at(c, 0.5) == 0.5
    assert s.free_at(a, 0.5) == 1.0
    # Task rate: one start per 5 s, in any queue.
    s.started(("other", "rated"), 2.0)
    assert s.free_at(("q", "rated"), 2.0) == 7.0
    d = s.describe()
    assert d["order"] == "priority"
    assert d["queues"]["q"] == {"weight": 1.0, "min_interval": 1.0, "running": 0}
    assert d["tasks"]["slow"] == {"concurrency": 1, "running": 0}
    assert d["tasks"]["rated"] == {"rate": "1/5", "running": 1}


def test_shaper_order_keys() -> None:
    hi, lo = pack(5, 10), pack(0, 1)
    assert hi < lo, "higher priority packs smaller"
    assert pack(0, 1) < pack(0, 2), "same priority: submit order"
    p = shaper({"a": {}, "b": {}})
    assert p.order_key(("b", "t"), hi) < p.order_key(("a", "t"), lo), "priority order ignores the queue"

    strict = shaper({"order": "strict", "a": {}, "b": {}})
    assert strict.order_key(("a", "t"), lo) < strict.order_key(("b", "t"), hi)
    assert strict.order_key(("a", "t"), hi) < strict.order_key(("a", "t"), lo)
    assert strict.order_key(("b", "t"), lo) < strict.order_key(("zzz", "t"), hi), \
        "queues not in the file come after the configured ones"

    w = shaper({"order": "weighted", "a": {"weight": 2}, "b": {"weight": 1}})
    starts = {"a": 0, "b": 0}
    for _ in range(30):
        lane = min((("a", "t"), ("b", "t")), key=lambda ln: w.order_key(ln, pack(0, 1)))
        w.started(lane, 0.0)
        starts[lane[0]] += 1
    assert starts == {"a": 20, "b": 10}


def test_shaper_apply_keeps_state_and_recount_sets_running() -> None:
    s = shaper({"q": {"concurrency": 3, "min_interval": 10.0}})
    for _ in range(3):
        s.started(("q", "t"), 0.0)
    s.apply(ShapingConfig.parse({"q": {"concurrency": 1, "min_interval": 10.0}, "new": {"concurrency": 1}}, None))
    assert s.queue_limits["q"].running == 3, "held jobs keep counting against the new limit"
    assert s.free_at(("q", "t"), 5.0) == math.inf
    s.recount([("q", "t"), ("q", "t"), ("new", "t")])
    assert s.queue_limits["q"].running == 2
    assert s.queue_limits["new"].running == 1
    for _ in range(2):
        s.finished(("q", "t"))
    assert s.free_at(("q", "t"), 5.0) == 10.0, "the last start is remembered across apply"
    # A queue dropped from the file is no longer limited.
    s.apply(ShapingConfig.parse(None, None))
    assert s.free_at(("q", "t"), 5.0) == 5.0
    assert s.describe() == {"order": "priority", "queues": {}, "tasks": {}}


# ---------------------------------------------------------------------------
# schedules


def ts(text: str, zone: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


def test_next_after_is_strictly_after() -> None:
    every2 = ScheduleSpec("s", "t", "*/2 * * * * *")
    base = ts("2025-03-01 10:00:00")
    assert every2.next_after(base) == base + 2
    assert every2.next_after(base + 0.5) == base + 2
    assert every2.next_after(base + 1.999) == base + 2
    assert every2.next_after(base + 2) == base + 4
    minute = ScheduleSpec("s", "t", "* * * * *")
    assert minute.next_after(base) == base + 60
    assert minute.next_after(base + 59.9) == base + 60
    daily = ScheduleSpec("s", "t", "0 3 * * *")
    assert daily.next_after(ts("2025-03-01 02:59:59")) == ts("2025-03-01 03:00:00")
    assert daily.next_after(ts("2025-03-01 03:00:00")) == ts("2025-03-02 03:00:00")


def test_next_after_follows_the_time_zone() -> None:
    berlin = ScheduleSpec("s", "t", "0 3 * * *", timezone="Europe/Berlin")
    # Winter (CET, UTC+1): 03:00 Berlin is 02:00 UTC; summer (CEST, UTC+2): 01:00 UTC.
    assert berlin.next_after(ts("2025-01-15 00:00:00")) == ts("2025-01-15 02:00:00")
    assert berlin.next_after(ts("2025-07-15 00:00:00")) == ts("2025-07-15 01:00:00")
    assert datetime.fromtimestamp(berlin.next_after(ts("2025-07-15 00:00:00")), ZoneInfo("Europe/Berlin")).hour == 3


def state(next_run: float, cron: str = "*/2 * * * * *", last_run: float | None = None,
          last_job: int | None = None, tz: str = "UTC") -> ScheduleState:
    return ScheduleState(next_run, last_run, last_job, cron, tz)


def test_plan_start_new_schedule_waits_for_its_first_due_time() -> None:
    spec = ScheduleSpec("s", "t", "*/2 * * * * *")
    now = ts("2025-03-01 10:00:01")
    st, run = plan_start(spec, None, now)
    assert run is False
    assert st.next_run == now + 1 and st.last_run is None and st.last_job is None
    assert (st.cron, st.timezone) == ("*/2 * * * * *", "UTC")


def test_plan_start_before_the_due_time_keeps_it() -> None:
    spec = ScheduleSpec("s", "t", "*/2 * * * * *", misfire="run_once")
    now = ts("2025-03-01 10:00:01")
    stored = state(now + 1, last_run=now - 1, last_job=7)
    st, run = plan_start(spec, stored, now)
    assert run is False and st == stored


@pytest.mark.parametrize("misfire, expect_run", [("run_once", True), ("skip", False)])
def test_plan_start_after_missed_runs(misfire: str, expect_run: bool) -> None:
    spec = ScheduleSpec("s", "t", "*/2 * * * * *", misfire=misfire)
    now = ts("2025-03-01 10:00:11")
    stored = state(now - 9, last_run=now - 11, last_job=3)  # five due times missed
    st, run = plan_start(spec, stored, now)
    assert run is expect_run, "one job for all the missed runs (run_once), none (skip)"
    assert st.next_run == now + 1, "the next due time is after now, never in the past"
    assert st.last_run == now - 11 and st.last_job == 3
    # Exactly at the due time counts as missed (not lost).
    st2, run2 = plan_start(spec, state(now), now)
    assert run2 is expect_run and st2.next_run > now


def test_plan_start_with_a_changed_cron_or_zone_starts_over() -> None:
    spec = ScheduleSpec("s", "t", "* * * * *", misfire="run_once")
    now = ts("2025-03-01 10:00:30")
    for stored in (state(now - 100, cron="*/2 * * * * *", last_run=1.0, last_job=4),
                   state(now - 100, cron="* * * * *", last_run=1.0, last_job=4, tz="Europe/Berlin")):
        st, run = plan_start(spec, stored, now)
        assert run is False
        assert st.next_run == ts("2025-03-01 10:01:00")
        assert (st.cron, st.timezone) == ("* * * * *", "UTC")
        assert st.last_run == 1.0 and st.last_job == 4


def test_schedules_parse_defaults_and_values() -> None:
    specs = parse({
        "nightly": {"task": "app.clean", "cron": "0 3 * * *"},
        "often": {"task": "app.ping", "cron": "*/5 * * * * *", "timezone": "Europe/Berlin",
                  "args": {"n": 1}, "queue": "q", "priority": 5, "misfire": "skip"},
    })
    assert [s.name for s in specs] == ["nightly", "often"]
    n, o = specs
    assert (n.timezone, n.args, n.queue, n.priority, n.misfire) == ("UTC", {}, None, None, "run_once")
    assert (o.timezone, o.args, o.queue, o.priority, o.misfire) == ("Europe/Berlin", {"n": 1}, "q", 5, "skip")
    assert parse(None) == []


@pytest.mark.parametrize(
    "entry, start",
    [
        ({"task": "a", "cron": "* * * * *", "when": 1}, "schedules.s: unknown key(s) when"),
        ({"cron": "* * * * *"}, "schedules.s.task "),
        ({"task": "a"}, "schedules.s.cron "),
        ({"task": "", "cron": "* * * * *"}, "schedules.s.task "),
        ({"task": "a", "cron": 5}, "schedules.s.cron "),
        ({"task": "a", "cron": "bad"}, "schedules.s.cron "),
        ({"task": "a", "cron": "61 * * * *"}, "schedules.s.cron "),
        ({"task": "a", "cron": "* * * * *", "timezone": "Mars/Olympus"}, "schedules.s.timezone "),
        ({"task": "a", "cron": "* * * * *", "misfire": "all"}, "schedules.s.misfire "),
        ({"task": "a", "cron": "* * * * *", "args": [1]}, "schedules.s.args "),
        ({"task": "a", "cron": "* * * * *", "priority": True}, "schedules.s.priority "),
        ({"task": "a", "cron": "* * * * *", "priority": 1.5}, "schedules.s.priority "),
    ],
)
def test_schedules_parse_refuses_bad_entries(entry: dict, start: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse({"s": entry})
    assert str(info.value).startswith(start), str(info.value)
    with pytest.raises(ScheduleError):
        parse({"s": "not a table"})


# ---------------------------------------------------------------------------
# ReadyIndex and TimedHeap


def drain(index: ReadyIndex, lane: tuple[str, str]) -> list[int]:
    out = []
    while index.top(lane) is not None:
        out.append(unpack_id(index.pop(lane)))
    return out


def test_readyindex_orders_by_priority_then_id() -> None:
    r = ReadyIndex()
    lane = ("q", "t")
    for prio, job in ((0, 1), (5, 2), (0, 3), (10, 4), (5, 5), (-3, 6)):
        r.push(lane, prio, job)
    assert len(r) == 6
    assert drain(r, lane) == [4, 2, 5, 1, 3, 6]
    assert len(r) == 0 and r.top(lane) is None


def test_readyindex_discard_push_back_and_bulk_load() -> None:
    r = ReadyIndex()
    a, b = ("a", "t"), ("b", "t")
    # per lane and priority, ids in increasing order (as the store's scan yields them)
    r.bulk_load({a: {0: array("q", [1, 3])}, b: {1: array("q", [2])}})
    assert len(r) == 3
    r.push(a, 0, 4)
    r.discard(1)
    assert len(r) == 3
    assert unpack_id(r.top(a)) == 3, "a discarded job is skipped at the top"
    packed = r.pop(a)
    r.push_back(a, packed)
    assert len(r) == 3
    assert drain(r, a) == [3, 4]
    assert drain(r, b) == [2]
    assert r.removed == {}


def test_readyindex_available_and_waiting_by_queue() -> None:
    r = ReadyIndex()
    r.push(("a", "t1"), 0, 1)
    r.push(("a", "t2"), 0, 2)
    r.push(("b", "t1"), 0, 3)
    assert r.available(set()) == 3
    assert r.available({"a"}) == 1
    assert r.available({"*"}) == 0
    assert r.waiting_by_queue() == {"a": 2, "b": 1}


def test_readyindex_counts_exclude_discarded_jobs() -> None:
    """A job aborted while pending is no longer waiting: per-queue counts agree with len()."""
    r = ReadyIndex()
    r.push(("a", "t"), 0, 1)
    r.push(("a", "t"), 0, 2)
    r.push(("b", "t"), 0, 3)
    r.discard(2, ("a", "t"))  # the supervisor names the lane whenever it knows it
    assert len(r) == 2
    assert r.available({"b"}) == 1, "available() with a pause counts a discarded job"
    assert r.waiting_by_queue() == {"a": 1, "b": 1}, "waiting_by_queue counts a discarded job"


def test_timedheap_basics() -> None:
    h = TimedHeap()
    assert h.next_due() is None and h.pop_due(1e12) == []
    h.push(30.0, 3)
    h.push(10.0, 1)
    h.push(20.0, 2)
    with pytest.raises(ValueError):
        h.push(5.0, 2)
    assert 2 in h and len(h) == 3
    assert h.next_due() == 10.0
    assert h.discard(1) is True
    assert h.discard(1) is False and h.discard(99) is False
    assert 1 not in h and len(h) == 2
    assert h.next_due() == 20.0
    assert h.pop_due(19.9) == []
    assert h.pop_due(25.0) == [2]
    assert h.pop_due(30.0) == [3]
    assert len(h) == 0 and h.next_due() is None
    h.bulk_load([(5.0, 7), (1.0, 8)])
    assert len(h) == 2 and 7 in h
    assert h.pop_due(10.0) == [8, 7]


def test_timedheap_repush_after_discard_uses_the_new_time_only() -> None:
    """A job taken off its timer and timed again (aborted while delayed, retried, then
    backing off) is due at its new time, once."""
    h = TimedHeap()
    h.push(10.0, 1)
    assert h.discard(1)
    h.push(20.0, 1)
    assert h.next_due() == 20.0
    assert h.pop_due(15.0) == [], "the discarded entry at 10.0 came back"
    assert h.pop_due(25.0) == [1]
    assert h.pop_due(1e12) == []
    assert len(h) == 0


# ---------------------------------------------------------------------------
# settings: the configuration file and the environment


FULL = """\
[store]
path = "/var/lib/hq/jobs.db"
durability = "full"

[socket]
path = "/run/hq.sock"
max_line = 4096

[workers]
count = 4
prefetch = 1
min = 1
max = 6
idle_timeout = 30
max_jobs = 100
max_memory = 512

[tasks]
modules = ["app.tasks", "app/other.py"]

[shutdown]
grace = 5

[retention]
completed = 3600
failed = 0

[logging]
level = "debug"

[queues]
order = "weighted"

[queues.mail]
concurrency = 2
rate = "10/1m"
weight = 3

[limits."app.tasks.send"]
min_interval = 0.5

[schedules.nightly]
task = "app.tasks.clean"
cron = "0 3 * * *"
args = { older_than = 3600 }
"""


def write(tmp_path: Path, text: str, name: str = "hq.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for s in settings.SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    monkeypatch.delenv("HOSTQUEUE_CONFIG", raising=False)
    return monkeypatch


def test_read_config_file_maps_every_section(tmp_path: Path) -> None:
    values = read_config_file(write(tmp_path, FULL))
    assert values == {
        "store": "/var/lib/hq/jobs.db", "durability": "full",
        "socket": "/run/hq.sock", "max_line": 4096,
        "workers": 4, "prefetch": 1, "workers_min": 1, "workers_max": 6, "idle_timeout": 30.0,
        "max_jobs_per_worker": 100, "max_memory_per_worker": 512,
        "tasks": ("app.tasks", "app/other.py"),
        "grace": 5.0,
        "retention_completed": 3600.0, "retention_failed": 0.0,
        "log_level": "debug",
        "queues": {"order": "weighted", "mail": {"concurrency": 2, "rate": "10/1m", "weight": 3}},
        "limits": {"app.tasks.send": {"min_interval": 0.5}},
        "schedules": {"nightly": {"task": "app.tasks.clean", "cron": "0 3 * * *", "args": {"older_than": 3600}}},
    }
    assert isinstance(values["grace"], float) and isinstance(values["idle_timeout"], float)


def test_every_setting_has_a_file_key() -> None:
    keys = [s.toml for s in settings.SETTINGS]
    assert all(keys) and len(set(keys)) == len(keys)
    sections = {k.split(".")[0] for k in keys}
    assert sections >= {"store", "socket", "workers", "tasks", "shutdown", "retention", "logging"}


def test_read_config_file_single_module_string(tmp_path: Path) -> None:
    assert read_config_file(write(tmp_path, '[tasks]\nmodules = "app.tasks"\n')) == {"tasks": ("app.tasks",)}


@pytest.mark.parametrize(
    "text, needles",
    [
        ('[workers]\ncount = "x"\n', ["'workers.count'", "line 2", "integer"]),
        ("[workers]\ncount = true\n", ["'workers.count'", "line 2"]),
        ("[workers]\ncount = 2\n\nbogus = 1\n", ["'workers.bogus'", "line 4", "not a known key"]),
        ("[nosuch]\nkey = 1\n", ["'nosuch.key'", "line 2"]),
        ("[shutdown]\ngrace = \"5s\"\n", ["'shutdown.grace'", "line 2", "number"]),
        ('[tasks]\nmodules = [1, 2]\n', ["'tasks.modules'", "line 2", "list of strings"]),
        ("[logging]\nlevel = 3\n", ["'logging.level'", "line 2"]),
        ('store = "x.db"\n', ["'store'", "line 1", "table"]),
    ],
)
def test_read_config_file_refuses_naming_key_and_line(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        read_config_file(path)
    message = str(info.value)
    assert message.startswith(path)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_read_config_file_missing_and_invalid(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        read_config_file(str(tmp_path / "nope.toml"))
    with pytest.raises(SettingsError, match="not valid TOML"):
        read_config_file(write(tmp_path, "[workers\ncount = 1\n"))


def test_from_environment_precedence(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[workers]\ncount = 3\nprefetch = 2\n[shutdown]\ngrace = 7\n')
    cfg = from_environment(path)
    assert (cfg.workers, cfg.prefetch, cfg.grace, cfg.config_path) == (3, 2, 7.0, path)
    assert cfg.durability == "normal", "defaults fill what the file leaves out"
    clean_env.setenv("HOSTQUEUE_WORKERS", "4")
    assert from_environment(path).workers == 4, "the environment beats the file"
    cfg = from_environment(path, workers=5, prefetch=None)
    assert (cfg.workers, cfg.prefetch) == (5, 2), "a flag beats the environment; None is not given"
    assert cfg.flags == {"workers": 5}


def test_from_environment_reads_hostqueue_config(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[workers]\ncount = 6\n[queues.default]\nconcurrency = 2\n')
    clean_env.setenv("HOSTQUEUE_CONFIG", path)
    cfg = from_environment()
    assert cfg.workers == 6 and cfg.config_path == path
    assert cfg.queues == {"default": {"concurrency": 2}}
    assert settings.reread(cfg).workers == 6
    other = write(tmp_path, '[workers]\ncount = 1\n', "other.toml")
    assert from_environment(other).workers == 1, "--config beats $HOSTQUEUE_CONFIG"


def test_from_environment_validates_autoscale_and_recycling(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    for text, needle in (
        ("[workers]\nmin = 1\n", "go together"),
        ("[workers]\nmin = 3\nmax = 2\n", "autoscale"),
        ("[workers]\nidle_timeout = 0\n", "idle_timeout"),
        ("[workers]\nmax_jobs = 0\n", "max_jobs"),
        ("[workers]\nmax_memory = 8\n", "max_memory"),
    ):
        with pytest.raises(SettingsError, match=needle):
            from_environment(write(tmp_path, text))
    cfg = from_environment(write(tmp_path, "[workers]\nmin = 1\nmax = 3\nidle_timeout = 1\nmax_jobs = 3\nmax_memory = 60\n"))
    assert (cfg.workers_min, cfg.workers_max, cfg.idle_timeout) == (1, 3, 1.0)
    assert (cfg.max_jobs_per_worker, cfg.max_memory_per_worker) == (3, 60)


@pytest.mark.parametrize(
    "text, key, line",
    [
        ("[workers]\ncount = 2\n\n[queues.default]\nconcurrency = 0\n", "queues.default.concurrency", 5),
        ('[queues]\norder = "fifo"\n', "queues.order", 2),
        ('[queues.fast]\nweight = 1\nrate = "often"\n', "queues.fast.rate", 3),
        ('[queues.mail]\nconcurrency = 1\nburst = 3\n', "burst", 3),
        ('[limits."app.send"]\nconcurrency = 1\nrate = "often"\n', 'limits."app.send".rate', 3),
        ('[schedules.nightly]\ntask = "a.b"\ncron = "nope"\n', "schedules.nightly.cron", 3),
        ('[schedules.nightly]\ntask = "a.b"\ncron = "* * * * *"\nwhen = 1\n', "when", 4),
    ],
)
def test_table_errors_name_key_and_line(tmp_path: Path, clean_env: pytest.MonkeyPatch,
                                        text: str, key: str, line: int) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SettingsError) as info:
        from_environment(path)
    message = str(info.value)
    assert key in message, message
    assert f"{path} line {line}:" in message, f"no line {line} in: {message}"


def test_readyindex_keeps_order_with_out_of_order_returns_and_compaction() -> None:
    """Ids mostly arrive in order (array) but retries come back older (side heap): the
    order is always priority first, then id; compaction of a long array keeps it."""
    r = ReadyIndex()
    lane = ("q", "t")
    for job_id in range(1, 10_001):
        r.push(lane, 0, job_id)
    taken = [unpack_id(r.pop(lane)) for _ in range(6000)]  # forces compaction
    assert taken == list(range(1, 6001))
    r.push(lane, 0, 17)  # a retry of an old job
    r.push(lane, 5, 9000)  # higher priority, already queued at 0 too: a different entry
    r.push(lane, 0, 20_000)
    assert unpack_id(r.pop(lane)) == 9000
    assert unpack_id(r.pop(lane)) == 17
    rest = drain(r, lane)
    assert rest == list(range(6001, 10_001)) + [20_000]
    assert len(r) == 0
