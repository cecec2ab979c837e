"""benchmarks/learning.py: the classic-control configs it runs, the SB3 translation of a config, and its pages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gymnasium as gym
import pytest

from fastdqn.config import Config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("learning_bench", ROOT / "benchmarks" / "learning.py")
learning = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning)


@pytest.mark.parametrize("name", sorted(learning.ENVS))
def test_each_env_has_a_shipped_config_with_the_envs_solve_line(name):
    cfg = learning.env_config(name)
    assert cfg.device == "cpu" and cfg.torch_threads == 1
    assert cfg.solve_line is not None  # the classic-control envs all have one (presets.SOLVE_LINES)
    assert cfg.total_steps <= learning.ENVS[name]["zoo_steps"]  # compared with rl-zoo at no larger budget
    env = gym.make(cfg.env_id)  # LunarLander needs the box2d extra, which dev installs
    assert env.action_space.n >= 2
    env.close()


def test_sb3_hyperparams_translate_the_config_and_name_what_sb3_lacks():
    cfg = Config(
        env_id="Acrobot-v1",
        num_envs=1,
        total_steps=100_000,
        epsilon_decay_steps=12_000,
        train_every=4,
        gradient_steps=4,
        double_dqn=False,
        n_step=1,
        lr_schedule="linear",
        lr_end=1e-5,
    )
    params, unmatched = learning.sb3_hyperparams(cfg)
    assert params["train_freq"] == 4 and params["gradient_steps"] == 4
    assert params["exploration_fraction"] == pytest.approx(0.12) and params["learning_rate_end"] == 1e-5
    assert params["net_arch"] == cfg.hidden_sizes and unmatched == []
    _, unmatched = learning.sb3_hyperparams(cfg.updated(double_dqn=True, n_step=3, num_envs=4))
    assert unmatched[:2] == ["double_dqn=true", "n_step=3"] and unmatched[2].startswith("num_envs=4")


def test_the_env_page_and_index_compare_with_rl_zoo_and_sb3():
    runs = [
        {
            "seed": s,
            "final_eval": f,
            "best_eval": f + 5,
            "env_steps": 100_000,
            "wall_time": w,
            "load_after": 1.0,
            "evals": [[50_000, f - 10], [100_000, f]],
        }
        for s, f, w in ((1, -80.0, 60.0), (2, -70.0, 70.0), (3, -75.0, 65.0))
    ]
    record = {
        "env": "acrobot",
        "env_id": "Acrobot-v1",
        "config": "configs/acrobot.yaml",
        "solve_line": -100.0,
        "rl_zoo": {"env_id": "Acrobot-v1", "mean_return": -76.6, "env_steps": 100_000},
        "machine": "x",
        "date": "d",
        "fastdqn": {"runs": runs, "final_median": -75.0, "best_median": -70.0, "wall_time_median": 65.0},
        "sb3": {"runs": runs[:1], "final_median": -80.0, "wall_time_median": 260.0, "unmatched": ["n_step=3"]},
    }
    page = learning.markdown(record)
    assert page.count("| fastdqn |") == 3 and page.count("| SB3 DQN |") == 1
    assert "median final eval -75.0 over 3 seeds (at or above rl-zoo's score), median best eval -70.0" in page
    assert "0.25x SB3's" in page and "differ in: n_step=3" in page
    assert (
        "| [Acrobot-v1](acrobot.md) | -76.6 at 100k | -75.0 | -70.0 | 3 | -80.0 (1 seed) | 65.0 / 260.0 = 0.25x | "
        "- / - |" in learning.index([record])
    )
    record["fastdqn"]["cpu_time_median"], record["sb3"]["cpu_time_median"] = 50.0, 200.0
    assert "| 65.0 / 260.0 = 0.25x | 50.0 / 200.0 = 0.25x |" in learning.index([record])


def test_more_seeds_join_the_envs_experiment_but_another_config_does_not(tmp_path):
    from fastdqn.plans import load_plan, prepare_dir

    prepare_dir(learning.env_plan("acrobot", [1], {}, tmp_path), tmp_path)
    assert learning.env_plan("acrobot", [3, 2], {}, tmp_path).seeds == [1, 2, 3]
    assert load_plan(tmp_path).seeds == [1, 2, 3]  # written, so the runner sees the same plan
    variant = learning.env_plan("acrobot", [4], {"num_envs": "1"}, tmp_path)
    assert variant.seeds == [4] and load_plan(tmp_path).seeds == [1, 2, 3]  # left to the runner to refuse


def test_a_variant_has_its_own_dir_and_a_line_on_the_envs_page():
    assert (
        learning.variant_dir("mountaincar", {"num_envs": "16", "gamma": "0.99"}) == "mountaincar+gamma=0.99+num_envs=16"
    )
    assert learning.env_config("mountaincar", {"num_envs": "16"}).num_envs == 16
    run = {
        "seed": 1,
        "final_eval": -200.0,
        "best_eval": -190.0,
        "env_steps": 120_000,
        "wall_time": 300.0,
        "load_after": 1.0,
        "evals": [[120_000, -200.0]],
    }
    record = {
        "env": "mountaincar",
        "env_id": "MountainCar-v0",
        "config": "configs/mountaincar.yaml",
        "solve_line": -110.0,
        "rl_zoo": {"env_id": "MountainCar-v0", "mean_return": -100.8, "env_steps": 120_000},
        "machine": "x",
        "date": "d",
        "fastdqn": {"runs": [], "final_median": None, "wall_time_median": None},
        "sb3": {"runs": [], "final_median": None, "wall_time_median": None, "unmatched": []},
    }
    variant = {
        **record,
        "dir": "mountaincar+num_envs=16",
        "changes": {"num_envs": 16},
        "fastdqn": {"runs": [run], "final_median": -200.0, "wall_time_median": 300.0},
    }
    assert (
        "- Variant `--set num_envs=16` (1 seed: seed 1 final -200.0, best -190.0): "
        "`benchmarks/results/learning-mountaincar+num_envs=16.json`."
    ) in learning.markdown(record, [variant])


def test_the_load_is_stamped_on_every_finished_run_and_its_own_cpu_time_kept(tmp_path):
    import json

    from fastdqn.plans import run_dir_of

    plan = learning.env_plan("acrobot", [1, 2], {}, tmp_path)
    run_dir = run_dir_of(tmp_path, plan.points[0], 1)
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"wall_time": 1.0, "cpu_time": 12.5}))
    learning.stamp_load(tmp_path, plan)  # seed 2 has not finished: nothing to stamp
    result = json.loads((run_dir / "result.json").read_text())
    assert result["cpu_time"] == 12.5 and result["load_after"] >= 0
