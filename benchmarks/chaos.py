"""Chaos: a small training job run again and again under faults injected at random moments, resumed after each the
way docs/reliability.md tells a user to, and checked when it finishes.

    python benchmarks/chaos.py --faults 50 [--minutes 10] [--seed 0] [--out benchmarks/results/chaos.json]

Faults (each through the real CLI, `fastdqn train` in its own process group):
  sigkill_trainer       kill -9 of the trainer                       -> fastdqn train --resume RUN
  sigterm_trainer       SIGTERM (a cluster's stop)                     -> fastdqn train --resume RUN
  sigkill_worker        kill -9 of one async env worker (the OOM killer); with env_restarts 0 the run stops with a
                        checkpoint (-> --resume), with 1 it starts the worker again and goes on
  disk_full             the run dir's filesystem (a tmpfs) filled up  -> free space, fastdqn train --resume RUN
  truncated_checkpoint  kill -9, then the newest checkpoint cut short -> the resume names the previous one: move the
                        cut one away, resume
  second_process        a second `fastdqn train --resume RUN` into the running run: refused in one line, the first
                        goes on (it imports fastdqn before the first has progressed, then tries the run dir)
A job is either exact (1 sync env, save_replay: its final weights must equal those of an unbroken run) or async
(4 async envs, where a resume starts new episodes, so only the checks below apply). When a job reaches
total_steps: every checkpoint left loads, metrics.jsonl holds each training record once (no duplicate or missing
step), nothing half-written is left, no process of the run is left, and an exact job matches the unbroken run.
Each fault is checked on the spot too (exit status, its one line, the checkpoint it resumes from is the newest
complete one). Lost work is what the resumed run does again: the last logged env step (log_every=20) minus the
checkpoint it resumed from. Prints a table and writes it with every fault's record to --out. Needs root (tmpfs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the pinned small CartPole job and the tmpfs helpers the tests use

from fastdqn.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from small_fs import fill, tmpfs  # noqa: E402
from small_runs import small_flags  # noqa: E402

TOTAL, CHECKPOINT_EVERY, LOG_EVERY = 2000, 100, 20
COMMON = dict(
    total_steps=TOTAL, checkpoint_every=CHECKPOINT_EVERY, log_every=LOG_EVERY, save_replay=True, keep_checkpoints=3
)
JOBS = {
    "exact": dict(
        flags=small_flags(**COMMON),
        exact=True,
        kinds=["sigkill_trainer", "sigterm_trainer", "disk_full", "truncated_checkpoint", "second_process"],
    ),
    "async": dict(
        flags=small_flags(**COMMON, num_envs=4, vector_mode="async"),
        exact=False,
        kinds=[
            "sigkill_trainer",
            "sigterm_trainer",
            "sigkill_worker",
            "disk_full",
            "truncated_checkpoint",
            "second_process",
        ],
    ),
}
KINDS = JOBS["async"]["kinds"]
WAIT = 120  # seconds any one step of the script may take before it counts as a failure
RESTARTS = 10  # env_restarts of a trainer whose worker is killed to be started again
PR_SET_CHILD_SUBREAPER = 36
STARTED = time.monotonic()


@dataclass
class Fault:
    job: str
    kind: str
    reached: int = 0  # last logged env step when the fault hit
    resumed_from: int = 0  # env step of the checkpoint the run went on from
    survived: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return max(0, self.reached - self.resumed_from)


class Failed(Exception):
    """A check of the chaos run failed: the fault was not survived."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


# --- the run on disk ------------------------------------------------------------------------------------
def steps(run: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in list_checkpoints(run)]


def newest(run: Path) -> int:
    found = steps(run)
    return found[-1] if found else 0


