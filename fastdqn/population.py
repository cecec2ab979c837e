"""Populations: K agents trained together in one process (`fastdqn train --agents K`).

Agent k is the run's config with seed + k (and, optionally, its own values of the keys in AGENT_KEYS), built as a
`Trainer` of its own in RUN/agent-k: its vector env, evaluations, checkpoints, best.pt, metrics.jsonl and
TensorBoard events are a standalone run's, so `fastdqn eval RUN/agent-k` works on it, and so does `fastdqn train
--resume RUN/agent-k` (it then goes on alone).

What the agents share is the work that batches. Their weights, target weights, Adam moments and replay columns
live in stacked tensors with a leading agent dimension, and each agent's own tensors are views into them. One
update trains all K agents: one sample of (K, B) transitions, one forward and backward pass of the stacked
networks (`networks.Linear` turns each layer into a batched matmul), then each agent's gradient clipping and Adam
step exactly as its standalone run takes them.

Each agent draws its random numbers (acting, replay sampling) from a generator of its own, started where its
standalone run's default generator stands once the network is built, and draws them in the same order. So agent k
follows the standalone run with seed + k to float tolerance: only the batched matmuls round differently.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdqn.adam import fused_adam_
from fastdqn.config import Config
from fastdqn.errors import ConfigError
from fastdqn.evaluation import EVAL_SEED_OFFSET, eval_seeds, evaluate
from fastdqn.faults import EnvFailure
from fastdqn.learner import (
    DQNLearner,
    by_hand,
    clip_scale,
    hand_gradients,
    q_and_targets,
    soft_update_,
    targets_beforehand,
    td_loss,
    updates_per_target_pass,
)
from fastdqn.logs import ScalarSink, console, summary_table
from fastdqn.presets import is_atari_id, is_minatar_id
from fastdqn.replay import Batch, ReplayBuffer
from fastdqn.schedules import epsilon_at
from fastdqn.stepping import JointStep, joint_steppers
from fastdqn.trainer import RunState, StopRequest, Trainer, TrainResult
from fastdqn.update_runner import compile_mode

POPULATION_FILE = "population.json"
# Keys an agent may set to its own value: plain numbers used per agent (acting, clipping, Adam, soft updates,
# the loss). Everything else is the same for all agents, because it shapes what is batched.
AGENT_KEYS = (
    "learning_rate",
    "lr_end",
    "adam_eps",
    "max_grad_norm",
    "huber_delta",
    "tau",
    "epsilon_start",
    "epsilon_end",
    "epsilon_decay_steps",
    "epsilon_step_factor",
)


def agent_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"agent-{k}"


def agent_configs(cfg: Config, values: dict[str, list[Any]] | None = None) -> list[Config]:
    """The configs of a population's agents: agent k has seed cfg.seed + k (or the k-th of values["seed"]) and
    the k-th of each `values` list."""
    values = {"seed": [cfg.seed + k for k in range(cfg.agents)], **(values or {})}
    for key, vals in values.items():
        if key not in ("seed", *AGENT_KEYS):
            raise ConfigError(
                f"agents cannot differ in '{key}': per-agent values are for seed, {', '.join(AGENT_KEYS)}; "
                "run other values as separate runs (fastdqn sweep)"
            )
        if len(vals) != cfg.agents:
            raise ConfigError(f"'{key}' has {len(vals)} per-agent values for {cfg.agents} agents: give one per agent")
    return [cfg.updated(agents=1, **{key: vals[k] for key, vals in values.items()}) for k in range(cfg.agents)]


def unbatchable(cfg: Config) -> tuple[str, str] | None:
    """(what, the fix) when a config cannot train as a population yet; None when it can. Image and grid envs
    are known by their id here (Atari, MinAtar) and by their observation once built (`Population`)."""
    refused = [
        (cfg.prioritized, "prioritized replay", "--no-prioritized"),
        (cfg.normalize_obs, "normalize_obs", "--no-normalize-obs"),
        (cfg.profile, "profile", "--no-profile, and profile a single agent"),
        (cfg.cuda_graph == "always", "cuda_graph: always", "--cuda-graph auto"),
        (is_atari_id(cfg.env_id) or is_minatar_id(cfg.env_id), "image or grid observations", "separate runs"),
    ]
    return next(((what, fix) for bad, what, fix in refused if bad), None)


def check_population(cfg: Config) -> None:
    """Refuse, in one line, what a population cannot batch yet."""
    refused = unbatchable(cfg)
    if refused is not None:
        raise ConfigError(f"--agents {cfg.agents} does not support {refused[0]} yet: use {refused[1]}, or --agents 1")


def default_generator(device: torch.device) -> torch.Generator:
    """torch's default generator of `device` (what a standalone run draws from)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def stack_as_views(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tensors stacked along a new first dim, and views of each slice to use in their place."""
    whole = torch.stack([t.detach() for t in tensors])
    return whole, list(whole.unbind(0))


def stacked_losses(
    cfgs: Sequence[Config],
    q_net: nn.Module,
    target_net: nn.Module | None,
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    discounts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each agent's loss (K,), Q(s,a) (K, B)): the population's forward pass through the stacked networks, agent
    k's loss with its own loss settings. A plain function of its arguments, which `--compile` compiles (its backward
    with it) once for every population in the process."""
    q, y = q_and_targets(cfgs[0], q_net, target_net, obs, actions, rewards, next_obs, terminated, discounts)
    if one_loss(cfgs):  # computed for all agents at once
        return td_loss(q, y, cfgs[0].loss, cfgs[0].huber_delta, per_agent=True), q
    return torch.stack([td_loss(q[k], y[k], c.loss, c.huber_delta) for k, c in enumerate(cfgs)]), q


def one_loss(cfgs: Sequence[Config]) -> bool:
    """Do all agents take the same TD loss (kind and Huber delta)?"""
    return len({(c.loss, c.huber_delta) for c in cfgs}) == 1


@functools.cache
def compiled_stacked_losses(mode: str) -> Callable:
    """`stacked_losses` compiled once per mode for the whole process."""
    return torch.compile(stacked_losses, mode=mode)


class StackedAgents:
    """The agents' learners and replays with their tensors stacked, and the update step that trains them all.

    `adopt` moves each agent's weights, target weights, Adam state and replay columns into stacked tensors and points
    the agent at its slice; it runs at the start and again after a checkpoint load (which gives Adam new tensors).
    """

    def __init__(
        self,
        learners: list[DQNLearner],
        replays: list[ReplayBuffer],
        cfgs: list[Config],
        generators: list[torch.Generator],
    ):
        self.learners, self.replays, self.cfgs, self.cfg = learners, replays, cfgs, cfgs[0]
        self.k, self.device, self.generators = len(learners), learners[0].device, generators
        self.names = [name for name, _ in learners[0].q.named_parameters()]
        # The agents' network with stacked weights in place of its own (networks.Linear runs them batched); another
        # holds the stacked target weights (None: the no-target-network ablation, whose target is the online net).
        self.q_net: nn.Module = copy.deepcopy(learners[0].q)
        self.target_net: nn.Module | None = None
        self.storage = copy.copy(replays[0])  # agent 0's ring, whose columns become every agent's rings below
        self.ring_starts = (torch.arange(self.k, device=self.device) * replays[0].capacity).unsqueeze(1)  # (K, 1)
        self.q_params: list[torch.Tensor] = []  # q_net's stacked weights, in `names` order
        self.target_params: list[torch.Tensor] = []  # target_net's, when there is one
        # Agents that share their Adam and soft-update settings (seeds of one config) take one fused Adam step and one
        # target update for all; agents with their own values take them one agent at a time.
        self.shared = all(
            len({getattr(c, key) for c in cfgs}) == 1 for key in ("learning_rate", "lr_end", "adam_eps", "tau")
        )
        self.grad_limits = torch.tensor([c.max_grad_norm for c in cfgs], device=self.device)
        self.losses = compiled_stacked_losses(compile_mode(self.cfg)) if self.cfg.compile else stacked_losses
        # eager plain MLPs with one loss for all agents take their gradients by hand, as DQNLearner.step_on does
        self.by_hand = not self.cfg.compile and by_hand(self.q_net) and one_loss(cfgs)
        self.adopt()

    def adopt(self) -> None:
        """Stack every agent's tensors and make each agent's own tensors views of its slice."""
        moments = [[learner.optimizer.state[p] for p in learner.optimizer.params] for learner in self.learners]
        self.q_params = self._stack_params([learner.q for learner in self.learners], self.q_net, grad=True)
        if self.learners[0].target_net is not None:
            self.target_net = copy.deepcopy(self.q_net)
            self.target_params = self._stack_params([lr.target for lr in self.learners], self.target_net, grad=False)
        for learner in self.learners:
            opt = learner.optimizer
            learner.optimizer = type(opt)(list(learner.q.parameters()), learner.lr, opt.betas, opt.eps)
        self.moments: dict[str, list[torch.Tensor]] = {key: [] for key in ("step", "exp_avg", "exp_avg_sq")}
        for i in range(len(self.names)):
            for key, stacked in self.moments.items():
                whole, views = stack_as_views([agent[i][key] for agent in moments])
                stacked.append(whole)
                for learner, view in zip(self.learners, views):
                    learner.optimizer.state[learner.optimizer.params[i]][key] = view
        for learner in self.learners:
            learner.optimizer.use_state(learner.optimizer.state)
        for name in self.replays[0].columns():
            whole, views = stack_as_views([rb.columns()[name] for rb in self.replays])
            for rb, view in zip(self.replays, views):
                setattr(rb, name, view)
            setattr(self.storage, name, whole.view(-1, *whole.shape[2:]))

    def _stack_params(self, nets: list[nn.Module], stacked_net: nn.Module, grad: bool) -> list[torch.Tensor]:
        """Stack each parameter of `nets` into `stacked_net`'s, and make every net's parameter a view of its slice."""
        stacked: list[torch.Tensor] = []
        for name in self.names:
            module_name, _, attr = name.rpartition(".")
            whole, views = stack_as_views([net.get_parameter(name) for net in nets])
            for net, view in zip(nets, views):
                net.get_submodule(module_name)._parameters[attr] = nn.Parameter(view, requires_grad=False)
            param = stacked_net.get_submodule(module_name)._parameters[attr] = nn.Parameter(whole, requires_grad=grad)
            stacked.append(param)
        return stacked

    @torch.no_grad()
    def act(
        self, obs: list[torch.Tensor], epsilons: list[float], generators: list[torch.Generator] | None = None
    ) -> list[torch.Tensor]:
        """Each agent's epsilon-greedy actions for its envs' observations, as `DQNLearner.act` draws them from the
        agent's generator (or from `generators`), with the greedy actions of all agents from one forward pass of the
        stacked networks (none while every agent's epsilon is 1)."""
        n_actions = self.learners[0].n_actions
        draws = [
            (
                torch.rand(len(o), device=self.device, generator=g) < eps,
                torch.randint(0, n_actions, (len(o),), device=self.device, generator=g),
            )
            for o, eps, g in zip(obs, epsilons, generators or self.generators)
        ]
        if min(epsilons) >= 1.0:
            return [random for _, random in draws]
        greedy = self.q_net(torch.stack(obs)).max(dim=-1).indices  # see td_targets: not argmax
        return [
            random if eps >= 1.0 else torch.where(explore, random, greedy[k])
            for k, ((explore, random), eps) in enumerate(zip(draws, epsilons))
        ]

    def samples(self, n: int) -> Batch:
        """n samples of (K, B) transitions, as (n, K, B): agent k's B of each drawn from its own ring with its own
        generator, as n calls of its replay's `sample` draw them, and all of them gathered at once."""
        size, batch = len(self.replays[0]), self.cfg.batch_size
        draws = [
            torch.randint(0, size, (batch,), device=self.device, generator=g) for _ in range(n) for g in self.generators
        ]
        idx = torch.stack(draws).view(n, self.k, batch)
        base = self.ring_starts.expand(n, self.k, batch)
        flat = self.storage.gather(idx.reshape(-1), base.reshape(-1))
        return Batch._make(None if t is None else t.view(n, self.k, batch, *t.shape[1:]) for t in flat)

    def sample(self) -> Batch:
        """(K, B) transitions, as `samples` draws them."""
        return self.samples(1).at(0)

    def newest(self) -> Batch:
        """Every agent's last vector step, (K, N) in env order: the no-replay ablation's batches, as each agent's
        replay's `newest` gives them (the agents write in lockstep, so their rings stand at the same slot)."""
        slots = self.ring_starts + self.replays[0].newest_slots()  # (K, N)
        return self.storage.gather(slots)  # one-step transitions: replay_buffer: false has n_step 1

    def steps(self, n: int) -> Iterator[torch.Tensor]:
        """n updates of every agent, each on a new sample (with replay_buffer: false, each on the newest vector step),
        yielding each one's (K, 3) [loss, mean Q, grad norm].

        They go in chunks: a chunk's samples are drawn (in the order n single samples draw them) and gathered at once,
        and where the target net stays as it is until the updates are done (hand gradients and a hard target copy,
        made after a training phase), their target Q-values come from one forward pass. Only float rounding differs
        from updates taken one at a time: a matmul over more columns may sum in another order. A chunk holds
        `updates_per_target_pass` updates."""
        if not self.cfg.replay_buffer:
            for _ in range(n):
                yield self.update(self.newest())
            return
        chunk = updates_per_target_pass(self.cfg, self.k)
        for start in range(0, n, chunk):
            yield from self._chunk_steps(min(chunk, n - start))

    def _chunk_steps(self, n: int) -> Iterator[torch.Tensor]:
        batches = self.samples(n)
        next_q_target = None
        if self.by_hand and targets_beforehand(self.cfg, self.q_net, self.target_net):
            assert self.target_net is not None, "targets_beforehand: there is a target net"
            next_obs = batches.next_obs.transpose(0, 1).reshape(self.k, -1, *batches.next_obs.shape[3:])  # (K, n*B, ..)
            with torch.no_grad():
                next_q_target = self.target_net(next_obs).view(self.k, n, self.cfg.batch_size, -1).transpose(0, 1)
        for u in range(n):
            yield self.update(batches.at(u), None if next_q_target is None else next_q_target[u])

    def update(self, batch: Batch, next_q_target: torch.Tensor | None = None) -> torch.Tensor:
        """One update of every agent, agent k on `batch`'s k-th (B,) slice, with its own clipping and Adam step as
        `DQNLearner.step_on` takes them; returns the (K, 3) [loss, mean Q, grad norm] of each. `next_q_target`: the
        target net's (K, B, n_actions) Q-values of the batch's next_obs, when computed beforehand (hand gradients)."""
        inputs = batch.loss_inputs()[:-1]  # no weights: populations have no prioritized replay
        if self.by_hand:
            losses, q, _, grads = hand_gradients(
                self.cfg, self.q_net, self.target_net, *inputs, None, per_agent=True, next_q_target=next_q_target
            )
        else:
            losses, q = self.losses(self.cfgs, self.q_net, self.target_net, *inputs)
            grads = list(torch.autograd.grad(losses.sum(), self.q_params))
            losses, q = losses.detach(), q.detach()
        # the fused Adam kernel reads memory in order: a transposed gradient would be stepped with the wrong moments
        # (both ways of differentiating give contiguous ones, and then contiguous() copies nothing)
        grads = [g.contiguous() for g in grads]
        with torch.no_grad():
            norms = self.step_all(grads) if self.shared else self.step_each(grads)
            return torch.stack([losses, q.mean(dim=1), norms], dim=1)

    def step_all(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Clip each agent's gradients to its max_grad_norm (as `clip_scale` does), then one fused Adam step and one
        soft target update for all agents; returns the (K,) gradient norms."""
        per_param = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (params, K)
        norms = torch.linalg.vector_norm(per_param, dim=0)
        limits = self.grad_limits
        scale = torch.where(limits > 0, torch.clamp(limits / (norms + 1e-6), max=1.0), torch.ones_like(norms))
        for g in grads:
            g.mul_(scale.view(-1, *(1,) * (g.dim() - 1)))
        torch._foreach_add_(self.moments["step"], 1)
        lead = self.learners[0].optimizer  # its step counts are views of the stacked ones, all equal
        moments = self.moments
        fused_adam_(
            self.q_params, grads, moments["exp_avg"], moments["exp_avg_sq"], lead.steps, lead.lr, lead.betas, lead.eps
        )
        if self.cfg.target_update == "soft":
            assert self.target_net is not None, "a soft target update has a target net"
            torch._foreach_lerp_(self.target_params, self.q_params, self.cfg.tau)
        return norms

    def step_each(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Each agent's clipping, Adam step and soft target update with its own settings, as `DQNLearner.step_on`
        takes them; returns the (K,) gradient norms."""
        norms = []
        for k, (learner, cfg) in enumerate(zip(self.learners, self.cfgs)):
            agent_grads = [g[k] for g in grads]
            norm, scale = clip_scale(cfg, agent_grads)
            if scale is not None:
                torch._foreach_mul_(agent_grads, scale)
            learner.optimizer.step(agent_grads)
            if cfg.target_update == "soft":
                soft_update_(learner.target, learner.q, cfg.tau)
            norms.append(norm)
        return torch.stack(norms)


class PopulationEvaluation:
    """Every agent's evaluation at an env step, played at once: all agents' episodes (each agent's env seeds and
    random draws those of its standalone evaluation) in one vector env, the actions of all from one forward pass of
    the stacked networks. Agent k's evaluator takes its share (`agent(k)`), played when the first agent asks."""

    def __init__(self, stacked: StackedAgents, cfgs: list[Config]):
        self.stacked, self.cfgs = stacked, cfgs
        self.step: int | None = None
        self.returns: list[np.ndarray] = []

    def agent(self, k: int) -> Callable[[int], np.ndarray]:
        return lambda step: self.returns_at(step)[k]

    def returns_at(self, step: int) -> list[np.ndarray]:
        if step != self.step:
            self.returns, self.step = self.play(), step
        return self.returns

    def play(self) -> list[np.ndarray]:
        """Each agent's eval_episodes returns of its current policy at its eval_epsilon."""
        cfgs, device, k = self.cfgs, self.stacked.device, len(self.cfgs)
        episodes = cfgs[0].eval_episodes
        generators = [torch.Generator(device).manual_seed(c.seed + EVAL_SEED_OFFSET) for c in cfgs]

        def policy(obs: torch.Tensor) -> torch.Tensor:
            grouped = obs.view(k, episodes, *obs.shape[1:])
            if all(c.eval_epsilon == 0 for c in cfgs):  # greedy: the random draws could change no action
                with torch.no_grad():
                    return self.stacked.q_net(grouped).max(dim=-1).indices.flatten()
            return torch.cat(self.stacked.act(list(grouped), [c.eval_epsilon for c in cfgs], generators))

        seeds = [s for c in cfgs for s in eval_seeds(c.seed, episodes)]
        returns = evaluate(policy, cfgs[0], len(seeds), cfgs[0].seed, device, seeds)
        return list(returns.reshape(k, episodes))


@dataclass
class PopulationResult:
    """How a population run went: one TrainResult per agent, and the wall time of the whole."""

    run_dir: Path
    agents: list[TrainResult]
    wall_time: float

    @property
    def interrupted(self) -> bool:
        return any(r.interrupted for r in self.agents)

    def summary(self) -> dict[str, Any]:
        """The JSON result of `fastdqn train --agents K --quiet`: the population's and each agent's."""
        return {
            "run_dir": str(self.run_dir),
            "agents": len(self.agents),
            "wall_time": round(self.wall_time, 2),
            "final_eval_means": [r.final_eval_mean for r in self.agents],
            "interrupted": self.interrupted,
            "agent_results": [r.summary() for r in self.agents],
        }

    def table(self, cfg: Config) -> Any:
        """The console summary: each agent's final and best evaluation."""
        rows: dict[str, Any] = {}
        for k, r in enumerate(self.agents):
            best = f"{r.best_eval[1]:g} at {r.best_eval[0]}" if r.best_eval else "no evaluation"
            rows[f"agent {k} ({r.run_dir.name})"] = f"final {r.final_eval_mean:g}, best {best}"
        rows["env steps per agent"] = self.agents[0].env_steps
        rows["wall time (s)"] = round(self.wall_time, 1)
        return summary_table(f"fastdqn: {cfg.agents} agents on {cfg.env_id}", {**rows, "run dir": str(self.run_dir)})


class Population:
    """K agents (`agent_configs`) as Trainers in `run_dir/agent-k` (or the given `dirs`), stepped in lockstep, with
    one batched update for all (`StackedAgents`)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        show_progress: bool = True,
        values: dict[str, list[Any]] | None = None,
        dirs: list[Path] | None = None,
    ):
        check_population(cfg)
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), show_progress
        self.cfgs = agent_configs(cfg, values)
        self.dirs = dirs or [agent_dir(run_dir, k) for k in range(cfg.agents)]
        self.trainers: list[Trainer] = []
        self.joint: list[JointStep] | None = None  # the agents' steppers when their envs step together
        generators = []
        try:
            for k, (agent_cfg, path) in enumerate(zip(self.cfgs, self.dirs)):
                trainer = Trainer(agent_cfg, path, show_progress=show_progress and k == 0)
                trainer.label, trainer.resume_dir = f"agent {k}: ", self.run_dir
                self.trainers.append(trainer)
                # where the standalone run's generator stands now, its network built: the agent goes on from here
                generator = torch.Generator(trainer.device)
                generator.set_state(default_generator(trainer.device).get_state())
                trainer.collector.generator = trainer.checkpoints.generator = generator
                generators.append(generator)
            first = self.trainers[0]
            if not isinstance(first.replay, ReplayBuffer) or any(
                isinstance(m, nn.Conv2d) for m in first.learner.q.modules()
            ):
                raise ConfigError(
                    f"--agents {cfg.agents} takes vector observations (MLP networks) for now, and {cfg.env_id} "
                    "gives images or grids: run its seeds as separate runs (fastdqn sweep), or --agents 1"
                )
            self.stacked = StackedAgents(
                [t.learner for t in self.trainers],
                [t.replay for t in self.trainers],  # type: ignore[misc]  # checked above: uniform replays
                self.cfgs,
                generators,
            )
            # native CartPoles (no overlap) take one numpy step for all agents, each with its own resets
            self.joint = joint_steppers([t.envs for t in self.trainers], [t.collector.stepper for t in self.trainers])
            for trainer, stepper in zip(self.trainers, self.joint or []):
                trainer.collector.stepper = stepper
        except BaseException:
            self.close()
            raise
        self.evaluation = PopulationEvaluation(self.stacked, self.cfgs)
        for k, trainer in enumerate(self.trainers):
            trainer.evaluator.play = self.evaluation.agent(k)
        self.metrics_sum = torch.zeros(cfg.agents, 3, device=first.device)
        for k, trainer in enumerate(self.trainers):  # each agent's runner keeps its row, read by its logs
            trainer.updates.metrics_sum = self.metrics_sum[k]

    def restore(self, states: list[dict[str, Any]]) -> None:
        """Continue every agent from its checkpoint (all of one env step), then stack the loaded tensors again."""
        for trainer, state in zip(self.trainers, states):
            trainer.restore(state)
        self.stacked.adopt()

    def close(self) -> None:
        for trainer in self.trainers:
            trainer.close()
        if self.joint:
            self.joint[0].group.close()

    # --- the loop -------------------------------------------------------------------------------------
    def run(self, sinks: Sequence[ScalarSink] = ()) -> PopulationResult:
        """Train every agent to total_steps (or to a SIGINT/SIGTERM) in lockstep: each vector step collects every
        agent's envs, then runs the due updates of all agents together (with the overlap, while the envs step);
        logs, evaluations and checkpoints are each agent's own, as in `Trainer.run`."""
        runs: list[RunState] = []
        lead = self.trainers[0]
        try:
            runs = [t.open_run(sinks) for t in self.trainers]
            with StopRequest() as stop:
                while lead.counters.env_step < lead.cfg.total_steps and not runs[0].interrupted:
                    before = lead.counters.env_step
                    actions = self.stacked.act(
                        [t.collector.obs_t for t in self.trainers], [epsilon_at(t.cfg, before) for t in self.trainers]
                    )
                    # one device->host copy of every agent's actions, then each agent's envs start their step
                    on_host = np.split(lead.collector.staging.to_host(torch.cat(actions)), len(actions))
                    for trainer, acts, host in zip(self.trainers, actions, on_host):
                        trainer.collector.start(acts, host)
                    # with the overlap the updates run while the envs step, as in Trainer.vector_step
                    overlapped = lead.overlap and len(lead.replay) >= lead.min_replay
                    if overlapped:
                        self.train(before + lead.cfg.num_envs)
                    for trainer, run in zip(self.trainers, runs):
                        run.add_episodes(before + trainer.cfg.num_envs, trainer.collector.finish())
                    if not overlapped:
                        self.train(before + lead.cfg.num_envs)
                    for trainer, run in zip(self.trainers, runs):
                        trainer.after_vector_step(run, before, stop)
            for trainer, run in zip(self.trainers, runs):
                trainer.end_run(run)
        except EnvFailure as exc:
            for trainer, run in zip(self.trainers, runs):
                run.logger.episodes(run.episodes)
                trainer.checkpoints.save()
            raise EnvFailure(
                f"{exc}; every agent's checkpoint saved at env step {lead.counters.env_step}, resume with: "
                f"fastdqn train --resume {self.run_dir}"
            ) from exc
        finally:
            for run in runs:
                run.logger.close(quiet=not run.finished)
            self.close()
        results = [trainer.result(run, table=False) for trainer, run in zip(self.trainers, runs)]
        wall = max(run.end_time for run in runs) - min(run.start_time for run in runs)
        result = PopulationResult(self.run_dir, results, wall)
        if self.show_progress and not result.interrupted:
            console.print(result.table(self.cfg))
        return result

    def train(self, env_step: int) -> None:
        """The updates due at `env_step` (the same number for every agent), for all agents at once, then each
        agent's due target sync."""
        due = [trainer.start_updates(env_step) for trainer in self.trainers]
        assert len(set(due)) == 1, f"agents in lockstep have the same updates due, got {due}"
        for metrics in self.stacked.steps(due[0]):
            self.metrics_sum += metrics
            for trainer in self.trainers:
                trainer.updates.metrics_count += 1
            if self.trainers[0].first_update is None:  # the population's first update, timed for every agent
                for trainer in self.trainers:
                    trainer.mark_first_update(env_step)
        for trainer in self.trainers:
            trainer.sync_targets(env_step)


def write_population_file(run_dir: Path, cfg: Config, values: dict[str, list[Any]], dirs: list[Path]) -> None:
    """population.json: how many agents, their per-agent values and their dirs (relative to the run dir when inside)."""
    from fastdqn.disk import run_write

    names = [str(d.relative_to(run_dir)) if d.is_relative_to(run_dir) else str(d) for d in dirs]
    text = json.dumps({"agents": cfg.agents, "values": values, "dirs": names}, indent=1)
    with run_write(run_dir / POPULATION_FILE, "the population file", len(text)):
        (run_dir / POPULATION_FILE).write_text(text)


def read_population_file(run_dir: Path) -> tuple[dict[str, list[Any]], list[Path]] | None:
    """(per-agent values, agent dirs) of a population run dir; None for a run dir of one agent."""
    path = Path(run_dir) / POPULATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["values"], [Path(run_dir) / d for d in data["dirs"]]
