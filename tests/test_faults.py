"""Faults: SIGKILL at random moments, SIGINT and SIGTERM, an env that raises, a diverging loss, no compiler.

The signal tests drive real `fastdqn train` subprocesses on CartPole and check that, after every stop, the run
resumes and finishes with exactly the weights of a run that was never stopped (replay saved, one CPU thread).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compile_checks import assert_not_compiled
from fastdqn.checkpoint import list_checkpoints, load_checkpoint
from fastdqn.cli import main
from fastdqn.config import Config
from fastdqn.errors import DeviceError, TrainingDiverged
from fastdqn.faults import EnvFailure
from fastdqn.logs import keep_records_up_to
from fastdqn.trainer import Trainer
from small_runs import small_cfg, small_flags

TESTS = Path(__file__).resolve().parent
TOTAL = 2_000
RUN = dict(total_steps=TOTAL, eval_episodes=2, checkpoint_every=100, save_replay=True)
RUN_FLAGS = [*small_flags(**RUN), "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final online-network weights of the run that is never stopped."""
    trainer = Trainer(small_cfg(**RUN), tmp_path_factory.mktemp("reference"), show_progress=False)
    trainer.run()
    return {k: v.clone() for k, v in trainer.learner.q.state_dict().items()}


def start(run_dir: Path, resume: bool) -> subprocess.Popen:
    args = ["--resume", str(run_dir)] if resume else ["--run-dir", str(run_dir)]
    return subprocess.Popen(
        [sys.executable, "-m", "fastdqn.cli", "train", *args, *RUN_FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return int(found[-1].stem.split("-")[1]) if found else -1


def wait_for_progress(proc: subprocess.Popen, run_dir: Path, after: int, timeout: float = 120.0) -> None:
    """Until a checkpoint newer than `after` exists (or the process ends)."""
    deadline = time.monotonic() + timeout
    while newest_step(run_dir) <= after and proc.poll() is None:
        assert time.monotonic() < deadline, "no new checkpoint in time"
        time.sleep(0.05)


def assert_finished_like_reference(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints and newest_step(run_dir) == TOTAL
    for path in checkpoints:  # every checkpoint left on disk loads (weights_only)
        load_checkpoint(path)
    assert not list(run_dir.glob(".ckpt-*.tmp"))
    final = load_checkpoint(checkpoints[-1])["learner"]["q"]
    for name, value in reference.items():
        assert torch.equal(final[name], value), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(100, TOTAL + 1, 100))  # no duplicates from resumes, no cut-off lines


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_run_that_resumes_and_finishes_exactly(tmp_path, reference):
    rng = random.Random(6)
    run_dir = tmp_path / "run"
    reached = -1
    for kill in range(3):
        proc = start(run_dir, resume=kill > 0)
        # A random checkpoint 1-3 ahead, then a random fraction of a second: mid-step or mid-write, on any
        # machine speed, while bounding the progress of each attempt so that all kills land before the end.
        wait_for_progress(proc, run_dir, reached + 100 * rng.randint(0, 2))
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        reached = newest_step(run_dir)
        assert 0 < reached < TOTAL, f"kill {kill} came too late to test anything ({reached})"
        for path in list_checkpoints(run_dir):
            load_checkpoint(path)
    proc = start(run_dir, resume=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["env_steps"] == TOTAL
    assert_finished_like_reference(run_dir, reference)


@pytest.mark.slow
def test_sigint_and_sigterm_checkpoint_exit_0_and_resume_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    reached = -1
    for n, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
        proc = start(run_dir, resume=n > 0)
        wait_for_progress(proc, run_dir, reached)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["interrupted"] and result["env_steps"] < TOTAL
        assert f"Resume with: fastdqn train --resume {run_dir}" in " ".join(err.split())
        assert newest_step(run_dir) == result["env_steps"]  # the checkpoint of the step it stopped at
        reached = result["env_steps"]
    proc = start(run_dir, resume=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert_finished_like_reference(run_dir, reference)


def test_sigterm_during_the_final_evaluation_lets_it_and_the_final_checkpoint_finish(tmp_path, monkeypatch):
    trainer = Trainer(small_cfg(total_steps=200), tmp_path, show_progress=False)
    evaluate = trainer.evaluator.evaluate

    def terminated_meanwhile(step: int):
        os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(step)

    def default_handler(*_):
        raise AssertionError("SIGTERM reached the handler outside the trainer, which would end the process")

    monkeypatch.setattr(trainer.evaluator, "evaluate", terminated_meanwhile)
    previous = signal.signal(signal.SIGTERM, default_handler)
    try:
        result = trainer.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not result.interrupted and result.env_steps == 200
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["counters"]["env_step"] == 200


def flaky_cfg(**changes) -> Config:
    import fault_envs  # noqa: F401  (registers the envs in this process)

    return small_cfg(env_id="fault_envs:FlakyCartPole-v0", num_envs=2, **changes)


def test_env_that_raises_is_reported_by_index_and_the_run_checkpointed(tmp_path):
    trainer = Trainer(flaky_cfg(), tmp_path, show_progress=False)
    with pytest.raises(
        EnvFailure,
        match=r"env 1 \(fault_envs:FlakyCartPole-v0\) raised RuntimeError: simulator "
        r"lost contact.* in step.*env_restarts.*checkpoint .* saved at env step 298",
    ):
        trainer.run()
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["counters"]["env_step"] == 298


def test_env_that_raises_is_rebuilt_when_configured(tmp_path):
    trainer = Trainer(flaky_cfg(env_restarts=2), tmp_path, show_progress=False)
    result = trainer.run()
    assert result.env_steps == 400 and not result.interrupted
    assert [env.restarts.left for env in trainer.envs.envs] == [2, 1]  # env 1 crashed once and was rebuilt


def diverging_cfg(**changes) -> Config:
    import fault_envs  # noqa: F401

    return small_cfg(env_id="fault_envs:InfRewardCartPole-v0", learning_starts=50, log_every=50, **changes)


def test_nonfinite_loss_stops_with_a_checkpoint_of_the_last_finite_state(tmp_path):
    trainer = Trainer(diverging_cfg(), tmp_path, show_progress=False)
    with pytest.raises(TrainingDiverged) as caught:
        trainer.run()
    message = str(caught.value)
    assert "became non-finite between env steps 100 and 150" in message
    assert "learning_rate" in message and "reward scale" in message and "--resume" in message
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["counters"]["env_step"] == 150
    tensors = [
        *state["learner"]["q"].values(),
        *[v for s in state["learner"]["optimizer"]["state"].values() for v in s.values()],
    ]
    assert all(torch.isfinite(t).all() for t in tensors)


def test_diverged_run_exits_3_through_the_cli(tmp_path, capsys):
    import fault_envs  # noqa: F401

    code = main(
        [
            "train",
            "--run-dir",
            str(tmp_path / "run"),
            "--quiet",
            *small_flags(env_id="fault_envs:InfRewardCartPole-v0", total_steps=300, learning_starts=50, log_every=50),
        ]
    )
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fastdqn: error: training diverged: loss=inf")


def test_nonfinite_skips_roll_back_and_go_on(tmp_path):
    trainer = Trainer(diverging_cfg(nonfinite_skips=50), tmp_path, show_progress=False)
    result = trainer.run()
    assert result.env_steps == 400 and trainer.counters.nonfinite_skips >= 2
    assert all(torch.isfinite(p).all() for p in trainer.learner.q.parameters())
    assert math.isfinite(result.final_eval_mean)


@pytest.fixture
def no_cpp_compiler():
    """Make inductor's compiler search fail, as on a machine without g++ (through torch's own config patch)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search

    cpp_compiler_search.cache_clear()
    with inductor_config.patch({"cpp.cxx": (os.devnull + "/g++",)}):
        yield
    cpp_compiler_search.cache_clear()


def test_compile_without_a_compiler_falls_back_to_eager_with_a_warning(tmp_path, no_cpp_compiler, capsys):
    with assert_not_compiled():
        trainer = Trainer(small_cfg(compile=True), tmp_path, show_progress=False)
        result = trainer.run()
    assert "no working compiler" in capsys.readouterr().err
    assert result.updates > 0 and all(torch.isfinite(p).all() for p in trainer.learner.q.parameters())
    assert trainer.cfg.compile  # the run's own config keeps what the user asked for


def test_compile_strict_without_a_compiler_is_an_error(tmp_path, no_cpp_compiler):
    with pytest.raises(DeviceError, match="no working compiler.*drop compile_strict"):
        Trainer(small_cfg(compile=True, compile_strict=True), tmp_path, show_progress=False)


def test_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *RUN_FLAGS, "--total-steps", "200"]) == 0
    first = load_checkpoint(list_checkpoints(run_dir)[-1])["learner"]["q"]
    for path in list_checkpoints(run_dir):  # as if killed right after writing config.yaml
        path.unlink()
    (run_dir / ".ckpt-x.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert "no checkpoint yet: training it again from env step 0" in " ".join(capsys.readouterr().err.split())
    again = load_checkpoint(list_checkpoints(run_dir)[-1])["learner"]["q"]
    assert all(torch.equal(again[k], v) for k, v in first.items())
    assert not list(run_dir.glob(".ckpt-*.tmp"))


def test_resumed_logs_drop_records_after_the_checkpoint_and_a_cut_off_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"kind": "train", "step": 100}\n{"kind": "eval", "step": 200}\n{"kind": "train", "step": 300}\n'
        '{"kind": "train", "st'
    )
    keep_records_up_to(path, 200)
    assert path.read_text() == '{"kind": "train", "step": 100}\n{"kind": "eval", "step": 200}\n'


@pytest.mark.slow
def test_async_env_failure_is_one_line_through_the_cli_with_a_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastdqn.cli",
            "train",
            "--run-dir",
            str(tmp_path / "run"),
            "--quiet",
            *small_flags(
                env_id="fault_envs:FlakyCartPole-v0",
                num_envs=2,
                vector_mode="async",
                total_steps=600,
                checkpoint_every=100,
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fastdqn: error: env 1 (fault_envs:FlakyCartPole-v0) raised RuntimeError")
    assert "checkpoint ckpt-000000000298.pt saved" in last
    assert load_checkpoint(tmp_path / "run" / "ckpt-000000000298.pt")["counters"]["env_step"] == 298


def test_rollback_restores_the_snapshot_into_the_same_tensors():
    from fastdqn.faults import FiniteGuard
    from fastdqn.learner import DQNLearner
    from fastdqn.replay import ReplayBuffer
    from fastdqn.update_runner import UpdateRunner

    learner = DQNLearner(small_cfg(), (4,), 2, torch.device("cpu"))
    replay = ReplayBuffer(64, 1, (4,), torch.float32, torch.device("cpu"))
    for _ in range(64):
        replay.add(
            torch.randn(1, 4),
            torch.zeros(1, dtype=torch.int64),
            torch.ones(1),
            torch.randn(1, 4),
            torch.zeros(1),
            torch.zeros(1),
        )
    updates = UpdateRunner(learner, replay)
    updates.update(replay.sample(16))
    guard = FiniteGuard(learner)
    guard.commit(100)
    before = {k: v.clone() for k, v in learner.q.state_dict().items()}
    weight = learner.q.state_dict()["net.0.weight"].data_ptr()
    updates.update(replay.sample(16))
    with torch.no_grad():
        next(learner.q.parameters()).fill_(float("nan"))
    assert not guard.is_finite({})
    guard.rollback()
    assert guard.is_finite({"loss": 1.0})
    assert all(torch.equal(learner.q.state_dict()[k], v) for k, v in before.items())
    assert learner.q.state_dict()["net.0.weight"].data_ptr() == weight  # same storage, updated in place


def test_resuming_a_finished_run_says_how_to_extend_it_and_extending_works(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), *RUN_FLAGS, "--total-steps", "200"]) == 0
    final = load_checkpoint(list_checkpoints(run_dir)[-1])
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0  # finishes again: nothing trained, same state
    assert "already reached total_steps=200: evaluating it again; pass a larger --total-steps" in " ".join(
        capsys.readouterr().err.split()
    )
    again = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert again["counters"] == final["counters"]
    assert all(torch.equal(again["learner"]["q"][k], v) for k, v in final["learner"]["q"].items())
    assert main(["train", "--resume", str(run_dir), "--total-steps", "300", "--quiet"]) == 0
    assert load_checkpoint(list_checkpoints(run_dir)[-1])["counters"]["env_step"] == 300
