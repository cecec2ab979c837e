"""The `fastdqn` command: train and eval (each subcommand's --help lists every option with its default)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from fastdqn import config as C
from fastdqn.errors import CheckpointError, ConfigError, FastDQNError

# Short names for the flags people type most; every config key also has its own --long-flag.
ALIASES = {"env_id": ["--env"], "num_envs": ["--envs"]}
CONFIG_FILE = "config.yaml"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; defaults are None so only what the user typed overrides the config."""
    group = parser.add_argument_group("config keys (override --config and --set; steps are env steps)")
    for name, f in C.FIELDS.items():
        default = f.default if f.default is not C.dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        flags = [*ALIASES.get(name, []), _flag(name)]
        hint = C._HINTS[name]
        if hint is bool:
            group.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = list(typing.get_args(hint)) if typing.get_origin(hint) is Literal else None
            group.add_argument(*flags, dest=name, default=None, choices=choices, metavar=None if choices else "V",
                               help=help_text)



def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> C.Config:
    """Defaults < Atari preset (ALE ids) < base (a saved run's config) < --config file < --set items < flags."""
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
    from fastdqn.atari import ATARI_DEFAULTS, is_atari_id

    if is_atari_id(str(values.get("env_id", ""))):  # the published DQN settings, under all the user gave
        values = {**ATARI_DEFAULTS, **values}
    return C.from_dict(values, where=getattr(args, "config", None) or "config")


