"""hostqueue benchmark: no-op jobs on a real supervisor, optionally side by side with peers,
or with another checkout of hostqueue (A/B).

    python bench/bench.py                 # hostqueue alone, 3 runs (about 2-3 minutes)
    python bench/bench.py --peers         # and Huey, Celery, RQ, Dramatiq (about 12 minutes)
    python bench/bench.py --quick         # a few seconds: checks that everything works
    python bench/bench.py --against /work/main --depth 0
                                          # this checkout against another, round by round

Every run starts a fresh supervisor (`python -m hostqueue run`) on a temporary
store with the default durable settings (WAL, synchronous=NORMAL: a submit is
acknowledged once committed), 2 workers and a task that returns True, and takes:

- enqueue, one by one (each submit waits for its ack) and in bulk (20,000 jobs by
  submit_many of 1,000 jobs, 32 requests in flight; hostqueue's figure is the median
  of 5 such bursts, each taking 60-70 ms), into a paused queue so that nothing runs;
- end to end: from the first submit to the last completion of 20,000 jobs, with
  bulk submits and with one client pipelining single submits;
- submit-to-result latency p50/p99 over 300 sequential jobs, workers idle and warm:
  `submit` then `wait` (two requests), and `submit` with `wait` (one request);
- throughput (end to end, bulk) with 1, 2, 4 and 8 workers, and the time to scale
  from 1 to 16 workers (`scale`, until `status` shows 16 idle workers);
- supervisor and worker RSS; CPU and wake-ups of all its processes while idle for 10 s;
- fast jobs beside one slow job (hostqueue only; peers print n/a), on another fresh
  supervisor with 2 workers: 2,000 jobs of a task `work(i, slow=0.0)` (it sleeps
  `slow` seconds) run to completion, so that the supervisor knows it as fast; then
  one submit_many of 200 jobs, the one with i == 5 sleeping 2 s. The figure is the
  longest finished_at - created_at of the 199 fast ones (ms; target < 100): with a
  worker free, none should wait behind the slow job (a fair queue ends each within a
  few tens of ms, an unfair one holds some for the whole 2 s). Also their median, and
  how many fast jobs ended over 1 s after the slow one started;
- then, once, the same with 1,000,000 pending jobs in a paused queue behind the
  measured ones: filled over the socket (submit_many), measured, then again after
  a restart (the supervisor loads them from the store); last, the paused queue is
  resumed and the supervisor's RSS sampled for 5 s while they run.

The benchmark talks to hostqueue through its CLI and socket protocol only (its own
client, hqsocket.py; it imports nothing of hostqueue), so it measures any checkout:
--source PATH (default: this one) is the checkout whose hostqueue/ runs.

With --against PATH, a second checkout (e.g. today's main) is measured in the same
run with the same settings, each figure taken the same way for both (fresh supervisors,
the same temporary store setup): rounds alternate, source then against, then against
then source, and so on, so that neither is always first. One table gives both medians
and the change of --source against --against in %; then each round's values (all in
--json too). The depth run is taken for both unless --depth 0. Not with --peers.

With --peers, each round also runs every peer on the same task, job count (where the
peer can do it within the time budget; the count is printed), worker count and
machine; the peers are installed with pip into a virtualenv under /tmp and Redis is
a redis-server started here on a free port of 127.0.0.1. Ratios are taken pair by
pair: round i of hostqueue against round i of the peer.

Exit status: 0 when every hostqueue job did what it should, 1 on a functional error
(a job lost, failed, never answered; the supervisor logging an error or not stopping).
Times never fail the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import hq
from common import BenchError, Figure, fmt_number, fmt_values, machine_note, table

FIGURES = [
    Figure("enqueue_one", "enqueue, one by one (jobs/s)", "jobs/s", True),
    Figure("enqueue_bulk", "enqueue, bulk (jobs/s)", "jobs/s", True, ">= 100,000"),
    Figure("e2e_bulk", "end to end, bulk submits (jobs/s)", "jobs/s", True, ">= 15,000"),
    Figure("e2e_one", "end to end, one-by-one submits (jobs/s)", "jobs/s", True, ">= 5,000"),
    Figure("lat_p50", "submit-to-result p50, submit + wait (ms)", "ms", False, "< 0.5"),
    Figure("lat_p99", "submit-to-result p99, submit + wait (ms)", "ms", False, "< 2"),
    Figure("lat1_p50", "submit-to-result p50, one request (ms)", "ms", False, "< 0.5"),
    Figure("lat1_p99", "submit-to-result p99, one request (ms)", "ms", False, "< 2"),
    Figure("scale_1", "end to end, 1 worker (jobs/s)", "jobs/s", True),
    Figure("scale_2", "end to end, 2 workers (jobs/s)", "jobs/s", True),
    Figure("scale_4", "end to end, 4 workers (jobs/s)", "jobs/s", True),
    Figure("scale_8", "end to end, 8 workers (jobs/s)", "jobs/s", True),
    Figure("scale_up", "scale 1 -> 16 workers (s)", "s", False),
    Figure("rss_supervisor", "supervisor / broker RSS (MB)", "MB", False),
    Figure("rss_workers", "workers RSS, all (MB)", "MB", False),
    Figure("rss_total", "RSS of everything (MB)", "MB", False),
    Figure("idle_cpu", "CPU while idle, 10 s (s)", "s", False, "0"),
    Figure("idle_wakeups", "wake-ups while idle, 10 s", "", False),
    Figure("slow_wait", "fast jobs beside one slow job: longest wait (ms)", "ms", False, "< 100"),
    Figure("slow_wait_p50", "fast jobs beside one slow job: median wait (ms)", "ms", False),
    Figure("slow_late", "fast jobs ending > 1 s after the slow one started", "", False),
]
BY_KEY = {f.key: f for f in FIGURES}
DEPTH_FIGURES = ["enqueue_one", "enqueue_bulk", "e2e_bulk", "e2e_one", "lat_p50", "lat_p99",
                 "lat1_p50", "lat1_p99"]


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def prefixed(who: str) -> Callable[[str], None]:
    """log() with the name of what is measured in front."""
    return lambda text: log(f"  {who}: {text}")


def git_state(source: str) -> str:
    """The commit under test, and whether hostqueue/ differs from it (read-only git)."""
    try:
        head = subprocess.run(["git", "-C", source, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", source, "status", "--porcelain", "--", "hostqueue"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return f"from {source} (not a git checkout)"
    return head + (" with uncommitted changes in hostqueue/" if dirty else "")


def values(rounds: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rounds if isinstance(r.get(key), (int, float))]


def cell(rounds: list[dict[str, Any]], key: str) -> str:
    vals = values(rounds, key)
    text = fmt_values(vals)
    if any(r.get(f"{key}_capped") for r in rounds) or (
        key.startswith(("lat_", "deep_lat_", "restart_lat_")) and any(
            r.get(key.rsplit("_", 1)[0] + "_capped") for r in rounds)):
        text += " *"
    return text


def ratio_cell(hq_rounds: list[dict[str, Any]], peer_rounds: list[dict[str, Any]], key: str) -> str:
    """hostqueue's advantage, pair by pair: x > 1 means hostqueue is better."""
    ratios = []
    for a, b in zip(hq_rounds, peer_rounds):
        x, y = a.get(key), b.get(key)
        if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or x <= 0 or y <= 0:
            continue
        ratios.append(x / y if BY_KEY[key].higher_is_better else y / x)
    if not ratios:
        return "-"
    med = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{fmt_number(med)}x"
    return f"{fmt_number(med)}x [{fmt_number(min(ratios))}-{fmt_number(max(ratios))}]"


