"""The Ray backend on a real Ray cluster: two nodes on this machine (`ray start --head`, then `ray start
--address`), 1 CPU each, shared by this module's tests (each test uses its own experiment dirs).

The cluster listens on 127.0.0.2, a loopback address: Ray would turn 127.0.0.1 into the machine's network
address, and these tests keep their traffic on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray

from fastdqn import experiments as X
from fastdqn import plans as P
from fastdqn import reports as R
from fastdqn.backends import BackendSpec
from fastdqn.checkpoint import list_checkpoints
from fastdqn.cli import main
from fastdqn.config import Config
from fastdqn.errors import ConfigError
from fastdqn.experiments import make_job
from fastdqn.jobs import run_dir_in_use
from small_runs import PINNED

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HOST = "127.0.0.2"
TESTS = Path(__file__).resolve().parent
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}  # loopback only: no token needed
# Runs that last a few seconds whatever the machine's speed (5 ms a step), checkpointed every 100 env steps with
# their replay, so a resumed run goes on exactly as the uninterrupted one.
SLOW = {
    **PINNED,
    "env_id": "fault_envs:SlowCartPole-v0",
    "total_steps": 600,
    "checkpoint_every": 100,
    "keep_checkpoints": 2,
    "save_replay": True,
    "eval_every": 200,
    "eval_episodes": 1,
}
FAST = {**PINNED, "total_steps": 300, "eval_every": 150, "eval_episodes": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def alive_nodes(address: str) -> int:
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        return sum(n["Alive"] for n in ray.nodes())
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster():
    """The address of a two-node Ray cluster (1 CPU a node) whose workers import the tests' envs; RAY_ENV is set
    in this process (and so in its drivers) while the module's tests run."""
    temp = Path(tempfile.mkdtemp(prefix="fdqr", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    port = free_port()
    address = f"{HOST}:{port}"
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--block", "--num-cpus", "1", "--node-ip-address", HOST, "--disable-usage-stats"]
    nodes = []
    with pytest.MonkeyPatch.context() as mp:
        for key, value in RAY_ENV.items():
            mp.setenv(key, value)
        try:
            nodes.append(
                subprocess.Popen(
                    [
                        ray_cli,
                        "start",
                        "--head",
                        "--port",
                        str(port),
                        "--include-dashboard",
                        "false",
                        "--temp-dir",
                        str(temp),
                        *common,
                    ],
                    env=env,
                    stdout=(temp / "head.log").open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
            wait_for(lambda: socket.create_connection((HOST, port), timeout=1).close() is None, 120, temp)
            nodes.append(
                subprocess.Popen(
                    [ray_cli, "start", "--address", address, *common],
                    env=env,
                    stdout=(temp / "worker.log").open("w"),
                    stderr=subprocess.STDOUT,
                )
            )
            wait_for(lambda: alive_nodes(address) == 2, 120, temp)
            yield address
        finally:
            for node in reversed(nodes):  # SIGTERM: `ray start --block` stops the Ray processes it started
                node.terminate()
                try:
                    node.wait(60)
                except subprocess.TimeoutExpired:
                    node.kill()
            shutil.rmtree(temp, ignore_errors=True)


def wait_for(ready, timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (OSError, ConnectionError, RuntimeError):
            pass
        time.sleep(1)
    raise AssertionError(f"the Ray cluster did not start in {timeout} s; see {logs}/*.log")


def ray_flags(address: str) -> list[str]:
    return ["--backend", "ray", "--address", address]


def sets(values: dict) -> list[str]:
    return [f"--set={k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


def table_without_wall_time(out: Path) -> list[list[str]]:
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in (out / R.TABLE_FILE).read_text().splitlines()
        if line.startswith("|")
    ]
    return [row[:-1] for row in rows]  # every column but the last, the wall time


def test_runs_are_placed_on_both_nodes_and_a_relative_out_is_refused(cluster, tmp_path):
    from fastdqn.ray_backend import RayBackend

    with pytest.raises(ConfigError, match="relative path, but the Ray cluster has 2 nodes"):
        RayBackend(BackendSpec("ray", address=cluster), Path("runs/sweep"))
    assert not ray.is_initialized()  # the refused backend let go of the cluster
    out = tmp_path / "sweep"
    plan = P.sweep_plan(Config(**FAST), P.parse_grid(["learning_rate=1e-3,2e-3"]), 1)
    backend = RayBackend(BackendSpec("ray", address=cluster), out)
    try:
        P.prepare_dir(plan, out)
        backend.start(out)
        assert backend.capacity() == 2 and "2 node(s)" in backend.describe()
        for point in plan.points:
            backend.submit(make_job(plan, out, point, 1, None))
        results = []
        while backend.running():
            results += [result for _, result in backend.wait()]
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        backend.close()
    assert all("error" not in r and not r["interrupted"] for r in results)
    assert {r["node"] for r in results} == nodes and len(nodes) == 2  # one run on each node


def test_sweep_and_ablation_on_ray_give_the_local_backends_tables(cluster, tmp_path):
    for command in (
        ["sweep", "--grid", "learning_rate=1e-3,3e-3", "--seeds", "1"],
        ["ablate", "--variants", "full,no-target", "--seeds", "1"],
    ):
        local, on_ray = tmp_path / f"{command[0]}-local", tmp_path / f"{command[0]}-ray"
        assert main([*command, "--workers", "1", "--out", str(local), *sets(FAST)]) == 0
        assert main([*command, *ray_flags(cluster), "--out", str(on_ray), *sets(FAST)]) == 0
        assert table_without_wall_time(on_ray) == table_without_wall_time(local)
        assert len(table_without_wall_time(local)) == 4  # header, rule, two rows


def test_a_stopped_or_killed_worker_is_retried_and_its_run_resumes_exactly(cluster, tmp_path):
    plan = P.sweep_plan(Config(**SLOW), P.parse_grid(["learning_rate=1e-3"]), 1)
    run_dir = P.run_dir_of(tmp_path / "ray", plan.points[0], 1)
    signalled: list[tuple[int, int]] = []

    def newest_step() -> int:
        return max((int(p.stem.split("-")[1]) for p in list_checkpoints(run_dir)), default=0) if run_dir.is_dir() else 0

    def stop_then_kill_the_worker():
        """SIGTERM (a node drained) after the first checkpoint, SIGKILL (a crash) once the retry has checkpointed
        past step 300; each time to the Ray worker that holds the run dir."""
        deadline = time.monotonic() + 240
        for sig, after_step in ((signal.SIGTERM, 100), (signal.SIGKILL, 300)):
            while time.monotonic() < deadline:
                if newest_step() >= after_step and run_dir_in_use(run_dir):  # (Ray may retry in the same process)
                    holder = int((run_dir / ".lock").read_text().split()[0])
                    os.kill(holder, sig)
                    signalled.append((holder, sig))
                    break
                time.sleep(0.02)

    watcher = threading.Thread(target=stop_then_kill_the_worker, daemon=True)
    watcher.start()
    assert X.execute(plan, tmp_path / "ray", BackendSpec("ray", address=cluster)) == 0
    watcher.join()
    assert [sig for _, sig in signalled] == [signal.SIGTERM, signal.SIGKILL], "the run ended before it was stopped"
    result = json.loads((run_dir / P.RESULT_FILE).read_text())
    assert result["env_steps"] == 600 and not result["interrupted"]
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 3  # two retries resumed; a restart would leave one
    assert X.execute(plan, tmp_path / "local", BackendSpec(workers=1)) == 0  # the same run, never stopped
    assert table_without_wall_time(tmp_path / "ray") == table_without_wall_time(tmp_path / "local")


def test_ctrl_c_then_resume_finishes_the_plan_with_no_run_done_twice(cluster, tmp_path):
    out = tmp_path / "sweep"
    # The long run must outlast the short one, the queued run's start (a Ray worker importing torch, slow on a
    # loaded CPU) and its first checkpoint: at 5 ms a step, 4,000 steps are 20 s of sleep alone.
    short, long, queued = (P.Point(f"total_steps={n}", {}) for n in (200, 4000, 4001))
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastdqn.cli",
            "sweep",
            "--grid",
            "total_steps=200,4000,4001",
            "--seeds",
            "1",
            *ray_flags(cluster),
            "--out",
            str(out),
            *sets(SLOW),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    runs = {p.name: P.run_dir_of(out, p, 1) for p in (short, long, queued)}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if (runs[short.name] / P.RESULT_FILE).is_file() and all(
            d.is_dir() and list_checkpoints(d) for d in (runs[long.name], runs[queued.name])
        ):
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)  # Ctrl-C
    output = driver.communicate(timeout=180)[0]
    assert driver.returncode == 130, output
    assert "interrupted: finished runs are kept" in output
    assert (runs[short.name] / P.RESULT_FILE).is_file()
    stopped = [runs[long.name], runs[queued.name]]
    assert all(list_checkpoints(d) and not (d / P.RESULT_FILE).exists() for d in stopped), output
    stamp = (runs[short.name] / P.RESULT_FILE).stat().st_mtime_ns

    assert main(["sweep", "--resume", str(out), *ray_flags(cluster)]) == 0
    assert (runs[short.name] / P.RESULT_FILE).stat().st_mtime_ns == stamp  # not run again
    for run_dir in stopped:
        result = json.loads((run_dir / P.RESULT_FILE).read_text())
        steps = int(re.search(r"total_steps=(\d+)", run_dir.parent.name)[1])
        assert result["env_steps"] == steps and not result["interrupted"]
        assert len(list(run_dir.glob("events.out.tfevents*"))) == 2  # resumed from its checkpoint
