"""A full disk: every write of a run that fails for lack of space stops it with one line (path, what the write
needed, what is free, what to do), exit status 1, and the newest complete checkpoint intact.

The disk is real: a small tmpfs per test (tests/small_fs.py; mounting needs root, as CI has), filled to the brim.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdqn.checkpoint import checkpoint_nbytes, list_checkpoints, load_checkpoint, save_checkpoint
from fastdqn.disk import quiet_space_errors_in_threads, run_write
from fastdqn.errors import DiskFull, space_error
from fastdqn.logs import RunLogger
from fastdqn.rundir import CONFIG_FILE, write_config
from fastdqn.trainer import Trainer
from small_fs import fill, resize, tmpfs
from small_runs import small_cfg, small_flags

TESTS = Path(__file__).resolve().parent


def cli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "fastdqn.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_full_disk_is_one_line_keeps_the_newest_checkpoint_and_the_run_resumes_once_there_is_space(tmp_path):
    with tmpfs(tmp_path / "fs", 256) as fs:
        run = fs / "run"
        flags = small_flags(total_steps=1500, checkpoint_every=100, save_replay=True)
        first = cli("train", "--run-dir", run, "--quiet", *flags)
        assert first.returncode == 1, first.stderr
        assert "warning: checkpoints of this run take up to" in " ".join(first.stderr.split())  # said at the start
        line = one_error_line(first)
        newest = list_checkpoints(run)[-1]
        found = re.fullmatch(
            r"fastdqn: error: no space left on device writing (.+) '(.+)' \(it needs (\S+ \S+), "
            r"(\S+ \S+) free there\): free space there, then resume from (\S+) with: fastdqn train "
            rf"--resume {run} \(add --keep-checkpoints 1 or --no-save-replay to keep fewer or smaller "
            r"checkpoints\)",
            line,
        )
        assert found, line
        assert found.group(5) == newest.name
        load_checkpoint(newest)  # complete, and nothing half-written beside it
        assert not list(run.glob(".*.tmp"))

        again = cli("train", "--resume", run, "--quiet")  # into the same full disk: the same clear stop
        assert again.returncode == 1
        assert one_error_line(again).startswith("fastdqn: error: no space left on device writing")
        assert list_checkpoints(run)[-1] == newest

        resize(fs, 4096)  # space freed
        done = cli("train", "--resume", run, "--quiet")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["env_steps"] == 1500


def test_a_checkpoint_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    with tmpfs(tmp_path / "fs", 256) as fs:
        before = sorted(p.name for p in fs.iterdir())
        with pytest.raises(
            DiskFull,
            match=r"writing a checkpoint '.*ckpt-000000000100\.pt' \(it needs 1\.00 MB, "
            r"2\d\d\.\d\d KB free there\)",
        ):
            save_checkpoint(
                {"format": 1, "w": torch.zeros(1_000_000 - checkpoint_nbytes({}) - 512, dtype=torch.uint8)},
                fs,
                100,
                keep=2,
            )
        assert sorted(p.name for p in fs.iterdir()) == before


def test_a_checkpoint_write_that_runs_out_of_space_midway_leaves_the_previous_one(tmp_path):
    """torch.save reports ENOSPC as RuntimeError("[enforce fail at inline_container.cc] unexpected pos"): the
    pre-check counts tensor bytes, so a large non-tensor payload passes it and fails in the write."""
    with tmpfs(tmp_path / "fs", 512) as fs:
        save_checkpoint({"format": 1, "w": torch.ones(10)}, fs, 100, keep=2)
        with pytest.raises(
            DiskFull, match=r"no space left on device writing a checkpoint '.*ckpt-000000000200\.pt'"
        ) as caught:
            save_checkpoint({"format": 1, "blob": "x" * 1_000_000}, fs, 200, keep=2)
        assert "inline_container" in str(caught.value.__cause__)  # the error it translated
        assert [p.name for p in fs.iterdir()] == ["ckpt-000000000100.pt"]  # no partial file left
        assert torch.equal(load_checkpoint(fs / "ckpt-000000000100.pt")["w"], torch.ones(10))


def test_best_checkpoint_on_a_full_disk_keeps_the_previous_best(tmp_path):
    with tmpfs(tmp_path / "fs", 512) as fs:
        trainer = Trainer(small_cfg(), fs / "run", show_progress=False)
        trainer.evaluator.best = (100, 20.0, 1.0)
        first = trainer.checkpoints.save_best([20.0])
        saved = first.read_bytes()
        fill(fs)
        trainer.evaluator.best = (200, 30.0, 1.0)
        with pytest.raises(
            DiskFull,
            match=r"writing the best checkpoint '.*run/best\.pt' \(it needs \d+\.\d\d KB, "
            r"0 B free there\)",
        ):
            trainer.checkpoints.save_best([30.0])
        assert first.read_bytes() == saved
        trainer.close()


def test_checkpoint_size_estimate_is_an_upper_bound_close_to_the_real_size(tmp_path):
    for save_replay in (False, True):
        trainer = Trainer(
            small_cfg(save_replay=save_replay, total_steps=300), tmp_path / str(save_replay), show_progress=False
        )
        trainer.run()
        state = trainer.checkpoints.state_dict()
        written = list_checkpoints(tmp_path / str(save_replay))[-1].stat().st_size
        assert written <= checkpoint_nbytes(state) <= written + 64 * 1024
        assert trainer.checkpoints.largest_nbytes() >= written


def test_the_start_warns_with_the_numbers_when_the_checkpoints_will_not_fit(tmp_path, capsys):
    with tmpfs(tmp_path / "fs", 256) as fs:
        trainer = Trainer(
            small_cfg(save_replay=True, keep_checkpoints=5, buffer_size=2000), fs / "run", show_progress=False
        )
        warning = trainer.checkpoints.space_warning()
        size = trainer.checkpoints.largest_nbytes()
        assert size > 2000 * 52  # a full replay is in it
        assert warning is not None and "and 6 exist at once (keep_checkpoints=5 and the one being written)" in warning
        assert re.search(
            r"but .*run has 2\d\d\.\d\d KB free; free space, lower keep_checkpoints or set save_replay: "
            "false",
            warning,
        )
        trainer.close()
    roomy = Trainer(small_cfg(save_replay=True), tmp_path / "roomy", show_progress=False)
    assert roomy.checkpoints.space_warning() is None
    roomy.close()


def test_config_write_on_a_full_disk_keeps_the_old_config(tmp_path):
    with tmpfs(tmp_path / "fs", 256) as fs:
        write_config(small_cfg(), fs)
        old = (fs / CONFIG_FILE).read_text()
        fill(fs)
        with pytest.raises(
            DiskFull, match=r"writing the run's config '.*config\.yaml' \(it needs \d\.\d\d KB, 0 B free"
        ):
            write_config(small_cfg(total_steps=999), fs)
        assert (fs / CONFIG_FILE).read_text() == old
        assert not list(fs.glob(".*.tmp"))


def test_metrics_record_on_a_full_disk(tmp_path):
    with tmpfs(tmp_path / "fs", 256) as fs:
        logger = RunLogger(fs / "run", small_cfg(), 0, show_progress=False)
        fill(fs)
        with pytest.raises(
            DiskFull, match=r"writing a metrics record to '.*metrics\.jsonl' \(it needs \d+ B, 0 B free"
        ):
            logger.record("train", 100, loss=1.0)
        logger.close(quiet=True)


@pytest.fixture
def thread_errors():
    """The exceptions that end threads (each would print "Exception in thread ..." with a traceback)."""
    seen: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)
    yield seen
    threading.excepthook = previous


def test_tensorboard_on_a_full_disk_is_one_error_without_the_writer_threads_traceback(tmp_path, thread_errors):
    with tmpfs(tmp_path / "fs", 256) as fs:
        logger = RunLogger(fs / "run", small_cfg(), 0, show_progress=False)
        fill(fs)
        with pytest.raises(
            DiskFull,
            match=r"writing TensorBoard events in '.*run' \(it needs at least one more "
            r"\d\.\d\d KB block, 0 B free there\)",
        ):
            for step in range(100_000):  # the writer thread buffers, writes, dies; the next call raises
                logger.scalars({"loss": 1.0, "q": 2.0}, step)
        assert not logger.writer.file_writer.event_writer._async_writer._worker.is_alive()  # the thread died of it
        with pytest.raises(DiskFull):
            logger.close()
    assert thread_errors == []


def test_space_errors_of_other_threads_are_quiet_only_inside_the_scope(thread_errors):
    def die(exc: BaseException) -> None:
        def run() -> None:
            raise exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()

    with quiet_space_errors_in_threads():
        die(OSError(errno.ENOSPC, "No space left on device"))
        die(ValueError("a real bug"))
    die(OSError(errno.ENOSPC, "No space left on device"))
    assert [type(e) for e in thread_errors] == [ValueError, OSError]


def test_profiler_trace_on_a_full_disk(tmp_path):
    from fastdqn.profiling import make_profiler

    with tmpfs(tmp_path / "fs", 512) as fs:
        prof = make_profiler(fs / "profile", 0, 0, 2, 1, torch.device("cpu"))
        prof.start()
        fill(fs)
        with pytest.raises(DiskFull, match=r"writing a profiler trace '.*profile/trace_2\.json'"):
            for _ in range(3):
                torch.randn(64, 64) @ torch.randn(64, 64)
                prof.step()
        assert not list((fs / "profile").glob("trace_*"))  # nothing half-written left


def test_video_on_a_full_disk(tmp_path):
    from fastdqn.video import write_video

    frames = [np.random.default_rng(i).integers(0, 255, (120, 160, 3), dtype=np.uint8) for i in range(60)]
    with tmpfs(tmp_path / "fs", 512) as fs:
        fill(fs, leave=32 * 1024)
        with pytest.raises(DiskFull, match=r"writing a video '.*v\.mp4'"):
            write_video(frames, fs / "v.mp4")
        assert not (fs / "v.mp4").exists()  # no cut video that looks whole
        (fs / "filler").unlink()
        assert write_video(frames, fs / "v.mp4") == fs / "v.mp4"


def test_space_errors_are_found_behind_other_errors_and_quota_is_named(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            # Implicit chaining on purpose (no `from`): torch.save's error carries the ENOSPC as its __context__.
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 559744 vs 559636")  # noqa: B904
    except RuntimeError as wrapped:
        assert space_error(wrapped).errno == errno.ENOSPC
    assert space_error(OSError(errno.EFBIG, "File too large")) is None  # a size limit, not a lack of space
    with pytest.raises(DiskFull, match=r"^disk quota exceeded writing metrics '.*m\.jsonl' \(it needs 10 B"):
        with run_write(tmp_path / "m.jsonl", "metrics", 10):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(ValueError):  # other errors pass through untouched
        with run_write(tmp_path / "m.jsonl", "metrics", 10):
            raise ValueError("not about space")
