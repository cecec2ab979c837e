"""The `fastdqn` command: train and eval (each subcommand's --help lists every option with its default)."""

from __future__ import annotations

import argparse
import atexit
import difflib
import gc
import json
import os
import re
import sys
import threading
import typing
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, NoReturn

from fastdqn import config as C
from fastdqn.errors import ConfigError, FastDQNError, explain, one_line
from fastdqn.plans import METRICS

# Short names for the flags people type most; every config key also has its own --long-flag.
ALIASES = {"env_id": ["--env"], "num_envs": ["--envs"]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; defaults are None so only what the user typed overrides the config."""
    group = parser.add_argument_group("config keys (override --config and --set; steps are env steps)")
    for name, f in C.FIELDS.items():
        default = C.field_default(name)
        help_text = f"{f.metadata['help']} (default: {default})"
        flags = [*ALIASES.get(name, []), _flag(name)]
        hint = C._HINTS[name]
        if hint is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else None
            group.add_argument(
                *flags, dest=name, default=None, choices=choices, metavar=None if choices else "V", help=help_text
            )


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> C.Config:
    """Defaults < env preset (`Config` applies it) < base (a saved run's config) < --config file < --set items
    < flags."""
    values: dict[str, Any] = dict(base or {})
    if getattr(args, "config", None):
        values.update(C.load_yaml(args.config))
        for key in values:
            if key not in C.FIELDS:
                raise C.unknown_key_error(key, args.config)
    sets = C.parse_set(args.set or [])
    for key in sets:
        if key not in C.FIELDS:
            raise C.unknown_key_error(key, "--set")
    values.update(sets)
    values.update({k: getattr(args, k) for k in C.FIELDS if getattr(args, k, None) is not None})
    return C.from_dict(values, where=getattr(args, "config", None) or "config")


def tracking_from_args(args: argparse.Namespace) -> Any:
    """--track and its --wandb-* flags -> a `fastdqn.tracking.Tracking`, or None."""
    if not args.track:
        return None
    from fastdqn.tracking import Tracking

    return Tracking(project=args.wandb_project, entity=args.wandb_entity, group=args.wandb_group).check()


def cmd_train(args: argparse.Namespace) -> int:
    from fastdqn import api  # torch and gymnasium only now: a typo in the command line is reported at once

    track = tracking_from_args(args)
    if args.resume and args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
        raise ConfigError(f"--resume continues '{args.resume}' in place: drop --run-dir {args.run_dir}")
    values = parse_agent_values(args.agent_values or [])
    population = api.is_population(Path(args.resume)) if args.resume else config_from_args(args).agents > 1
    if population:
        if track is not None:
            raise ConfigError("--track sends one run to W&B: train populations (--agents > 1) without it")
        summary = train_population(args, values)
        if args.quiet:
            print(json.dumps(summary))
        return 0
    if values:
        raise ConfigError("--agent-values sets each agent's value: add --agents K (one value per agent)")
    if args.resume:
        cfg = config_from_args(args, base=api.saved_config(args.resume))
        result = api.train(cfg, args.resume, resume=True, show_progress=not args.quiet, track=track)
    else:
        cfg = config_from_args(args)
        result = api.train(
            cfg,
            args.run_dir,
            overwrite=args.overwrite,
            runs_root=args.runs_root,
            show_progress=not args.quiet,
            track=track,
        )
    if args.quiet:
        print(json.dumps(result.summary()))
    return 0


def train_population(args: argparse.Namespace, values: dict[str, list[Any]]) -> dict[str, Any]:
    """`fastdqn train --agents K` (or --resume of a population's dir); returns the population's JSON summary."""
    from fastdqn import api

    if args.resume:
        if values:
            raise ConfigError("--agent-values are kept from the population's start: drop them to resume it")
        cfg = config_from_args(args, base=api.saved_config(args.resume))
        return api.train_population(cfg, args.resume, resume=True, show_progress=not args.quiet).summary()
    return api.train_population(
        config_from_args(args),
        args.run_dir,
        values=values,
        overwrite=args.overwrite,
        runs_root=args.runs_root,
        show_progress=not args.quiet,
    ).summary()


def parse_agent_values(items: list[str]) -> dict[str, list[Any]]:
    """`--agent-values KEY=V1,V2,...` items -> {key: [values]} (typed like the key; population.py checks them)."""
    from fastdqn.plans import parse_grid

    return {key: [C.coerce(key, v) for v in values] for key, values in parse_grid(items, "--agent-values").items()}


def cmd_eval(args: argparse.Namespace) -> int:
    from fastdqn import api
    from fastdqn.logs import console, summary_table

    if args.agent is not None:
        args.run = str(Path(args.run) / f"agent-{args.agent}")
        if not Path(args.run).is_dir():
            raise ConfigError(f"'{args.run}' does not exist: --agent takes 0..K-1 of a population run dir (--agents K)")
    elif api.is_population(Path(args.run)):
        raise ConfigError(f"'{args.run}' is a population's run dir: pick an agent with --agent K")
    result = api.evaluate(
        args.run,
        episodes=args.episodes,
        seed=args.seed,
        epsilon=args.epsilon,
        device=args.device,
        video=args.video,
        checkpoint=args.checkpoint,
    )
    rows = {k: v for k, v in asdict(result).items() if k != "returns" and v is not None}
    run = Path(args.run)
    console.print(summary_table(f"eval {(run if run.is_dir() else run.parent).name}", rows))
    print(json.dumps({"mean": result.mean, "std": result.std}))
    return 0


def experiment_plan(args: argparse.Namespace, make: Any) -> tuple[Any, Path]:
    """`--resume DIR` -> that dir's plan; else make(config) and a new (or the given --out) dir."""
    from fastdqn import experiments as X
    from fastdqn.plans import load_plan

    if args.resume:
        return load_plan(Path(args.resume)), Path(args.resume)
    plan = make(config_from_args(args))
    return plan, Path(args.out) if args.out else X.default_out(plan.kind, Path(args.runs_root))


def run_experiment(args: argparse.Namespace, make: Any) -> int:
    """Plan (or load) the experiment and run it on the backend the flags name."""
    from fastdqn import experiments as X
    from fastdqn.backends import BackendSpec

    track = tracking_from_args(args)
    plan, out = experiment_plan(args, make)
    backend = BackendSpec(args.backend, args.workers, args.address, args.cpus_per_run, args.gpus_per_run)
    return X.execute(plan, out, backend, track)


def cmd_ablate(args: argparse.Namespace) -> int:
    from fastdqn.plans import ablation_plan

    ids = args.variants.split(",") if args.variants else None
    seeds = 5 if args.seeds is None else args.seeds
    return run_experiment(args, lambda cfg: ablation_plan(cfg, seeds, ids, populations=not args.separate_runs))


def cmd_sweep(args: argparse.Namespace) -> int:
    from fastdqn.plans import parse_grid, sweep_plan

    if not args.resume and not args.grid:
        raise ConfigError("sweep needs --grid key=v1,v2 ... (or --resume DIR)")
    if args.search is None:
        if args.trials is not None:
            raise ConfigError("--trials counts the runs of a search: add --search tpe (or random, grid)")
        return run_experiment(
            args,
            lambda cfg: sweep_plan(
                cfg,
                parse_grid(args.grid or []),
                3 if args.seeds is None else args.seeds,
                args.metric,
                populations=not args.separate_runs,
            ),
        )
    if args.seeds not in (None, 1):
        raise ConfigError(
            f"--search trains one run (the config's seed) per trial, each pruned on its own "
            f"evaluations: drop --seeds {args.seeds}, then train the best point over seeds with "
            "`fastdqn sweep --grid ... --seeds N`"
        )
    from fastdqn.search import search_plan

    return run_experiment(
        args,
        lambda cfg: search_plan(
            cfg,
            parse_grid(args.grid or []),
            args.search,
            args.trials,
            args.pruner,
            args.startup_trials,
            args.search_seed,
            args.metric,
        ),
    )


def cmd_report(args: argparse.Namespace) -> int:
    from fastdqn.logs import console
    from fastdqn.reports import report

    result = report(Path(args.dir))
    console.print(result.table)
    console.print(result.note)
    return 0


def add_tracking_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracking (Weights & Biases, pip install 'fastdqn[wandb]')")
    group.add_argument(
        "--track",
        action="store_true",
        help="also send each run's scalars, config and result to W&B (WANDB_MODE=offline keeps them on disk)",
    )
    group.add_argument("--wandb-project", default="fastdqn", help="W&B project (default: fastdqn)")
    group.add_argument("--wandb-entity", default=None, help="W&B entity (team or user; default: yours)")
    group.add_argument(
        "--wandb-group",
        default=None,
        help="W&B group of the runs (default: the experiment dir's name for ablate and sweep)",
    )


def add_experiment_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--config", metavar="YAML", help="base config file; flags and --set override it")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key of the base")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per point: the config's seed, seed+1, ... (default: "
        + ("5)" if kind == "ablate" else "3; a --search trains 1 per trial)"),
    )
    parser.add_argument(
        "--out",
        help=f"experiment dir (default: RUNS_ROOT/{kind}-<time>); with --backend ray, on "
        "storage every node sees at the same absolute path",
    )
    parser.add_argument("--runs-root", default="runs", help="parent of new experiment dirs")
    parser.add_argument("--resume", metavar="DIR", help="continue an experiment dir: finished runs are not run again")
    parser.add_argument(
        "--separate-runs",
        action="store_true",
        help="train every seed as a run of its own; by default a point's seeds train together as one population "
        "(fastdqn train --agents <seeds>) where its config allows (vector observations, uniform replay)",
    )
    backend = parser.add_argument_group("where the runs train")
    backend.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: worker processes on this machine; ray: Ray tasks on a Ray cluster "
        "(pip install 'fastdqn[ray]') (default: local)",
    )
    backend.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs trained at the same time (local default: 2, one process each; ray default: as "
        "many as the cluster's CPUs and GPUs hold)",
    )
    backend.add_argument(
        "--address",
        default=None,
        help="ray: the cluster, auto or HOST:PORT (from `ray start --head`) or ray://HOST:PORT (Ray "
        "client); default: RAY_ADDRESS, else the cluster `ray start` began here, else a new "
        "one on this machine",
    )
    backend.add_argument("--cpus-per-run", type=float, default=1.0, help="ray: CPUs each run reserves (default: 1)")
    backend.add_argument(
        "--gpus-per-run",
        type=float,
        default=0.0,
        help="ray: GPUs each run reserves; a fraction (0.25) lets several runs share a GPU (default: 0)",
    )
    add_tracking_flags(parser)
    add_config_flags(parser)


