"""Does a restart with 1,000,000 jobs pending slow hostqueue down? Live against
restarted, on the same store, back to back.

    python bench/restart_check.py [--depth 1000000] [--runs 3]

Fills a paused queue with --depth jobs over the socket, measures end to end (bulk,
20,000 jobs) and latency (300 jobs) --runs times each, stops the supervisor, starts
it again on the same store (it loads the pending set) and measures the same again.
bench.py compares the restarted figures with those of an empty store measured
minutes earlier in another process; this compares like with like.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import hq  # noqa: E402


def measure(sup: hq.Supervisor, runs: int, tag: str) -> tuple[list[float], list[float]]:
    e2e = [hq.end_to_end_bulk(sup, 20_000, queue=f"{tag}{i}")["e2e_bulk"] for i in range(runs)]
    p50 = [hq.latency(sup, 300, queue=f"{tag}l{i}")["lat_p50"] for i in range(runs)]
    return e2e, p50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    opts = parser.parse_args()
    sup = hq.Supervisor(os.path.dirname(HERE), opts.workers)
    try:
        sup.start()
        sup.wait_pool(opts.workers)
        hq.fill_deep(sup, opts.depth)
        live = measure(sup, opts.runs, "live")
        sup.stop()
        sup.start()
        sup.wait_pool(opts.workers)
        after = measure(sup, opts.runs, "after")
        sup.stop()
    finally:
        sup.close()
    print(f"{opts.depth:,} pending; medians of {opts.runs} [all runs]")
    for label, (e2e, p50) in (("live", live), ("after restart", after)):
        print(f"{label:14s} end to end {statistics.median(e2e):8,.0f} jobs/s {[round(x) for x in e2e]}"
              f"   latency p50 {statistics.median(p50):.3f} ms {[round(x, 3) for x in p50]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
