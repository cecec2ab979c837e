"""The one typed configuration object of a run, and how YAML files and `--set key=value` fill it.

Unit convention: every count of "steps" in this file is counted in *env steps*, one transition of one env.
A vector step of 16 envs is 16 env steps. `total_steps`, `learning_starts`, `train_every`,
`target_update_interval`, the epsilon schedule, `eval_every`, `log_every` and `checkpoint_every` all use it,
so a config means the same thing whatever `num_envs` is.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import yaml

from fastdqn.errors import ConfigError
from fastdqn.presets import preset_for, solve_line_of


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its one-line documentation (shown by `fastdqn train --help`)."""
    if isinstance(default, list):
        return field(default_factory=partial(list, default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(init=False)
class Config:
    """Every hyperparameter of a fastdqn run. Steps are env steps (one transition of one env).

    Keys not given take the preset of the env family (`fastdqn.presets`: the published settings for ALE/* ids),
    then the defaults below, so a Config built in Python and one built by the command line agree.
    """

    # --- environment -------------------------------------------------------------------------------------
    env_id: str = _f("CartPole-v1", "gymnasium environment id (Discrete action space)")
    num_envs: int = _f(8, "environments stepped together in one vector step")
    vector_mode: Literal["auto", "sync", "async", "native"] = _f(
        "auto",
        "sync: the envs in-process, one after another; async: one process per env; native: gymnasium's "
        "numpy-vectorized env, all envs in one call (CartPole only); auto: native where there is one and num_envs >= 6 "
        "(below that one Python env per env steps faster), else sync",
    )
    seed: int = _f(1, "seeds envs, action sampling, network init and replay sampling")
    agents: int = _f(
        1,
        "agents trained together in one process, seeds seed..seed+agents-1, with one batched update for all "
        "(a population: vector observations, uniform replay); each gets its own run dir agent-<k> in the run dir",
    )
    total_steps: int = _f(50_000, "env steps to train for (all envs together)")
    max_episode_steps: int = _f(0, "time limit per episode, 0 = the env's own")

    # --- replay ------------------------------------------------------------------------------------------
    buffer_size: int = _f(50_000, "replay capacity in transitions (one env step each)")
    learning_starts: int = _f(1_000, "env steps collected before the first gradient update (warm-up)")
    batch_size: int = _f(64, "transitions per gradient update")
    train_every: int = _f(256, "env steps between training phases; with N envs a vector step is N env steps")
    gradient_steps: int = _f(
        64, "gradient updates per training phase; updates per env step = gradient_steps/train_every"
    )
    replay_buffer: bool = _f(
        True,
        "false = the no-replay ablation: each update trains once on the newest vector step "
        "(needs buffer_size = batch_size = train_every = num_envs, gradient_steps = 1)",
    )

    # --- learning ----------------------------------------------------------------------------------------
    gamma: float = _f(0.99, "discount factor, in [0, 1]")
    learning_rate: float = _f(2.3e-3, "Adam learning rate (start value of the LR schedule)")
    lr_schedule: Literal["constant", "linear"] = _f("linear", "learning rate over training: constant or linear decay")
    lr_end: float = _f(1e-4, "final learning rate of the linear LR schedule, reached at total_steps")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    loss: Literal["huber", "mse"] = _f("huber", "TD loss: Huber (smooth L1) or mean squared error")
    huber_delta: float = _f(1.0, "Huber loss threshold between quadratic and linear")
    double_dqn: bool = _f(True, "Double DQN: online net picks a', target net evaluates it")
    max_grad_norm: float = _f(10.0, "clip the global gradient norm to this; 0 = no clipping")
    target_update: Literal["hard", "soft", "none"] = _f(
        "hard",
        "target net: hard copy every target_update_interval, Polyak soft update each gradient step, "
        "or none (target = online net)",
    )
    target_update_interval: int = _f(256, "env steps between hard target copies")
    tau: float = _f(0.005, "Polyak coefficient of the soft target update, in (0, 1]")
    hidden_sizes: list[int] = _f([256, 256], "MLP hidden layer widths")

    # --- extensions (dueling and prioritized off; n_step 1, double_dqn false and all off = the classic DQN) ---
    dueling: bool = _f(False, "dueling head: Q = V(s) + A(s, a) - mean_a A(s, a)")
    n_step: int = _f(3, "n-step returns: sum n discounted rewards, then bootstrap gamma^n * V (cut at episode ends)")
    prioritized: bool = _f(
        False, "proportional prioritized replay: sample with probability p^per_alpha, p = |TD error| + per_eps"
    )
    per_alpha: float = _f(0.6, "prioritized replay: how strongly priorities shape sampling (0 = uniform)")
    per_beta_start: float = _f(0.4, "prioritized replay: importance-weight exponent at step 0")
    per_beta_end: float = _f(1.0, "prioritized replay: importance-weight exponent reached (linearly) at total_steps")
    per_eps: float = _f(1e-6, "prioritized replay: added to |TD error| so no transition gets priority 0")

    # --- exploration -------------------------------------------------------------------------------------
    epsilon_schedule: Literal["linear", "exponential", "step", "constant"] = _f(
        "linear", "epsilon-greedy schedule over env steps"
    )
    epsilon_start: float = _f(1.0, "epsilon at step 0, in [0, 1]")
    epsilon_end: float = _f(0.04, "epsilon floor, in [0, 1]")
    epsilon_decay_steps: int = _f(
        8_000, "linear: steps to reach epsilon_end; exponential: time constant; step: steps between drops"
    )
    epsilon_step_factor: float = _f(0.5, "step schedule: epsilon is multiplied by this at every drop")

    # --- preprocessing -----------------------------------------------------------------------------------
    clip_rewards: bool = _f(False, "store rewards clipped to [-1, 1] (returns are still reported raw)")
    normalize_obs: bool = _f(False, "normalize observations by a running mean and std inside the network")

    # --- Atari and other pixel envs (84x84 grayscale frame stacks; ignored for vector observations) ------
    atari_backend: Literal["ale_vector", "gymnasium"] = _f(
        "ale_vector", "ALE/* ids: ale-py's C++ vector env (threads) or gymnasium AtariPreprocessing (one env each)"
    )
    env_threads: int = _f(0, "ale_vector backend: C++ threads stepping the envs; 0 = one per env, up to the CPU count")
    frame_stack: int = _f(4, "pixel envs: frames stacked into one observation (zero-padded at episode starts)")
    frame_skip: int = _f(4, "Atari: emulator frames per action (max-pooled over the last two)")
    noop_max: int = _f(30, "Atari: at most this many no-op actions at each reset (random start states)")
    episodic_life: bool = _f(
        True, "Atari: a lost life ends the training episode (no bootstrap); scores stay whole-game"
    )
    fire_reset: bool = _f(True, "Atari: press FIRE after reset in games that need it to start")
    repeat_action_probability: float = _f(0.25, "Atari: sticky actions, chance the previous action repeats (v5: 0.25)")
    full_action_space: bool = _f(False, "Atari: all 18 actions instead of the game's minimal set")

    # --- speed -------------------------------------------------------------------------------------------
    device: str = _f("auto", "auto (cuda if present, else cpu), cpu, cuda or cuda:N")
    compile: bool = _f(False, "torch.compile the update step")
    compile_strict: bool = _f(
        False, "with compile: fail if torch.compile cannot run here, instead of warning and running eager"
    )
    amp: bool = _f(
        False,
        "bf16 autocast for the CNNs' convolutions in the update step; fully connected layers "
        "(all of an MLP), Q-values, targets, loss, acting and optimizer stay fp32",
    )
    tf32: bool = _f(
        False,
        "CUDA only: TF32 tensor cores for float32 matmuls and convolutions (10-bit mantissa, faster); "
        "false = full float32 for both",
    )
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _f(
        "auto",
        "torch.compile mode; auto = default (max-autotune's first compile can take minutes; reduce-overhead "
        "and max-autotune bring inductor's own CUDA graphs, so cuda_graph auto then stays off)",
    )
    cuda_graph: Literal["auto", "always", "never"] = _f(
        "auto",
        "CUDA only: capture sampling + update in one CUDA graph and replay it; auto = with compile on CUDA "
        "where the replay allows it (uniform, one-step)",
    )
    overlap: Literal["auto", "always", "never"] = _f(
        "auto",
        "step the envs while the updates of the same vector step run; those updates then sample the replay "
        "without that step (one vector step of data delay). always: ale-py's threads, async processes, sync and "
        "native envs in a worker thread (inline on CUDA); auto: where the envs step outside this thread or the "
        "updates run on a GPU, not for sync and native envs on a CPU; never: the sequential loop",
    )
    profile: bool = _f(False, "torch.profiler trace of the training loop into the run dir (off = zero cost)")
    profile_schedule: list[int] = _f(
        [10, 5, 20, 1], "profiler schedule in loop iterations: [wait, warmup, active, repeat]"
    )
    torch_threads: int = _f(
        1,
        "CPU threads for torch; 1 is fastest for small MLPs and robust when other processes "
        "share the cores; 0 = torch's default",
    )

    # --- evaluation --------------------------------------------------------------------------------------
    eval_every: int = _f(2_500, "env steps between greedy evaluations; 0 = only at the end")
    eval_episodes: int = _f(10, "episodes per evaluation, each on its own seeded env")
    eval_epsilon: float = _f(0.0, "epsilon during evaluation (0 = greedy)")
    solved_return: float | None = _f(
        None,
        "evaluation mean return that counts as solved (for reports); null = the "
        "env's own solve line (CartPole-v1 475, Acrobot-v1 -100, MountainCar-v0 -110, "
        "LunarLander-v3 200), none for other envs: their reports show scores only",
    )

    # --- logging and checkpoints -------------------------------------------------------------------------
    log_every: int = _f(1_000, "env steps between reading device counters into logs and console")
    checkpoint_every: int = _f(10_000, "env steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = _f(2, "newest checkpoints kept in the run dir (at least 1)")
    save_replay: bool = _f(False, "put the replay buffer in checkpoints (exact resume, larger files)")

    # --- faults ------------------------------------------------------------------------------------------
    env_restarts: int = _f(
        0,
        "an env that raises in step, or whose async worker process dies or hangs, is rebuilt "
        "(its episode cut) up to this many times a run, per env; 0 = stop with a checkpoint at the "
        "first failure",
    )
    env_step_timeout: float = _f(
        60.0,
        "vector_mode async: seconds a worker may take to answer a step or reset; one "
        "that takes longer hangs and is treated as dead (restarted or reported, like a "
        "worker that was killed)",
    )
    nonfinite_skips: int = _f(
        0,
        "a non-finite loss, Q-value or weight rolls training back to the last finite state "
        "and goes on, up to this many times; 0 = stop with a checkpoint of that state",
    )

    # ---------------------------------------------------------------------------------------------------
    def __init__(self, **values: Any) -> None:
        values = {**preset_for(values.get("env_id", FIELDS["env_id"].default))[1], **values}
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise TypeError(f"Config got unknown keys {unknown}")
        for name in FIELDS:
            setattr(self, name, values[name] if name in values else field_default(name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def solve_line(self) -> float | None:
        """The eval mean return that counts as solved: `solved_return` if set, else the env's own (or None)."""
        return self.solved_return if self.solved_return is not None else solve_line_of(self.env_id)

    def updated(self, **changes: Any) -> Config:
        """A validated copy with some keys changed (values are coerced like `--set`)."""
        return from_dict({**self.to_dict(), **changes})

    def validate(self) -> Config:
        """Raise ConfigError on a value that is out of range; return self."""
        checks: list[tuple[bool, str]] = [
            (self.num_envs >= 1, f"num_envs must be >= 1, got {self.num_envs}"),
            (self.agents >= 1, f"agents must be >= 1, got {self.agents}"),
            (self.seed >= 0, f"seed must be >= 0 (gymnasium seeds are non-negative), got {self.seed}"),
            (self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}"),
            (self.buffer_size >= 1, f"buffer_size must be >= 1, got {self.buffer_size}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                self.batch_size <= self.buffer_size,
                f"batch_size ({self.batch_size}) is larger than buffer_size ({self.buffer_size}): "
                "lower batch_size or raise buffer_size",
            ),
            (self.learning_starts >= 0, f"learning_starts must be >= 0, got {self.learning_starts}"),
            (self.train_every >= 1, f"train_every must be >= 1, got {self.train_every}"),
            (self.gradient_steps >= 1, f"gradient_steps must be >= 1, got {self.gradient_steps}"),
            (0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}"),
            (
                0 < self.learning_rate < float("inf"),
                f"learning_rate must be a finite number > 0, got {self.learning_rate}",
            ),
            (0 < self.lr_end < float("inf"), f"lr_end must be a finite number > 0, got {self.lr_end}"),
            (
                self.adam_eps > 0,
                f"adam_eps must be > 0 (with 0, a weight whose gradient stays 0 becomes NaN), got {self.adam_eps}",
            ),
            (self.huber_delta > 0, f"huber_delta must be > 0, got {self.huber_delta}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (
                self.target_update_interval >= 1,
                f"target_update_interval must be >= 1, got {self.target_update_interval}",
            ),
            (0.0 < self.tau <= 1.0, f"tau must be in (0, 1], got {self.tau}"),
            (
                len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
                f"hidden_sizes must be a non-empty list of positive widths, got {self.hidden_sizes}",
            ),
            (0.0 <= self.epsilon_start <= 1.0, f"epsilon_start must be in [0, 1], got {self.epsilon_start}"),
            (0.0 <= self.epsilon_end <= 1.0, f"epsilon_end must be in [0, 1], got {self.epsilon_end}"),
            (0.0 <= self.eval_epsilon <= 1.0, f"eval_epsilon must be in [0, 1], got {self.eval_epsilon}"),
            (self.epsilon_decay_steps >= 1, f"epsilon_decay_steps must be >= 1, got {self.epsilon_decay_steps}"),
            (
                0.0 < self.epsilon_step_factor <= 1.0,
                f"epsilon_step_factor must be in (0, 1], got {self.epsilon_step_factor}",
            ),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.eval_episodes >= 1, f"eval_episodes must be >= 1, got {self.eval_episodes}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.env_restarts >= 0, f"env_restarts must be >= 0, got {self.env_restarts}"),
            (self.env_step_timeout > 0, f"env_step_timeout must be > 0 seconds, got {self.env_step_timeout}"),
            (self.nonfinite_skips >= 0, f"nonfinite_skips must be >= 0, got {self.nonfinite_skips}"),
            (self.torch_threads >= 0, f"torch_threads must be >= 0, got {self.torch_threads}"),
            (
                len(self.profile_schedule) == 4 and min(self.profile_schedule) >= 0 and self.profile_schedule[2] >= 1,
                "profile_schedule must be [wait, warmup, active, repeat] with active >= 1, "
                f"got {self.profile_schedule}",
            ),
            (self.max_episode_steps >= 0, f"max_episode_steps must be >= 0, got {self.max_episode_steps}"),
            (self.env_threads >= 0, f"env_threads must be >= 0, got {self.env_threads}"),
            (self.frame_stack >= 1, f"frame_stack must be >= 1, got {self.frame_stack}"),
            (self.frame_skip >= 1, f"frame_skip must be >= 1, got {self.frame_skip}"),
            (self.noop_max >= 0, f"noop_max must be >= 0, got {self.noop_max}"),
            (
                0.0 <= self.repeat_action_probability <= 1.0,
                f"repeat_action_probability must be in [0, 1], got {self.repeat_action_probability}",
            ),
            (self.n_step >= 1, f"n_step must be >= 1, got {self.n_step}"),
            (0.0 <= self.per_alpha <= 1.0, f"per_alpha must be in [0, 1], got {self.per_alpha}"),
            (
                0.0 <= self.per_beta_start <= 1.0 and 0.0 <= self.per_beta_end <= 1.0,
                f"per_beta_start and per_beta_end must be in [0, 1], got {self.per_beta_start}, {self.per_beta_end}",
            ),
            (self.per_eps > 0, f"per_eps must be > 0, got {self.per_eps}"),
            (
                self.replay_buffer
                or all(v == self.num_envs for v in (self.buffer_size, self.batch_size, self.train_every))
                and self.gradient_steps == 1,
                f"replay_buffer: false trains once on each vector step: set buffer_size, batch_size and train_every to "
                f"num_envs ({self.num_envs}) and gradient_steps to 1",
            ),
            (
                self.replay_buffer or not self.prioritized and self.n_step == 1,
                "replay_buffer: false keeps one vector step only: it cannot be combined with prioritized or n_step > 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def field_help(name: str) -> str:
    return FIELDS[name].metadata["help"]


def field_default(name: str) -> Any:
    """The default of key `name` (a fresh copy for lists)."""
    f = FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _optional(hint: Any) -> Any:
    """X for a hint `X | None`, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def field_type_name(name: str) -> str:
    hint = _HINTS[name]
    if _optional(hint) is not None:
        return f"{_optional(hint).__name__} or null"
    if typing.get_origin(hint) is Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    return getattr(hint, "__name__", str(hint)) if not isinstance(hint, types.GenericAlias) else str(hint)


def markdown_table() -> str:
    """Every config key with its type, default and meaning: the table docs/generate.py writes into
    docs/configuration.md."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(Config):
        default = field_default(f.name)
        meaning = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{f.name}` | {field_type_name(f.name).replace('|', ' or ')} | `{default}` | {meaning} |")
    return "\n".join(rows)


def unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; `fastdqn train --help` lists the keys"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def coerce(name: str, value: Any) -> Any:
    """Turn a YAML value or a command-line string into the type of field `name`, or raise ConfigError."""
    hint = _HINTS[name]
    example = field_default(name)
    fix = f": write it as {','.join(map(str, example))} or {example}" if typing.get_origin(hint) is list else ""
    bad = ConfigError(f"config key '{name}' expects {field_type_name(name)}, got {value!r}{fix}")
    if isinstance(value, str) and typing.get_origin(hint) is list and "[" not in value:
        value = f"[{value}]"  # a command-line list may leave out the brackets: 120,84
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise bad from None
    if _optional(hint) is not None:
        if value is None:
            return None
        hint = _optional(hint)
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise bad
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                raise bad from None
            if as_float.is_integer():
                return int(as_float)
        raise bad
    if hint is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if typing.get_origin(hint) is list:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad
        return list(value)
    raise bad  # pragma: no cover - every field type is handled above


def from_dict(values: dict[str, Any], where: str = "config") -> Config:
    """Build a validated Config from a mapping of keys to (possibly string) values."""
    for key in values:
        if key not in FIELDS:
            raise unknown_key_error(key, where)
    return Config(**{k: coerce(k, v) for k, v in values.items()}).validate()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML into a flat mapping; error clearly on a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass a path such as configs/cartpole.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"config file '{path}' is not valid YAML ({first}): fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of key: value, got {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> dict[str, str]:
    """Parse `--set key=value` items into a mapping (values stay strings; `coerce` types them)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        out[key.strip().replace("-", "_")] = value.strip()
    return out