def cmd_bench(args: argparse.Namespace) -> int:
    from fastdqn.bench import run

    run(args)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """`fastdqn train --profile`, by default only as long as the profiler schedule needs."""
    if args.resume:
        raise ConfigError("fastdqn profile starts a new run: use `fastdqn train --resume RUN_DIR --profile` instead")
    args.profile = True
    if args.total_steps is None:
        cfg = config_from_args(args)
        wait, warmup, active, repeat = cfg.profile_schedule
        iterations = (wait + warmup + active) * max(repeat, 1) + 2
        args.total_steps = cfg.learning_starts + cfg.train_every + iterations * cfg.num_envs
    return cmd_train(args)


# --- parser ----------------------------------------------------------------------------------------------
def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The options of `fastdqn train` (also taken by `fastdqn profile`)."""
    parser.add_argument("--config", metavar="YAML", help="config file (see configs/); flags override it")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set learning_rate=3e-4 --set hidden_sizes=[256,256]",
    )
    parser.add_argument("--run-dir", help="where to write this run (default: RUNS_ROOT/<env>-s<seed>-<time>)")
    parser.add_argument("--runs-root", default="runs", help="parent dir of new run dirs (default: runs)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --run-dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; print a JSON result line at the end")
    parser.add_argument(
        "--agent-values",
        nargs="+",
        metavar="KEY=V1,V2",
        help="with --agents K: each agent's own value of a key (one per agent), e.g. learning_rate=1e-3,3e-3; keys: "
        "learning_rate, lr_end, adam_eps, max_grad_norm, huber_delta, tau and the epsilon schedule's",
    )
    add_tracking_flags(parser)
    add_config_flags(parser)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `fastdqn: error:` line, naming the closest flag."""

    def option_strings(self) -> list[str]:
        """Every flag of this parser and of its subcommands."""
        found: list[str] = []
        for action in self._actions:
            found += action.option_strings
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += sub.option_strings()
        return found

    def commands_with(self, flag: str) -> list[str]:
        """The subcommands that have `flag`."""
        return [
            name
            for action in self._actions
            if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()
            if flag in sub.option_strings()
        ]

    def error(self, message: str) -> NoReturn:
        _, marker, rest = message.partition("unrecognized arguments:")
        hints = []
        for flag in re.findall(r"(?:^|\s)(--?[A-Za-z][\w-]*)", rest) if marker else []:
            owners = self.commands_with(flag)
            close = difflib.get_close_matches(flag, self.option_strings(), n=1, cutoff=0.6)
            if owners:
                hints.append(f"{flag} is an option of `fastdqn {' / '.join(owners)}`, not of this command")
            elif close:
                hints.append(f"did you mean {close[0]} (for {flag})?")
        hint = " ".join(hints) or f"see `{self.prog} --help`"
        self.exit(2, f"fastdqn: error: {message}: {hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="fastdqn",
        description="The fastest correct DQN trainer for PyTorch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train a DQN agent (CartPole-v1 by default)",
        description="Train a DQN agent. Steps are env steps: a vector step of N envs is N.",
    )
    add_train_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval",
        help="greedy, seeded evaluation of a run's best policy (best.pt)",
        description="Evaluate a run (its best.pt, the network of its best evaluation, unless "
        "--checkpoint says otherwise) or one checkpoint file.",
    )
    ev.add_argument("run", metavar="RUN_DIR_OR_CKPT", help="a run dir under runs/ or a ckpt-*.pt / best.pt file")
    ev.add_argument(
        "--checkpoint",
        default=None,
        metavar="best|last|PATH",
        help="which of the run's checkpoints: best (default), last (the newest ckpt-*.pt) or a file",
    )
    ev.add_argument("--agent", type=int, default=None, help="which agent of a population run dir (--agents K): 0..K-1")
    ev.add_argument("--episodes", type=int, default=10, help="episodes, each on its own seeded env (default: 10)")
    ev.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    ev.add_argument("--epsilon", type=float, default=None, help="exploration during evaluation (default: config)")
    ev.add_argument("--device", default=None, help="device to evaluate on (default: the run's)")
    ev.add_argument(
        "--video",
        action="store_true",
        help="also record one episode (a whole game for Atari) to RUN_DIR/<ckpt>-seed<seed>.mp4 (.gif if no mp4 codec)",
    )
    ev.set_defaults(func=cmd_eval)

    ab = sub.add_parser(
        "ablate",
        help="the DQN ablation table: variants x seeds, a Markdown table and a plot",
        description="Train the ablation variants (full DQN, no target network, no replay buffer, "
        "small buffer, no exploration decay, MSE loss, Double DQN) over several seeds "
        "in worker processes or on a Ray cluster, then write results.md and curves.png.",
    )
    ab.add_argument(
        "--variants",
        metavar="ID,ID",
        help="variant ids to run instead of the seven classic rows: full, "
        "no-target, no-replay, small-buffer, no-decay, mse, double, dueling, nstep, per",
    )
    add_experiment_flags(ab, "ablate")
    ab.set_defaults(func=cmd_ablate)

    sw = sub.add_parser(
        "sweep",
        help="grid over config keys with seeds per point, or an Optuna search; resumable",
        description="Train every point of a grid over several seeds, or --trials points picked by "
        "an Optuna search (TPE, random or grid) that prunes bad runs early; write "
        "results.md/results.csv sorted by --metric and best.yaml.",
    )
    sw.add_argument(
        "--grid",
        nargs="+",
        metavar="KEY=SPEC",
        help="the values or range of each key: a,b,c (listed "
        "values, e.g. learning_rate=1e-3,3e-4 hidden_sizes=[64],[64,64]); with --search also lo:hi "
        "(log-uniform when lo > 0, e.g. learning_rate=1e-4:1e-2) and int:lo:hi (uniform integers)",
    )
    sw.add_argument(
        "--search",
        choices=["tpe", "random", "grid"],
        default=None,
        help="let Optuna pick the points (pip install 'fastdqn[optuna]'); the study lives in the sweep dir, "
        "so --resume (on any machine that shares it) goes on with it",
    )
    sw.add_argument("--trials", type=int, default=None, help="--search: runs in all (grid: every point by default)")
    sw.add_argument(
        "--pruner",
        choices=["median", "halving", "none"],
        default="median",
        help="--search: stop a run whose evaluations fall behind (median of earlier trials at the same "
        "step, or successive halving); never in a run's first quarter (default: median)",
    )
    sw.add_argument(
        "--startup-trials",
        type=int,
        default=5,
        help="--search: trials TPE samples at random, and that end before the median pruner prunes (default: 5)",
    )
    sw.add_argument("--search-seed", type=int, default=0, help="--search: seed of the sampler (default: 0)")
    sw.add_argument(
        "--metric",
        default="final_return",
        choices=list(METRICS),
        help="what ranks the points (median over seeds; best_return = the best "
        "evaluation's, auc = mean greedy return over all evaluations)",
    )
    add_experiment_flags(sw, "sweep")
    sw.set_defaults(func=cmd_sweep)

    bench = sub.add_parser(
        "bench",
        help="time update-step variants, replay and training; table + JSON",
        description="Benchmark the update step (eager / compiled / compiled+AMP / CUDA graph), "
        "replay add and sample, end-to-end CartPole training with 1, 16, 64 envs, "
        "and fastdqn against CleanRL's own dqn.py at its settings. Every training "
        "run is a new process; each reports its whole run, its time to the first "
        "update and its steady-state rate. Prints medians and speed-ups measured in "
        "this run; writes benchmarks/results/bench-<time>.json and .md.",
    )
    from fastdqn.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    prof = sub.add_parser(
        "profile",
        help="a short `fastdqn train --profile` run: trace files and top operators",
        description="Train with torch.profiler on (every `fastdqn train` option is accepted) for "
        "just the steps its profile_schedule needs after the first update, unless "
        "--total-steps is given. Writes RUN_DIR/profile/ and prints the top operators.",
    )
    add_train_flags(prof)
    prof.set_defaults(func=cmd_profile)

    rep = sub.add_parser(
        "report",
        help="rebuild an ablation's or sweep's table and plot from its dir",
        description="Rebuild results.md (and curves.png or results.csv/best.yaml) from what is on disk.",
    )
    rep.add_argument("dir", metavar="DIR", help="an experiment dir made by `fastdqn ablate` or `fastdqn sweep`")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:  # async vector envs log a crashed worker's traceback; our one error line restates it
        warnings.filterwarnings("ignore", message=".*ERROR: (Received the following error|Traceback|Raising the last)")
    try:
        return args.func(args)
    except FastDQNError as exc:
        if args.debug:
            raise
        print(f"fastdqn: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fastdqn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # from torch, gymnasium or the OS: still one line unless --debug
        if args.debug:
            raise
        print(f"fastdqn: error: {explain(exc)}", file=sys.stderr)
        return 1


def run() -> NoReturn:
    """The `fastdqn` command: `main`, then an exit without the interpreter's teardown, which with torch loaded is a
    noticeable part of a short run (`python -c "import torch"` against the same ending in `os._exit(0)`: 1.51 against
    1.08 s on this project's CPU). The files are closed by then; stdio is flushed and the exit handlers run (Ray,
    multiprocessing) as at a normal exit. While a non-daemon thread is still alive, under a profiler or tracer
    (cProfile, coverage), or when `main` raises, the exit is the normal one.

    The garbage collector runs every 50,000 allocations instead of every 700: importing fastdqn.api makes some
    280,000 objects the collector tracks (`gc.disable(); import fastdqn.api; gc.get_count()`), and each collection
    that arrives among them walks them all."""
    gc.set_threshold(50_000, 10, 10)
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    profiled = sys.getprofile() is not None or sys.gettrace() is not None  # cProfile, coverage: they write at exit
    if profiled or any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs first; only the teardown after it is skipped
    os._exit(code)


if __name__ == "__main__":
    run()
