"""`fastdqn bench` runs end to end and reads every process's figures right (a minimal run; no speed is asserted).

The cleanrl suite runs CleanRL's own dqn.py when FASTDQN_CLEANRL_SCRIPT and FASTDQN_CLEANRL_PYTHON point at a
checkout and its environment (docs/performance.md: comparing with CleanRL). Elsewhere it runs a stand-in written by
the test below: a script that takes dqn.py's flags and prints dqn.py's `SPS:` lines from a known pace, so the bench's
reading of those lines is checked against numbers known in advance.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from fastdqn import cli
from fastdqn.bench import markdown_tables
from fastdqn.bench_cases import Case, TrainingCase
from fastdqn.bench_training import FastDQNRun, measure_cases, training_config

ROOT = Path(__file__).resolve().parents[1]
REAL_CLEANRL = (os.environ.get("FASTDQN_CLEANRL_SCRIPT"), os.environ.get("FASTDQN_CLEANRL_PYTHON"))
PACE, OFFSET = 1000.0, 0.5  # the stand-in's clock: env step s is printed at s / PACE + OFFSET seconds

# A stand-in for CleanRL's dqn.py (not CleanRL's code): dqn.py's flags in, its SPS lines out, and a record of
# the flags, working dir and environment it was started with.
STAND_IN = textwrap.dedent(f"""
    import argparse, json, os, time
    p = argparse.ArgumentParser()
    p.add_argument("--total-timesteps", type=int)
    p.add_argument("--learning-starts", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cuda", action="store_true")
    args = p.parse_args()
    with open(os.environ["STAND_IN_SEEN"], "a") as seen:
        seen.write(json.dumps({{"args": vars(args), "cwd": os.getcwd(), "omp": os.environ.get("OMP_NUM_THREADS"),
                               "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
                               "pythonpath": os.environ.get("PYTHONPATH")}}) + "\\n")
    time.sleep(0.3)
    for step in range(args.total_timesteps):
        if step > args.learning_starts and step % 100 == 0:
            print("SPS:", int(step / (step / {PACE} + {OFFSET})))
        elif step % 97 == 0:
            print(f"global_step={{step}}, episodic_return=[9.]")
""")


def dqn_py_settings(script: Path) -> tuple[dict, list[int]]:
    """The defaults of dqn.py's Args and the hidden widths of its QNetwork, read from its source."""
    tree = ast.parse(script.read_text())
    args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
    defaults = {
        a.target.id: a.value.value
        for a in args.body
        if isinstance(a, ast.AnnAssign) and isinstance(a.value, ast.Constant)
    }
    linear_outputs = [
        call.args[1].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and getattr(call.func, "attr", "") == "Linear"
        and isinstance(call.args[1], ast.Constant)
    ]
    return defaults, linear_outputs


def cleanrl_flags(tmp_path: Path) -> list[str]:
    """The real CleanRL where the environment names it, else the stand-in in a checkout-shaped dir."""
    script, python = REAL_CLEANRL
    if script and python:
        return ["--cleanrl-script", script, "--cleanrl-python", python]
    fake = tmp_path / "checkout" / "cleanrl" / "dqn.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(STAND_IN)
    return ["--cleanrl-script", str(fake), "--cleanrl-python", sys.executable]


def run_bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Path:
    """`fastdqn bench --device cpu ARGS` as its own process in tmp_path; the JSON it wrote under tmp_path/out."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "fastdqn", "bench", "--device", "cpu", *args, "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = out.glob("bench-*.json")
    return path


@pytest.mark.slow
def test_bench_training_suites_run_each_case_as_a_process_and_report_its_figures(tmp_path):
    seen = tmp_path / "seen.jsonl"
    path = run_bench(
        tmp_path,
        *("--suite", "cleanrl,e2e", "--envs", "2", "--steps", "800", "--learning-starts", "100", "--repeats", "1"),
        *("--cleanrl-threads", "1,0", *cleanrl_flags(tmp_path)),
        env={"STAND_IN_SEEN": str(seen)},
    )
    record = json.loads(path.read_text())
    cases = {c["name"]: c for c in record["training"]}
    cleanrl_names = [n for n in cases if n.startswith("cleanrl dqn.py")]
    assert cleanrl_names[0] == "cleanrl dqn.py, 1 env, OMP_NUM_THREADS=1" and len(cleanrl_names) == 2
    assert set(cases) - set(cleanrl_names) == {
        "fastdqn 1 env, 1 update / 10 steps, eager",
        "fastdqn 16 envs, 1 update / 10 steps, eager",
        "fastdqn 16 envs, 64 updates / 640 steps, eager",
        "2 envs, eager",
    }
    for case in cases.values():
        [run] = case["runs"]
        assert 0 < run["first_update_s"] < run["whole_s"] and run["cpu_s"] > 0, case["name"]
        assert run["steady_sps"] > 0 and run["reported_sps"] > 0, case["name"]
        assert case["baseline"] == (cleanrl_names[0] if case["suite"] == "cleanrl" else "2 envs, eager")
    same = cases["fastdqn 16 envs, 1 update / 10 steps, eager"]["info"]["config"]
    grouped = cases["fastdqn 16 envs, 64 updates / 640 steps, eager"]["info"]["config"]
    assert (same["hidden_sizes"], same["batch_size"], same["loss"], same["double_dqn"]) == (
        [120, 84],
        128,
        "mse",
        False,
    )
    assert (same["train_every"], same["gradient_steps"], grouped["train_every"], grouped["gradient_steps"]) == (
        10,
        1,
        640,
        64,
    )  # the same replay ratio, grouped
    assert {k: v for k, v in grouped.items() if k not in ("train_every", "gradient_steps")} == {
        k: v for k, v in same.items() if k not in ("train_every", "gradient_steps")
    }
    assert (same["total_steps"], same["learning_starts"], same["torch_threads"]) == (800, 100, 1)
    assert "| cleanrl | fastdqn 16 envs, 64 updates / 640 steps, eager |" in path.with_suffix(".md").read_text()
    if REAL_CLEANRL[0]:  # fastdqn's side has the real dqn.py's own defaults and network widths
        defaults, widths = dqn_py_settings(Path(REAL_CLEANRL[0]))
        assert [
            same[k]
            for k in (
                "learning_rate",
                "buffer_size",
                "gamma",
                "target_update_interval",
                "batch_size",
                "epsilon_start",
                "epsilon_end",
                "seed",
                "hidden_sizes",
            )
        ] == [
            defaults[k]
            for k in (
                "learning_rate",
                "buffer_size",
                "gamma",
                "target_network_frequency",
                "batch_size",
                "start_e",
                "end_e",
                "seed",
            )
        ] + [widths]
        assert same["gradient_steps"] / same["train_every"] == 1 / defaults["train_frequency"]
        assert same["epsilon_decay_steps"] == defaults["exploration_fraction"] * same["total_steps"]
        return
    # The stand-in: dqn.py's flags, its own scratch dir per run, OMP_NUM_THREADS only where asked for, its
    # checkout root on PYTHONPATH; the figures follow from its pace.
    runs = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [r["args"] for r in runs] == [
        {"total_timesteps": 800, "learning_starts": 100, "seed": 1, "no_cuda": True}
    ] * 2
    assert [r["omp"] for r in runs] == ["1", None] and {r["unbuffered"] for r in runs} == {"1"}
    assert runs[0]["cwd"] != runs[1]["cwd"] and not Path(runs[0]["cwd"]).exists()
    assert runs[0]["pythonpath"].split(os.pathsep)[0] == str(tmp_path / "checkout")
    stand_in = cases[cleanrl_names[0]]["runs"][0]
    assert stand_in["steady_sps"] == pytest.approx(PACE, rel=0.01)  # the offset cancels out
    assert stand_in["reported_sps"] == int(700 / (700 / PACE + OFFSET))  # its last SPS line, at env step 700
    assert stand_in["first_update_s"] >= 0.3  # its first SPS line came after its start-up sleep


class Echo:
    """A runner whose process prints its working dir; measures it as the bench's runners do."""

    def __init__(self, order: list[str], label: str, cache: Path | None = None):
        self.order, self.label, self.cache = order, label, cache

    def command(self, scratch: Path) -> list[str]:
        return [sys.executable, "-c", "import os, time; print(os.getcwd(), flush=True); time.sleep(0.2)"]

    def prepare(self, scratch: Path) -> dict[str, str]:
        return dict(os.environ)

    def measure(self, case: TrainingCase, done) -> dict[str, float]:
        [(arrival, cwd)] = done.lines
        self.order.append(self.label)
        return {"first_update_s": arrival, "steady_sps": 1.0, "reported_sps": 1.0, "cwd": cwd}


def test_training_cases_take_turns_each_run_a_process_in_its_own_scratch_dir(tmp_path):
    order: list[str] = []
    cases = [(TrainingCase("t", "A", []), Echo(order, "A")), (TrainingCase("t", "B", []), Echo(order, "B", tmp_path))]
    measured = measure_cases(cases, repeats=2)
    assert order == ["B", "A", "B", "A", "B"]  # B keeps a warm cache: one untimed run fills it first
    runs = [run for case in measured for run in case.runs]
    assert (
        [len(case.runs) for case in measured] == [2, 2]
        and len({run["cwd"] for run in runs}) == 4
        and not any(Path(run["cwd"]).exists() for run in runs)
    )
    assert all(0 < run["first_update_s"] < 0.2 + run["first_update_s"] <= run["whole_s"] for run in runs)


def test_a_fastdqn_run_gets_an_empty_compile_cache_unless_its_case_keeps_one_warm(tmp_path):
    opts = SimpleNamespace(steps=300, learning_starts=100, device="cpu", threads=0)
    cfg = training_config(opts, "compiled", num_envs=2)
    cold = FastDQNRun(cfg).prepare(tmp_path)
    assert cold["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor-cache")
    assert FastDQNRun(cfg, tmp_path / "kept").prepare(tmp_path)["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "kept")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written == cfg.to_dict() and written["compile"] is True and written["torch_threads"] == 1


def test_a_run_reports_its_first_update_from_process_start(tmp_path):
    code = (
        "import time; time.sleep(0.4); from fastdqn.process_clock import seconds_since_start; "
        "print(seconds_since_start())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0.4 <= float(done.stdout) < 60  # the sleep and the interpreter's start, nothing from before it


def test_bench_command_starts_without_torch():
    code = (
        "import sys; from fastdqn.cli import build_parser; build_parser().parse_args(['bench']); "
        "import fastdqn.bench, fastdqn.bench_training; print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.slow
def test_in_process_suites_write_json_with_medians_and_speedups(tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--suite",
            "update-mlp,replay",
            "--variants",
            "eager",
            "--rounds",
            "2",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    [path] = tmp_path.glob("bench-*.json")
    record = json.loads(path.read_text())
    assert record["in_process"]["device_type"] == "cpu" and record["in_process"]["torch"]
    assert record["machine"]["cores"] >= 1 and len(record["machine"]["load_average"]) == 3
    cases = {(c["suite"], c["name"]): c for c in record["cases"]}
    assert set(cases) == {("update-mlp", "eager"), ("replay", "add (16 envs)"), ("replay", "sample (batch 128)")}
    assert len(cases[("update-mlp", "eager")]["samples"]) == 2 and cases[("update-mlp", "eager")]["speedup"] == 1.0
    assert record["training"] == [] and "speed-up" in capsys.readouterr().err


def test_bench_rejects_bad_options_in_one_line(tmp_path, capsys):
    assert cli.main(["bench", "--suite", "update-mlp", "--rounds", "0", "--out", str(tmp_path)]) != 0
    assert "--rounds must be >= 1" in capsys.readouterr().err
    assert cli.main(["bench", "--suite", "cleanrl", "--out", str(tmp_path)]) != 0
    assert "pass --cleanrl-script" in capsys.readouterr().err
    assert cli.main(["bench", "--suite", "e2e", "--steps", "100", "--learning-starts", "100"]) != 0
    assert "e2e: --steps (100) must be larger than --learning-starts (100)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--suite", "warp-drive"])
    assert "expected a comma list of update-mlp" in capsys.readouterr().err


@pytest.mark.slow
def test_pytest_benchmark_files_run_once_each():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "-q",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
            "-k",
            "(eager and mlp) or replay",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout  # the MLP update eager and eager-autograd, replay add and sample


def test_performance_page_tables_are_what_their_committed_bench_runs_give():
    """Each docs/performance.md table between `<!-- bench-table: NAME.json -->` markers is the Markdown that the
    bench wrote for that committed run, and rebuilding it from the JSON's samples gives the same table."""
    page = (ROOT / "docs" / "performance.md").read_text()
    quoted = re.findall(r"<!-- bench-table: (\S+\.json) -->\n(.*?)<!-- /bench-table -->", page, re.S)
    assert quoted, "docs/performance.md lost its bench-table markers"
    for name, table in quoted:
        path = ROOT / "benchmarks" / "results" / name
        assert table.strip() == path.with_suffix(".md").read_text().strip(), (
            f"docs/performance.md's table differs from {name}"
        )
        record = json.loads(path.read_text())
        micro = [Case(**{k: v for k, v in c.items() if k != "median"}) for c in record["cases"]]
        training = [TrainingCase(**{k: v for k, v in c.items() if k != "medians"}) for c in record["training"]]
        assert markdown_tables(micro, training).strip() == table.strip()


def test_loop_suite_times_each_vector_step_without_the_envs_step():
    from fastdqn.bench_suites import bench_loop

    opts = SimpleNamespace(envs=[1, 4], rounds=2, iters=5, warmup=1, clock="wall")
    cases = bench_loop(torch.device("cpu"), opts)
    assert [c.name for c in cases] == ["1 envs", "4 envs"]
    for case in cases:
        assert len(case.samples) == 2 and all(s > 0 for s in case.samples)
        assert case.info["env_step_us"] > 0  # the steppers went through the timed envs.step, so it is taken out


@pytest.mark.slow
def test_overlap_suite_runs_pong_sequential_and_overlapped_with_one_update_per_vector_step(tmp_path):
    path = run_bench(
        tmp_path,
        *("--suite", "overlap", "--overlap-envs", "4", "--steps", "240", "--learning-starts", "80", "--repeats", "1"),
    )
    cases = {c["name"]: c for c in json.loads(path.read_text())["training"]}
    never, always = cases["Pong, 4 envs, overlap never"], cases["Pong, 4 envs, overlap always"]
    a, b = never["info"]["config"], always["info"]["config"]
    assert (a["overlap"], b["overlap"]) == ("never", "always")
    assert {k: v for k, v in a.items() if k != "overlap"} == {k: v for k, v in b.items() if k != "overlap"}
    assert (a["env_id"], a["train_every"], a["gradient_steps"], a["env_threads"], a["torch_threads"]) == (
        "ALE/Pong-v5",
        4,
        1,
        1,
        1,
    )
    assert always["baseline"] == "Pong, 4 envs, overlap never" and always["runs"][0]["steady_sps"] > 0
