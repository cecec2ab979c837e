"""benchmarks/gpu_check.sh, the script that collects the GPU evidence, checked on the CPU so that it cannot rot
before a GPU is at hand: stage processes, time limits, the JSON rewritten after each stage, a failed stage
recorded and skipped, and command lines that the real CLI accepts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdqn.cli import build_parser, config_from_args
from fastdqn.config import from_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SCRIPT_ENV = {**os.environ, "PYTHON": sys.executable}
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_check  # its dataclass looks itself up there
spec.loader.exec_module(gpu_check)
curves_spec = importlib.util.spec_from_file_location("minatar_curves", ROOT / "benchmarks" / "minatar_curves.py")
minatar_curves = importlib.util.module_from_spec(curves_spec)
curves_spec.loader.exec_module(minatar_curves)

STOPS_CLEANLY = """
import signal, sys, time, json
signal.signal(signal.SIGINT, lambda *a: (print(json.dumps({"saved": True})), sys.exit(0)))
print("ready", flush=True)
time.sleep(60)
"""


def recorded_so_far(out: Path) -> str:
    """A stage that reads the check's own JSON while it runs: what the stages before it left there."""
    return (
        f"import json, glob; r = json.load(open(sorted(glob.glob({str(out / 'gpu-check-*.json')!r}))[-1])); "
        "print(json.dumps({'statuses': [s['status'] for s in r['stages']]}))"
    )


def synthetic_stages(out: Path):
    def make(python, log_dir, runs, dry):
        py = [*python, "-c"]
        return [
            gpu_check.Stage("ok", [*py, "print('{\"x\": 1}')"], 30, gpu_check.last_json_line),
            gpu_check.Stage("fails", [*py, "import sys; print('boom: CUDA error'); sys.exit(3)"], 30),
            gpu_check.Stage("hangs", [*py, "import time; time.sleep(60)"], 1),
            gpu_check.Stage("stops", [*py, STOPS_CLEANLY], 1.5, gpu_check.last_json_line, stop_ok=True),
            gpu_check.Stage("unreadable", [*py, "print('no json here')"], 30, gpu_check.last_json_line),
            gpu_check.Stage("sees-json", [*py, recorded_so_far(out)], 30, gpu_check.last_json_line),
            gpu_check.Stage("late", [*py, "print(1)"], 30, min_s=10_000),
        ]

    return make


def test_stages_run_in_their_own_processes_with_limits_and_every_result_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 5)
    code = gpu_check.main(["--out", str(tmp_path), "--budget", "120"], make_stages=synthetic_stages(tmp_path))
    assert code == 1  # some stages failed; the check itself went through all of them
    record = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert list(stages) == ["ok", "fails", "hangs", "stops", "unreadable", "sees-json", "late"]
    assert stages["ok"]["status"] == "ok" and stages["ok"]["results"] == {"x": 1}
    assert stages["fails"]["status"] == "failed" and stages["fails"]["returncode"] == 3
    assert stages["fails"]["tail"] == ["boom: CUDA error"]  # the end of its log, for a first-contact failure
    assert stages["hangs"]["status"] == "timeout" and stages["hangs"]["wall_s"] < 10
    assert stages["stops"]["status"] == "stopped" and stages["stops"]["results"] == {"saved": True}
    assert stages["unreadable"]["status"] == "ok" and "no JSON result line" in stages["unreadable"]["results_error"]
    # the JSON on disk already held the five stages before it when the sixth one ran
    assert stages["sees-json"]["results"] == {"statuses": ["ok", "failed", "timeout", "stopped", "ok"]}
    assert stages["late"]["status"] == "skipped" and "budget left" in stages["late"]["reason"]
    assert record["finished"] and (tmp_path / stages["fails"]["log"]).read_text() == "boom: CUDA error\n"


def test_the_budget_bounds_the_whole_check_stops_included(tmp_path, monkeypatch):
    """A stage gets at most what is left of the budget less the time stopping it may take, so the check ends within
    its budget however its stages behave; what no longer fits is recorded as skipped."""
    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "KILL_WAIT_S", 1)

    def make(python, log_dir, runs, dry):
        ignores_sigint = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
        return [
            gpu_check.Stage("stubborn", [*python, "-c", ignores_sigint], 100, min_s=1),
            gpu_check.Stage("next", [*python, "-c", "print(1)"], 100, min_s=1),
        ]

    assert gpu_check.main(["--out", str(tmp_path), "--budget", "6"], make_stages=make) == 1
    record = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    stubborn, after = record["stages"]
    assert stubborn["status"] == "timeout" and stubborn["limit_s"] <= 4 and stubborn["returncode"] == -9  # SIGKILL
    assert after["status"] == "skipped"
    assert record["elapsed_s"] <= 6.5