def baseline(hq_rounds: list[dict[str, Any]], depth: list[dict[str, Any]], prefix: str,
             key: str) -> list[float]:
    """What a figure at depth is compared with: the same figure taken alongside on an
    empty store (ref_*), where there is one; else the empty-store rounds."""
    return values(depth, f"ref_{prefix}_{key}") or values(hq_rounds, key)


def change(empty: list[float], deep: list[float], higher_is_better: bool) -> str:
    if not empty or not deep:
        return "-"
    a, b = statistics.median(empty), statistics.median(deep)
    if a == 0:
        return "-"
    pct = (b / a - 1) * 100
    worse = pct < 0 if higher_is_better else pct > 0
    return f"{pct:+.0f}% of {fmt_number(a)}" + (" worse" if worse and abs(pct) >= 20 else "")


# -- reports ------------------------------------------------------------------------


def report(opts: argparse.Namespace, hq_rounds: list[dict[str, Any]], depth: list[dict[str, Any]],
           peers: dict[str, list[dict[str, Any]]], context: dict[str, Any]) -> str:
    from peers import BY_NAME

    out: list[str] = []
    n = len(hq_rounds)
    out.append(f"hostqueue {context['hostqueue']} on {context['machine']}")
    bursts = f" (hostqueue: the median of {opts.bursts} per run)" if opts.bursts > 1 else ""
    out.append(f"{opts.workers} workers, a no-op task, {opts.jobs:,} jobs per end-to-end run"
               f" and bulk enqueue{bursts};"
               f" median of {n} run{'s' if n > 1 else ''} [min-max]; * = stopped at its time budget;"
               f" idle figures from the first run")
    out.append(f"load average before/after: {context['load_before']} / {context['load_after']}"
               " (the machine's other work competes for the same cores)")
    if opts.quick:
        out.append("QUICK MODE: small counts and one run; it checks that everything works,"
                   " its figures say little about speed")
    out.append("")

    names = list(peers)
    header = ["figure", "hostqueue"] + [BY_NAME[p].label for p in names]
    rows = []
    for f in FIGURES:
        if not values(hq_rounds, f.key) and not any(values(peers[p], f.key) for p in names):
            continue
        label = f.label.replace("10 s", f"{opts.idle:g} s")
        rows.append([label, cell(hq_rounds, f.key)] + [cell(peers[p], f.key) for p in names])
    if names:
        rows.append(["jobs per end-to-end run", f"{opts.jobs:,}"]
                    + [fmt_values(values(peers[p], "jobs")) for p in names])
    out.append(table(header, rows))
    out.append("")
    out.append(SLOW_NOTE)

    if names:
        out.append("")
        out.append("hostqueue's advantage, pair by pair (x > 1: hostqueue better; median [min-max])")
        out.append("")
        rows = []
        for f in FIGURES:
            if f.key in ("idle_cpu", "idle_wakeups"):
                continue
            cells = [ratio_cell(hq_rounds, peers[p], f.key) for p in names]
            if any(c != "-" for c in cells):
                rows.append([f.label] + cells)
        out.append(table(["figure"] + [BY_NAME[p].label for p in names], rows))

    if depth:
        out.append("")
        d0 = depth[0]
        out.append(f"hostqueue with {opts.depth:,} jobs pending in a paused queue (filled over the socket"
                   f" at {fmt_number(d0.get('deep_fill', 0))} jobs/s in {fmt_number(d0.get('deep_fill_seconds', 0))} s;"
                   f" restart with them: {fmt_number(d0.get('restart_start', 0))} s to serve)")
        out.append("change: against the same figure (its median after \"of\") on a second supervisor"
                   " with an empty store beside it, taken in turn with this one (latency: job by job,"
                   f" {opts.depth_latency:,} jobs each)")
        out.append("")
        rows = []
        for key in DEPTH_FIGURES:
            f = BY_KEY[key]
            empty = values(hq_rounds, key)
            deep = values(depth, f"deep_{key}")
            restart = values(depth, f"restart_{key}")
            rows.append([f.label, fmt_values(empty), cell(depth, f"deep_{key}"),
                         change(baseline(hq_rounds, depth, "deep", key), deep, f.higher_is_better),
                         cell(depth, f"restart_{key}") if restart else "-",
                         change(baseline(hq_rounds, depth, "restart", key), restart, f.higher_is_better)
                         if restart else "-"])
        live = values(depth, "deep_rss_supervisor") + values(depth, "deep_rss_after_fill")
        rows.append(["supervisor RSS, highest (MB)", fmt_number(max(values(hq_rounds, "rss_supervisor"))),
                     fmt_number(max(live)) if live else "-", "",
                     fmt_number(max(values(depth, "restart_rss_supervisor") or [0])), ""])
        rows.append(["CPU while idle (s)", fmt_values(values(hq_rounds, "idle_cpu")),
                     "", "", fmt_values(values(depth, "deep_idle_cpu")), ""])
        out.append(table(["figure", "empty store", "pending (live)", "change", "after restart", "change"], rows))
        if values(depth, "drain_rate"):
            out.append(f"after the restart, the {opts.depth:,} pending jobs resumed: they ran at"
                       f" {cell(depth, 'drain_rate')} jobs/s for {cell(depth, 'drain_seconds')} s,"
                       f" the supervisor's RSS at most {cell(depth, 'drain_rss_supervisor')} MB")
        peer_deep = {p: r for p, r in peers.items() if values(r, "deep_e2e_one")}
        for p, r in peer_deep.items():
            out.append("")
            out.append(f"{BY_NAME[p].label} with {opts.depth:,} jobs of another queue in its store:"
                       f" end to end (one by one) {cell(r, 'deep_e2e_one')} jobs/s"
                       f" (empty: {cell(r, 'e2e_one')}), latency p50 {cell(r, 'deep_lat_p50')} ms"
                       f" p99 {cell(r, 'deep_lat_p99')} ms (empty: {cell(r, 'lat_p50')} / {cell(r, 'lat_p99')}),"
                       f" enqueue one by one {cell(r, 'deep_enqueue_one')} jobs/s")

    out.append("")
    out.append("targets (hostqueue)")
    out.append("")
    out.append(table(["target", "measured", "met"], targets(hq_rounds, depth)))

    if names:
        out.append("")
        out.append("peers: " + ", ".join(f"{k} {v}" for k, v in context.get("versions", {}).items())
                   + f"; redis-server {context.get('redis', 'n/a')}")
        for p in names:
            peer = BY_NAME[p]
            bulk = {"huey-sqlite": "none (jobs submitted one by one)", "huey-redis": "none (jobs submitted one by one)",
                    "celery": "group(...).apply_async()", "rq": "Queue.enqueue_many()",
                    "dramatiq": "group(...).run()"}[p]
            counts = fmt_values(values(peers[p], "enqueue_bulk_n"))
            scale = fmt_values(values(peers[p], "scale_jobs"))
            lat = fmt_values(values(peers[p], "lat_n"))
            out.append(f"- {peer.label}: {peer.setup}; bulk API: {bulk}"
                       + (f"; bulk enqueue of {counts} jobs" if "none" not in bulk else "")
                       + f"; {scale} jobs per pool-size run; {lat} latency samples")
            errors = [r["error"] for r in peers[p] if not r.get("ok", True)]
            if errors:
                out.append(f"  failed: {errors[0]}")
        out.append("- hostqueue's one-by-one end to end pipelines single submits on one connection;"
                   " its one-by-one enqueue waits for each ack, as the peers' calls do.")
        out.append("- the peers' pool sizes come from their first round only.")
    return "\n".join(out)


