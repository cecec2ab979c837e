"""Populations (`--agents K`): each agent is its standalone run to float tolerance, the batched update is each
agent's own update, agent dirs are standalone run dirs, and a population checkpoints and resumes exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

from fastdqn import api, networks
from fastdqn import learner as learner_module
from fastdqn.checkpoint import list_checkpoints, load_checkpoint
from fastdqn.config import Config
from fastdqn.errors import CheckpointError, ConfigError
from fastdqn.population import Population, agent_configs
from fastdqn.trainer import Trainer

SMALL = dict(
    num_envs=4,
    vector_mode="native",
    device="cpu",
    torch_threads=1,
    total_steps=2_000,
    learning_starts=400,
    buffer_size=2_000,
    batch_size=32,
    train_every=16,
    gradient_steps=4,
    target_update_interval=200,
    hidden_sizes=[64, 64],
    epsilon_decay_steps=1_000,
    eval_every=1_000,
    eval_episodes=2,
    log_every=500,
    checkpoint_every=0,
)


def small(**changes) -> Config:
    return Config(**{**SMALL, **changes}).validate()


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.learner.q.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


# the no-replay ablation (plans.ablation_variants): every update trains on the vector step just taken
NO_REPLAY = dict(
    replay_buffer=False, buffer_size=4, batch_size=4, train_every=4, gradient_steps=1, learning_starts=0, n_step=1
)


@pytest.mark.parametrize(
    ("overlap", "changes"), [("never", {}), ("always", {}), ("never", NO_REPLAY)], ids=["never", "always", "no-replay"]
)
def test_agents_follow_their_standalone_runs(tmp_path: Path, overlap: str, changes: dict) -> None:
    """Agent k acts, stores and learns as the standalone run with seed + k: the same actions in every replay
    slot, the same episodes and updates, and weights equal to float tolerance after ~400 updates: without the
    overlap every agent's CartPoles take one numpy step together (`envs.step_together`); with it each agent's envs
    step in a worker thread of their own while the updates run. Without a replay buffer every agent's update trains
    on its own newest vector step."""
    cfg = small(agents=3, seed=4, overlap=overlap, **changes)
    population = Population(cfg, tmp_path / "pop", show_progress=False)
    assert all(t.overlap == (overlap == "always") for t in population.trainers)
    assert (population.joint is not None) == (overlap == "never")
    population.run()
    for k, agent in enumerate(population.trainers):
        alone = Trainer(cfg.updated(agents=1, seed=4 + k), tmp_path / f"alone-{k}", show_progress=False)
        alone.run()
        assert agent.counters == alone.counters
        assert torch.equal(agent.replay.actions, alone.replay.actions)  # every action of the run
        assert torch.equal(agent.replay.obs, alone.replay.obs)
        assert max_diff(weights(agent), weights(alone)) < 1e-3
        assert [e[0] for e in agent.evaluator.evals] == [e[0] for e in alone.evaluator.evals]


OWN_VALUES = {"learning_rate": [1e-3, 3e-3, 2e-4], "huber_delta": [1.0, 0.5, 2.0], "tau": [0.01, 0.005, 0.1]}


@pytest.mark.parametrize(
    ("changes", "values"),
    [
        ({}, None),
        ({"dueling": True, "target_update": "soft", "n_step": 1, "loss": "mse"}, None),
        ({"target_update": "none", "double_dqn": False}, {"max_grad_norm": [0.5, 0.0, 10.0]}),
        ({"target_update": "soft", "max_grad_norm": 0.5}, OWN_VALUES),
    ],
    ids=["shared", "shared-dueling-soft-mse", "shared-no-target-own-clipping", "own-lr-huber-tau"],
)
def test_batched_update_is_each_agents_own_update(tmp_path: Path, changes: dict, values: dict | None) -> None:
    """On the same batch, the population's one update gives every agent the loss, Q, gradient norm and new weights
    of its own eager step (DQNLearner.step_on): agents of one config (one fused Adam step for all) and agents with
    their own learning rate, Huber delta, tau or clipping (a step per agent)."""
    cfg = small(agents=3, **changes)
    population = Population(cfg, tmp_path / "pop", show_progress=False, values=values)
    alone = [Trainer(c, tmp_path / f"alone-{k}", show_progress=False) for k, c in enumerate(agent_configs(cfg, values))]
    for _ in range(30):
        for trainer in population.trainers:
            trainer.collector.collect()
    for step in range(3):
        batch = population.stacked.sample()
        stats = population.stacked.update(batch)
        for k, trainer in enumerate(alone):
            own, _ = trainer.learner.step_on(batch.at(k))
            assert torch.allclose(stats[k], own, rtol=1e-5, atol=1e-6), (step, k)
            assert max_diff(weights(population.trainers[k]), weights(trainer)) < 1e-5, (step, k)
            target_a, target_b = population.trainers[k].learner.target, trainer.learner.target
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(target_a.parameters(), target_b.parameters()))
    population.close()
    for trainer in alone:
        trainer.close()


@pytest.mark.parametrize("target_update", ["hard", "soft"])
def test_updates_in_chunks_are_the_updates_one_at_a_time(tmp_path: Path, monkeypatch, target_update: str) -> None:
    """`steps(n)`, the training phase's updates with their samples drawn and gathered in chunks (here of 3) and, with
    a hard target copy, each chunk's target Q-values from one forward pass, draws what n updates taken one at a time
    draw and gives their metrics and weights to float tolerance."""
    monkeypatch.setattr(learner_module, "TARGET_PASS_FLOATS", 3 * 3 * 32 * 64)  # chunks of 3 updates
    cfg = small(agents=3, target_update=target_update)
    chunked, single = (Population(cfg, tmp_path / name, show_progress=False) for name in ("chunked", "single"))
    for _ in range(30):
        for population in (chunked, single):
            for trainer in population.trainers:
                trainer.collector.collect()
    target_passes = []
    chunked.stacked.target_net.register_forward_hook(lambda module, args, out: target_passes.append(out.shape))
    got = torch.stack(list(chunked.stacked.steps(7)))
    expected = torch.stack([metrics for _ in range(7) for metrics in single.stacked.steps(1)])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked.trainers, single.trainers):
        assert max_diff(weights(a), weights(b)) < 1e-5
    for a, b in zip(chunked.stacked.generators, single.stacked.generators):
        assert torch.equal(a.get_state(), b.get_state())  # the same draws, in the same order
    # hard: one target pass per chunk of 3 (3 x 32 columns, then 1 x 32); soft: the target moves every update
    columns = [3 * 32, 3 * 32, 32] if target_update == "hard" else [32] * 7
    assert [shape[1] for shape in target_passes] == columns
    chunked.close()
    single.close()


@pytest.mark.parametrize("rows", [networks.FEW_ROWS - 1, networks.FEW_ROWS])
def test_a_stacked_layer_is_each_agents_own_layer(rows: int) -> None:
    """networks.Linear on stacked (K, out, in) weights maps each agent's rows as that agent's nn.Linear does, in
    both of its layouts (x W^T for a few rows, (W x^T)^T for more)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 7) for _ in range(3)]
    stacked = networks.Linear(5, 7)
    stacked.weight = torch.nn.Parameter(torch.stack([layer.weight for layer in layers]))
    stacked.bias = torch.nn.Parameter(torch.stack([layer.bias for layer in layers]))
    x = torch.randn(3, rows, 5)
    out = stacked(x)
    assert out.shape == (3, rows, 7)
    for k, layer in enumerate(layers):
        assert torch.allclose(out[k], layer(x[k]), rtol=1e-5, atol=1e-6)


