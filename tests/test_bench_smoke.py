"""`fastdqn bench` and the pytest-benchmark files stay runnable (a minimal run; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastdqn import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_command_writes_json_with_medians_and_speedups(tmp_path, capsys):
    code = cli.main(["bench", "--device", "cpu", "--threads", "1", "--suite", "update-mlp,replay,e2e,cleanrl",
                     "--variants", "eager", "--rounds", "2", "--iters", "2", "--warmup", "1", "--repeats", "1",
                     "--steps", "300", "--learning-starts", "100", "--envs", "1,4", "--out", str(tmp_path)])
    assert code == 0
    [path] = tmp_path.glob("bench-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["device_type"] == "cpu" and record["torch"]
    cases = {(c["suite"], c["name"]): c for c in record["cases"]}
    assert set(cases) == {("update-mlp", "eager"), ("replay", "add (16 envs)"), ("replay", "sample (batch 128)"),
                          ("e2e", "1 envs"), ("e2e", "4 envs"), ("cleanrl", "cleanrl dqn.py (1 env)"),
                          ("cleanrl", "fastdqn (16 envs)"), ("cleanrl", "fastdqn (16 envs, 64 updates / 640 steps)")}
    assert len(cases[("update-mlp", "eager")]["samples"]) == 2
    assert cases[("e2e", "1 envs")]["speedup"] == 1.0 and cases[("cleanrl", "fastdqn (16 envs)")]["speedup"] > 0
    same_work = cases[("cleanrl", "fastdqn (16 envs)")]["info"]  # the comparison is at CleanRL's replay ratio
    assert (same_work["train_every"], same_work["gradient_steps"], same_work["hidden_sizes"]) == (10, 1, [120, 84])
    assert (same_work["double_dqn"], same_work["loss"], same_work["batch_size"]) == (False, "mse", 128)  # as dqn.py
    grouped = cases[("cleanrl", "fastdqn (16 envs, 64 updates / 640 steps)")]["info"]
    assert grouped["gradient_steps"] / grouped["train_every"] == 1 / 10  # the same updates per env step
    assert {k: v for k, v in grouped.items() if k not in ("train_every", "gradient_steps")} == \
        {k: v for k, v in same_work.items() if k not in ("train_every", "gradient_steps")}
    assert "speed-up" in capsys.readouterr().err


def test_bench_rejects_bad_options_in_one_line(tmp_path, capsys):
    assert cli.main(["bench", "--suite", "update-mlp", "--rounds", "0", "--out", str(tmp_path)]) != 0
    assert "--rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--suite", "warp-drive"])
    assert "expected a comma list of update-mlp" in capsys.readouterr().err


@pytest.mark.slow
def test_pytest_benchmark_files_run_once_each():
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable", "-p",
                           "no:cacheprovider", "-k", "(eager and mlp) or replay"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout
