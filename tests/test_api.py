"""The public Python API: `fastdqn.train`, `fastdqn.evaluate`, `fastdqn.load_policy`, and presets that the
config layer applies, so a run built in Python is the run the CLI builds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastdqn
from fastdqn.checkpoint import list_checkpoints
from fastdqn.cli import build_parser, config_from_args
from fastdqn.errors import CheckpointError, ConfigError
from fastdqn.presets import ATARI


def small(**kw) -> fastdqn.Config:
    return fastdqn.Config(
        **{
            "total_steps": 2_000,
            "learning_starts": 200,
            "buffer_size": 1_000,
            "batch_size": 32,
            "hidden_sizes": [32],
            "train_every": 64,
            "gradient_steps": 8,
            "eval_every": 0,
            "eval_episodes": 2,
            "checkpoint_every": 1_000,
            "device": "cpu",
            **kw,
        }
    )


def test_train_from_python_writes_a_run_and_returns_its_result(tmp_path):
    result = fastdqn.train(small(), runs_root=tmp_path, show_progress=False)
    assert result.env_steps == 2_000 and result.updates > 0 and not result.interrupted
    assert result.run_dir.parent == tmp_path and result.run_dir.name.startswith("CartPole-v1-s1-")
    assert (result.run_dir / "config.yaml").is_file() and list_checkpoints(result.run_dir)
    assert np.isfinite(result.final_eval_mean) and result.summary()["env_steps"] == 2_000
    # the run's own CPU time, over the span of its wall time (not the process's since it started)
    assert 0 < result.cpu_time < 4 * result.wall_time + 0.5 and result.summary()["cpu_time"] > 0


def test_train_refuses_a_used_run_dir_and_resume_continues_it(tmp_path):
    run = tmp_path / "run"
    fastdqn.train(small(total_steps=1_000), run, show_progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        fastdqn.train(small(), run, show_progress=False)
    with pytest.raises(CheckpointError, match="cannot change batch_size"):
        fastdqn.train(small(total_steps=2_000, batch_size=16), run, resume=True, show_progress=False)
    resumed = fastdqn.train(small(total_steps=2_000), run, resume=True, show_progress=False)
    assert resumed.env_steps == 2_000
    assert resumed.updates == (2_000 - 200) // 64 * 8, "the update count goes on from the checkpoint"
    again = fastdqn.train(None, run, resume=True, show_progress=False)  # as saved: already at total_steps
    assert again.env_steps == 2_000 and again.evals == resumed.evals  # the final evaluation is not run twice
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_evals = [r for r in records if r["kind"] == "eval" and r["step"] == 2_000]
    assert len(final_evals) == 1, final_evals


def test_evaluate_and_load_policy_read_the_newest_checkpoint(tmp_path):
    run = fastdqn.train(small(), tmp_path / "run", show_progress=False).run_dir
    result = fastdqn.evaluate(run, episodes=3, seed=7, checkpoint="last")
    assert result.episodes == 3 and len(result.returns) == 3 and result.env_step == 2_000
    assert result.checkpoint == list_checkpoints(run)[-1].name
    assert json.loads((run / "eval.json").read_text())["mean"] == pytest.approx(result.mean)
    assert fastdqn.evaluate(run, episodes=3, seed=7, checkpoint="last").returns == result.returns, (
        "seeded evaluation repeats"
    )

    policy = fastdqn.load_policy(run, checkpoint="last")
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    with torch.no_grad():
        greedy = policy.q(torch.as_tensor(obs)).argmax(dim=1).numpy()
    assert (policy(obs) == greedy).all()
    assert policy.q.training is False


def test_config_applies_the_atari_preset_beneath_given_keys():
    pong = fastdqn.Config(env_id="ALE/Pong-v5", batch_size=64)
    assert pong.batch_size == 64, "a key given explicitly wins over the preset"
    assert all(getattr(pong, k) == v for k, v in ATARI.items() if k != "batch_size")
    assert fastdqn.Config().buffer_size != ATARI["buffer_size"], "no preset for CartPole"
    with pytest.raises(TypeError, match="unknown keys"):
        fastdqn.Config(learning_rat=1e-3)


@pytest.mark.parametrize(
    "argv",
    [
        ["--env", "ALE/Breakout-v5"],
        ["--env", "ALE/Pong-v5", "--batch-size", "64"],
        ["--env", "Acrobot-v1", "--learning-rate", "3e-4"],
    ],
)
def test_python_and_the_command_line_build_the_same_config(argv):
    from_cli = config_from_args(build_parser().parse_args(["train", *argv]))
    given = {
        "env_id": argv[1],
        **({"batch_size": 64} if "--batch-size" in argv else {}),
        **({"learning_rate": 3e-4} if "--learning-rate" in argv else {}),
    }
    assert from_cli == fastdqn.Config(**given)


@pytest.mark.parametrize("env_id, line", [("CartPole-v1", "steps to eval >= 475"), ("CartPole-v0", None)])
def test_the_summary_names_the_envs_solve_line_and_shows_scores_only_without_one(tmp_path, capsys, env_id, line):
    cfg = small(env_id=env_id, total_steps=300, learning_starts=100, checkpoint_every=0, solved_return=None)
    result = fastdqn.train(cfg, tmp_path / "run", show_progress=True)
    printed = capsys.readouterr().err  # the console writes to stderr
    assert "final eval mean" in printed
    if line is None:  # CartPole-v0 has no entry in presets.SOLVE_LINES: no solve line, no steps-to-solve row
        assert "steps to eval" not in printed and result.steps_to_solve is None
    else:
        assert line in printed
