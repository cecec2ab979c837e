"""Async env workers that die (SIGKILL as from the OOM killer, a segfault, an exit) or hang are noticed within
seconds: the run checkpoints and stops with one line naming the env and how it died, or, with env_restarts, the
worker is started again on a fresh seeded episode and the run goes on. The surviving workers print nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import fault_envs  # noqa: F401  (registers the envs, also in the forked workers)
from fastdqn.checkpoint import list_checkpoints, load_checkpoint
from fastdqn.envs import make_vector_env
from fastdqn.faults import EnvFailure
from small_runs import small_cfg, small_flags

TESTS = Path(__file__).resolve().parent
ASYNC = dict(num_envs=4, vector_mode="async", checkpoint_every=200)


def start(run: Path, **changes) -> subprocess.Popen:
    """`fastdqn train` with 4 async envs, in its own process group (as a shell runs a command)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastdqn.cli",
            "train",
            "--run-dir",
            str(run),
            "--quiet",
            *small_flags(**{**ASYNC, **changes}),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def workers(pid: int) -> list[int]:
    """The trainer's worker processes, in the order they were started (env 0 first)."""
    kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return sorted(kids, key=lambda k: (int(Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[19]), k))


def signal_a_worker_after_the_first_checkpoint(proc: subprocess.Popen, run: Path, sig: int) -> list[int]:
    """Send `sig` to env 1's worker once the run has a checkpoint; returns the pids of all its workers."""
    deadline = time.monotonic() + 120
    while not list_checkpoints(run):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    pids = workers(proc.pid)
    assert len(pids) == 4, pids
    os.kill(pids[1], sig)
    return pids


def finish(proc: subprocess.Popen, within: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the trainer was still running {within:g} s after its env worker died") from None


def test_killed_worker_stops_the_run_in_one_line_with_a_checkpoint_and_no_tracebacks(tmp_path):
    run = tmp_path / "run"
    proc = start(run, total_steps=10_000_000)
    pids = signal_a_worker_after_the_first_checkpoint(proc, run, signal.SIGKILL)
    _, err = finish(proc, within=60)
    assert proc.returncode == 2, err
    for noise in ("Traceback", "BrokenPipeError", "ConnectionResetError", "EOFError"):
        assert noise not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "fastdqn: error: env 1 (CartPole-v1) worker process was killed by SIGKILL (as the "
        "kernel's OOM killer does: check `dmesg`) in step: fix the env, or set env_restarts > 0"
    ), last
    step = int(last.split("saved at env step ")[1].split(",")[0])
    assert f"resume with: fastdqn train --resume {run}" in last
    assert load_checkpoint(list_checkpoints(run)[-1])["counters"]["env_step"] == step
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # the survivors were closed, not orphaned


def test_killed_worker_is_restarted_with_env_restarts_and_the_run_finishes(tmp_path):
    run = tmp_path / "run"
    proc = start(run, total_steps=3_000, env_restarts=1)
    signal_a_worker_after_the_first_checkpoint(proc, run, signal.SIGKILL)
    out, err = finish(proc, within=240)
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["env_steps"] == 3_000
    flat = " ".join(err.split())
    assert (
        "warning: env 1 (CartPole-v1) worker process was killed by SIGKILL (as the kernel's OOM killer does: "
        "check `dmesg`) in step; started a new worker and cut its episode (0 of env_restarts left)"
    ) in flat
    assert "Traceback" not in err


def test_hung_worker_is_killed_after_env_step_timeout_and_reported(tmp_path):
    run = tmp_path / "run"
    proc = start(run, total_steps=10_000_000, env_step_timeout=2)
    signal_a_worker_after_the_first_checkpoint(proc, run, signal.SIGSTOP)  # alive, never answers
    _, err = finish(proc, within=60)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "fastdqn: error: env 1 (CartPole-v1) worker process hung (no answer within env_step_timeout=2 s) and was "
            "killed in step: fix the env"
        )
    )


