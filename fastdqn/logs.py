"""Where a run reports: TensorBoard events, a metrics.jsonl file, and a rich console (progress bar, summary).

Each file write goes through `disk.run_write`, so a full disk stops the run with one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fastdqn.config import Config
from fastdqn.disk import quiet_space_errors_in_threads, run_write

if TYPE_CHECKING:
    import numpy as np

console = Console(stderr=True, soft_wrap=True)  # long lines (paths, resume commands) stay whole for copy-paste


class ScalarSink(Protocol):
    """Somewhere else a run's scalars go, e.g. a Weights & Biases run (`fastdqn.tracking`)."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...


class RunLogger:
    """Writes scalars to TensorBoard, metrics.jsonl and any sinks, and drives the console progress bar."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        start_step: int,
        show_progress: bool = True,
        sinks: Sequence[ScalarSink] = (),
        label: str = "",
    ):
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

        self.run_dir, self.cfg, self.sinks = Path(run_dir), cfg, list(sinks)
        self.label = label  # put before console messages (a population's agent)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # TensorBoard's writer thread dies of a full disk with a traceback; its error reaches us on the next call.
        self.quiet_threads = contextlib.ExitStack()
        self.quiet_threads.enter_context(quiet_space_errors_in_threads())
        try:
            # A resumed run writes the steps after its checkpoint again: TensorBoard purges them, and so do we.
            with self.tensorboard_write():
                self.writer = SummaryWriter(str(self.run_dir), purge_step=start_step)
            keep_records_up_to(self.metrics_path, start_step)
            with run_write(self.metrics_path, "metrics"):
                self.metrics_file = self.metrics_path.open("a")
        except BaseException:
            self.quiet_threads.close()
            raise
        self.progress: Progress | None = None
        if show_progress:
            self.progress = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[sps]:>6} sps"),
                TextColumn("return {task.fields[ret]:>7}"),
                TextColumn("eps {task.fields[eps]:.3f}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task(
                "train", total=cfg.total_steps, completed=start_step, sps="-", ret="-", eps=cfg.epsilon_start
            )
            self.progress.start()

    def tensorboard_write(self) -> contextlib.AbstractContextManager[None]:
        """The block writes TensorBoard events (into files the writer names itself, in the run dir)."""
        return run_write(self.run_dir, "TensorBoard events in")

    def scalars(self, values: dict[str, float], step: int) -> None:
        """`values` at `step` as one TensorBoard event (what `add_scalar` writes once per value: half the cost of
        logging an episode's return and length), and to every sink."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=name, simple_value=float(v)) for name, v in values.items()])
        with self.tensorboard_write():
            self.writer._get_file_writer().add_summary(summary, step)  # as add_scalar writes its one value
        for sink in self.sinks:
            sink.scalars(values, step)

    def record(self, kind: str, step: int, **values: Any) -> None:
        """One line of metrics.jsonl: what `fastdqn report` and the ablation plots read back."""
        line = json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n"
        with run_write(self.metrics_path, "a metrics record to", len(line.encode())):
            self.metrics_file.write(line)
            self.metrics_file.flush()

    def advance(self, step: int, sps: float, recent_return: float | None, epsilon: float) -> None:
        if self.progress is not None:
            ret = "-" if recent_return is None else f"{recent_return:.1f}"
            self.progress.update(self.task, completed=step, sps=f"{sps:.0f}", ret=ret, eps=epsilon)

    # --- what the training loop reports ---------------------------------------------------------------
    def episodes(self, finished: list[tuple[int, float, int]]) -> None:
        """Finished episodes, each (env step it ended at, raw return (a whole game for Atari), length), written in one
        call at the loop's next sync point instead of one call each inside the loop."""
        for step, ret, length in finished:
            self.scalars({"charts/episodic_return": ret, "charts/episodic_length": length}, step)

    def training(
        self,
        step: int,
        sps: float,
        epsilon: float,
        learning_rate: float,
        metrics: dict[str, float],
        recent_return: float | None,
        episodes: int,
    ) -> None:
        """The periodic training record: schedules, speed and the update metrics averaged since the last one."""
        scalars = {"charts/epsilon": epsilon, "charts/learning_rate": learning_rate, "charts/SPS": sps}
        scalars.update({f"losses/{k}": v for k, v in metrics.items()})
        self.scalars(scalars, step)
        self.record("train", step, sps=sps, epsilon=epsilon, recent_return=recent_return, episodes=episodes, **metrics)
        self.advance(step, sps, recent_return, epsilon)

    def evaluation(self, step: int, returns: np.ndarray, episodes: int, best: tuple[int, float, float]) -> None:
        """One evaluation's returns, with their mean and std, and the best evaluation so far (step, mean, std)."""
        mean, std = float(returns.mean()), float(returns.std())
        self.scalars({"eval/mean_return": mean, "eval/std_return": std, "eval/best_mean_return": best[1]}, step)
        self.record(
            "eval",
            step,
            mean=mean,
            std=std,
            returns=returns.tolist(),
            episodes=episodes,
            best_mean=best[1],
            best_step=best[0],
        )
        self.message(f"eval @ {step:>8} env steps: {mean:8.2f} +- {std:.2f} over {len(returns)} episodes")

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else console).print(self.label + text)

    def hparams(self, final_eval_mean: float) -> None:
        flat = {k: (str(v) if isinstance(v, list) else v) for k, v in self.cfg.to_dict().items()}
        with self.tensorboard_write():
            self.writer.add_hparams(flat, {"hparams/final_eval_mean": final_eval_mean}, run_name="hparams")

    def close(self, quiet: bool = False) -> None:
        """Stop the progress bar and close the files, each even if another fails; `quiet` drops their errors, for a
        run that is already failing with its own."""
        if self.progress is not None:
            self.progress.stop()
        errors = []
        for path, what, close in (
            (self.run_dir, "TensorBoard events in", self.writer.close),
            (self.metrics_path, "metrics", self.metrics_file.close),
        ):
            try:
                with run_write(path, what):
                    close()
            except Exception as exc:
                errors.append(exc)
        self.quiet_threads.close()
        if errors and not quiet:
            raise errors[0]


def keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without records after `step` and without a last line cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and json.loads(line).get("step", 0) <= step:
            kept.append(line)
    text = "".join(kept)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with run_write(path, "metrics", len(text.encode())):
            tmp.write_text(text)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summary_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table
