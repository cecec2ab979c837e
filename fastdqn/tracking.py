"""Weights & Biases tracking (`--track`): one W&B run per fastdqn run, as CleanRL's `--track` makes them.

A W&B run gets the run's resolved config, every scalar the run writes to TensorBoard (plotted against
`global_step`, in env steps) and, at the end, the run's result in its summary. The runs of a study share a W&B
group (the experiment dir's name). A resumed run goes on in the same W&B run: its id is kept in the run dir.
W&B is an extra (`pip install 'fastdqn[wandb]'`); with WANDB_MODE=offline nothing leaves the machine and the
run files stay in `<run dir>/wandb/` (or WANDB_DIR) for a later `wandb sync`.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdqn.config import Config
from fastdqn.errors import import_extra

ID_FILE = "wandb-id"  # in the run dir: the W&B run id this run logs to


@dataclass(frozen=True)
class Tracking:
    """Where `--track` sends runs: the W&B project (and entity), a group that gathers a study's runs, the run's
    name (default: its run dir's name), its job type and extra config values (a study's point and trial)."""

    project: str = "fastdqn"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    job_type: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> Tracking:
        """Fail now, not after the first run, when W&B is not installed."""
        import_extra("wandb", "wandb", "--track")
        return self


class WandbRun:
    """The W&B run of one fastdqn run: a scalar sink for its RunLogger, finished with the run's result."""

    def __init__(self, tracking: Tracking, run_dir: Path, cfg: Config):
        wandb = import_extra("wandb", "wandb", "--track")
        run_dir = Path(run_dir)
        id_path = run_dir / ID_FILE
        run_id = id_path.read_text().strip() if id_path.is_file() else secrets.token_hex(6)
        id_path.write_text(run_id + "\n")
        self.run = wandb.init(
            project=tracking.project,
            entity=tracking.entity,
            group=tracking.group,
            name=tracking.name or run_dir.name,
            job_type=tracking.job_type,
            id=run_id,
            resume="allow",
            config={**cfg.to_dict(), **tracking.extra},
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
        )
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "global_step": step})

    def finish(self, summary: dict[str, Any] | None) -> None:
        """End the W&B run: with the run's result in its summary, or marked failed (None)."""
        if summary is not None:
            self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary is not None else 1)
