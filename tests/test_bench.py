"""The benchmark's quick mode as a test: it must run to the end on a real supervisor.

It fails only on a functional error (a job lost, failed or never answered, the
supervisor logging an error or not stopping: bench.py then exits 1), never on a
time. Its table is printed even when it passes, so CI's log shows the figures.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")


def test_quick_benchmark_runs(capsys: pytest.CaptureFixture[str], tmp_path: os.PathLike[str]) -> None:
    raw = os.path.join(tmp_path, "bench.json")
    try:
        done = subprocess.run(
            [sys.executable, BENCH, "--quick", "--json", raw],
            capture_output=True, text=True, timeout=100, cwd=ROOT, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the quick benchmark did not finish within 100 s (a hang, not slowness:"
                    f" it takes about 10 s):\n{exc.stdout}\n{exc.stderr}")
    with capsys.disabled():
        print("\n" + done.stdout)
    assert done.returncode == 0, f"the benchmark failed:\n{done.stdout}\n{done.stderr}"
    assert "end to end, bulk submits (jobs/s)" in done.stdout
    assert "targets (hostqueue)" in done.stdout

    import json

    with open(raw) as f:
        result = json.load(f)
    assert result["error"] is None
    (figures,) = result["hostqueue"]
    for key in ("enqueue_one", "enqueue_bulk", "e2e_bulk", "e2e_one", "lat_p50", "lat_p99",
                "scale_1", "scale_2", "scale_up", "rss_supervisor", "idle_cpu"):
        assert figures[key] >= 0, key
    (depth,) = result["depth"]
    for key in ("deep_e2e_bulk", "deep_lat_p50", "restart_e2e_bulk", "restart_lat_p50",
                "ref_deep_lat_p50", "ref_restart_lat_p50", "ref_restart_e2e_bulk", "ref_deep_enqueue_one",
                "drain_rate", "drain_rss_supervisor"):
        assert depth[key] > 0, key
