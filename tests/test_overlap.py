"""The overlap (stepping.py): the envs step while the updates of the same vector step run. The only change is one
vector step of data delay (those updates sample the replay without that step); every count, schedule, checkpoint
and exact resume stays as in the sequential loop."""

from __future__ import annotations

import threading
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from fastdqn.checkpoint import checkpoint_path, list_checkpoints
from fastdqn.checkpointer import load_run_checkpoint
from fastdqn.errors import ConfigError
from fastdqn.stepping import AsyncStep, InlineStep, SendRecvStep, ThreadStep, make_stepper, overlap_wanted
from fastdqn.trainer import Trainer
from small_runs import small_cfg
from test_resume import assert_same_run

CPU = torch.device("cpu")


def overlap_cfg(**changes):
    """Three sync CartPoles, two updates every two vector steps, target copies every 10 vector steps."""
    settings = dict(
        vector_mode="sync",
        num_envs=3,
        total_steps=600,
        learning_starts=90,
        train_every=6,
        gradient_steps=2,
        target_update_interval=30,
    )
    return small_cfg(**{**settings, **changes})


def test_overlap_steps_the_envs_while_the_updates_run(tmp_path):
    """The envs' step of each vector step waits until that vector step's update phase has started: it can only
    finish when the two run together (in the sequential loop every wait would time out)."""
    cfg = overlap_cfg(overlap="always", total_steps=150, train_every=3, gradient_steps=1)  # a phase every vector step
    trainer = Trainer(cfg, tmp_path, show_progress=False)
    assert trainer.overlap and isinstance(trainer.collector.stepper, ThreadStep)
    first = (cfg.learning_starts + cfg.train_every) // cfg.num_envs  # the vector step of the first phase
    phases, calls, seen, changed = 0, 0, [], threading.Condition()
    run_updates, step_envs = trainer.updates.run, trainer.envs.step

    def updates(n):
        nonlocal phases
        with changed:
            phases += 1
            changed.notify_all()
        run_updates(n)

    def step(actions):
        nonlocal calls
        calls += 1
        if calls >= first:
            with changed:
                seen.append(changed.wait_for(lambda: phases >= calls - first + 1, timeout=5))
        return step_envs(actions)

    trainer.updates.run, trainer.envs.step = updates, step
    trainer.run()
    assert len(seen) == 150 // 3 - first + 1 and all(seen)


def recorded_run(cfg, run_dir: Path) -> tuple[Trainer, list[tuple], list[float]]:
    """A run with, for every update phase, (env steps it is due at, updates, learning rate, replay size when it ran)
    and the epsilon of every training act (not the evaluation's)."""
    trainer = Trainer(cfg, run_dir, show_progress=False)
    phases, epsilons = [], []
    run_updates, act, train = trainer.updates.run, trainer.learner.act, trainer.train

    def recording_train(env_step=None):
        before = trainer.counters.updates
        train(env_step)
        if trainer.counters.updates > before:
            phases[-1] = (env_step, *phases[-1][1:])

    def updates(n):
        phases.append((None, n, trainer.learner.lr.item(), len(trainer.replay)))
        run_updates(n)

    trainer.updates.run, trainer.train = updates, recording_train
    trainer.learner.act = lambda obs, epsilon, generator=None: (
        epsilons.append(epsilon) if len(obs) == cfg.num_envs else None,
        act(obs, epsilon, generator),
    )[1]
    trainer.run()
    return trainer, phases, epsilons


@pytest.mark.parametrize("learning_starts,train_every,gradient_steps", [(90, 6, 2), (0, 3, 1)])
def test_overlap_changes_nothing_but_what_the_updates_sample(tmp_path, learning_starts, train_every, gradient_steps):
    """Random actions (epsilon 1), so both runs step the envs alike: the same transitions, episodes, counts, update
    phases and learning rates; only the replay the updates sample lacks the step in flight."""
    cfg = overlap_cfg(
        epsilon_schedule="constant",
        epsilon_start=1.0,
        lr_schedule="linear",
        eval_episodes=2,
        learning_starts=learning_starts,
        train_every=train_every,
        gradient_steps=gradient_steps,
    )
    off, off_phases, off_eps = recorded_run(cfg.updated(overlap="never"), tmp_path / "off")
    on, on_phases, on_eps = recorded_run(cfg.updated(overlap="always"), tmp_path / "on")
    assert isinstance(on.collector.stepper, ThreadStep) and isinstance(off.collector.stepper, InlineStep)
    assert vars(on.counters) == vars(off.counters)
    assert off.counters.updates == (600 - learning_starts) // train_every * gradient_steps
    assert off_eps == on_eps and len(off_eps) == 200
    assert [p[:3] for p in on_phases] == [p[:3] for p in off_phases] and len(off_phases) > 80
    # a phase overlaps once the replay holds learning_starts transitions without the step in flight; it then lacks
    # that step (before, it runs after the step is stored, as in the sequential loop)
    ready = max(learning_starts, 1)
    assert [p[3] for p in on_phases] == [p[3] if p[3] - 3 < ready else p[3] - 3 for p in off_phases]
    assert any(p[3] - 3 < ready for p in off_phases) == (learning_starts == 0)
    for name, column in off.replay.columns().items():
        assert torch.equal(column, on.replay.columns()[name]), name
    assert list(on.collector.recent_returns) == list(off.collector.recent_returns)
    assert any(not torch.equal(a, b) for a, b in zip(on.learner.q.parameters(), off.learner.q.parameters()))


