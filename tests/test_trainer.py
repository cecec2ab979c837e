"""Trainer: seeded determinism, the update count's meaning, warm-up, reward clipping, observation normalization,
evaluation."""

from __future__ import annotations

import collections
import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

import fastdqn
import fastdqn.collection as collection_module
import fastdqn.envs as envs_module
from compile_checks import assert_compiled
from core_helpers import COUNTER_ENV, REWARD, classic, drive, trainer_without_run
from fastdqn import evaluation
from fastdqn.config import Config
from fastdqn.evaluation import Evaluator, evaluate
from fastdqn.learner import DQNLearner
from fastdqn.trainer import Trainer


def record_finished_episodes(monkeypatch) -> list[tuple[float, int]]:
    """A list that collects every (return, length) the trainer reads from its envs, in order."""
    episodes: list[tuple[float, int]] = []
    real = envs_module.finished_episodes

    def recording(infos):
        found = real(infos)
        episodes.extend(found)
        return found

    monkeypatch.setattr(collection_module, "finished_episodes", recording)
    return episodes


def run_recording_episodes(cfg, run_dir, monkeypatch) -> tuple[list[tuple[float, int]], Trainer, object]:
    """Trainer.run() that also returns every finished (return, length), in order."""
    episodes = record_finished_episodes(monkeypatch)
    trainer = Trainer(cfg, run_dir, show_progress=False)
    result = trainer.run()
    return episodes, trainer, result


@pytest.mark.slow
def test_same_seed_gives_the_same_returns_twice(tmp_path, tiny_cfg, monkeypatch):
    cfg = classic(tiny_cfg, total_steps=1_000, eval_every=500)
    first, t1, r1 = run_recording_episodes(cfg, tmp_path / "a", monkeypatch)
    second, t2, r2 = run_recording_episodes(cfg, tmp_path / "b", monkeypatch)
    assert len(first) > 20 and r1.updates > 0
    assert first == second
    assert r1.evals == r2.evals and len(r1.evals) == 2
    assert (r1.final_eval_mean, r1.updates, r1.episodes) == (r2.final_eval_mean, r2.updates, r2.episodes)
    for a, b in zip(t1.learner.q.state_dict().values(), t2.learner.q.state_dict().values()):
        assert torch.equal(a, b)
    other, _, _ = run_recording_episodes(cfg.updated(seed=2), tmp_path / "c", monkeypatch)
    assert other != first  # the seed matters, so the equality above is not vacuous


@pytest.mark.parametrize("num_envs", [1, 3, 8])
def test_update_count_is_independent_of_num_envs(tmp_path, tiny_cfg, num_envs):
    total, starts, every, grad_steps = 600, 120, 4, 2
    cfg = classic(
        tiny_cfg,
        num_envs=num_envs,
        learning_starts=starts,
        train_every=every,
        gradient_steps=grad_steps,
        batch_size=8,
        hidden_sizes=[8],
    )
    calls = []
    with trainer_without_run(cfg, tmp_path) as trainer:
        real_update = trainer.updates.update

        def counting_update(batch, *target_q):
            calls.append(trainer.counters.env_step)
            return real_update(batch, *target_q)

        trainer.updates.update = counting_update
        drive(trainer, total)
        assert trainer.counters.env_step == total
        expected = (total - starts) // every * grad_steps
        assert trainer.counters.updates == len(calls) == expected == 240
    assert min(calls) > starts  # warm-up: no update until learning_starts env steps are stored
    # the replay ratio holds all along, not only at the end: at most one vector step of updates behind
    for step in sorted(set(calls)):
        done_by_then = sum(1 for c in calls if c <= step)
        assert done_by_then == (step - starts) // every * grad_steps


def test_clip_rewards_stores_clipped_rewards_and_reports_raw_returns(tmp_path, tiny_cfg, monkeypatch):
    """The counter env pays 2.5 a step: replay holds 1.0, episode returns stay 2.5 * length."""
    episodes = record_finished_episodes(monkeypatch)
    for clip, stored in ((True, 1.0), (False, REWARD)):
        episodes.clear()
        cfg = classic(
            tiny_cfg, env_id=COUNTER_ENV, num_envs=2, clip_rewards=clip, buffer_size=100, learning_starts=10_000
        )
        with trainer_without_run(cfg, tmp_path / str(clip)) as trainer:
            drive(trainer, 100)
            assert torch.equal(trainer.replay.rewards, torch.full((100,), stored))
            assert list(trainer.collector.recent_returns) == [r for r, _ in episodes][-20:]
        assert len(episodes) > 10
        assert all(ret == pytest.approx(REWARD * length) for ret, length in episodes)


