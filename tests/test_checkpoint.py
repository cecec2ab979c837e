"""Checkpoint files: the round trip restores everything, writes are atomic, loading never runs code from the file,
compiled modules' `_orig_mod.` keys never reach a checkpoint, and resume refuses keys that define the run; the
Checkpointer on its own, with its finite guard."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from fastdqn.checkpoint import (
    check_resume_config,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_partial_writes,
    save_checkpoint,
    strip_compile_prefix,
)
from fastdqn.checkpointer import Checkpointer, load_run_checkpoint
from fastdqn.collection import Collector
from fastdqn.counters import Counters
from fastdqn.envs import make_vector_env
from fastdqn.errors import CheckpointError, TrainingDiverged
from fastdqn.evaluation import Evaluator, evaluate
from fastdqn.learner import DQNLearner
from fastdqn.replay import ReplayBuffer
from fastdqn.trainer import Trainer
from small_runs import small_cfg


def trained(cfg, run_dir: Path) -> Trainer:
    trainer = Trainer(cfg, run_dir, show_progress=False)
    trainer.run()
    return trainer


@pytest.fixture
def run_cfg():
    return small_cfg(total_steps=400, checkpoint_every=200, keep_checkpoints=5, save_replay=True)


def test_round_trip_restores_q_values_optimizer_counters_and_replay(run_cfg, tmp_path):
    source = trained(run_cfg, tmp_path / "a")
    state = load_run_checkpoint(latest_checkpoint(tmp_path / "a"), torch.device("cpu"))
    copy = Trainer(run_cfg, tmp_path / "b", show_progress=False)
    copy.restore(state)
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])

    obs = torch.randn(64, 4)
    assert torch.equal(copy.learner.q(obs), source.learner.q(obs))
    assert torch.equal(copy.learner.target(obs), source.learner.target(obs))
    saved_opt, restored_opt = source.learner.optimizer.state_dict(), copy.learner.optimizer.state_dict()
    for key, slot in saved_opt["state"].items():
        for name, value in slot.items():
            assert torch.equal(restored_opt["state"][key][name], value), (key, name)
    assert float(copy.learner.lr) == float(source.learner.lr)
    assert vars(copy.counters) == vars(source.counters) and copy.counters.env_step == 400
    assert copy.counters.updates == source.counters.updates > 0
    assert copy.evaluator.evals == source.evaluator.evals
    assert list(copy.collector.recent_returns) == list(source.collector.recent_returns)
    assert (copy.replay.pos, copy.replay.size) == (source.replay.pos, source.replay.size)
    assert torch.equal(copy.replay.obs[: copy.replay.size], source.replay.obs[: source.replay.size])


def test_checkpoints_load_with_weights_only(run_cfg, tmp_path):
    trained(run_cfg, tmp_path)
    for path in list_checkpoints(tmp_path):
        payload = torch.load(
            path, weights_only=True
        )  # raises if anything but plain data is inside: loading never runs code
        assert payload["counters"]["env_step"] in (200, 400)


class _RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {_RunsCode.marker}",)


def test_loading_a_malicious_file_does_not_run_its_code(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "ckpt-000000000100.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": 1, "payload": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    assert not _RunsCode.marker.exists()


def test_compiled_module_keys_are_saved_plain_and_evaluate_uncompiled(run_cfg, tmp_path):
    """A torch.compile'd module's state_dict has `_orig_mod.` keys; checkpoints must not."""
    trainer = Trainer(run_cfg, tmp_path, show_progress=False)
    trainer.learner.q = torch.compile(trainer.learner.q)  # compiled lazily: nothing is compiled unless called
    assert all(k.startswith("_orig_mod.") for k in trainer.learner.q.state_dict())
    state = trainer.checkpoints.state_dict()
    assert not any("_orig_mod." in k for k in state["learner"]["q"])

    eager = DQNLearner(run_cfg, trainer.obs_shape, trainer.n_actions, torch.device("cpu"))
    eager.q.load_state_dict(state["learner"]["q"])
    obs = torch.randn(8, 4)
    assert torch.equal(eager.q(obs), trainer.learner.q._orig_mod(obs))
    returns = evaluate(lambda o: eager.act(o, 0.0), run_cfg, 2, run_cfg.seed, torch.device("cpu"))
    assert returns.shape == (2,) and (returns > 0).all()
    assert strip_compile_prefix({"_orig_mod.net.0.weight": 1}) == {"net.0.weight": 1}


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    first = save_checkpoint({"format": 1, "x": torch.ones(3)}, tmp_path, 100, keep=1)

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"format": 1, "x": torch.zeros(3)}, tmp_path, 200, keep=1)
    assert list_checkpoints(tmp_path) == [first]
    assert torch.equal(load_checkpoint(first)["x"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def test_keep_drops_only_older_checkpoints_after_the_new_one_is_complete(tmp_path):
    for step in (100, 200, 300):
        save_checkpoint({"format": 1, "step": step}, tmp_path, step, keep=2)
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path)] == [200, 300]


def test_partial_writes_of_a_killed_process_are_removed(tmp_path):
    (tmp_path / ".ckpt-abc.tmp").write_bytes(b"killed here")
    keep = save_checkpoint({"format": 1}, tmp_path, 100, keep=2)
    remove_partial_writes(tmp_path)
    assert sorted(tmp_path.iterdir()) == [keep]


def test_truncated_checkpoint_is_a_clear_error_naming_the_previous_one(tmp_path):
    save_checkpoint({"format": 1}, tmp_path, 100, keep=2)
    newest = save_checkpoint({"format": 1, "w": torch.randn(1000)}, tmp_path, 200, keep=2)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="move it away to resume from ckpt-000000000100.pt"):
        load_checkpoint(newest)
    assert newest.read_bytes() == data[: len(data) // 3]  # the error path never deletes or rewrites


@pytest.mark.parametrize(
    "change",
    [
        {"total_steps": 9_000},
        {"learning_rate": 1e-4},
        {"device": "cpu"},
        {"compile": True},
        {"eval_every": 50},
        {"keep_checkpoints": 9},
    ],
)
def test_resume_may_change_run_length_schedules_and_speed_keys(change):
    check_resume_config(small_cfg().to_dict(), small_cfg(**change))


@pytest.mark.parametrize(
    "change",
    [
        {"env_id": "Acrobot-v1"},
        {"hidden_sizes": [8]},
        {"num_envs": 2},
        {"buffer_size": 900},
        {"train_every": 2},
        {"gamma": 0.5},
        {"seed": 7},
    ],
)
def test_resume_refuses_keys_that_define_the_checkpoint(change):
    key = next(iter(change))
    with pytest.raises(CheckpointError, match=f"cannot change {key}"):
        check_resume_config(small_cfg().to_dict(), small_cfg(**change))


def test_resume_refuses_a_config_with_keys_this_version_does_not_know():
    with pytest.raises(CheckpointError, match="does not know \\(warp_drive\\)"):
        check_resume_config({**small_cfg().to_dict(), "warp_drive": 1}, small_cfg())


def checkpointer_of(cfg, run_dir: Path) -> Checkpointer:
    """A run's units wired by hand, as the Trainer wires them, without a loop or a logger."""
    torch.manual_seed(cfg.seed)
    cpu = torch.device("cpu")
    replay = ReplayBuffer(cfg.buffer_size, cfg.num_envs, (4,), torch.float32, cpu)
    learner, counters = DQNLearner(cfg, (4,), 2, cpu), Counters()
    collector = Collector(cfg, make_vector_env(cfg, cfg.num_envs), replay, learner, counters, cpu)
    return Checkpointer(cfg, run_dir, learner, replay, collector, Evaluator(cfg, learner), counters)