def test_ctrl_c_reaching_the_workers_too_stops_the_run_cleanly(tmp_path):
    """The terminal sends Ctrl-C to the whole process group: the workers leave the stop to the trainer."""
    run = tmp_path / "run"
    proc = start(run, total_steps=10_000_000)
    deadline = time.monotonic() + 120
    while not list_checkpoints(run):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = finish(proc, within=60)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["interrupted"] and "Traceback" not in err
    assert load_checkpoint(list_checkpoints(run)[-1])["counters"]["env_step"] == result["env_steps"]


def stepped(envs: gym.vector.VectorEnv, steps: int) -> list[tuple]:
    results = []
    for _ in range(steps):
        results.append(envs.step(np.zeros(envs.num_envs, dtype=np.int64)))
    return results


def test_a_segfaulting_worker_is_started_again_on_a_seeded_episode_and_its_step_cut(capfd):
    cfg = small_cfg(env_id="fault_envs:DyingCartPole-segv-v0", num_envs=3, vector_mode="async", env_restarts=1)
    envs = make_vector_env(cfg, 3)
    try:
        obs, _ = envs.reset(seed=cfg.seed)
        before = obs
        for _ in range(40):  # env 1 dies at its 30th step (episodes of action 0 last about 10)
            obs, rewards, terminated, truncated, infos = envs.step(np.zeros(3, dtype=np.int64))
            if infos.get("final_info", {}).get("_env_restarted", np.zeros(3, bool))[1]:
                break
            before = obs
        else:
            raise AssertionError("env 1 never died")
        assert truncated[1] and not terminated[1] and rewards[1] == 0.0
        np.testing.assert_array_equal(infos["final_obs"][1], before[1])  # cut back to its last observation
        fresh, _ = gym.make("CartPole-v1").reset(seed=cfg.seed + 7919 * 2 + 1)  # EnvRestarts' first seed, env 1
        np.testing.assert_array_equal(obs[1], fresh)
        assert envs.restarts[1].left == 0 and envs.restarts[0].left == 1
        for obs, *_ in stepped(envs, 50):  # the new worker goes on answering through the pipe
            assert np.isfinite(obs).all()
    finally:
        envs.close()
    err = capfd.readouterr().err
    assert "killed by SIGSEGV (a crash in native code) in step; started a new worker" in " ".join(err.split())
    assert "Traceback" not in err


def test_a_worker_that_exits_is_reported_by_index_and_the_others_close_quietly(capfd):
    cfg = small_cfg(env_id="fault_envs:DyingCartPole-exit-v0", num_envs=3, vector_mode="async")
    envs = make_vector_env(cfg, 3)
    envs.reset(seed=cfg.seed)
    with pytest.raises(
        EnvFailure,
        match=r"^env 1 \(fault_envs:DyingCartPole-exit-v0\) worker process exited with "
        r"status 3 in step: fix the env, or set env_restarts > 0",
    ):
        stepped(envs, 40)
    processes = list(envs.processes)
    envs.close()
    assert not any(p.is_alive() for p in processes)
    assert "Traceback" not in capfd.readouterr().err


def test_restarts_inside_a_worker_and_of_the_worker_share_one_budget():
    """FlakyCartPole's env 1 raises at its 150th step: its worker's GuardedEnv rebuilds it, and the trainer's side
    counts that restart too, so a later worker restart sees what is left."""
    cfg = small_cfg(env_id="fault_envs:FlakyCartPole-v0", num_envs=2, vector_mode="async", env_restarts=2)
    envs = make_vector_env(cfg, 2)
    try:
        envs.reset(seed=cfg.seed)
        stepped(envs, 160)
        assert [r.used for r in envs.restarts] == [0, 1]
        envs.processes[1].kill()
        stepped(envs, 1)
        assert [r.used for r in envs.restarts] == [0, 2]
        envs.processes[1].kill()
        with pytest.raises(EnvFailure, match=r"env 1 .* was killed by SIGKILL .*all env_restarts=2 were used"):
            stepped(envs, 1)
    finally:
        envs.close()
