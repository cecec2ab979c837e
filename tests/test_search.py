"""Optuna searches: the search space, the samplers (TPE beats random on a toy objective), the evaluation hook a
pruner uses, a pruned run, and a searched sweep that is stopped, resumed and reported."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import optuna
import pytest

from fastdqn import api
from fastdqn import experiments as X
from fastdqn import plans as P
from fastdqn import reports as R
from fastdqn import search as S
from fastdqn.backends import BackendSpec
from fastdqn.checkpoint import checkpoint_path, list_checkpoints
from fastdqn.cli import main
from fastdqn.config import Config, load_yaml
from fastdqn.errors import ConfigError
from small_runs import small_cfg

# CartPole that learns within 1,000 env steps with a good learning rate (greedy return ~100 at step 1,000 with
# seed 2) and not at all with a tiny one (~9): a run that is clearly worse by its second evaluation.
LEARNS = dict(
    env_id="CartPole-v1",
    num_envs=1,
    vector_mode="native",
    device="cpu",
    seed=2,
    total_steps=1500,
    learning_starts=300,
    buffer_size=2000,
    batch_size=64,
    train_every=1,
    gradient_steps=1,
    hidden_sizes=[64],
    target_update_interval=100,
    epsilon_decay_steps=1000,
    eval_every=500,
    eval_episodes=3,
    log_every=500,
    checkpoint_every=0,
)


def test_search_space_takes_log_ranges_integer_ranges_and_listed_values():
    dists = S.distributions(
        P.parse_grid(
            [
                "learning_rate=1e-5:1e-2",
                "batch_size=int:16:128",
                "gamma=-0.5:0.5",
                "hidden_sizes=[64],[64,64]",
                "buffer_size=1000:100000",
            ]
        )
    )
    assert dists["learning_rate"] == optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    assert dists["batch_size"] == optuna.distributions.IntDistribution(16, 128)
    assert dists["gamma"] == optuna.distributions.FloatDistribution(-0.5, 0.5)  # lo <= 0: uniform
    assert dists["buffer_size"] == optuna.distributions.IntDistribution(1000, 100000, log=True)  # an int key
    assert dists["hidden_sizes"].choices == ("[64]", "[64,64]")
    assert S.changes_of({"hidden_sizes": "[64,64]", "batch_size": 32}) == {"hidden_sizes": [64, 64], "batch_size": 32}


@pytest.mark.parametrize(
    "items,search,trials,message",
    [
        (["learning_rate=int:1:3"], "tpe", 5, "int:lo:hi is for integer keys"),
        (["learning_rate=1e-2:1e-4"], "tpe", 5, "lo < hi"),
        (["learning_rate=1e-4:1e-2"], "grid", None, "--search grid takes listed values"),
        (["learning_rate=1e-4:1e-2"], "tpe", None, "needs --trials"),
        (["batch_size=int:16:100000"], "random", 5, "batch_size"),  # the high end is larger than buffer_size
        (["loss=huber,nope"], "random", 5, "loss"),
    ],
)
def test_search_plan_refuses_a_space_it_cannot_search(items, search, trials, message):
    with pytest.raises(ConfigError, match=message):
        S.search_plan(small_cfg(), P.parse_grid(items), search, trials)


def test_grid_search_defaults_to_every_point():
    plan = S.search_plan(small_cfg(), P.parse_grid(["batch_size=16,32", "loss=huber,mse"]), "grid", None)
    assert plan.search.trials == 4 and plan.seeds == [small_cfg().seed] and plan.points == []
    assert P.Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def trials_to_reach(sampler: str, seed: int, budget: int = 40) -> int:
    """Trials a sampler needs to find the good region of a toy objective (budget + 1: never found)."""
    space = P.parse_grid(["learning_rate=1e-6:1e-1", "batch_size=int:16:512", "gamma=0.9,0.95,0.99,0.999"])
    study = optuna.create_study(
        direction="maximize", sampler=S.make_sampler(P.Search(sampler, space, budget, seed=seed))
    )
    dists = S.distributions(space)
    for n in range(1, budget + 1):
        trial = study.ask(dists)
        p = S.changes_of(trial.params)
        value = (
            -((math.log10(p["learning_rate"]) + 2.5) ** 2)
            - ((p["batch_size"] - 300) / 150) ** 2
            - (p["gamma"] != 0.99) * 0.5
        )
        study.tell(trial, value)
        if value >= -0.25:
            return n
    return budget + 1


def test_tpe_finds_the_good_region_of_a_toy_objective_faster_than_random():
    tpe = [trials_to_reach("tpe", seed) for seed in range(5)]
    random = [trials_to_reach("random", seed) for seed in range(5)]
    assert max(tpe) <= 40, tpe  # TPE always finds it
    assert sum(tpe) < 0.75 * sum(random), (tpe, random)


def test_parameter_importances_appear_once_enough_trials_finished(tmp_path):
    plan = S.search_plan(small_cfg(), P.parse_grid(["learning_rate=1e-5:1e-1", "batch_size=16,32"]), "random", 9)
    P.prepare_dir(plan, tmp_path)
    study, dists = S.open_study(plan, tmp_path), S.distributions(plan.search.space)
    for _ in range(S.IMPORTANCE_MIN_TRIALS):
        assert "Parameter importance: after" in R.importance_markdown(plan, tmp_path)
        trial = study.ask(dists)
        study.tell(trial, -abs(math.log10(trial.params["learning_rate"]) + 3))  # only the learning rate matters
    values, finished = S.importances(plan, tmp_path)
    assert finished == S.IMPORTANCE_MIN_TRIALS and set(values) == {"learning_rate", "batch_size"}
    assert values["learning_rate"] > values["batch_size"] and math.isclose(sum(values.values()), 1.0)
    assert "| learning_rate | " in R.importance_markdown(plan, tmp_path)


def test_on_eval_stops_the_run_like_ctrl_c_and_it_resumes(tmp_path):
    seen = []

    def on_eval(step: int, mean: float) -> bool:
        seen.append(step)
        return step >= 200

    cfg = small_cfg(eval_every=100, eval_episodes=1, total_steps=400)
    stopped = api.train(cfg, tmp_path / "run", show_progress=False, on_eval=on_eval)
    assert seen == [100, 200] and stopped.interrupted and stopped.stopped_early and stopped.env_steps == 200
    assert list_checkpoints(tmp_path / "run") == [checkpoint_path(tmp_path / "run", 200)]
    assert stopped.summary()["stopped_early"] is True
    finished = api.train(None, tmp_path / "run", resume=True, show_progress=False)
    assert not finished.interrupted and finished.env_steps == 400


@pytest.mark.slow
def test_the_median_pruner_stops_a_run_that_is_clearly_worse(tmp_path):
    out = tmp_path / "search"
    plan = S.search_plan(
        Config(**LEARNS), P.parse_grid(["learning_rate=1e-8:1e-2"]), "tpe", 3, pruner="median", startup_trials=2
    )
    P.prepare_dir(plan, out)
    study = S.open_study(plan, out)
    for lr in (2.5e-3, 1.5e-3, 1e-7):  # two that learn, then one that does not: fixed, not sampled
        study.enqueue_trial({"learning_rate": lr})
    assert X.execute(plan, out, BackendSpec(workers=1)) == 0
    states = [t.state.name for t in S.open_study(plan, out).get_trials()]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    bad = P.run_dir_of(out, S.trial_point(2, {"learning_rate": 1e-7}), plan.seeds[0])
    result = json.loads((bad / P.RESULT_FILE).read_text())
    step = result["env_steps"]
    assert result["pruned"] and step in (500, 1000)  # at an evaluation after the warm-up quarter, before the end
    assert list_checkpoints(bad) == [checkpoint_path(bad, step)]  # kept: it can be resumed
    table = (out / R.TABLE_FILE).read_text()
    assert f"| 3 | 2 | 1e-07 | pruned at {step:,} |" in table and "the median pruner stopped 1" in table
    best = Config(**load_yaml(out / R.BEST_FILE))
    assert best.learning_rate == study.best_trial.params["learning_rate"] == 2.5e-3


@pytest.mark.slow
def test_a_stopped_search_resumes_its_running_trial_and_reports_every_trial(tmp_path):
    out = tmp_path / "search"
    base = small_cfg(total_steps=600, checkpoint_every=100, eval_every=200, eval_episodes=1, save_replay=True)
    plan = S.search_plan(
        base, P.parse_grid(["learning_rate=1e-4:1e-2", "batch_size=16,32"]), "random", 3, pruner="none", seed=3
    )

    def ctrl_c_once_trial_1_has_a_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(list_checkpoints(d) for d in out.glob("trial-1/seed-*") if d.is_dir()):
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the run in this process saves and stops
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=ctrl_c_once_trial_1_has_a_checkpoint, daemon=True)
    watcher.start()
    assert X.execute(plan, out, BackendSpec(workers=1)) == 130
    watcher.join()
    study = S.open_study(plan, out)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "RUNNING"]
    first = P.run_dir_of(out, S.trial_point(0, study.trials[0].params), base.seed) / P.RESULT_FILE
    stamp = first.stat().st_mtime_ns

    assert main(["sweep", "--resume", str(out), "--workers", "1"]) == 0
    study = S.open_study(plan, out)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3
    assert first.stat().st_mtime_ns == stamp  # not trained again
    resumed = P.run_dir_of(out, S.trial_point(1, study.trials[1].params), base.seed)
    assert len(list(resumed.glob("events.out.tfevents*"))) == 2  # went on from its checkpoint, not from scratch
    header, *rows = (out / R.CSV_FILE).read_text().splitlines()
    assert header.startswith("rank,trial,learning_rate,batch_size,status,solved") and len(rows) == 3
    assert all(",done," in row for row in rows)
    assert "Parameter importance: after 5 finished trials" in (out / R.TABLE_FILE).read_text()