def test_checkpointer_alone_saves_and_restores_every_unit_exactly(tmp_path):
    cfg = small_cfg(num_envs=2, save_replay=True)
    source, copy = checkpointer_of(cfg, tmp_path / "a"), checkpointer_of(cfg, tmp_path / "b")
    for _ in range(60):
        source.collector.collect()
    source.learner.step_on(source.replay.sample(16))
    source.evaluator.evaluate(source.counters.env_step)
    path = source.save()
    assert path == tmp_path / "a" / "ckpt-000000000120.pt"
    copy.restore(load_run_checkpoint(path, "cpu"))
    assert vars(copy.counters) == vars(source.counters) and copy.counters.episodes > 0
    assert copy.collector.counters is copy.counters  # restored in place: the collector counts on
    assert copy.evaluator.evals == source.evaluator.evals and len(copy.evaluator.evals) == 1
    assert list(copy.collector.recent_returns) == list(source.collector.recent_returns)
    assert torch.equal(copy.replay.obs[: len(copy.replay)], source.replay.obs[: len(source.replay)])
    rng, stored = torch.get_rng_state(), []
    for units in (source, copy):  # both go on alike: same env states, weights and random draws
        torch.set_rng_state(rng)
        for _ in range(10):
            units.collector.collect()
        units.learner.step_on(units.replay.sample(16))
        stored.append((units.replay.next_obs[120:140].clone(), [p.clone() for p in units.learner.q.parameters()]))
        units.collector.envs.close()
    assert torch.equal(stored[0][0], stored[1][0])
    assert all(torch.equal(a, b) for a, b in zip(stored[0][1], stored[1][1]))


def test_checkpointer_rolls_back_nonfinite_weights_then_stops_with_the_last_finite_ones(tmp_path):
    units = checkpointer_of(small_cfg(nonfinite_skips=1), tmp_path)
    units.collector.envs.close()
    units.check_finite({"loss": 1.0})  # finite: remembered
    finite = {k: v.clone() for k, v in units.learner.q.state_dict().items()}
    with torch.no_grad():
        next(units.learner.q.parameters()).fill_(float("nan"))
    units.check_finite({})  # one roll-back allowed: back to the finite weights, and on
    assert units.counters.nonfinite_skips == 1
    assert all(torch.equal(units.learner.q.state_dict()[k], v) for k, v in finite.items())
    with pytest.raises(TrainingDiverged, match="loss=nan became non-finite"):
        units.check_finite({"loss": float("nan")})
    saved = load_checkpoint(list_checkpoints(tmp_path)[-1])["learner"]["q"]
    assert all(torch.equal(saved[k], v) for k, v in finite.items())
