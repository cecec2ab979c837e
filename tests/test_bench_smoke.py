"""`fastdqn bench` and the pytest-benchmark files stay runnable (a minimal run; no timing is asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdqn import cli
from fastdqn.bench_suites import load_cleanrl

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
    # each speed-up is the baseline's median time over the case's, both from this run
    pairs = (("e2e", "1 envs", "4 envs"), ("cleanrl", "cleanrl dqn.py (1 env)", "fastdqn (16 envs)"))
    for suite, baseline, case in pairs:
        base, other = cases[(suite, baseline)], cases[(suite, case)]
        assert other["baseline"] == baseline and base["median"] == statistics.median(base["samples"])
        assert other["speedup"] == pytest.approx(base["median"] / statistics.median(other["samples"]))
    # the CleanRL comparison does dqn.py's work: its settings as run, its network, its loss and no Double DQN
    cleanrl = cases[("cleanrl", "cleanrl dqn.py (1 env)")]["info"]
    same_work = cases[("cleanrl", "fastdqn (16 envs)")]["info"]
    assert same_work["gradient_steps"] / same_work["train_every"] == 1 / cleanrl["train_frequency"]
    assert [same_work[k] for k in ("batch_size", "learning_rate", "gamma", "buffer_size", "target_update_interval")] \
        == [cleanrl[k] for k in ("batch_size", "learning_rate", "gamma", "buffer_size", "target_network_frequency")]
    linear_widths = [m.out_features for m in load_cleanrl().QNetwork(4, 2).network if isinstance(m, torch.nn.Linear)]
    assert same_work["hidden_sizes"] == linear_widths[:-1]
    assert (same_work["double_dqn"], same_work["loss"], same_work["max_grad_norm"]) == (False, "mse", 0.0)
    grouped = cases[("cleanrl", "fastdqn (16 envs, 64 updates / 640 steps)")]["info"]
    assert grouped["gradient_steps"] / grouped["train_every"] == 1 / cleanrl["train_frequency"]
    assert grouped["gradient_steps"] > same_work["gradient_steps"]  # in phases
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