SLOW_NOTE = (f"fast jobs beside one slow job (hostqueue only): a fresh supervisor with {hq.SLOW_WORKERS} workers"
             f" runs {hq.SLOW_TEACH:,} fast jobs, then one submit_many of {hq.SLOW_JOBS} of which one sleeps"
             f" {hq.SLOW_SECONDS:g} s; wait = a fast job's finished_at - created_at (longest, median);"
             " with a worker free, none should wait behind the slow one")


def ab_change(a: list[float], b: list[float], higher_is_better: bool) -> str:
    """--source against --against: median over median, in %."""
    if not a or not b:
        return "-"
    ma, mb = statistics.median(a), statistics.median(b)
    if mb == 0:
        return "-" if ma == 0 else "new"
    pct = (ma / mb - 1) * 100
    if round(pct) == 0:
        return "0%"
    better = pct > 0 if higher_is_better else pct < 0
    return f"{pct:+.0f}% ({'better' if better else 'worse'})"


def report_ab(opts: argparse.Namespace, rounds: dict[str, list[dict[str, Any]]],
              depths: dict[str, list[dict[str, Any]]], context: dict[str, Any]) -> str:
    """--source and --against side by side: medians, the change, each round's values."""
    a, b = rounds["source"], rounds["against"]
    n = max(len(a), len(b))
    out = [f"source:  {context['source']} ({context['hostqueue']})",
           f"against: {context['against']} ({context['against_state']})",
           f"on {context['machine']}",
           f"{opts.workers} workers, a no-op task, {opts.jobs:,} jobs per end-to-end run and bulk enqueue;"
           f" {n} round{'s' if n > 1 else ''} of each, taken in turn (source, against, then against,"
           " source, ...), every one on fresh supervisors and temporary stores;"
           " median [min-max]; * = stopped at its time budget; idle figures from the first round",
           "change: the median of source against the median of against",
           f"load average before/after: {context['load_before']} / {context['load_after']}"
           " (the machine's other work competes for the same cores)"]
    if opts.quick:
        out.append("QUICK MODE: small counts and one round each; it checks that everything works,"
                   " its figures say little about speed")
    out.append("")
    rows = []
    for f in FIGURES:
        if not values(a, f.key) and not values(b, f.key):
            continue
        rows.append([f.label.replace("10 s", f"{opts.idle:g} s"), cell(a, f.key), cell(b, f.key),
                     ab_change(values(a, f.key), values(b, f.key), f.higher_is_better), f.target or ""])
    out.append(table(["figure", "source", "against", "change", "target"], rows))
    out.append("")
    out.append(SLOW_NOTE)

    out.append("")
    out.append("each round's values, in the order taken")
    out.append("")
    taken = sorted([(r.get("round", 0), r.get("order", 0), name, r)
                    for name, rs in rounds.items() for r in rs], key=lambda t: t[:2])
    header = ["figure"] + [f"{i} {name}" for i, _, name, _ in taken]
    rows = []
    for f in FIGURES:
        cells = [fmt_number(r[f.key]) if isinstance(r.get(f.key), (int, float)) else "-"
                 for *_, r in taken]
        if any(c != "-" for c in cells):
            rows.append([f.label.replace("10 s", f"{opts.idle:g} s")] + cells)
    out.append(table(header, rows))

    da, db = depths.get("source") or [], depths.get("against") or []
    if da or db:
        out.append("")
        out.append(f"with {opts.depth:,} jobs pending in a paused queue (one depth run of each, source first;"
                   " latency job by job beside an empty-store supervisor, as without --against)")
        out.append("")
        rows = []
        for key, label, hib in (("deep_fill", "filling them over the socket (jobs/s)", True),
                                ("deep_rss_after_fill", "supervisor RSS after filling (MB)", False),
                                ("restart_start", "restart with them, until served (s)", False)):
            if values(da, key) or values(db, key):
                rows.append([label, cell(da, key), cell(db, key), ab_change(values(da, key), values(db, key), hib)])
        for prefix, where in (("deep", "pending (live)"), ("restart", "after restart")):
            for key in DEPTH_FIGURES + ["rss_supervisor"]:
                k = f"{prefix}_{key}"
                if not values(da, k) and not values(db, k):
                    continue
                f = BY_KEY[key]
                rows.append([f"{where}: {f.label}", cell(da, k), cell(db, k),
                             ab_change(values(da, k), values(db, k), f.higher_is_better)])
        for key, label, hib in (("drain_rate", "draining them after restart (jobs/s)", True),
                                ("drain_rss_supervisor", "supervisor RSS while draining (MB)", False)):
            if values(da, key) or values(db, key):
                rows.append([label, cell(da, key), cell(db, key), ab_change(values(da, key), values(db, key), hib)])
        out.append(table(["figure", "source", "against", "change"], rows))

    out.append("")
    out.append("targets")
    out.append("")
    ta = {r[0]: r[1:] for r in targets(a, da)}
    tb = {r[0]: r[1:] for r in targets(b, db)}
    labels = list(ta) + [k for k in tb if k not in ta]
    out.append(table(["target", "source", "met", "against", "met"],
                     [[k] + ta.get(k, ["-", "-"]) + tb.get(k, ["-", "-"]) for k in labels]))
    return "\n".join(out)


