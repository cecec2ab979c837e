"""Checkpoint files: written atomically, loaded without executing code from the file.

A checkpoint is `ckpt-<env_step>.pt` in the run dir, and `best.pt` holds the network of the run's best
evaluation. Writing goes to a temporary file in the same dir, is fsynced, then renamed over the final name, so
a crash at any moment leaves either the old set of checkpoints or the new one, never a half-written file under
a checkpoint name. The newest `keep` checkpoints are kept.
Loading uses `torch.load(weights_only=True)`: only tensors, numbers, strings and containers of them.
Module weights are saved without torch.compile's `_orig_mod.` prefix, so compiled and eager runs read each
other's checkpoints.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastdqn.config import FIELDS
from fastdqn.disk import check_space, run_write, storage_sizes
from fastdqn.errors import CheckpointError

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_TMP_GLOB = ".ckpt-*.tmp"
COMPILE_PREFIX = "_orig_mod."
# What torch.save adds to the tensor bytes: the pickled rest (config, counters, env state; 5-15 KB measured) and per
# tensor a zip entry, its alignment and its pickled reference (300-800 B measured); rounded up to stay an upper bound.
CHECKPOINT_OVERHEAD, PER_TENSOR_OVERHEAD = 32 * 1024, 512

# Config keys a resumed run may change: run length, schedules that are pure functions of the step, logging,
# evaluation, checkpointing, device and speed, and the fault settings. Every other key (env, network, replay
# layout, update cadence, objective, and any key added later) defines what the checkpoint holds and is fixed.
RESUME_CHANGEABLE = frozenset(
    {
        "total_steps",
        "learning_rate",
        "lr_schedule",
        "lr_end",
        "max_grad_norm",
        "clip_rewards",
        "epsilon_schedule",
        "epsilon_start",
        "epsilon_end",
        "epsilon_decay_steps",
        "epsilon_step_factor",
        "eval_every",
        "eval_episodes",
        "eval_epsilon",
        "solved_return",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "save_replay",
        "device",
        "compile",
        "compile_strict",
        "amp",
        "tf32",
        "torch_threads",
        "env_restarts",
        "env_step_timeout",
        "nonfinite_skips",
        "env_threads",
        "overlap",
    }
)


BEST_FILE = "best.pt"


def checkpoint_path(run_dir: Path, env_step: int) -> Path:
    return Path(run_dir) / f"ckpt-{env_step:012d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_partial_writes(run_dir: Path) -> None:
    """Delete temporary files left by a checkpoint write that was killed before its rename."""
    for tmp in Path(run_dir).glob(_TMP_GLOB):
        tmp.unlink(missing_ok=True)


def strip_compile_prefix(state: Any) -> Any:
    """`state` with torch.compile's `_orig_mod.` removed from every dict key at any depth: the keys of the eager
    modules, whether `state` is one module's state_dict or the learner's (networks and optimizer)."""
    if not isinstance(state, dict):
        return state
    return {
        k.replace(COMPILE_PREFIX, "") if isinstance(k, str) else k: strip_compile_prefix(v) for k, v in state.items()
    }


def fixed_keys_that_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys outside RESUME_CHANGEABLE on which two config mappings disagree (keys missing from one are skipped)."""
    return [k for k in FIELDS if k in a and k in b and k not in RESUME_CHANGEABLE and a[k] != b[k]]


def check_run_owns(checkpoint: Path, saved: dict[str, Any], run_config: dict[str, Any]) -> None:
    """Raise CheckpointError if a checkpoint's config is not the run's own (`config.yaml`): a file from elsewhere."""
    foreign = fixed_keys_that_differ(run_config, saved)
    if foreign:
        diffs = ", ".join(f"{k} {saved[k]!r} (run: {run_config[k]!r})" for k in foreign)
        raise CheckpointError(
            f"checkpoint '{checkpoint}' is not from this run, it has {diffs}: move it away, or "
            "resume the run it came from"
        )


def check_resume_config(saved: dict[str, Any], cfg: Any) -> None:
    """Raise CheckpointError if `cfg` changes a key of the saved run's config that a resume cannot change."""
    unknown = sorted(k for k in saved if k not in FIELDS)
    if unknown:
        raise CheckpointError(
            f"the checkpoint's config has keys this fastdqn does not know ({', '.join(unknown)}): "
            "resume it with the fastdqn version that wrote it"
        )
    current = cfg.to_dict()
    changed = fixed_keys_that_differ(saved, current)
    if changed:
        diffs = ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise CheckpointError(
            f"cannot change {diffs} when resuming (it defines what the checkpoint holds): drop "
            "those flags to continue the run, or start a new run with another --run-dir"
        )


def save_checkpoint(payload: dict[str, Any], run_dir: Path, env_step: int, keep: int) -> Path:
    """Atomically write `payload` as the checkpoint of `env_step`, then drop all but the newest `keep`."""
    final = write_atomically(payload, checkpoint_path(run_dir, env_step))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def checkpoint_nbytes(payload: Any) -> int:
    """About the size of `payload` saved with torch.save (at least it): its tensor storages plus what the zip
    archive adds per tensor and the pickled rest (CHECKPOINT_OVERHEAD and PER_TENSOR_OVERHEAD, measured)."""
    sizes = storage_sizes(payload)
    return sum(sizes) + CHECKPOINT_OVERHEAD + PER_TENSOR_OVERHEAD * len(sizes)


def own_storages(payload: Any) -> Any:
    """`payload` with every tensor that views part of a larger storage replaced by a copy of just that part.
    torch.save writes a tensor's whole storage, and a population agent's weights and Adam moments are slices of
    all agents' stacked tensors: each agent's checkpoint of a 32-agent population was 31 times a standalone one's."""
    from torch.utils._pytree import tree_map

    from fastdqn.disk import is_partial_view

    return tree_map(lambda v: v.clone() if is_partial_view(v) else v, payload)


def write_atomically(payload: dict[str, Any], final: Path, what: str = "a checkpoint") -> Path:
    """torch.save `payload` to a temporary file beside `final`, fsync it, then rename it over `final`: a kill or a
    full disk at any moment leaves the old file or the new one, never a part of one. A payload that cannot fit in
    the free space is refused (DiskFull) before anything is written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    import torch  # here, not at the top: path mistakes in `fastdqn train --resume` are reported without it

    payload = own_storages(payload)
    need = checkpoint_nbytes(payload)
    check_space(final, what, need)
    tmp: str | None = None
    try:
        with run_write(final, what, need):
            fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=final.parent)
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load one checkpoint file safely; raise CheckpointError on a truncated, corrupt or unsafe file.

    `mmap` maps the tensors instead of reading them: cheap when only the config or counters are wanted.
    """
    import torch

    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except Exception as exc:  # torch raises many types for damaged files
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
        fix = f"move it away to resume from {older[-1].name}" if older else "it was the only one: start a new run"
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({reason}): {fix}") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"'{path}' is not a fastdqn checkpoint")
    return payload


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """The config a checkpoint was written with, without reading its tensors."""
    return load_checkpoint(path, mmap=True)["config"]


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint in `run_dir`, or CheckpointError if there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir '{run_dir}' does not exist: pass a dir under runs/ made by `fastdqn train`")
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"run dir '{run_dir}' has no checkpoint (ckpt-*.pt): start a new run instead of resuming")
    return found[-1]