@pytest.mark.parametrize("vector_mode", ["sync", "native"])
def test_resume_with_overlap_continues_exactly(tmp_path, vector_mode):
    cfg = overlap_cfg(
        overlap="always",
        vector_mode=vector_mode,
        eval_every=200,
        eval_episodes=2,
        checkpoint_every=300,
        keep_checkpoints=5,
        save_replay=True,
    )
    whole = Trainer(cfg, tmp_path / "whole", show_progress=False)
    whole.run()
    resumed = Trainer(cfg, tmp_path / "resumed", show_progress=False)
    resumed.restore(load_run_checkpoint(checkpoint_path(tmp_path / "whole", 300), CPU))
    resumed.run()
    assert isinstance(resumed.collector.stepper, ThreadStep) and whole.counters.updates > 100
    assert_same_run(whole, resumed)


def test_ctrl_c_during_a_step_in_flight_stores_that_step_and_resumes_exactly(tmp_path):
    """SIGINT arrives while the envs step in the worker thread: the step is completed and stored before the
    checkpoint (never half-taken), and the run resumed from it ends exactly as the run that was never stopped."""
    import fault_envs  # noqa: F401  (registers the envs)

    cfg = overlap_cfg(
        env_id="fault_envs:InterruptingCartPole-v0",
        overlap="always",
        total_steps=900,
        buffer_size=1200,
        save_replay=True,
    )
    stopped = Trainer(cfg, tmp_path / "stopped", show_progress=False)
    result = stopped.run()
    assert result.interrupted and result.env_steps == 600  # the 200th step of env 0 is the 200th vector step
    state = load_run_checkpoint(list_checkpoints(tmp_path / "stopped")[-1], CPU)
    assert state["counters"]["env_step"] == 600 and state["replay"]["size"] == 600
    assert torch.equal(state["obs"], stopped.collector.obs_t)  # the observations of the step that was in flight
    resumed = Trainer(cfg, tmp_path / "stopped", show_progress=False)
    resumed.restore(state)
    resumed.run()
    whole = Trainer(cfg.updated(env_id="CartPole-v1"), tmp_path / "whole", show_progress=False)
    whole.run()
    for a, b in zip(whole.learner.q.parameters(), resumed.learner.q.parameters()):
        assert torch.equal(a, b)


def test_overlap_choice_follows_the_envs_and_the_device():
    sync = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")])
    cfg = small_cfg()
    try:
        assert not overlap_wanted(cfg, sync, CPU)  # auto: a thread would share the interpreter with the updates
        assert overlap_wanted(cfg, sync, torch.device("cuda"))  # the updates run on the GPU
        assert overlap_wanted(cfg.updated(overlap="always"), sync, CPU)
        assert not overlap_wanted(cfg.updated(overlap="never"), sync, torch.device("cuda"))
        assert isinstance(make_stepper(sync, torch.device("cuda"), True), InlineStep)
        assert isinstance(make_stepper(sync, CPU, False), InlineStep)
        no_replay = cfg.updated(replay_buffer=False, buffer_size=1, batch_size=1, train_every=1, gradient_steps=1)
        assert not overlap_wanted(no_replay, sync, torch.device("cuda"))
        with pytest.raises(ConfigError, match="replay_buffer: false trains on the step just taken"):
            overlap_wanted(no_replay.updated(overlap="always"), sync, CPU)
    finally:
        sync.close()


def test_async_envs_overlap_through_step_async_and_step_wait(tmp_path):
    trainer = Trainer(overlap_cfg(vector_mode="async", total_steps=150), tmp_path, show_progress=False)
    assert trainer.overlap and isinstance(trainer.collector.stepper, AsyncStep)
    assert trainer.run().env_steps == 150


def test_ale_envs_overlap_through_send_and_recv(tmp_path):
    pytest.importorskip("ale_py")
    cfg = small_cfg(
        env_id="ALE/Pong-v5",
        num_envs=2,
        total_steps=80,
        learning_starts=40,
        buffer_size=200,
        batch_size=4,
        train_every=2,
        max_episode_steps=20,
    )
    trainer = Trainer(cfg, tmp_path, show_progress=False)
    assert trainer.overlap and isinstance(trainer.collector.stepper, SendRecvStep)
    result = trainer.run()
    assert result.env_steps == 80 and result.updates == 20
