"""The code stays lint-clean, formatted and type-checked: ruff and mypy as configured in pyproject.toml, run as
CI runs the tests (their versions are pinned in test-constraints.txt)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_finds_nothing():
    done = run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, f"ruff check (`ruff check --fix .` fixes some):\n{done.stdout[-4000:]}{done.stderr}"


def test_code_is_ruff_formatted():
    done = run("ruff", "format", "--no-cache", "--check", ".")
    assert done.returncode == 0, f"run `ruff format .`:\n{done.stdout[-4000:]}{done.stderr}"


@pytest.mark.slow
def test_mypy_finds_no_type_errors(tmp_path):
    """A fresh cache each time, so the result never depends on an earlier run (about a minute)."""
    done = run("mypy", "--cache-dir", str(tmp_path / "mypy-cache"))
    assert done.returncode == 0, f"mypy fastdqn:\n{done.stdout[-6000:]}{done.stderr}"
    assert "Success" in done.stdout
