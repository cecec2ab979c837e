"""The Ray backend (`--backend ray`): each run of an experiment is a Ray task on a Ray cluster.

A task asks for `--cpus-per-run` CPUs and `--gpus-per-run` GPUs (fractions let several runs share a GPU). Run
dirs are under `--out`, which every node must see at the same path (a network file system), since a run may
resume on another node than the one it started on. A task whose worker dies (killed, out of memory, its node
lost) is retried by Ray, and the retry resumes the run from its newest checkpoint; a run stopped by SIGTERM (a
node drained) saves a checkpoint and raises `RunStopped`, which Ray retries too. Ctrl-C cancels the tasks: Ray
interrupts each running one, which saves a checkpoint and exits as `fastdqn train` does on Ctrl-C.
Ray is an extra: pip install 'fastdqn[ray]'.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from fastdqn.backends import BackendSpec
from fastdqn.errors import ConfigError, import_extra, one_line
from fastdqn.jobs import RunJob, run_dir_in_use, train_job
from fastdqn.plans import PLAN_FILE

RETRIES = 3  # times Ray runs a task again after its worker died (or its run was stopped by a signal)
STOP_WAIT_S = 120.0  # how long Ctrl-C waits for the running runs to save their checkpoints


class RunStopped(Exception):
    """A run stopped by a signal other than Ray's cancel (its node being drained): Ray retries the task."""


def ray_job(job: RunJob, threads: int) -> dict[str, Any]:
    """A run as a Ray task; its result names the node it ran on."""
    import ray

    result = train_job(job, threads)
    if result.get("interrupted") and not result.get("pruned"):
        raise RunStopped(f"{job.run_dir} stopped at env step {result['env_steps']} (checkpoint saved)")
    return {**result, "node": ray.get_runtime_context().get_node_id()}


def _sees_plan(out: str) -> bool:
    return (Path(out) / PLAN_FILE).is_file()


class RayBackend:
    """Runs as Ray tasks: on the cluster at `spec.address` (Ray's default: RAY_ADDRESS, else the cluster that
    `ray start` began on this machine, else a new one on this machine alone), as many at once as its CPUs and
    GPUs hold (or `spec.workers`)."""

    def __init__(self, spec: BackendSpec, out: Path):
        self.ray = ray = import_extra("ray", "ray", "--backend ray")
        if not spec.cpus_per_run > 0 or spec.gpus_per_run < 0:
            raise ConfigError(
                f"--cpus-per-run must be > 0 and --gpus-per-run >= 0, got {spec.cpus_per_run} and {spec.gpus_per_run}"
            )
        if spec.workers is not None and spec.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {spec.workers}")
        self.spec = spec
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=spec.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        try:
            self._check_cluster(Path(out))
        except BaseException:
            self.close()
            raise
        self.task = ray.remote(ray_job).options(
            num_cpus=spec.cpus_per_run, num_gpus=spec.gpus_per_run, max_retries=RETRIES, retry_exceptions=[RunStopped]
        )
        self.threads = max(1, math.floor(spec.cpus_per_run))
        self.refs: dict[Any, RunJob] = {}

    def _check_cluster(self, out: Path) -> None:
        """Refuse a relative --out on several nodes, or GPUs the cluster lacks."""
        ray = self.ray
        nodes = sum(n["Alive"] for n in ray.nodes())
        if nodes > 1 and not out.is_absolute():
            raise ConfigError(
                f"--out {out} is a relative path, but the Ray cluster has {nodes} nodes: give an "
                "absolute path on storage that every node mounts at that path (e.g. an NFS share)"
            )
        if self.spec.gpus_per_run > 0 and not ray.cluster_resources().get("GPU"):
            raise ConfigError(
                f"--gpus-per-run {self.spec.gpus_per_run}, but the Ray cluster has no GPU: use "
                "--gpus-per-run 0, or add GPU nodes"
            )

    def start(self, out: Path) -> None:
        """Refuse an --out that some node does not see: a probe task on each node looks for its plan.json."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n["Alive"]]
        probe = ray.remote(_sees_plan)
        refs = {
            n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(out.resolve()))
            for n in nodes
        }
        blind = [node for node, ref in refs.items() if not ray.get(ref)]
        if blind:
            raise ConfigError(
                f"Ray node {blind[0]} does not see {out.resolve()}: put --out on storage that every "
                "node mounts at the same path (e.g. an NFS share)"
            )

    def describe(self) -> str:
        resources = self.ray.cluster_resources()
        nodes = sum(n["Alive"] for n in self.ray.nodes())
        gpus = f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""
        return (
            f"as Ray tasks on {nodes} node(s) with {resources.get('CPU', 0):g} CPUs{gpus}, "
            f"{self.spec.cpus_per_run:g} CPU and {self.spec.gpus_per_run:g} GPU per run, "
            f"{self.capacity()} at a time"
        )

    def capacity(self) -> int:
        resources = self.ray.cluster_resources()
        fits = resources.get("CPU", 0) / self.spec.cpus_per_run
        if self.spec.gpus_per_run > 0:
            fits = min(fits, resources.get("GPU", 0) / self.spec.gpus_per_run)
        fits = max(1, int(fits + 1e-9))
        return fits if self.spec.workers is None else min(fits, self.spec.workers)

    def running(self) -> int:
        return len(self.refs)

    def submit(self, job: RunJob) -> None:
        self.refs[self.task.remote(job, self.threads)] = job

    def wait(self) -> list[tuple[RunJob, dict[str, Any]]]:
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        ready += [r for r in self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)[0] if r not in ready]
        ended = []
        for ref in ready:
            job = self.refs.pop(ref)
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:  # retries used up, or the cluster lost the task
                result = {"run_dir": job.run_dir, "error": f"Ray: {one_line(exc)[:300]} (see {job.log_path})"}
            ended.append((job, result))
        return ended

    def stop(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref)
        held = wait_until_released([Path(job.run_dir) for job in self.refs.values()])
        self.refs.clear()
        if held:
            from fastdqn.logs import console

            console.print(
                f"[yellow]{len(held)} run(s) did not stop within {STOP_WAIT_S:.0f} s (e.g. {held[0]}): "
                "they resume from their newest checkpoint with --resume[/]"
            )

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def wait_until_released(run_dirs: list[Path], timeout: float = STOP_WAIT_S) -> list[Path]:
    """Wait until no process trains in these run dirs (their runs saved and exited); those still held."""
    deadline = time.monotonic() + timeout
    held = [d for d in run_dirs if run_dir_in_use(d)]
    while held and time.monotonic() < deadline:
        time.sleep(0.2)
        held = [d for d in held if run_dir_in_use(d)]
    return held
