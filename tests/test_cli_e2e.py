"""End to end through the command line: `fastdqn train` writes a whole run dir, `fastdqn eval` reads it back."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compile_checks import assert_compiled
from fastdqn.cli import build_parser, main
from fastdqn.config import FIELDS, Config, from_dict

# A CartPole run of a few hundred env steps: seconds, with every periodic action (log, eval, checkpoint) firing.
# The update cadence is pinned (one update every 4 env steps) so that tuning Config's defaults changes nothing here.
SHORT_RUN = [
    "--quiet",
    "--device",
    "cpu",
    "--total-steps",
    "600",
    "--learning-starts",
    "100",
    "--buffer-size",
    "600",
    "--batch-size",
    "16",
    "--hidden-sizes",
    "[16]",
    "--eval-episodes",
    "2",
    "--eval-every",
    "300",
    "--log-every",
    "200",
    "--checkpoint-every",
    "300",
    "--epsilon-decay-steps",
    "300",
    "--train-every",
    "4",
    "--gradient-steps",
    "1",
    "--learning-rate",
    "1e-3",
]


def last_json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def scalar_tags(run_dir: Path) -> dict[str, int]:
    """TensorBoard scalar tags in the run dir's event files (hparams/ included), with how many points each has."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, int] = {}
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags[tag] = tags.get(tag, 0) + len(acc.Scalars(tag))
    return tags


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, dict]:
    """One short `fastdqn train` shared by the tests that inspect its run dir."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--run-dir", str(run_dir), "--seed", "7", "--envs", "1", *SHORT_RUN])
    assert code == 0
    return run_dir, last_json_line(out.getvalue())


def test_the_command_ends_with_every_file_written_and_main_s_exit_code(trained_run, tmp_path):
    """`fastdqn` (cli.run) exits without the interpreter's teardown: the same run as a process prints its result
    and leaves the same metrics, TensorBoard points and checkpoints as the in-process one."""
    run_dir = tmp_path / "run"
    argv = ["train", "--run-dir", str(run_dir), "--seed", "7", "--envs", "1", *SHORT_RUN]
    proc = subprocess.run([sys.executable, "-m", "fastdqn", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert last_json_line(proc.stdout)["env_steps"] == 600
    in_process = trained_run[0]
    assert scalar_tags(run_dir) == scalar_tags(in_process)
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds == [json.loads(line)["kind"] for line in (in_process / "metrics.jsonl").read_text().splitlines()]
    assert [p.name for p in sorted(run_dir.glob("*.pt"))] == [p.name for p in sorted(in_process.glob("*.pt"))]
    torch.load(sorted(run_dir.glob("ckpt-*.pt"))[-1], weights_only=True)
    again = subprocess.run([sys.executable, "-m", "fastdqn", *argv], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already" in again.stderr  # an existing run dir: main's code, not 0


def test_train_writes_config_checkpoint_metrics_and_events(trained_run):
    run_dir, result = trained_run
    assert result["env_steps"] == 600 and not result["interrupted"]
    assert Path(result["run_dir"]) == run_dir
    saved = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert (saved.total_steps, saved.seed, saved.hidden_sizes, saved.device) == (600, 7, [16], "cpu")
    assert (saved.gamma, saved.target_update_interval) == (Config().gamma, Config().target_update_interval)
    checkpoints = sorted(run_dir.glob("ckpt-*.pt"))
    assert [int(p.stem.split("-")[1]) for p in checkpoints] == [300, 600]
    state = torch.load(checkpoints[-1], weights_only=True)
    assert state["counters"]["env_step"] == 600 and state["counters"]["updates"] == (600 - 100) // 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [200, 400, 600]
    assert all(np.isfinite(r["loss"]) for r in train[1:])  # updates start after learning_starts = 100
    assert [r["step"] for r in evals] == [300, 600] and all(len(r["returns"]) == 2 for r in evals)
    assert result["final_eval_mean"] == pytest.approx(evals[-1]["mean"])


def test_train_writes_tensorboard_scalars(trained_run):
    tags = scalar_tags(trained_run[0])
    for tag in (
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/epsilon",
        "charts/learning_rate",
        "charts/SPS",
        "losses/loss",
        "losses/q_mean",
        "losses/grad_norm",
        "eval/mean_return",
    ):
        assert tags.get(tag, 0) > 0, f"no TensorBoard scalar {tag}; found {sorted(tags)}"
    assert tags["charts/episodic_return"] > 10 and tags["losses/loss"] == 3
    assert tags.get("hparams/final_eval_mean") == 1  # the hparams entry, with the final evaluation as its metric
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_run[0]))
    acc.Reload()
    returns = [(e.step, e.value) for e in acc.Scalars("charts/episodic_return")]
    lengths = [(e.step, e.value) for e in acc.Scalars("charts/episodic_length")]
    assert returns == lengths and all(v >= 1 for _, v in returns)  # CartPole pays 1 a step: each under its own tag


def test_eval_prints_mean_and_std_and_writes_eval_json(trained_run, capsys):
    run_dir = trained_run[0]
    assert main(["eval", str(run_dir), "--episodes", "3", "--checkpoint", "last"]) == 0
    printed = last_json_line(capsys.readouterr().out)
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == 3 and len(report["returns"]) == 3 and report["seed"] == 7
    assert report["env_step"] == 600 and report["epsilon"] == 0.0
    assert printed["mean"] == pytest.approx(np.mean(report["returns"]))
    assert printed["std"] == pytest.approx(np.std(report["returns"]))
    assert all(r >= 1 for r in report["returns"])
    # seeded: the same evaluation again gives the same returns
    assert main(["eval", str(run_dir), "--episodes", "3", "--checkpoint", "last"]) == 0
    assert json.loads((run_dir / "eval.json").read_text())["returns"] == report["returns"]


def test_an_existing_run_dir_is_not_overwritten_by_accident(trained_run, capsys):
    run_dir = trained_run[0]
    before = sorted(p.name for p in run_dir.iterdir())
    assert main(["train", "--run-dir", str(run_dir), *SHORT_RUN]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastdqn: error:") and "--resume" in err and "--overwrite" in err and "\n" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_the_commands(capsys):
    text = help_text(["--help"], capsys)
    assert "train" in text and "eval" in text and "--debug" in text


def test_train_help_lists_every_config_key_with_default_and_meaning(capsys):
    text = " ".join(help_text(["train", "--help"], capsys).split())  # undo argparse's line wrapping
    for name, f in FIELDS.items():
        assert "--" + name.replace("_", "-") in text, name
        meaning = " ".join(f.metadata["help"].split())
        assert meaning[:40] in text, f"help of {name} not shown"
    defaults = Config()
    for words in (
        "(default: CartPole-v1)",
        f"(default: {defaults.learning_rate})",
        f"(default: {defaults.hidden_sizes})",
        "--env ",
        "--envs ",
        "--config",
        "--set",
        "--resume",
        "--run-dir",
    ):
        assert words in text, words


def test_eval_help_lists_its_options(capsys):
    text = help_text(["eval", "--help"], capsys)
    for option in ("--episodes", "--seed", "--epsilon", "--device"):
        assert option in text


def subcommand_actions(command: str) -> list[argparse.Action]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]._actions


def test_every_config_flag_shows_the_config_default():
    defaults = Config().to_dict()
    shown = {a.dest: a.help for a in subcommand_actions("train") if a.dest in defaults}
    assert set(shown) == set(defaults)
    for name, help_line in shown.items():
        assert help_line.endswith(f"(default: {defaults[name]})"), (name, help_line)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_option_with_a_default_shows_it(command):
    """An option that has a default (not a switch, not None) says what it is in its help line."""
    for action in subcommand_actions(command):
        if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            continue
        assert "default" in (action.help or ""), (
            f"{command} {action.option_strings}: default {action.default!r} not shown"
        )


def test_console_script_is_installed():
    out = subprocess.run(["fastdqn", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "fastdqn.cli", "train", "--set", "learnig_rate=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    err = bad.stderr.strip()
    assert err.startswith("fastdqn: error: unknown config key 'learnig_rate'") and "'learning_rate'" in err
    assert "\n" not in err and "Traceback" not in err


def test_a_profiled_command_still_writes_its_profile(tmp_path):
    """Under cProfile (or coverage) `fastdqn` exits normally, so the tool writes what it gathered."""
    out = tmp_path / "cli.prof"
    argv = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "fastdqn", "train", "--set", "learnig_rate=1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert "unknown config key" in done.stderr  # (cProfile swallows the exit code itself)
    assert out.is_file() and out.stat().st_size > 0


@pytest.mark.slow
def test_vector_envs_compile_and_amp_run_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--run-dir", str(run_dir), "--envs", "4", "--compile", "--amp", *SHORT_RUN]
    with assert_compiled():  # no silent fallback to eager, no recompile during the run
        assert main(argv) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["env_steps"] == 600 and np.isfinite(result["final_eval_mean"])
    saved = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert (saved.num_envs, saved.compile, saved.amp) == (4, True, True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train" and "loss" in r]
    assert losses and all(np.isfinite(losses))
    # a compiled run's checkpoint evaluates in a fresh, uncompiled learner
    assert main(["eval", str(run_dir), "--episodes", "2"]) == 0
    assert np.isfinite(last_json_line(capsys.readouterr().out)["mean"])
