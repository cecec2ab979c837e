"""best.pt: each evaluation that beats every earlier one keeps its network, so a run that falls back after its
peak still ends with its best policy; `fastdqn eval` evaluates it by default."""

from __future__ import annotations

import json

import pytest
import torch

import fastdqn
from fastdqn.checkpoint import BEST_FILE, list_checkpoints, load_checkpoint
from fastdqn.checkpointer import read_best
from fastdqn.cli import main
from fastdqn.trainer import Trainer
from small_runs import small_cfg

EVALS = dict(total_steps=3_000, eval_every=250, eval_episodes=3, checkpoint_every=1_000)


def records(run, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_best_pt_holds_the_best_evaluation_and_reproduces_its_score(tmp_path):
    result = fastdqn.train(small_cfg(**EVALS), tmp_path / "run", show_progress=False)
    run, evals = result.run_dir, result.evals
    means = [m for _, m, _ in evals]
    assert len(set(means)) > 2, "the evaluations differ, so picking the best is a real choice"
    best_index = means.index(max(means))  # the first of equal bests: a later one must beat it
    assert result.best_eval == evals[best_index] and read_best(run) == evals[best_index]
    saved = load_checkpoint(run / BEST_FILE)
    assert saved["counters"]["env_step"] == evals[best_index][0] and len(saved["eval"]["returns"]) == 3

    again = fastdqn.evaluate(run, episodes=3)  # the run's eval seeds and epsilon: the same episodes
    assert again.checkpoint == BEST_FILE and again.mean == pytest.approx(max(means))
    final = records(run, "eval")[-1]
    assert (final["mean"], final["best_mean"], final["best_step"]) == (means[-1], max(means), evals[best_index][0])
    assert result.summary()["best_eval_mean"] == max(means) and result.summary()["final_eval_mean"] == means[-1]


def test_eval_takes_best_by_default_last_or_a_file_on_request(tmp_path, capsys):
    run = fastdqn.train(small_cfg(**EVALS), tmp_path / "run", show_progress=False).run_dir
    newest = list_checkpoints(run)[-1]
    for flags, expected in (
        ([], BEST_FILE),
        (["--checkpoint", "best"], BEST_FILE),
        (["--checkpoint", "last"], newest.name),
        (["--checkpoint", str(newest)], newest.name),
    ):
        assert main(["eval", str(run), "--episodes", "1", *flags]) == 0
        assert json.loads((run / "eval.json").read_text())["checkpoint"] == expected
    assert main(["eval", str(run / BEST_FILE), "--episodes", "1", "--checkpoint", "last"]) == 2
    assert "is a checkpoint file already" in capsys.readouterr().err
    assert main(["eval", str(run), "--checkpoint", str(run / "nope.pt")]) == 2


def test_a_kill_while_writing_best_leaves_the_previous_one(tmp_path, monkeypatch):
    run = fastdqn.train(small_cfg(**EVALS), tmp_path / "run", show_progress=False).run_dir
    before = (run / BEST_FILE).read_bytes()
    trainer = Trainer(small_cfg(**EVALS), tmp_path / "other", show_progress=False)
    trainer.evaluator.evals.append((5, 1e9, 0.0))
    assert trainer.evaluator.newest_is_best()
    trainer.checkpoints.run_dir = run

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a best.pt")
        raise KeyboardInterrupt  # as a signal would, mid-write

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpoints.save_best([1e9])
    trainer.close()
    assert (run / BEST_FILE).read_bytes() == before and not list(run.glob(".ckpt-*.tmp"))


def test_a_resumed_run_keeps_a_best_pt_written_after_its_checkpoint(tmp_path):
    """Killed after an evaluation wrote best.pt but before the next checkpoint: the resumed run re-evaluates
    from the checkpoint and must only replace best.pt with a better one."""
    run = tmp_path / "run"
    fastdqn.train(small_cfg(**{**EVALS, "total_steps": 1_000}), run, show_progress=False)
    best = load_checkpoint(run / BEST_FILE)
    best["eval"]["mean"] = 1e9  # stands for an evaluation after the checkpoint that nothing later beats
    torch.save(best, run / BEST_FILE)
    resumed = fastdqn.train(small_cfg(**EVALS), run, resume=True, show_progress=False)
    assert resumed.best_eval[1] == 1e9 and load_checkpoint(run / BEST_FILE)["eval"]["mean"] == 1e9
    assert max(m for _, m, _ in resumed.evals) < 1e9
