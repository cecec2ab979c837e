"""Every bad input through the real CLI (a subprocess each): the exit code, one `fastdqn: error:` line that
names the problem and the fix, no Python traceback, and every file already on disk unchanged.

The cases run concurrently (each in its own copy of a real run dir) in one module fixture; each test then
checks its own case's result.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fastdqn.checkpoint import list_checkpoints
from fastdqn.cli import main
from small_runs import small_flags

TESTS = Path(__file__).resolve().parent
TINY = small_flags(total_steps=300, checkpoint_every=100)


def run_cli(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "fastdqn.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and modification time of every file under `root`."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def newest(run: Path) -> Path:
    return list_checkpoints(run)[-1]


def truncate_newest(case: Path) -> None:
    ckpt = newest(case / "run")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def garble_newest(case: Path) -> None:
    newest(case / "run").write_bytes(os.urandom(4096))


def foreign_newest(case: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, newest(case / "run"))


def acrobot_newest(case: Path) -> None:
    """The newest checkpoint replaced by one made for another env and network (copied from another run)."""
    path = newest(case / "run")
    state = torch.load(path, weights_only=True)
    state["config"].update(env_id="Acrobot-v1", hidden_sizes=[64, 64])
    torch.save(state, path)


# id: (command line, exit code, words the error line must contain, setup of the case dir, extra env)
CASES = {
    "unknown_env": (["train", "--env", "CartPol-v1", "--run-dir", "new"], 2, ["unknown env id", "'CartPole-v1'"]),
    "continuous_actions": (["train", "--env", "Pendulum-v1", "--run-dir", "new"], 2, ["Discrete action space", "Box("]),
    "observation_space": (["train", "--env", "Blackjack-v1", "--run-dir", "new"], 2, ["observation space", "Tuple("]),
    "env_raises_on_creation": (
        ["train", "--env", "fault_envs:BrokenInit-v0", "--run-dir", "new"],
        2,
        ["env 0", "ValueError: track_length must be positive", "while being created"],
    ),
    "unknown_flag": (["train", "--lerning-rate", "0.1"], 2, ["unrecognized arguments", "did you mean --learning-rate"]),
    "unknown_set_key": (["train", "--set", "gama=0.9"], 2, ["unknown config key 'gama'", "did you mean 'gamma'"]),
    "unknown_yaml_key": (
        ["train", "--config", "bad.yaml"],
        2,
        ["unknown config key 'batchsize'", "'batch_size'"],
        lambda case: (case / "bad.yaml").write_text("batchsize: 32\n"),
    ),
    "malformed_yaml": (
        ["train", "--config", "broken.yaml"],
        2,
        ["not valid YAML"],
        lambda case: (case / "broken.yaml").write_text("gamma: [0.9\n"),
    ),
    "missing_config_file": (["train", "--config", "nope.yaml"], 2, ["'nope.yaml' does not exist"]),
    "wrong_type": (["train", "--batch-size", "abc"], 2, ["'batch_size' expects int", "'abc'"]),
    "negative_envs": (["train", "--envs", "-2"], 2, ["num_envs must be >= 1, got -2"]),
    "batch_larger_than_buffer": (
        ["train", "--batch-size", "64", "--buffer-size", "32"],
        2,
        ["batch_size (64) is larger than buffer_size (32)", "lower batch_size"],
    ),
    "gamma_out_of_range": (["train", "--gamma", "1.5"], 2, ["gamma must be in [0, 1], got 1.5"]),
    "epsilon_out_of_range": (["train", "--epsilon-end", "-0.1"], 2, ["epsilon_end must be in [0, 1]"]),
    "bad_choice": (["train", "--loss", "hubr"], 2, ["invalid choice: 'hubr'", "'huber'"]),
    "unknown_command": (["trian"], 2, ["invalid choice: 'trian'"]),
    "resume_missing_dir": (["train", "--resume", "nowhere"], 2, ["'nowhere' does not exist"]),
    "resume_dir_without_checkpoint": (
        ["train", "--resume", "notes"],
        2,
        ["has no checkpoint", "start a new run"],
        lambda case: shutil.copytree(TESTS, case / "notes"),
    ),
    "resume_other_env": (
        ["train", "--resume", "run", "--env", "Acrobot-v1"],
        2,
        ["cannot change env_id 'CartPole-v1' -> 'Acrobot-v1'", "new run"],
    ),
    "resume_other_network": (
        ["train", "--resume", "run", "--hidden-sizes", "[64,64]"],
        2,
        ["cannot change hidden_sizes [16] -> [64, 64]"],
    ),
    "resume_checkpoint_of_another_run": (
        ["train", "--resume", "run"],
        2,
        [
            "is not from this run",
            "env_id 'Acrobot-v1' (run: 'CartPole-v1')",
            "hidden_sizes [64, 64] (run: [16])",
            "move it away",
        ],
        acrobot_newest,
    ),
    "resume_other_run_dir": (["train", "--resume", "run", "--run-dir", "elsewhere"], 2, ["drop --run-dir"]),
    "resume_truncated_checkpoint": (
        ["train", "--resume", "run"],
        2,
        ["corrupt or truncated", "move it away to resume from ckpt-000000000200.pt"],
        truncate_newest,
    ),
    "resume_corrupt_checkpoint": (["train", "--resume", "run"], 2, ["corrupt or truncated"], garble_newest),
    "resume_foreign_checkpoint": (["train", "--resume", "run"], 2, ["is not a fastdqn checkpoint"], foreign_newest),
    "run_dir_exists": (["train", "--run-dir", "run"], 2, ["already exists", "--resume run", "--overwrite"]),
    "overwrite_with_bad_env": (
        ["train", "--run-dir", "run", "--overwrite", "--env", "Pendulum-v1"],
        2,
        ["Discrete action space"],
    ),
    "compile_strict_without_compiler": (
        ["train", "--run-dir", "new", "--compile", "--compile-strict", *TINY],
        2,
        ["torch.compile has no working compiler", "drop compile_strict"],
        None,
        {"CXX": "/nonexistent/g++"},
    ),
}
if not torch.cuda.is_available():
    CASES["cuda_without_gpu"] = (["train", "--device", "cuda", "--run-dir", "new"], 2, ["no CUDA GPU", "--device cpu"])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict, dict, Path]]:
    """Run every case at once (3 at a time) in its own copy of a real 300-step run; keep disk snapshots."""
    root = tmp_path_factory.mktemp("cli_errors")
    assert main(["train", "--run-dir", str(root / "template"), "--quiet", *TINY]) == 0
    assert len(list_checkpoints(root / "template")) == 3

    def one(name: str):
        args, _code, _words, *rest = CASES[name]
        setup, extra_env = (rest + [None, None])[:2]
        case = root / name
        shutil.copytree(root / "template", case / "run")
        if setup:
            setup(case)
        before = snapshot(case)
        proc = run_cli(args, case, extra_env)
        return name, (proc, before, snapshot(case), case)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(results, name):
    proc, before, after, case = results[name]
    _args, code, words, *_ = CASES[name]
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith("fastdqn: error: "), proc.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    assert after == before, f"files on disk changed: {set(after.items()) ^ set(before.items())}"
    assert not (case / "new").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli(["--debug", "train", "--gamma", "1.5"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError: gamma must be in [0, 1]" in proc.stderr


def test_errors_from_torch_gymnasium_and_the_os_are_one_line_with_a_fix(tmp_path, monkeypatch, capsys):
    import gymnasium as gym

    from fastdqn.cli import explain
    from fastdqn.trainer import Trainer

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nGPU 0 has 8 GiB")

    monkeypatch.setattr(Trainer, "run", out_of_memory)
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastdqn: error: out of device memory (CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "lower batch_size, buffer_size or num_envs" in err[-1] and "Traceback" not in "".join(err)

    compile_failure = type("BackendCompilerFailed", (RuntimeError,), {"__module__": "torch._dynamo.exc"})
    assert "run without --compile" in explain(compile_failure("inductor raised CppCompileError"))
    assert explain(gym.error.DependencyNotInstalled("box2d is not installed, run `pip install box2d`")).startswith(
        "gymnasium: box2d is not installed"
    )
    assert "free space on that disk" in explain(OSError(28, "No space left on device"))
    assert "--debug" in explain(ValueError("something else"))
