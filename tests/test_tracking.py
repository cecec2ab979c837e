"""`--track`: W&B runs in offline mode (nothing leaves the machine), read back from the files W&B wrote; and the
one-line error for each extra that is not installed."""

from __future__ import annotations

import json
import sys

import pytest

from fastdqn import plans as P
from fastdqn.cli import main
from fastdqn.tracking import ID_FILE
from small_runs import small_flags
from wandb_records import offline_runs


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_track_sends_config_scalars_and_result_to_an_offline_wandb_run(tmp_path, wandb_offline, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--track",
                "--wandb-project",
                "dqn-tests",
                "--wandb-group",
                "g1",
                "--run-dir",
                str(run_dir),
                "--quiet",
                *small_flags(eval_every=200, eval_episodes=2, learning_rate=3e-4),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    [run] = offline_runs(run_dir)  # in the run dir, as no WANDB_DIR is set
    assert (run.project, run.group, run.name, run.job_type) == ("dqn-tests", "g1", "run", "train")
    assert run.run_id == (run_dir / ID_FILE).read_text().strip()
    assert run.config["learning_rate"] == 3e-4 and run.config["total_steps"] == 400
    evals = [(h["global_step"], h["eval/mean_return"]) for h in run.history if "eval/mean_return" in h]
    assert evals == [(r["step"], r["mean"]) for r in metrics(run_dir) if r["kind"] == "eval"]  # the same numbers
    logged = {key for h in run.history for key in h}
    assert {"charts/episodic_return", "charts/SPS", "charts/epsilon", "losses/loss"} <= logged
    assert run.summary["final_eval_mean"] == result["final_eval_mean"] and run.summary["env_steps"] == 400
    assert run.summary["stopped_early"] is False and run.exit_code == 0


def test_a_resumed_run_goes_on_in_the_same_wandb_run(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    run_dir = tmp_path / "run"
    assert main(["train", "--track", "--run-dir", str(run_dir), "--quiet", *small_flags(total_steps=200)]) == 0
    assert main(["train", "--track", "--resume", str(run_dir), "--quiet", "--total-steps", "400"]) == 0
    first, second = offline_runs(tmp_path / "wandb-dir")
    assert first.run_id == second.run_id == (run_dir / ID_FILE).read_text().strip()
    assert max(h["global_step"] for h in second.history) == 400 and second.summary["env_steps"] == 400


@pytest.mark.slow
def test_sweep_track_makes_one_wandb_run_per_run_grouped_by_the_study(tmp_path, wandb_offline):
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--track",
                "--grid",
                "learning_rate=1e-3,3e-4",
                "--seeds",
                "1",
                "--workers",
                "1",
                "--out",
                str(out),
                *small_flags(total_steps=200),
            ]
        )
        == 0
    )
    runs = offline_runs(out)
    assert sorted(r.name for r in runs) == ["sweep/learning_rate=0.0003/seed-1", "sweep/learning_rate=0.001/seed-1"]
    assert {r.group for r in runs} == {"sweep"} and {r.job_type for r in runs} == {"sweep"}
    for run in runs:
        assert run.config["point"] == f"learning_rate={json.dumps(run.config['learning_rate'])}"
        point = P.Point(run.config["point"], {})
        assert (
            run.summary["final_eval_mean"]
            == json.loads((P.run_dir_of(out, point, 1) / P.RESULT_FILE).read_text())["final_eval_mean"]
        )


@pytest.mark.parametrize(
    "module,argv,extra",
    [
        ("wandb", ["train", "--track"], "wandb"),
        ("ray", ["sweep", "--grid", "batch_size=16", "--backend", "ray"], "ray"),
        ("optuna", ["sweep", "--grid", "learning_rate=1e-4:1e-2", "--search", "tpe", "--trials", "2"], "optuna"),
    ],
)
def test_a_missing_extra_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys, module, argv, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    monkeypatch.chdir(tmp_path)
    assert main([*argv, *small_flags()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pip install 'fastdqn[{extra}]'" in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written