def test_normalize_obs_tracks_the_collected_observations(tmp_path, tiny_cfg):
    cfg = classic(tiny_cfg, normalize_obs=True, num_envs=4, learning_starts=10_000, buffer_size=400)
    with trainer_without_run(cfg, tmp_path) as trainer:
        normalizer = trainer.learner.q.normalizer
        assert normalizer.mean.abs().sum() == 0
        drive(trainer, 400)
        seen = trainer.replay.obs[:400].double()  # every observation acted on was stored once
        assert normalizer.count.item() == pytest.approx(400, rel=1e-6)
        assert torch.allclose(normalizer.mean.double(), seen.mean(0), atol=1e-4)
        assert torch.allclose(normalizer.var.double(), seen.var(0, unbiased=False), rtol=1e-3, atol=1e-5)
        # the network sees normalized inputs: about zero mean and unit variance on what was collected
        normalized = normalizer(seen.float())
        assert normalized.mean(0).abs().max() < 1e-3 and (normalized.std(0) - 1).abs().max() < 1e-2


def test_normalize_obs_is_off_by_default(tmp_path, tiny_cfg):
    with trainer_without_run(tiny_cfg, tmp_path) as trainer:
        assert getattr(trainer.learner.q, "normalizer", None) is None
        assert not tiny_cfg.clip_rewards


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
PACKAGE_DIR = str(Path(fastdqn.__file__).resolve().parent)


@pytest.mark.parametrize("changes", [{}, {"normalize_obs": True, "double_dqn": True, "target_update": "soft"}])
def test_hot_loop_reads_device_values_once_per_vector_step(tmp_path, tiny_cfg, monkeypatch, changes):
    """collect() + train() copy only the action vector to the host: no .item(), no branching on tensor values."""
    cfg = classic(
        tiny_cfg,
        num_envs=4,
        learning_starts=100,
        lr_schedule="linear",
        target_update_interval=40,
        batch_size=16,
        **changes,
    )
    calls: collections.Counter[str] = collections.Counter()
    with trainer_without_run(cfg, tmp_path) as trainer:
        drive(trainer, 200)  # past warm-up: updates, LR changes and target updates all happen below
        with monkeypatch.context() as patch:
            for name in HOST_READS:
                real = getattr(torch.Tensor, name)

                def counting(self, *args, _real=real, _name=name, **kwargs):
                    if sys._getframe(1).f_code.co_filename.startswith(PACKAGE_DIR):
                        calls[_name] += 1
                    return _real(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counting)
            drive(trainer, 600)
        assert trainer.counters.updates == (600 - 100) // 4
    vector_steps = (600 - 200) // 4
    assert calls["numpy"] == vector_steps and calls["cpu"] <= vector_steps  # the one action copy
    assert {k: v for k, v in calls.items() if k not in ("numpy", "cpu")} == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", [{}, {"compile": True}, {"compile": True, "amp": True}], ids=["eager", "compiled", "compiled+amp"]
)
def test_learns_cartpole_well_beyond_a_random_policy(tmp_path, variant):
    """The whole path learns, with every update-step variant: a sign error, a wrong gather or a broken target
    would keep returns near 20."""
    cfg = classic(
        Config(),
        seed=3,
        device="cpu",
        total_steps=6_000,
        learning_starts=500,
        epsilon_decay_steps=4_000,
        epsilon_end=0.05,
        batch_size=128,
        buffer_size=50_000,
        eval_every=2_000,
        eval_episodes=5,
        hidden_sizes=[64, 64],
        log_every=2_000,
        checkpoint_every=0,
        target_update_interval=250,
        **variant,
    )
    with assert_compiled() if cfg.compile else contextlib.nullcontext():
        result = Trainer(cfg, tmp_path, show_progress=False).run()
    means = [mean for _, mean, _ in result.evals]
    assert len(means) == 3 and means[0] < 60  # it starts out poor
    assert max(means) >= 100, means


