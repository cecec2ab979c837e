"""Ablation and sweep plans, the no-replay variant, resumable sweeps, and reports rebuilt from disk."""

from __future__ import annotations

import json

import pytest
import torch

from fastdqn import config as C
from fastdqn import experiments as X
from fastdqn import plans as P
from fastdqn import reports as R
from fastdqn.backends import BackendSpec
from fastdqn.checkpointer import read_best
from fastdqn.cli import main
from fastdqn.errors import ConfigError
from fastdqn.trainer import Trainer

TINY = {
    "num_envs": 1,
    "train_every": 4,
    "gradient_steps": 1,
    "total_steps": 300,
    "learning_starts": 100,
    "buffer_size": 500,
    "batch_size": 16,
    "hidden_sizes": [8],
    "eval_every": 150,
    "eval_episodes": 2,
    "log_every": 100,
    "checkpoint_every": 0,
    "epsilon_decay_steps": 200,
    "target_update_interval": 50,
    "device": "cpu",
    "solved_return": 12.0,
}


@pytest.fixture
def tiny_base() -> C.Config:
    return C.from_dict(TINY)


def test_ablation_plan_has_the_lecture_rows_as_valid_configs(tiny_base):
    plan = P.ablation_plan(tiny_base.updated(double_dqn=True, dueling=True), seeds=3)
    assert [p.name for p in plan.points] == [
        "full DQN",
        "no target network",
        "no replay buffer",
        "small buffer (1,000)",
        "no exploration decay",
        "MSE loss (not Huber)",
        "Double DQN",
    ]
    assert plan.seeds == [1, 2, 3]
    full = plan.config(plan.points[0], 1)
    assert not full.double_dqn and not full.dueling  # full DQN is the classic one, whatever the base enables
    configs = {p.name: plan.config(p, 2) for p in plan.points}
    assert configs["no target network"].target_update == "none"
    no_replay = configs["no replay buffer"]
    assert not no_replay.replay_buffer and no_replay.buffer_size == no_replay.batch_size == 1
    assert configs["small buffer (1,000)"].buffer_size == 1_000
    assert configs["no exploration decay"].epsilon_schedule == "constant"
    assert configs["MSE loss (not Huber)"].loss == "mse" and configs["Double DQN"].double_dqn
    assert all(c.seed == 2 for c in configs.values())


def test_ablation_plan_rejects_an_unknown_variant(tiny_base):
    with pytest.raises(ConfigError, match="unknown variant 'nope'.*no-replay"):
        P.ablation_plan(tiny_base, 1, ["full", "nope"])


def test_no_replay_variant_trains_once_on_each_vector_step(tiny_base, tmp_path, monkeypatch):
    changes = P.ablation_variants(tiny_base.updated(num_envs=2))["no-replay"][1]
    cfg = tiny_base.updated(num_envs=2, total_steps=40, **changes)
    trainer = Trainer(cfg, tmp_path, show_progress=False)
    seen = []
    real_update = trainer.updates.update
    monkeypatch.setattr(trainer.updates, "update", lambda batch: (seen.append(batch), real_update(batch))[1])
    newest = []
    real_add = trainer.replay.add
    monkeypatch.setattr(trainer.replay, "add", lambda *a, **k: (newest.append(a[0].clone()), real_add(*a, **k))[1])
    result = trainer.run()
    assert result.updates == len(seen) == 20  # one update per vector step of 2 envs
    for batch, obs in zip(seen, newest):  # each update is exactly the vector step just collected, in env order
        assert torch.equal(batch.obs, obs)


def test_grid_parsing_keeps_list_values_whole_and_checks_keys():
    grid = P.parse_grid(["learning_rate=1e-3,3e-4", "hidden_sizes=[64,64],[128]"])
    assert grid == {"learning_rate": ["1e-3", "3e-4"], "hidden_sizes": ["[64,64]", "[128]"]}
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        P.parse_grid(["batch_sise=32,64"])
    with pytest.raises(ConfigError, match="key=value1"):
        P.parse_grid(["learning_rate"])


def test_sweep_plan_is_the_whole_grid_and_leaves_ranges_to_a_search(tiny_base):
    grid = P.parse_grid(["learning_rate=1e-3,3e-4,1e-4", "batch_size=16,32"])
    plan = P.sweep_plan(tiny_base, grid, seeds=2)
    assert len(plan.points) == 6 and plan.seeds == [1, 2]
    assert {p.changes["batch_size"] for p in plan.points} == {16, 32}
    assert plan.config(plan.points[0], 1).learning_rate == 1e-3
    with pytest.raises(ConfigError, match="--search tpe"):
        P.sweep_plan(tiny_base, P.parse_grid(["learning_rate=1e-4:1e-2"]), 1)
    with pytest.raises(ConfigError, match="batch_size"):
        P.sweep_plan(tiny_base, P.parse_grid(["batch_size=1000"]), 1)  # larger than buffer_size: invalid point
    env_with_colon = P.sweep_plan(tiny_base, P.parse_grid(["env_id=CartPole-v1,fault_envs:FlakyCartPole-v0"]), 1)
    assert [p.changes["env_id"] for p in env_with_colon.points] == ["CartPole-v1", "fault_envs:FlakyCartPole-v0"]