def test_agent_dirs_are_standalone_run_dirs(tmp_path: Path) -> None:
    """Each agent has its own config (seed + k, its values), evaluations, best.pt, metrics and TensorBoard events;
    `fastdqn eval RUN --agent k` evaluates its best.pt, and a population dir without --agent is refused."""
    run = tmp_path / "pop"
    result = api.train_population(
        small(agents=2, seed=7), run, values={"epsilon_end": [0.05, 0.1]}, show_progress=False
    )
    assert len(result.agents) == 2 and not result.interrupted
    for k, agent in enumerate(result.agents):
        agent_dir = run / f"agent-{k}"
        assert agent.run_dir == agent_dir
        saved = Config(**{k_: v for k_, v in load_checkpoint(list_checkpoints(agent_dir)[-1])["config"].items()})
        assert (saved.seed, saved.epsilon_end, saved.agents) == (7 + k, [0.05, 0.1][k], 1)
        assert (agent_dir / "best.pt").is_file() and list(agent_dir.glob("events.out.tfevents.*"))
        evals = [json.loads(line) for line in (agent_dir / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals if e["kind"] == "eval"] == [1000, 2000]
    assert json.loads((run / "population.json").read_text())["dirs"] == ["agent-0", "agent-1"]
    cli = [sys.executable, "-m", "fastdqn.cli", "eval", str(run)]
    ok = subprocess.run([*cli, "--agent", "1", "--episodes", "2"], capture_output=True, text=True, check=True)
    assert json.loads(ok.stdout.strip().splitlines()[-1])["mean"] == api.evaluate(run / "agent-1", episodes=2).mean
    refused = subprocess.run(cli, capture_output=True, text=True)
    assert refused.returncode != 0 and "--agent" in refused.stderr.strip().splitlines()[-1]


def test_population_resumes_exactly(tmp_path: Path) -> None:
    """With save_replay, a population resumed from its checkpoints at env step 1000 ends with the weights of the
    run that never stopped, for every agent."""
    cfg = small(agents=2, checkpoint_every=1_000, keep_checkpoints=3, save_replay=True)
    run = tmp_path / "pop"
    api.train_population(cfg, run, show_progress=False)
    finals = [load_checkpoint(run / f"agent-{k}" / "ckpt-000000002000.pt")["learner"]["q"] for k in range(2)]
    for k in range(2):
        (run / f"agent-{k}" / "ckpt-000000002000.pt").unlink()
    resumed = api.train_population(None, run, resume=True, show_progress=False)
    assert [r.env_steps for r in resumed.agents] == [2_000, 2_000]
    for k in range(2):
        again = load_checkpoint(run / f"agent-{k}" / "ckpt-000000002000.pt")["learner"]["q"]
        assert all(torch.equal(finals[k][name], again[name]) for name in finals[k]), k


def test_resume_goes_back_to_the_last_step_all_agents_saved(tmp_path: Path) -> None:
    """A kill while the agents were saving leaves some a checkpoint ahead: resume takes the newest common one."""
    cfg = small(agents=2, total_steps=1_000, checkpoint_every=500, keep_checkpoints=3)
    run = tmp_path / "pop"
    api.train_population(cfg, run, show_progress=False)
    (run / "agent-1" / "ckpt-000000001000.pt").unlink()  # agent 1 never wrote its step-1000 checkpoint
    resumed = api.train_population(cfg.updated(total_steps=1_500), run, resume=True, show_progress=False)
    assert [r.env_steps for r in resumed.agents] == [1_500, 1_500]
    for k in range(2):
        shutil.rmtree(run / f"agent-{k}")
        (run / f"agent-{k}").mkdir()
    (run / "agent-0" / "ckpt-000000000500.pt").write_bytes(b"")  # only one agent has any checkpoint
    with pytest.raises(CheckpointError, match="in common"):
        api.train_population(None, run, resume=True, show_progress=False)


def test_one_agent_is_a_standalone_run(tmp_path: Path) -> None:
    """--agents 1 (the default) trains the standalone loop, bit for bit: no population dir, the weights of a run
    without the key. A population of one agent runs the batched update and matches it to float tolerance."""
    cfg = small()
    plain = api.train(cfg, tmp_path / "plain", show_progress=False)
    flagged = subprocess.run(
        [sys.executable, "-m", "fastdqn.cli", "train", "--quiet", "--run-dir", str(tmp_path / "one"), "--agents", "1"]
        + [f"--set={k}={v}" for k, v in SMALL.items()],
        capture_output=True,
        text=True,
        check=True,
    )
    assert not (tmp_path / "one" / "population.json").exists()
    a = load_checkpoint(list_checkpoints(plain.run_dir)[-1])["learner"]["q"]
    b = load_checkpoint(list_checkpoints(tmp_path / "one")[-1])["learner"]["q"]
    assert all(torch.equal(a[n], b[n]) for n in a), flagged.stdout[-300:]
    population = Population(cfg.updated(agents=1), tmp_path / "pop1", show_progress=False)
    population.run()
    assert max_diff(weights(population.trainers[0]), {k: v for k, v in a.items()}) < 1e-3


@pytest.mark.parametrize(
    ("changes", "values", "message"),
    [
        ({"prioritized": True}, None, "prioritized replay"),
        ({}, {"gamma": [0.9, 0.99]}, "cannot differ in 'gamma'"),
        ({}, {"learning_rate": [1e-3]}, "1 per-agent values for 2 agents"),
    ],
)
def test_what_a_population_cannot_take_is_refused(tmp_path: Path, changes, values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Population(small(agents=2, **changes), tmp_path / "pop", show_progress=False, values=values)
    assert not (tmp_path / "pop").exists()


def test_train_points_a_population_to_train_population(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_population"):
        api.train(small(agents=2), tmp_path / "pop")


def test_ablate_trains_each_variants_seeds_as_one_population(tmp_path: Path) -> None:
    """A variant that batches (no replay buffer among them) trains its seeds as one population (population dir, each
    seed's run dir with its result); one that cannot (prioritized replay) trains a run per seed; --separate-runs
    trains every seed alone."""
    flags = ["--seeds", "2", "--set", "total_steps=600", "--set", "learning_starts=200", "--set", "eval_every=0"]
    cli = [sys.executable, "-m", "fastdqn.cli", "ablate", "--variants", "full,no-replay,per", *flags]
    out = tmp_path / "grouped"
    done = subprocess.run([*cli, "--out", str(out)], capture_output=True, text=True, check=True)
    assert "2 of 3 points train as 2 populations of 2 agents" in " ".join((done.stdout + done.stderr).split())
    assert json.loads((out / "plan.json").read_text())["populations"] is True
    population = json.loads((out / "full-DQN" / "population" / "population.json").read_text())
    assert population["values"] == {"seed": [1, 2]}
    for seed in (1, 2):
        result = json.loads((out / "full-DQN" / f"seed-{seed}" / "result.json").read_text())
        assert result["env_steps"] == 600 and result["population"].endswith("population")
        saved = Config(**load_checkpoint(list_checkpoints(out / "full-DQN" / f"seed-{seed}")[-1])["config"])
        assert saved.seed == seed
        assert (out / "prioritized-replay" / f"seed-{seed}" / "result.json").is_file()
    assert (out / "no-replay-buffer" / "population" / "population.json").is_file()
    assert not (out / "prioritized-replay" / "population").exists()
    assert "full DQN" in (out / "results.md").read_text()
    alone = tmp_path / "alone"
    subprocess.run([*cli, "--separate-runs", "--out", str(alone)], capture_output=True, text=True, check=True)
    assert not (alone / "full-DQN" / "population").exists()
    assert (alone / "full-DQN" / "seed-2" / "result.json").is_file()


def test_compiled_population_update_matches_the_eager_one(tmp_path: Path) -> None:
    """--compile compiles the population's forward and loss (and so its backward) as one graph, without graph
    breaks or recompiles over several updates, and gives the eager update's results on the same batches."""
    from compile_checks import assert_compiled

    cfg = small(agents=2, hidden_sizes=[32])
    eager = Population(cfg, tmp_path / "eager", show_progress=False)
    compiled = Population(cfg.updated(compile=True), tmp_path / "compiled", show_progress=False)
    for _ in range(30):
        for population in (eager, compiled):
            for trainer in population.trainers:
                trainer.collector.collect()
    with assert_compiled():
        for _ in range(3):
            batch = eager.stacked.sample()
            compiled.stacked.sample()  # the same draws, from the compiled population's own generators
            expected = eager.stacked.update(batch)
            assert torch.allclose(compiled.stacked.update(batch), expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.trainers, compiled.trainers):
        assert max_diff(weights(a), weights(b)) < 1e-4
    eager.close()
    compiled.close()


def test_an_agent_dir_resumes_as_a_run_of_its_own(tmp_path: Path) -> None:
    """`fastdqn train --resume RUN/agent-k` goes on with that agent alone, from its checkpoint and generator."""
    run = tmp_path / "pop"
    api.train_population(small(agents=2, checkpoint_every=1_000), run, show_progress=False)
    result = api.train(small(total_steps=3_000, seed=2), run / "agent-1", resume=True, show_progress=False)
    assert result.env_steps == 3_000 and result.evals[-1][0] == 3_000
    assert [e[0] for e in result.evals] == [1_000, 2_000, 3_000]


@pytest.mark.parametrize("eval_epsilon", [0.0, 0.3])
def test_population_evaluation_is_each_agents_own(tmp_path: Path, eval_epsilon: float) -> None:
    """The population plays every agent's evaluation at once; each agent's returns are those of its standalone
    evaluation (Evaluator.play_episodes) of the same weights: the same env seeds, actions and random draws."""
    cfg = small(agents=3, total_steps=1_500, eval_every=0, eval_epsilon=eval_epsilon, eval_episodes=4)
    population = Population(cfg, tmp_path / "pop", show_progress=False)
    population.run()
    together = population.evaluation.play()
    for k, trainer in enumerate(population.trainers):
        alone = trainer.evaluator.play_episodes(trainer.counters.env_step)
        assert together[k].tolist() == alone.tolist(), k
    assert len({tuple(r.tolist()) for r in together}) > 1  # the agents play differently
    assert [t.evaluator.evals[-1][1] for t in population.trainers] == [r.mean() for r in together]


def test_sweep_points_that_differ_in_agent_keys_train_as_one_population(tmp_path: Path) -> None:
    """A learning-rate grid of 2 points x 2 seeds is one population of 4 agents (seed and learning rate per
    agent); a grid over a key that shapes the batch (hidden sizes) gives one population per point."""
    flags = ["--seeds", "2", "--set", "total_steps=600", "--set", "learning_starts=200", "--set", "eval_every=0"]
    cli = [sys.executable, "-m", "fastdqn.cli", "sweep", *flags]
    out = tmp_path / "lr"
    done = subprocess.run(
        [*cli, "--grid", "learning_rate=1e-3,3e-3", "--out", str(out)], capture_output=True, text=True, check=True
    )
    assert "2 of 2 points train as 1 population of 4 agents" in " ".join((done.stdout + done.stderr).split())
    (population,) = list(out.glob("*/population/population.json"))
    assert json.loads(population.read_text())["values"] == {
        "seed": [1, 2, 1, 2],
        "learning_rate": [1e-3, 1e-3, 3e-3, 3e-3],
    }
    for run in (path for path in out.glob("*/seed-*") if path.is_dir()):
        saved = load_checkpoint(list_checkpoints(run)[-1])["config"]
        assert f"learning_rate={saved['learning_rate']:g}" in run.parent.name and run.name == f"seed-{saved['seed']}"
    assert len(list(out.glob("*/seed-*/result.json"))) == 4
    sizes = tmp_path / "sizes"
    done = subprocess.run(
        [*cli, "--grid", "hidden_sizes=[16],[32]", "--out", str(sizes)], capture_output=True, text=True, check=True
    )
    assert "2 of 2 points train as 2 populations of 2 agents" in " ".join((done.stdout + done.stderr).split())


def test_an_agent_s_checkpoints_and_snapshots_hold_its_own_tensors_only(tmp_path: Path) -> None:
    """An agent's weights and Adam moments are slices of the population's stacked tensors; what it saves (last and
    best checkpoints) and the finite-state snapshot it keeps hold its own slice, not every agent's storage."""
    cfg = small(total_steps=800, eval_every=400, checkpoint_every=800)
    alone = api.train(cfg, tmp_path / "alone", show_progress=False)
    population = Population(cfg.updated(agents=6), tmp_path / "pop", show_progress=False)
    population.run()
    for name in ("best.pt", list_checkpoints(alone.run_dir)[-1].name):
        own = (alone.run_dir / name).stat().st_size
        agent = (tmp_path / "pop" / "agent-3" / name).stat().st_size
        assert agent < 1.1 * own, (name, agent, own)  # all six agents' tensors would be about 6x
    state = load_checkpoint(list_checkpoints(tmp_path / "pop" / "agent-3")[-1])
    assert state["counters"]["env_step"] == 800 and state["learner"]["q"]["net.0.weight"].shape == (64, 4)
    guard = population.trainers[3].checkpoints.finite
    assert guard.step == 800  # committed at the last save, after the agents' tensors were stacked
    tensors = [t for t in tree_leaves(guard.snapshot) if isinstance(t, torch.Tensor)]
    assert sum(t.untyped_storage().nbytes() for t in tensors) == sum(t.numel() * t.element_size() for t in tensors)
