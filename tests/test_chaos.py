"""The short run of benchmarks/chaos.py: a few faults on an exact and an async job, every one survived."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_chaos_short_run_survives_every_fault(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos.py"),
            "--faults",
            "4",
            "--per-job",
            "2",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["all_survived"] and len(record["faults"]) == 4
    assert {f["job"] for f in record["faults"]} == {"exact", "async"}
    assert sum(row["injected"] for row in record["summary"].values()) == 4
    for fault in record["faults"]:  # nothing lost beyond the work since the checkpoint it went on from
        assert 0 <= fault["lost"] <= 2 * 100, fault  # a truncation goes back one checkpoint more
    assert "| all | 4 | 4 |" in proc.stdout


@pytest.mark.parametrize("page", ["README.md", "docs/reliability.md"])
def test_chaos_table_is_the_committed_run(page):
    """The chaos table of README.md and docs/reliability.md quotes benchmarks/results/chaos.json row for row."""
    record = json.loads((ROOT / "benchmarks" / "results" / "chaos.json").read_text())
    text = (ROOT / page).read_text()
    for kind, row in record["summary"].items():
        line = f"| `{kind}` | {row['injected']} | {row['survived']} | {row['lost_mean']:.0f} ({row['lost_max']}) |"
        assert line in text, line
    injected = sum(row["injected"] for row in record["summary"].values())
    survived = sum(row["survived"] for row in record["summary"].values())
    assert f"{survived} of {injected} faults survived" in text
