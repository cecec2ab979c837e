"""Where a run reports: TensorBoard events, a metrics.jsonl file, and a rich console (progress bar, summary)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fastdqn.config import Config

if TYPE_CHECKING:
    import numpy as np

console = Console(stderr=True, soft_wrap=True)  # long lines (paths, resume commands) stay whole for copy-paste


class ScalarSink(Protocol):
    """Somewhere else a run's scalars go, e.g. a Weights & Biases run (`fastdqn.tracking`)."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...


class RunLogger:
    """Writes scalars to TensorBoard, metrics.jsonl and any sinks, and drives the console progress bar."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, show_progress: bool = True,
                 sinks: Sequence[ScalarSink] = ()):
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

        self.run_dir, self.cfg, self.sinks = Path(run_dir), cfg, list(sinks)
        # A resumed run writes the steps after its checkpoint again: TensorBoard purges them, and so do we.
        self.writer = SummaryWriter(str(self.run_dir), purge_step=start_step)
        keep_records_up_to(self.run_dir / "metrics.jsonl", start_step)
        self.metrics_file = (self.run_dir / "metrics.jsonl").open("a")
        self.progress: Progress | None = None
        if show_progress:
            self.progress = Progress(
                TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[sps]:>6} sps"), TextColumn("return {task.fields[ret]:>7}"),
                TextColumn("eps {task.fields[eps]:.3f}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.progress.add_task("train", total=cfg.total_steps, completed=start_step,
                                               sps="-", ret="-", eps=cfg.epsilon_start)
            self.progress.start()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        for sink in self.sinks:
            sink.scalars(values, step)

    def record(self, kind: str, step: int, **values: Any) -> None:
        """One line of metrics.jsonl: what `fastdqn report` and the ablation plots read back."""
        self.metrics_file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.metrics_file.flush()

    def advance(self, step: int, sps: float, recent_return: float | None, epsilon: float) -> None:
        if self.progress is not None:
            ret = "-" if recent_return is None else f"{recent_return:.1f}"
            self.progress.update(self.task, completed=step, sps=f"{sps:.0f}", ret=ret, eps=epsilon)

    # --- what the training loop reports ---------------------------------------------------------------
    def episode(self, ret: float, length: int, step: int) -> None:
        """One finished episode's raw return (a whole game for Atari), at the env step it ended."""
        self.scalars({"charts/episodic_return": ret, "charts/episodic_length": length}, step)

    def training(self, step: int, sps: float, epsilon: float, learning_rate: float, metrics: dict[str, float],
                 recent_return: float | None, episodes: int) -> None:
        """The periodic training record: schedules, speed and the update metrics averaged since the last one."""
        scalars = {"charts/epsilon": epsilon, "charts/learning_rate": learning_rate, "charts/SPS": sps}
        scalars.update({f"losses/{k}": v for k, v in metrics.items()})
        self.scalars(scalars, step)
        self.record("train", step, sps=sps, epsilon=epsilon, recent_return=recent_return, episodes=episodes,
                    **metrics)
        self.advance(step, sps, recent_return, epsilon)

    def evaluation(self, step: int, returns: np.ndarray, episodes: int, best: tuple[int, float, float]) -> None:
        """One evaluation's returns, with their mean and std, and the best evaluation so far (step, mean, std)."""
        mean, std = float(returns.mean()), float(returns.std())
        self.scalars({"eval/mean_return": mean, "eval/std_return": std, "eval/best_mean_return": best[1]}, step)
        self.record("eval", step, mean=mean, std=std, returns=returns.tolist(), episodes=episodes, best_mean=best[1],
                    best_step=best[0])
        self.message(f"eval @ {step:>8} env steps: {mean:8.2f} +- {std:.2f} over {len(returns)} episodes")

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else console).print(text)

    def hparams(self, final_eval_mean: float) -> None:
        flat = {k: (str(v) if isinstance(v, list) else v) for k, v in self.cfg.to_dict().items()}
        self.writer.add_hparams(flat, {"hparams/final_eval_mean": final_eval_mean}, run_name="hparams")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.writer.close()
        self.metrics_file.close()


def keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without records after `step` and without a last line cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and json.loads(line).get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table