def test_an_env_without_a_solve_line_gets_a_table_of_scores_only(tiny_base, tmp_path):
    scores_only = tiny_base.updated(env_id="CartPole-v0", solved_return=None)  # v0 is not in presets.SOLVE_LINES
    assert P.ablation_plan(tiny_base, 1).solve_line == 12.0
    plan = P.ablation_plan(scores_only, 1, ["full"])
    assert plan.solve_line is None
    header, rows = R.table_rows(plan, R.summarize(plan, tmp_path))
    assert "solved" not in header and "env steps to solve" not in header and "final greedy return" in header
    assert "no solve line: scores only" in R.solved_definition(plan) and ">=" not in R.solved_definition(plan)
    with pytest.raises(ConfigError, match="steps_to_solve needs a solve line"):
        P.sweep_plan(scores_only, P.parse_grid(["batch_size=16"]), 1, metric="steps_to_solve")


def test_a_different_plan_in_the_same_dir_is_refused(tiny_base, tmp_path):
    P.prepare_dir(P.sweep_plan(tiny_base, P.parse_grid(["batch_size=16"]), 1), tmp_path)
    P.prepare_dir(P.sweep_plan(tiny_base, P.parse_grid(["batch_size=16"]), 1), tmp_path)  # the same: fine
    with pytest.raises(ConfigError, match="different experiment"):
        P.prepare_dir(P.sweep_plan(tiny_base, P.parse_grid(["batch_size=32"]), 1), tmp_path)


@pytest.mark.slow
def test_sweep_resumes_without_rerunning_and_report_rebuilds_the_same_table(tiny_base, tmp_path):
    out = tmp_path / "sweep"
    plan = P.sweep_plan(tiny_base, P.parse_grid(["learning_rate=1e-3,1e-2"]), seeds=1, metric="auc")
    assert X.execute(plan, out, BackendSpec(workers=2)) == 0
    results = {p.name: P.run_dir_of(out, p, 1) / P.RESULT_FILE for p in plan.points}
    stamps = {name: path.stat().st_mtime_ns for name, path in results.items()}

    assert X.execute(plan, out, BackendSpec(workers=1)) == 0
    assert {n: p.stat().st_mtime_ns for n, p in results.items()} == stamps  # nothing ran again

    first, second = plan.points
    results[first.name].unlink()  # as if that run had been stopped: only it runs again
    assert X.execute(plan, out, BackendSpec(workers=1)) == 0
    assert results[first.name].is_file() and results[second.name].stat().st_mtime_ns == stamps[second.name]

    markdown = R.report(out).markdown
    csv_text = (out / R.CSV_FILE).read_text()
    for name in (R.TABLE_FILE, R.CSV_FILE, R.BEST_FILE):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / R.TABLE_FILE).read_text() == markdown and (out / R.CSV_FILE).read_text() == csv_text
    rows = markdown.splitlines()[2:4]
    assert all(row.startswith(f"| {rank} |") for rank, row in enumerate(rows, 1))
    # the table is sorted by the metric: the first row's mean eval return is the higher median
    summaries = {s.point.name: s for s in R.summarize(plan, out)}
    best_name = min(summaries.values(), key=lambda s: R._sort_key(s, "auc")).point.name
    best = C.from_dict({k: v for k, v in C.load_yaml(out / R.BEST_FILE).items()})
    assert best == plan.config(next(p for p in plan.points if p.name == best_name), tiny_base.seed)
    assert json.dumps(best.learning_rate) in rows[0]


@pytest.mark.slow
def test_ablate_command_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "ablate"
    sets = [f"--set={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in TINY.items()]
    assert (
        main(["ablate", "--variants", "full,no-replay", "--seeds", "1", "--workers", "1", "--out", str(out), *sets])
        == 0
    )
    table = (out / R.TABLE_FILE).read_text()
    assert "| full DQN | " in table and "| no replay buffer | " in table and "mean return >= 12" in table
    assert (out / R.PLOT_FILE).stat().st_size > 10_000
    run = P.run_dir_of(out, P.Point("no replay buffer", {}), 1)
    saved = C.load_yaml(run / "config.yaml")
    assert saved["replay_buffer"] is False and saved["buffer_size"] == 1
    assert (run / P.RESULT_FILE).is_file() and list(run.glob("events.out.tfevents*"))  # a normal run dir
    header = table.splitlines()[0].split(" | ")
    row = next(line for line in table.splitlines() if line.startswith("| no replay buffer | ")).split(" | ")
    evals = [
        r["mean"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"
    ]
    assert row[header.index("final greedy return")].startswith(f"{evals[-1]:.1f}")
    assert row[header.index("best greedy return")].startswith(f"{max(evals):.1f}")
    assert read_best(run)[1] == max(evals), "the best column is the score of the run's best.pt"
    assert main(["ablate", "--resume", str(out)]) == 0  # all finished: nothing runs, same table
    assert (out / R.TABLE_FILE).read_text() == table


def test_report_on_a_dir_without_a_plan_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    assert "has no plan.json" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_command_writes_csv_and_a_best_config_that_trains(tmp_path):
    out = tmp_path / "sweep"
    sets = [f"--set={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in TINY.items()]
    assert (
        main(["sweep", "--grid", "hidden_sizes=[8],[4,4]", "--seeds", "1", "--workers", "1", "--out", str(out), *sets])
        == 0
    )
    header = (out / R.CSV_FILE).read_text().splitlines()[0]
    assert header.startswith("rank,hidden_sizes,solved")
    best = out / R.BEST_FILE
    assert (
        main(["train", "--config", str(best), "--run-dir", str(tmp_path / "again"), "--quiet", "--total-steps", "50"])
        == 0
    )
