"""The profiler: a scheduled trace with the loop's named ranges, written as JSON that parses; nothing when off."""

from __future__ import annotations

import json

import pytest

from fastdqn import cli
from fastdqn.profiling import RANGES
from fastdqn.trainer import Trainer


def profile_cfg(tiny_cfg, **changes):
    # 4 envs, an update every env step, a hard target copy every 8 vector steps: every range occurs in the window
    settings = dict(
        num_envs=4,
        total_steps=600,
        learning_starts=100,
        train_every=1,
        gradient_steps=1,
        target_update_interval=32,
        profile=True,
        profile_schedule=[2, 2, 12, 1],
        eval_episodes=1,
    )
    return tiny_cfg.updated(**{**settings, **changes})


def trace_names(path) -> set[str]:
    events = json.loads(path.read_text())["traceEvents"]
    return {e.get("name") for e in events}


def test_profiled_run_writes_traces_with_every_named_range(tiny_cfg, tmp_path, capsys):
    trainer = Trainer(profile_cfg(tiny_cfg), tmp_path, show_progress=False)
    trainer.run()
    out = tmp_path / "profile"
    traces = sorted(out.glob("trace_*.json"))
    assert len(traces) == 1  # repeat=1: one active window
    assert set(RANGES) <= trace_names(traces[0])
    assert list((out / "tensorboard").glob("*.pt.trace.json"))
    assert "Self CPU" in (out / "top_ops.txt").read_text()
    assert "profile written to" in capsys.readouterr().err
    # the wrappers are gone again: the objects show their class methods
    assert "act" not in vars(trainer.learner) and "vector_step" not in vars(trainer)
    assert "start" not in vars(trainer.collector.stepper) and "finish" not in vars(trainer.collector.stepper)
    assert "step" not in vars(trainer.envs) and "add" not in vars(trainer.replay)


def test_profile_window_starts_with_the_first_update(tiny_cfg, tmp_path):
    """The schedule counts iterations from the first gradient update, so the window holds updates, not warm-up."""
    cfg = profile_cfg(tiny_cfg, learning_starts=400, profile_schedule=[0, 1, 3, 1])
    Trainer(cfg, tmp_path, show_progress=False).run()
    names = trace_names(next((tmp_path / "profile").glob("trace_*.json")))
    assert "learner.update" in names


def test_profile_off_wraps_nothing_and_writes_nothing(tiny_cfg, tmp_path, monkeypatch):
    import fastdqn.profiling as P

    monkeypatch.setattr(P, "make_profiler", lambda *a, **k: pytest.fail("profiler built with profile off"))
    trainer = Trainer(tiny_cfg.updated(total_steps=300, train_every=4, gradient_steps=1), tmp_path, show_progress=False)
    trainer.run()
    assert not (tmp_path / "profile").exists()


def test_fastdqn_profile_command_runs_just_long_enough(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(
        [
            "profile",
            "--run-dir",
            str(run_dir),
            "--quiet",
            "--device",
            "cpu",
            "--learning-starts",
            "64",
            "--envs",
            "2",
            "--train-every",
            "2",
            "--gradient-steps",
            "1",
            "--hidden-sizes",
            "[16]",
            "--batch-size",
            "16",
            "--buffer-size",
            "1000",
            "--eval-episodes",
            "1",
            "--set",
            "profile_schedule=[1,1,3,1]",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["env_steps"] <= 64 + 2 + (1 + 1 + 3 + 2) * 2 + 2  # learning_starts + the window, not 50k
    assert set(RANGES) - {"target.sync"} <= trace_names(next((run_dir / "profile").glob("trace_*.json")))
