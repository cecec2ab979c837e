"""Exact resume on CPU: a run restored from its step-k checkpoint (replay saved) reaches step n with the same
parameters, optimizer state and evaluation returns as the run that was never stopped; eager and compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compile_checks import assert_compiled
from fastdqn.checkpoint import checkpoint_path
from fastdqn.checkpointer import load_run_checkpoint
from fastdqn.trainer import Trainer
from small_runs import small_cfg


def run_and_resume(cfg, tmp_path: Path, resume_at: int) -> tuple[Trainer, Trainer]:
    """The uninterrupted run to cfg.total_steps, and a second one restored from its checkpoint at `resume_at`."""
    whole = Trainer(cfg, tmp_path / "whole", show_progress=False)
    whole.run()
    resumed = Trainer(cfg, tmp_path / "resumed", show_progress=False)
    resumed.restore(load_run_checkpoint(checkpoint_path(tmp_path / "whole", resume_at), torch.device("cpu")))
    resumed.run()
    return whole, resumed


def assert_same_run(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.learner.q.state_dict().items(), b.learner.q.state_dict().items()):
        assert torch.equal(x, y), name
    for (name, x), (_, y) in zip(a.learner.target.state_dict().items(), b.learner.target.state_dict().items()):
        assert torch.equal(x, y), name
    for key, slot in a.learner.optimizer.state_dict()["state"].items():
        for name, value in slot.items():
            assert torch.equal(b.learner.optimizer.state_dict()["state"][key][name], value), (key, name)
    assert vars(a.counters) == vars(b.counters)
    assert (
        a.evaluator.evals == b.evaluator.evals
    )  # every evaluation, including the final one at step n, has the same returns


@pytest.mark.parametrize("vector_mode,num_envs", [("sync", 1), ("native", 4)])
def test_resumed_run_continues_exactly_like_the_uninterrupted_one(tmp_path, vector_mode, num_envs):
    cfg = small_cfg(
        total_steps=600,
        eval_every=200,
        eval_episodes=2,
        checkpoint_every=300,
        keep_checkpoints=5,
        target_update_interval=50,
        save_replay=True,
        vector_mode=vector_mode,
        num_envs=num_envs,
    )
    whole, resumed = run_and_resume(cfg, tmp_path, resume_at=300)
    assert whole.counters.updates > 100 and len(whole.evaluator.evals) == 3
    assert_same_run(whole, resumed)


@pytest.mark.slow
def test_resumed_compiled_run_continues_exactly(tmp_path):
    cfg = small_cfg(
        total_steps=300,
        hidden_sizes=[8],
        batch_size=8,
        checkpoint_every=200,
        keep_checkpoints=5,
        target_update_interval=50,
        save_replay=True,
        compile=True,
    )
    with assert_compiled():  # both runs compiled, the resumed one without recompiling
        whole, resumed = run_and_resume(cfg, tmp_path, resume_at=200)
    assert_same_run(whole, resumed)


def test_resume_without_saved_replay_refills_before_training_again(tmp_path):
    """Not exact (documented): the replay starts empty, so updates wait until learning_starts transitions."""
    cfg = small_cfg(total_steps=500, checkpoint_every=300, keep_checkpoints=5, save_replay=False)
    whole = Trainer(cfg, tmp_path / "whole", show_progress=False)
    whole.run()
    state = load_run_checkpoint(checkpoint_path(tmp_path / "whole", 300), torch.device("cpu"))
    assert "replay" not in state
    resumed = Trainer(cfg, tmp_path / "resumed", show_progress=False)
    resumed.restore(state)
    weights = [p.clone() for p in resumed.learner.q.parameters()]
    for _ in range(99):  # fewer than learning_starts new transitions: no gradient step yet
        resumed.collector.collect()
        resumed.train()
    assert len(resumed.replay) == 99
    assert all(torch.equal(p, w) for p, w in zip(resumed.learner.q.parameters(), weights))
    resumed.collector.collect()
    resumed.train()
    resumed.collector.collect()
    resumed.train()
    assert not all(torch.equal(p, w) for p, w in zip(resumed.learner.q.parameters(), weights))
    resumed.envs.close()