def logged(run: Path) -> list[int]:
    """Env steps of the training records in metrics.jsonl, in file order (a line cut short is skipped)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            record = json.loads(line)
            if record["kind"] == "train":
                found.append(record["step"])
    return found


def complete(run: Path) -> list[int]:
    """Steps of the checkpoints that load."""
    good = []
    for path in list_checkpoints(run):
        try:
            load_checkpoint(path)
        except Exception:
            continue
        good.append(int(path.stem.split("-")[1]))
    return good


# --- processes ------------------------------------------------------------------------------------------
def train(run: Path, job: str, resume: bool, *extra: str) -> subprocess.Popen:
    args = ["--resume", str(run), *extra] if resume else ["--run-dir", str(run), *JOBS[job]["flags"], *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "fastdqn.cli", "train", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def waiting_second(run: Path) -> subprocess.Popen:
    """`fastdqn train --resume RUN` in a process that imports fastdqn first and then waits for a line on stdin, so
    that the run it collides with is still training when it tries the run dir (importing takes seconds here)."""
    code = (
        "import sys, fastdqn.api, fastdqn.cli; sys.stdin.readline(); "
        f"sys.exit(fastdqn.cli.main(['train', '--quiet', '--resume', {str(run)!r}]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def ended(proc: subprocess.Popen, timeout: float = WAIT) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise Failed(f"the trainer did not end within {timeout:g} s") from None
    check(not alive_group(proc.pid), "processes of the run were left running")
    return out, err


def alive_group(pgid: int, grace: float = 10.0) -> bool:
    """Is any process of the process group `pgid` still running after `grace` seconds? Workers orphaned by a killed
    trainer come to this script (a child subreaper), which reaps them."""
    deadline = time.monotonic() + grace
    while True:
        try:
            while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def one_line(err: str) -> str:
    check("Traceback" not in err, f"a traceback: {err[-500:]}")
    lines = err.strip().splitlines()
    return lines[-1] if lines else ""


def workers(pid: int) -> list[int]:
    return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for_progress(proc: subprocess.Popen, run: Path, rng: random.Random, kind: str, floor: int) -> bool:
    """Until a checkpoint 1-3 ahead of the newest, written by this trainer (newer than `floor`, the newest when it
    started: a signal that lands while Python starts only finds the default handlers) and before the last one (two
    checkpoints for a truncation, which goes back to the one before), then a random fraction of a second. False if
    there is no such checkpoint to wait for, or the run finished first."""
    target = min(newest(run) + CHECKPOINT_EVERY * rng.randint(1, 3), TOTAL - CHECKPOINT_EVERY)
    if target <= floor:
        return False
    deadline = time.monotonic() + WAIT
    while newest(run) < target or kind == "truncated_checkpoint" and len(steps(run)) < 2:
        if proc.poll() is not None:
            return False
        check(time.monotonic() < deadline, "the run made no progress")
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    return proc.poll() is None


# --- the faults -----------------------------------------------------------------------------------------
def inject(
    kind: str,
    proc: subprocess.Popen,
    run: Path,
    fs: Path,
    rng: random.Random,
    fault: Fault,
    restarts: int,
    second: subprocess.Popen | None,
) -> subprocess.Popen | None:
    """Inject `kind` into the running `proc` and recover; returns the trainer that runs on (None: start one).
    `second` is the waiting second process of a second_process fault."""
    before = complete(run)
    if kind in ("sigkill_trainer", "truncated_checkpoint"):
        proc.kill()
        ended(proc)
        check(proc.returncode == -signal.SIGKILL, f"exit status {proc.returncode} after SIGKILL")
        fault.reached = max(logged(run), default=0)
        if kind == "truncated_checkpoint":
            return truncate_newest(run, rng, fault)
        fault.resumed_from = newest(run)
        check(fault.resumed_from == max(complete(run), default=0), "the newest checkpoint does not load")
        return None
    if kind == "sigterm_trainer":
        proc.send_signal(signal.SIGTERM)
        out, err = ended(proc)
        if proc.returncode == -signal.SIGTERM and newest(run) == TOTAL:  # after the final checkpoint, while exiting
            raise Finished
        check(proc.returncode == 0, f"exit status {proc.returncode} after SIGTERM: {err[-300:]}")
        result = json.loads(out.strip().splitlines()[-1])
        if not result["interrupted"] and result["env_steps"] == TOTAL:  # it came after the training loop
            raise Finished
        check(result["interrupted"], "SIGTERM did not stop the run")
        fault.reached = result["env_steps"]
        fault.resumed_from = newest(run)
        check(fault.resumed_from == result["env_steps"], "no checkpoint at the step it stopped")
        return None
    if kind == "sigkill_worker":
        victims = workers(proc.pid)
        if not victims and newest(run) == TOTAL:  # the run finished and closed its envs meanwhile
            ended(proc)
            raise Finished
        check(len(victims) == 4, f"expected 4 env workers, found {len(victims)}")
        os.kill(rng.choice(victims), signal.SIGKILL)
        if restarts:
            fault.notes.append(f"env_restarts {restarts}: worker started again")
            fault.reached = fault.resumed_from = 0  # nothing is redone
            time.sleep(1.0)
            check(
                proc.poll() is None or proc.returncode == 0, "the run stopped although env_restarts allowed a restart"
            )
            return proc
        out, err = ended(proc, timeout=60)
        line = one_line(err)
        check(proc.returncode == 2 and "worker process was killed by SIGKILL" in line, f"not the one line: {line}")
        saved = re.search(r"saved at env step (\d+)", line)
        check(saved is not None, f"no checkpoint named: {line}")
        fault.reached = fault.resumed_from = int(saved.group(1))
        check(newest(run) == fault.resumed_from, "the checkpoint it names is not the newest")
        fault.notes.append("env_restarts 0: stopped with a checkpoint")
        return None
    if kind == "disk_full":
        filler = fill(fs)
        try:
            out, err = ended(proc)
            fault.reached = max(logged(run), default=0)
            if proc.returncode == 0:  # it finished without writing again
                raise Finished
            line = one_line(err)
            check(
                proc.returncode == 1 and line.startswith("fastdqn: error: no space left on device writing"),
                f"exit status {proc.returncode}: {line}",
            )
            check(f"fastdqn train --resume {run}" in line, f"no resume command: {line}")
            check(not list(run.glob(".*.tmp")), "a partial file was left")
        finally:
            filler.unlink()  # "free space there"
        fault.resumed_from = newest(run)
        check(fault.resumed_from in complete(run) or fault.resumed_from == 0, "the newest checkpoint does not load")
        check(fault.resumed_from >= max(before, default=0), "a complete checkpoint was lost")
        return None
    if kind == "second_process":
        second.stdin.write("go\n")  # it has imported fastdqn meanwhile: now it tries the run dir at once
        second.stdin.flush()
        out, err = ended(second)
        if second.returncode == 0 and proc.poll() == 0:  # the first had finished before the second started
            ended(proc)
            raise Finished
        line = one_line(err)
        check(
            second.returncode == 2 and f"is in use by another fastdqn process (pid {proc.pid}" in line,
            f"the second process was not refused: {second.returncode} {line}",
        )
        check(proc.poll() is None or proc.returncode == 0, "the first process stopped")
        return proc
    raise ValueError(kind)


class Finished(Exception):
    """The run reached total_steps before the fault could hit it: no fault was injected."""


def truncate_newest(run: Path, rng: random.Random, fault: Fault) -> None:
    """Cut the newest checkpoint short, resume as told (the error names the previous one), move it away, resume."""
    found = list_checkpoints(run)
    cut = found[-1]
    data = cut.read_bytes()
    cut.write_bytes(data[: int(len(data) * rng.uniform(0.0, 0.9))])
    proc = train(run, fault.job, resume=True)
    _, err = ended(proc)
    line = one_line(err)
    previous = found[-2].name
    check(
        proc.returncode == 2
        and "is corrupt or truncated" in line
        and f"move it away to resume from {previous}" in line,
        f"not the one line naming {previous}: {line}",
    )
    moved = run.parent / "moved-away"
    moved.mkdir(exist_ok=True)
    shutil.move(str(cut), moved / f"{run.name}-{cut.name}")
    fault.resumed_from = newest(run)
    check(fault.resumed_from == int(previous.split("-")[1].split(".")[0]), "not resumed from the previous one")
    return None


# --- a job ----------------------------------------------------------------------------------------------
BAGS: dict[str, list[str]] = {job: [] for job in JOBS}


def draw(job: str, rng: random.Random) -> str:
    """The next fault for a job of this kind: each kind once, in a random order, then again."""
    if not BAGS[job]:
        BAGS[job] = rng.sample(JOBS[job]["kinds"], len(JOBS[job]["kinds"]))
    return BAGS[job].pop()


def run_job(
    job: str,
    run: Path,
    fs: Path,
    rng: random.Random,
    budget: int,
    deadline: float,
    reference: dict[str, torch.Tensor] | None,
) -> list[Fault]:
    """Train `run` to total_steps while injecting up to `budget` faults; returns them, survived or not."""
    faults: list[Fault] = []
    proc: subprocess.Popen | None = None
    resume, restarts, second, floor = False, 0, None, 0
    try:
        while True:
            want = budget > len(faults) and time.monotonic() < deadline
            kind = draw(job, rng) if want else None
            if proc is None or proc.poll() is not None:
                restarts = rng.choice([0, RESTARTS]) if kind == "sigkill_worker" else 0
                floor = newest(run)
                proc = train(run, job, resume, "--env-restarts", str(restarts))
                resume = True
            second = waiting_second(run) if kind == "second_process" else None
            if kind is None or not wait_for_progress(proc, run, rng, kind, floor):
                if second is not None:
                    second.kill()
                    second.communicate()
                out, err = ended(proc)
                check(proc.returncode == 0, f"the last run failed: {err[-500:]}")
                check(json.loads(out.strip().splitlines()[-1])["env_steps"] == TOTAL, "total_steps not reached")
                break
            fault = Fault(job, kind)
            faults.append(fault)
            try:
                proc = inject(kind, proc, run, fs, rng, fault, restarts, second)
            except Finished:
                faults.pop()
                break
            print(
                f"[{time.monotonic() - STARTED:6.0f} s] {job}: {kind} at env step {fault.reached}, going on from "
                f"{fault.resumed_from} ({' '.join(fault.notes)})",
                file=sys.stderr,
                flush=True,
            )
        verify(run, reference)
        for fault in faults:
            fault.survived = True
    except Failed as exc:
        if faults:
            faults[-1].notes.append(f"FAILED: {exc}")
        else:
            faults.append(Fault(job, "none", notes=[f"FAILED: {exc}"]))
        for left in (proc, second):
            if left is not None and left.poll() is None:
                os.killpg(left.pid, signal.SIGKILL)
                left.communicate()
    return faults


def verify(run: Path, reference: dict[str, torch.Tensor] | None) -> None:
    """What a finished job must show, whatever it went through."""
    check(newest(run) == TOTAL, f"the newest checkpoint is at {newest(run)}, not {TOTAL}")
    check(complete(run) == steps(run), "a checkpoint left behind does not load")
    check(not list(run.glob(".*.tmp")), "a partial file was left")
    check(
        logged(run) == list(range(LOG_EVERY, TOTAL + 1, LOG_EVERY)),
        "metrics.jsonl has duplicate or missing training records",
    )
    if reference is not None:
        final = load_checkpoint(list_checkpoints(run)[-1])["learner"]["q"]
        check(all(torch.equal(final[k], v) for k, v in reference.items()), "final weights differ from the unbroken run")


def unbroken(root: Path) -> dict[str, torch.Tensor]:
    """Final weights of the exact job trained without a fault."""
    proc = train(root / "unbroken", "exact", resume=False)
    _, err = ended(proc, timeout=600)
    check(proc.returncode == 0, f"the unbroken run failed: {err[-500:]}")
    return load_checkpoint(list_checkpoints(root / "unbroken")[-1])["learner"]["q"]


# --- the table ------------------------------------------------------------------------------------------
def summary(faults: list[Fault]) -> dict[str, dict]:
    table = {}
    for kind in KINDS + (["none"] if any(f.kind == "none" for f in faults) else []):
        mine = [f for f in faults if f.kind == kind]
        lost = [f.lost for f in mine]
        table[kind] = {
            "injected": len(mine),
            "survived": sum(f.survived for f in mine),
            "lost_mean": round(sum(lost) / len(lost), 1) if lost else None,
            "lost_max": max(lost) if lost else None,
        }
    return table


def markdown(table: dict[str, dict]) -> str:
    lines = [
        "| fault | injected | survived | lost env steps, mean | lost env steps, max |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, row in table.items():
        mean = "-" if row["lost_mean"] is None else f"{row['lost_mean']:g}"
        most = "-" if row["lost_max"] is None else str(row["lost_max"])
        lines.append(f"| {kind} | {row['injected']} | {row['survived']} | {mean} | {most} |")
    total = sum(r["injected"] for r in table.values())
    lines.append(f"| all | {total} | {sum(r['survived'] for r in table.values())} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=50, help="faults to inject in all")
    parser.add_argument("--minutes", type=float, default=10.0, help="inject no new fault after this long")
    parser.add_argument("--per-job", type=int, default=6, help="faults injected into one job at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choices and moments")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chaos.json"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    start, load = time.monotonic(), os.getloadavg()
    deadline = start + 60 * args.minutes
    faults: list[Fault] = []
    with tempfile.TemporaryDirectory(prefix="fastdqn-chaos-") as tmp, tmpfs(Path(tmp) / "fs", 16 * 1024) as fs:
        reference = unbroken(Path(tmp))
        jobs = 0
        while len(faults) < args.faults and time.monotonic() < deadline:
            job = ["exact", "async"][jobs % 2]
            budget = min(args.per_job, args.faults - len(faults))
            faults += run_job(
                job, fs / f"{job}-{jobs}", fs, rng, budget, deadline, reference if JOBS[job]["exact"] else None
            )
            shutil.rmtree(fs / f"{job}-{jobs}", ignore_errors=True)  # room for the next job
            jobs += 1
    table = summary(faults)
    print(markdown(table))
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "jobs": jobs,
        "wall_time_s": round(time.monotonic() - start, 1),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "job_settings": {
            "total_steps": TOTAL,
            "checkpoint_every": CHECKPOINT_EVERY,
            "log_every": LOG_EVERY,
            "jobs": {k: {"flags": v["flags"], "exact": v["exact"]} for k, v in JOBS.items()},
        },
        "summary": table,
        "all_survived": all(f.survived for f in faults),
        "faults": [{**asdict(f), "lost": f.lost} for f in faults],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"{len(faults)} faults in {jobs} jobs, {record['wall_time_s']} s; all survived: {record['all_survived']}; "
        f"written to {args.out}"
    )
    return 0 if record["all_survived"] and faults else 1


if __name__ == "__main__":
    sys.exit(main())
