"""One process per run dir: a second trainer into a dir that one is training in is refused in one line naming
the holder; readers (eval) go on; a killed trainer leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastdqn.checkpoint import list_checkpoints
from fastdqn.errors import RunDirLocked
from fastdqn.rundir import RunDirLock
from small_runs import small_flags

TESTS = Path(__file__).resolve().parent


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastdqn.cli", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def test_a_second_lock_on_a_locked_dir_is_refused_and_released_on_exit(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            with RunDirLock(tmp_path):
                pass
    with RunDirLock(tmp_path):  # released by the first one's exit
        pass


def test_second_trainer_is_refused_eval_reads_and_sigkill_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        cli("train", "--run-dir", str(run), "--quiet", *small_flags(total_steps=10_000_000, checkpoint_every=200)),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run):
            assert first.poll() is None and time.monotonic() < deadline, "the first run made no checkpoint"
            time.sleep(0.05)
        config_before = (run / "config.yaml").read_text()
        for second in (
            cli("train", "--resume", str(run), "--quiet"),
            cli("train", "--run-dir", str(run), "--overwrite", "--quiet", *small_flags()),
        ):
            refused = subprocess.run(second, env=cli_env(), capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2, refused.stderr
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("fastdqn: error: run dir")
            assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert first.poll() is None, "the first run trains on"
        assert (run / "config.yaml").read_text() == config_before and list_checkpoints(run), (
            "the refused --overwrite replaced nothing"
        )
        reader = subprocess.run(
            cli("eval", str(run), "--episodes", "1"), env=cli_env(), capture_output=True, text=True, timeout=120
        )
        assert reader.returncode == 0, reader.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    resumed = subprocess.run(
        cli(
            "train",
            "--resume",
            str(run),
            "--quiet",
            "--total-steps",
            str(int(list_checkpoints(run)[-1].stem.split("-")[1]) + 100),
        ),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