def test_the_shell_script_runs_the_driver_and_records_the_machine_first(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--only", "machine", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=SCRIPT_ENV,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    import torch

    assert record["dry_run"] and record["machine"]["torch"] == torch.__version__
    assert [s["name"] for s in record["stages"]] == ["machine"]
    assert (
        subprocess.run(
            ["bash", str(SCRIPT), "--only", "nope", "--out", str(tmp_path)], capture_output=True, env=SCRIPT_ENV
        ).returncode
        == 2
    )


@pytest.mark.parametrize("dry", [False, True], ids=["gpu", "dry-run"])
def test_every_fastdqn_command_of_the_check_is_one_the_cli_accepts(tmp_path, dry):
    """The GPU stages run for the first time on a GPU: a renamed flag must fail here, not there."""
    stages = gpu_check.stages(["python"], tmp_path, tmp_path, dry)
    fastdqn_commands = 0
    for stage in stages:
        argv = stage.argv
        if argv[1:3] != ["-m", "fastdqn"]:
            continue
        fastdqn_commands += 1
        args = build_parser().parse_args(argv[3:])
        if args.command == "train":
            cfg = config_from_args(args)
            assert cfg.device == ("cpu" if dry else "cuda")
    assert fastdqn_commands == 7
    minatar = next(stage for stage in stages if stage.name == "minatar")
    curves = minatar_curves.build_parser().parse_args(minatar.argv[2:])
    values = minatar_curves.config_values(curves)
    for game in curves.games:  # every run's config is one the CLI would accept
        cfg = from_dict({**values, "env_id": f"MinAtar/{game}-{curves.version}"})
        assert cfg.device == ("cpu" if dry else "cuda")
    assert dry or (set(curves.games) == set(minatar_curves.GAMES) and curves.parallel and cfg.compile)
    names = [s.name for s in stages]
    assert names[:2] == ["machine", "cuda-tests"] and names[-1] == "pong"  # by value per second, Pong last
    if not dry:
        pong = config_from_args(build_parser().parse_args(stages[-1].argv[3:]))
        assert pong.compile and pong.amp and pong.env_id == "ALE/Pong-v5" and stages[-1].stop_ok


@pytest.mark.slow
def test_the_dry_run_goes_through_every_stage_on_the_cpu(tmp_path):
    """What CI runs of the check: every stage's real command, CPU-sized, and the Pong stage stopped by its time
    limit with its checkpoint saved."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        env=SCRIPT_ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    record = json.loads(next(tmp_path.glob("gpu-check-*.json")).read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert {k: s["status"] for k, s in stages.items()} == {
        "machine": "ok",
        "cuda-tests": "ok",
        "bench-update": "ok",
        "cartpole-default": "ok",
        "cartpole-16envs-compile-amp": "ok",
        "population-1": "ok",
        "population-64": "ok",
        "minatar": "ok",
        "bench-e2e": "ok",
        "pong": "stopped",
    }
    cuda = stages["cuda-tests"]["results"]
    assert cuda["tests"] == cuda["skipped"] > 10 and cuda["failures"] == cuda["errors"] == 0  # no CUDA here
    assert stages["cartpole-default"]["results"]["result"]["env_steps"] >= 600
    assert stages["cartpole-default"]["results"]["eval_curve"]
    assert [len(r["final_eval_means"]) for r in (stages["population-64"]["results"]["result"],)] == [2]  # dry: 2
    assert stages["bench-update"]["results"]["cases"] and stages["bench-e2e"]["results"]["training"]
    assert stages["pong"]["results"]["result"]["interrupted"]
    assert [(r["env_id"], r["env_steps"] >= 300) for r in stages["minatar"]["results"]["runs"]] == [
        ("MinAtar/Breakout-v1", True),
        ("MinAtar/Asterix-v1", True),
    ]