def default_run_dir(cfg: C.Config, root: Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.env_id).strip("-")
    return root / f"{slug}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_config(cfg: C.Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --- subcommands -----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from fastdqn.checkpoint import latest_checkpoint
    from fastdqn.trainer import Trainer, load_run_checkpoint, resolve_device

    if args.resume:
        run_dir = Path(args.resume)
        ckpt = latest_checkpoint(run_dir)
        state = load_run_checkpoint(ckpt, "cpu")
        cfg = config_from_args(args, base=state["config"])
        trainer = Trainer(cfg, run_dir, show_progress=not args.quiet)
        trainer.restore(load_run_checkpoint(ckpt, trainer.device))
        write_config(cfg, run_dir)
    else:
        cfg = config_from_args(args)
        resolve_device(cfg.device)  # fail before touching the disk
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg, Path(args.runs_root))
        if run_dir.exists() and any(run_dir.iterdir()):
            if not args.overwrite:
                raise ConfigError(f"run dir '{run_dir}' already exists: pass --resume {run_dir} to continue it, "
                                  "--overwrite to replace it, or another --run-dir")
            shutil.rmtree(run_dir)
        write_config(cfg, run_dir)
        trainer = Trainer(cfg, run_dir, show_progress=not args.quiet)
    result = trainer.run()
    if args.quiet:
        print(json.dumps({"run_dir": str(result.run_dir), "env_steps": result.env_steps,
                          "final_eval_mean": result.final_eval_mean, "steps_to_solve": result.steps_to_solve,
                          "wall_time": round(result.wall_time, 2), "interrupted": result.interrupted}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from fastdqn.checkpoint import latest_checkpoint
    from fastdqn.envs import make_vector_env
    from fastdqn.evaluation import evaluate
    from fastdqn.learner import DQNLearner
    from fastdqn.logs import console, summary_table
    from fastdqn.trainer import load_run_checkpoint, resolve_device

    target = Path(args.run)
    ckpt = target if target.is_file() else latest_checkpoint(target)
    run_dir = ckpt.parent
    state = load_run_checkpoint(ckpt, "cpu")
    cfg = C.from_dict(state["config"]).updated(num_envs=1, compile=False)
    if args.device:
        cfg = cfg.updated(device=args.device)
    device = resolve_device(cfg.device)
    probe = make_vector_env(cfg, 1, asynchronous=False)
    obs_shape, n_actions = tuple(probe.single_observation_space.shape), int(probe.single_action_space.n)
    probe.close()
    learner = DQNLearner(cfg, obs_shape, n_actions, device)
    try:
        learner.q.load_state_dict(state["learner"]["q"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint '{ckpt}' does not match its config's network "
                              f"({str(exc).splitlines()[0][:100]})") from None
    epsilon = cfg.eval_epsilon if args.epsilon is None else args.epsilon
    seed = cfg.seed if args.seed is None else args.seed
    returns = evaluate(lambda o: learner.act(o, epsilon), cfg, args.episodes, seed, device)
    result = {"checkpoint": ckpt.name, "env_step": state["counters"]["env_step"], "episodes": args.episodes,
              "seed": seed, "epsilon": epsilon, "mean": float(np.mean(returns)), "std": float(np.std(returns)),
              "returns": returns.tolist()}
    if args.video:
        from fastdqn.video import record_episode, write_video

        frames, video_return = record_episode(lambda o: learner.act(o, epsilon), cfg, seed, device)
        video = write_video(frames, run_dir / f"{ckpt.stem}-seed{seed}.mp4")
        result.update(video=str(video), video_return=video_return)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    console.print(summary_table(f"eval {run_dir.name}", {k: v for k, v in result.items() if k != "returns"}))
    print(json.dumps({"mean": result["mean"], "std": result["std"]}))
    return 0


def experiment_plan(args: argparse.Namespace, make: Any) -> tuple[Any, Path]:
    """`--resume DIR` -> that dir's plan; else make(config) and a new (or the given --out) dir."""
    from fastdqn import experiments as X

    if args.resume:
        return X.load_plan(Path(args.resume)), Path(args.resume)
    plan = make(config_from_args(args))
    return plan, Path(args.out) if args.out else X.default_out(plan.kind, Path(args.runs_root))


def cmd_ablate(args: argparse.Namespace) -> int:
    from fastdqn import experiments as X

    ids = args.variants.split(",") if args.variants else None
    plan, out = experiment_plan(args, lambda cfg: X.ablation_plan(cfg, args.seeds, ids))
    return X.execute(plan, out, args.workers)


def cmd_sweep(args: argparse.Namespace) -> int:
    from fastdqn import experiments as X

    if not args.resume and not args.grid:
        raise ConfigError("sweep needs --grid key=v1,v2 ... (or --resume DIR)")
    plan, out = experiment_plan(args, lambda cfg: X.sweep_plan(cfg, X.parse_grid(args.grid or []), args.seeds,
                                                               args.samples, args.sample_seed, args.metric))
    return X.execute(plan, out, args.workers)


def cmd_report(args: argparse.Namespace) -> int:
    from fastdqn import experiments as X
    from fastdqn.logs import console

    markdown, table = X.report(Path(args.dir))
    console.print(table)
    console.print(markdown.rsplit("\n\n", 1)[-1].strip())
    return 0


def add_experiment_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--config", metavar="YAML", help="base config file; flags and --set override it")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key of the base")
    parser.add_argument("--seeds", type=int, default=5 if kind == "ablate" else 3,
                        help="seeds per point: the config's seed, seed+1, ...")
    parser.add_argument("--workers", type=int, default=2, help="runs trained at the same time, one process each")
    parser.add_argument("--out", help=f"experiment dir (default: RUNS_ROOT/{kind}-<time>)")
    parser.add_argument("--runs-root", default="runs", help="parent of new experiment dirs")
    parser.add_argument("--resume", metavar="DIR", help="continue an experiment dir: finished runs are not run again")
    add_config_flags(parser)


# --- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdqn", description="The fastest correct DQN trainer for PyTorch.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train a DQN agent (CartPole-v1 by default)",
                           description="Train a DQN agent. Steps are env steps: a vector step of N envs is N.")
    train.add_argument("--config", metavar="YAML", help="config file (see configs/); flags override it")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any config key, e.g. --set learning_rate=3e-4 --set hidden_sizes=[256,256]")
    train.add_argument("--run-dir", help="where to write this run (default: RUNS_ROOT/<env>-s<seed>-<time>)")
    train.add_argument("--runs-root", default="runs", help="parent dir of new run dirs (default: runs)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --run-dir")
    train.add_argument("--quiet", action="store_true", help="no progress bar; print a JSON result line at the end")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="greedy, seeded evaluation of a run's newest checkpoint",
                        description="Evaluate a run (its newest checkpoint) or one checkpoint file.")
    ev.add_argument("run", metavar="RUN_DIR_OR_CKPT", help="a run dir under runs/ or a ckpt-*.pt file")
    ev.add_argument("--episodes", type=int, default=10, help="episodes, each on its own seeded env (default: 10)")
    ev.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's seed)")
    ev.add_argument("--epsilon", type=float, default=None, help="exploration during evaluation (default: config)")
    ev.add_argument("--device", default=None, help="device to evaluate on (default: the run's)")
    ev.add_argument("--video", action="store_true",
                    help="also record one episode (a whole game for Atari) to RUN_DIR/<ckpt>-seed<seed>.mp4 (.gif "
                         "if no mp4 codec)")
    ev.set_defaults(func=cmd_eval)

    ab = sub.add_parser("ablate", help="the DQN ablation table: variants x seeds, a Markdown table and a plot",
                        description="Train the ablation variants (full DQN, no target network, no replay buffer, "
                                    "small buffer, no exploration decay, MSE loss, Double DQN) over several seeds "
                                    "in worker processes, then write results.md and curves.png.")
    ab.add_argument("--variants", metavar="ID,ID", help="variant ids to run instead of the lecture's seven: full, "
                    "no-target, no-replay, small-buffer, no-decay, mse, double, dueling, nstep, per")
    add_experiment_flags(ab, "ablate")
    ab.set_defaults(func=cmd_ablate)

    sw = sub.add_parser("sweep", help="grid or random search over config keys, seeds per point, resumable",
                        description="Train every point of a grid (or --samples random points) over several seeds; "
                                    "write results.md/results.csv sorted by --metric and best.yaml.")
    sw.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="values per key, e.g. learning_rate=1e-3,3e-4 "
                    "batch_size=32,64; with --samples a key may give a range lo:hi (log-uniform when lo > 0)")
    sw.add_argument("--samples", type=int, default=0, help="random search: this many random points instead of the grid")
    sw.add_argument("--sample-seed", type=int, default=0, help="seed of the random search")
    sw.add_argument("--metric", default="final_return",
                    choices=["final_return", "auc", "steps_to_solve", "episodes_to_solve"],
                    help="what ranks the points (median over seeds; auc = mean greedy return over all evaluations)")
    add_experiment_flags(sw, "sweep")
    sw.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="rebuild an ablation's or sweep's table and plot from its dir",
                         description="Rebuild results.md (and curves.png or results.csv/best.yaml) from what is on disk.")
    rep.add_argument("dir", metavar="DIR", help="an experiment dir made by `fastdqn ablate` or `fastdqn sweep`")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FastDQNError as exc:
        if args.debug:
            raise
        print(f"fastdqn: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fastdqn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
