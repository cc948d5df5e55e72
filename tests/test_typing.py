"""The package type-checks: users' editors and type checkers can rely on its annotations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_the_package_passes_mypy() -> None:
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "hostqueue", "--ignore-missing-imports", "--no-error-summary"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, f"mypy found problems:\n{done.stdout}{done.stderr}"


def test_the_package_ships_py_typed() -> None:
    assert (ROOT / "hostqueue" / "py.typed").exists()