def targets(hq_rounds: list[dict[str, Any]], depth: list[dict[str, Any]]) -> list[list[str]]:
    rows: list[list[str]] = []

    def med(rounds: list[dict[str, Any]], key: str) -> float | None:
        v = values(rounds, key)
        return statistics.median(v) if v else None

    def add(label: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        text = "not measured" if value is None else f"{fmt_number(value)}{unit}"
        rows.append([label, text, "-" if ok is None else ("yes" if ok else "NO")])

    e2e_bulk, e2e_one = med(hq_rounds, "e2e_bulk"), med(hq_rounds, "e2e_one")
    p50, p99, enq = med(hq_rounds, "lat_p50"), med(hq_rounds, "lat_p99"), med(hq_rounds, "enqueue_bulk")
    add("end to end, bulk >= 15,000 jobs/s", e2e_bulk, None if e2e_bulk is None else e2e_bulk >= 15_000)
    add("end to end, one by one (pipelined) >= 5,000 jobs/s", e2e_one, None if e2e_one is None else e2e_one >= 5_000)
    add("latency p50 < 0.5 ms (submit, then wait)", p50, None if p50 is None else p50 < 0.5, " ms")
    add("latency p99 < 2 ms (submit, then wait)", p99, None if p99 is None else p99 < 2, " ms")
    p50, p99 = med(hq_rounds, "lat1_p50"), med(hq_rounds, "lat1_p99")
    add("latency p50 < 0.5 ms (submit with wait)", p50, None if p50 is None else p50 < 0.5, " ms")
    add("latency p99 < 2 ms (submit with wait)", p99, None if p99 is None else p99 < 2, " ms")
    add("bulk enqueue >= 100,000 jobs/s", enq, None if enq is None else enq >= 100_000)
    slow = med(hq_rounds, "slow_wait")
    add("fast jobs beside one slow job: longest wait < 100 ms", slow, None if slow is None else slow < 100, " ms")
    if depth:
        d = f"{depth[0].get('depth', 0):,.0f}"
        for prefix, where in (("deep", f"{d} pending (live)"), ("restart", f"{d} pending (after restart)")):
            for key in DEPTH_FIGURES:
                deep = med(depth, f"{prefix}_{key}")
                base = baseline(hq_rounds, depth, prefix, key)
                empty = statistics.median(base) if base else None
                if empty is None or deep is None:
                    continue
                f = BY_KEY[key]
                within = deep >= empty * 0.8 if f.higher_is_better else deep <= empty * 1.2
                unit = " ms" if f.unit == "ms" else ""
                rows.append([f"{where}: {f.label} within 20%",
                             f"{fmt_number(deep)}{unit} ({(deep / empty - 1) * 100:+.0f}%)",
                             "yes" if within else "NO"])
        rss = values(depth, "deep_rss_supervisor") + values(depth, "deep_rss_after_fill")
        add(f"supervisor RSS < 80 MB with {d} pending (live)", max(rss) if rss else None,
            None if not rss else max(rss) < 80, " MB")
        rss = values(depth, "restart_rss_supervisor")
        add(f"supervisor RSS < 80 MB with {d} pending (after restart)", max(rss) if rss else None,
            None if not rss else max(rss) < 80, " MB")
        rss = values(depth, "drain_rss_supervisor")
        add(f"supervisor RSS < 80 MB with {d} pending (draining them after restart)", max(rss) if rss else None,
            None if not rss else max(rss) < 80, " MB")
    idle = values(hq_rounds, "idle_cpu") + values(depth, "deep_idle_cpu")
    wake = values(hq_rounds, "idle_wakeups") + values(depth, "deep_idle_wakeups")
    rows.append(["zero CPU while idle", "not measured" if not idle else
                 f"{max(idle):.2f} s CPU, {max(wake):.0f} wake-ups at most",
                 "-" if not idle else ("yes" if max(idle) == 0 and max(wake) == 0 else "NO")])
    return rows


# -- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark hostqueue (and, with --peers, Huey, Celery, RQ and Dramatiq; with --against,"
                    " another checkout of hostqueue).",
        epilog=__doc__.split("\n\n")[1] + "\n\nWhat is measured, and how: the docstring of bench/bench.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds, small counts, hostqueue only: checks that it works, not how fast")
    parser.add_argument("--peers", nargs="?", const="all", metavar="LIST",
                        help="also run peers: all (default) or a comma-separated list of"
                             " huey-sqlite,huey-redis,celery,rq,dramatiq")
    parser.add_argument("--runs", type=int, default=3,
                        help="rounds (of each checkout with --against); figures are medians (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--jobs", type=int, help="jobs per end-to-end run (default 20,000)")
    parser.add_argument("--depth", type=int, help="pending jobs behind the measured ones (default 1,000,000; 0: skip)")
    parser.add_argument("--idle", type=float, help="seconds of the idle measurement (default 10)")
    parser.add_argument("--source", default=ROOT, metavar="PATH",
                        help="the checkout whose hostqueue/ is measured (default: this one); it runs as"
                             " `python -m hostqueue run` with PATH first on PYTHONPATH")
    parser.add_argument("--against", metavar="PATH",
                        help="A/B: also measure the checkout at PATH (e.g. today's main) in the same run, with"
                             " the same settings, a round of each in turn (source, against, then against,"
                             " source, ...); one table of both (medians), the change of --source against it"
                             " in %%, and each round's values; not with --peers. With --depth other than 0,"
                             " the depth run is taken for both (--depth 0 skips it)")
    parser.add_argument("--store", metavar="URL",
                        help="run hostqueue on this PostgreSQL server (postgresql://USER@HOST/DB), a fresh"
                             " schema per supervisor, dropped after it, instead of a SQLite file")
    parser.add_argument("--json", metavar="FILE", help="write every run's raw figures to FILE")
    parser.add_argument("--no-install-redis", action="store_true",
                        help="with --peers, skip the Redis peers instead of apt-get installing redis-server")
    opts = parser.parse_args(argv)

    if opts.store:
        if not opts.store.startswith(("postgresql://", "postgres://")):
            parser.error("--store takes a PostgreSQL URL (postgresql://USER@HOST/DB); SQLite is the default")
        hq.PG_URL = opts.store
    sizes = hq.QUICK if opts.quick else hq.Sizes()
    if opts.jobs:
        sizes.jobs = opts.jobs
    if opts.depth is not None:
        sizes.depth = opts.depth
    if opts.idle is not None:
        sizes.idle = opts.idle
    if opts.quick:
        opts.runs = 1
        if opts.peers:
            parser.error("--quick runs hostqueue only; leave out --peers")
    if opts.against and opts.peers:
        parser.error("--against compares two checkouts of hostqueue; leave out --peers")
    opts.jobs, opts.depth, opts.idle, opts.bursts = sizes.jobs, sizes.depth, sizes.idle, sizes.bursts
    opts.depth_latency = sizes.depth_latency
    source = os.path.abspath(opts.source)
    against = os.path.abspath(opts.against) if opts.against else None
    for path in (source, against):
        if path is not None and not os.path.isfile(os.path.join(path, "hostqueue", "__main__.py")):
            parser.error(f"{path} holds no hostqueue package (hostqueue/__main__.py)")
    if against == source:
        parser.error("--against names the same checkout as --source")

    context: dict[str, Any] = {
        "source": source,
        "hostqueue": git_state(source),
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
        "load_before": "{load1:.2f}".format(**machine_note()),
        "store": f"PostgreSQL {opts.store}" if opts.store else "SQLite (a file in /tmp)",
    }
    peer_names: list[str] = []
    python = None
    redis = None
    if opts.peers:
        from peers import BY_NAME, PEERS
        from peers import env as peer_env

        peer_names = [p.name for p in PEERS] if opts.peers == "all" else opts.peers.split(",")
        unknown = [p for p in peer_names if p not in BY_NAME]
        if unknown:
            parser.error(f"unknown peers {unknown}; choose from {[p.name for p in PEERS]}")
        python = peer_env.ensure_venv(log=log)
        context["versions"] = peer_env.peer_versions(python)
        if any(BY_NAME[p].redis for p in peer_names):
            binary = peer_env.find_redis(not opts.no_install_redis, log=log)
            if binary is None:
                peer_names = [p for p in peer_names if not BY_NAME[p].redis]
            else:
                redis = peer_env.RedisServer(binary)
                redis.start()
                context["redis"] = redis.version()
                log(f"redis-server {context['redis']} on {redis.url}")

    if against:
        context["against"] = against
        context["against_state"] = git_state(against)
    checkouts = [("source", source)] + ([("against", against)] if against else [])
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in checkouts}
    depths: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in checkouts}
    hq_rounds, depth = rounds["source"], depths["source"]
    peer_rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in peer_names}
    failed: str | None = None
    started = time.monotonic()
    try:
        for i in range(opts.runs):
            # With --against, a round of each checkout in turn, the pair's order
            # rotated each round: neither is always first (or always second).
            for order, (name, path) in enumerate(checkouts if i % 2 == 0 else checkouts[::-1]):
                who = f"hostqueue ({name}: {path})" if against else "hostqueue"
                log(f"round {i + 1}/{opts.runs}: {who}")
                result = hq.measure_round(path, opts.workers, sizes, sizes.idle if i == 0 else 0,
                                          log=prefixed(who))
                if against:
                    result.update(round=i + 1, order=order)
                rounds[name].append(result)
            for p in peer_names:
                log(f"round {i + 1}/{opts.runs}: {p}")
                spec = {
                    "jobs": sizes.jobs, "workers": opts.workers, "one_by_one": min(sizes.one_by_one, 2000),
                    "latency": sizes.latency, "latency_budget": 10.0, "e2e_budget": 10.0,
                    "scale_budget": 6.0,
                    "idle": sizes.idle if i == 0 else 0,
                    "scaling": list(sizes.scaling) if i == 0 else [], "scale_to": sizes.scale_to,
                    "depth": sizes.depth if i == 0 else 0,
                }
                assert python is not None
                result = peer_env.run_peer(python, p, spec, redis if BY_NAME[p].redis else None, timeout=600)
                if not result.get("ok"):
                    log(f"  {p} failed: {result.get('error')}")
                peer_rounds[p].append(result)
        if sizes.depth:
            for name, path in checkouts:
                who = f"hostqueue ({name}: {path})" if against else "hostqueue"
                log(f"{who} with {sizes.depth:,} pending jobs")
                depths[name][:] = hq.measure_depth(path, opts.workers, sizes, opts.runs, log=prefixed(who))
    except BenchError as exc:
        failed = str(exc)
    finally:
        if redis is not None:
            redis.stop()
    context["load_after"] = "{load1:.2f}".format(**machine_note())
    context["seconds"] = time.monotonic() - started

    if against and (hq_rounds or rounds["against"]):
        print(report_ab(opts, rounds, depths, context))
        print(f"\n(took {context['seconds']:.0f} s)")
    elif hq_rounds:
        print(report(opts, hq_rounds, depth, peer_rounds, context))
        print(f"\n(took {context['seconds']:.0f} s)")
    if opts.json:
        raw: dict[str, Any] = {"context": context, "hostqueue": hq_rounds, "depth": depth, "peers": peer_rounds,
                               "options": vars(opts), "error": failed}
        if against:
            raw["against"] = {"path": against, "hostqueue": rounds["against"], "depth": depths["against"]}
        with open(opts.json, "w") as f:
            json.dump(raw, f, indent=1)
    if failed:
        print(f"\nFUNCTIONAL ERROR: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