@pytest.mark.slow
def test_evaluating_during_training_does_not_change_training(tmp_path, tiny_cfg, monkeypatch):
    """Evaluation draws from its own seeded RNG: the eval cadence must not shift training's random numbers."""
    cfg = classic(tiny_cfg, total_steps=900, learning_starts=100, eval_episodes=2, eval_epsilon=0.5)
    without, t1, _ = run_recording_episodes(cfg.updated(eval_every=0), tmp_path / "a", monkeypatch)
    with_evals, t2, r2 = run_recording_episodes(cfg.updated(eval_every=300), tmp_path / "b", monkeypatch)
    assert len(r2.evals) == 3 and len(without) > 10
    assert with_evals == without
    for a, b in zip(t1.learner.q.parameters(), t2.learner.q.parameters()):
        assert torch.equal(a, b)


def test_evaluation_with_exploration_is_reproducible(tmp_path, tiny_cfg):
    cfg = classic(tiny_cfg, eval_epsilon=0.5)
    with trainer_without_run(cfg, tmp_path) as trainer:
        state = torch.get_rng_state()
        first = evaluate(lambda o: trainer.learner.act(o, 0.5), cfg, 4, cfg.seed, trainer.device)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
        torch.rand(10)  # whatever the caller drew in between
        second = evaluate(lambda o: trainer.learner.act(o, 0.5), cfg, 4, cfg.seed, trainer.device)
    assert first.tolist() == second.tolist()


POLICIES = {
    "short episodes": lambda obs: (obs[:, 2] > 0).long(),
    "long, varied episodes": lambda obs: ((obs[:, 2] + obs[:, 3]) > 0).long(),  # 366-500 steps: drifts off track
    "random draws": lambda obs: torch.where(
        torch.rand(len(obs)) < 0.2, torch.randint(0, 2, (len(obs),)), ((obs[:, 2] + 0.5 * obs[:, 3]) > 0).long()
    ),
}


@pytest.mark.parametrize("policy", POLICIES)
def test_cartpole_evaluation_on_the_numpy_env_plays_the_python_envs_episodes(tiny_cfg, monkeypatch, policy):
    """CartPole evaluations run gymnasium's numpy env, each episode started where its own seeded env starts: every
    episode's return is the one Python envs give, step for step to the end of 500-step episodes."""
    cfg = classic(tiny_cfg)
    device = torch.device("cpu")
    for seed in (1, 8):
        native = evaluate(POLICIES[policy], cfg, 10, seed, device)
        with monkeypatch.context() as m:
            m.setattr(evaluation, "has_native_vector_env", lambda env_id: False)
            python = evaluate(POLICIES[policy], cfg, 10, seed, device)
        assert native.tolist() == python.tolist()
        assert len(set(native.tolist())) > 1  # episodes that differ: the seeds reached each env


def test_evaluator_alone_records_each_evaluation_and_the_first_solved_step(tiny_cfg):
    cfg = classic(tiny_cfg, eval_episodes=3)
    evaluator = Evaluator(cfg, DQNLearner(cfg, (4,), 2, torch.device("cpu")))
    returns = evaluator.evaluate(100)
    assert evaluator.evals == [(100, float(returns.mean()), float(returns.std()))] and returns.shape == (3,)
    assert evaluator.evaluate(200).tolist() == returns.tolist()  # seeded alike each time; the weights did not move
    assert evaluator.steps_to_solve() is None  # CartPole's 475 is out of reach of an untrained net
    solved = Evaluator(cfg.updated(solved_return=float(returns.mean())), evaluator.learner)
    solved.load_state_dict(evaluator.state_dict())
    assert solved.evals == evaluator.evals and solved.steps_to_solve() == 100


def test_run_stops_and_does_periodic_work_at_the_first_vector_step_past_each_multiple(tmp_path, tiny_cfg):
    """3 envs never land on multiples of 25 or 50 or on 100: each event fires once, at the vector step past it."""
    cfg = classic(
        tiny_cfg,
        num_envs=3,
        total_steps=100,
        learning_starts=30,
        eval_every=25,
        checkpoint_every=50,
        log_every=40,
        keep_checkpoints=5,
    )
    result = Trainer(cfg, tmp_path, show_progress=False).run()
    assert result.env_steps == 102 and result.updates == (102 - 30) // cfg.train_every
    assert [step for step, _, _ in result.evals] == [27, 51, 75, 102]  # the last one is the final evaluation
    assert sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("ckpt-*.pt")) == [51, 102]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [42, 81, 102]
