"""The DQN learner: online and target Q-networks, the TD update, target syncs and epsilon-greedy acting.

The update step exists twice, computing the same thing: `DQNLearner.step_on`, the eager step (autograd engine and
torch's fused Adam), and `single_graph_step`, a pure function written for `torch.compile` to trace as one graph
(torch.func gradients, torch's functional Adam on the same optimizer state); `batch_td_loss` is the loss both share.
For a plain MLP the eager step takes its gradients from `hand_gradients`: the backward pass written out, without
autograd's bookkeeping, which costs a small MLP more than its matmuls (tests/test_hand_gradients.py holds it to
autograd).
Which one runs, and whether it is captured in a CUDA graph, is the update runner's choice (update_runner.py).
Every value that changes during training (learning rate, epsilon) enters as a tensor or stays outside, so a
compiled step never recompiles.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.optim.adam import adam

from fastdqn.adam import FusedAdam
from fastdqn.config import Config
from fastdqn.networks import MLPQNetwork, build_q_network
from fastdqn.replay import Batch

METRICS = ("loss", "q_mean", "grad_norm")


def td_targets(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float | torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * V(s'); for n-step returns r is the discounted sum and gamma is gamma^k.
    Q-values are (B, n_actions), or (K, B, n_actions) for a population of K agents.

    DQN:        V(s') = max_a' Q_target(s', a').
    Double DQN: V(s') = Q_target(s', argmax_a' Q_online(s', a')), when `next_q_online` is given.
    A truncated (time-limit) transition has terminated = 0 and so bootstraps like any other.
    """
    if next_q_online is None:
        next_v = next_q_target.max(dim=-1).values
    else:
        # max's indices are argmax's (the first of equal values); argmax took 31.6 against 6.7 us on a population's
        # (K, B, n_actions) Q-values, which are transposed in memory (networks.Linear; benchmarks/layouts.py)
        next_v = next_q_target.gather(-1, next_q_online.max(dim=-1, keepdim=True).indices).squeeze(-1)
    if isinstance(gamma, torch.Tensor):
        return torch.addcmul(rewards, gamma * (1.0 - terminated), next_v)
    return torch.addcmul(rewards, 1.0 - terminated, next_v, value=gamma)


def td_loss(
    q: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    huber_delta: float,
    weights: torch.Tensor | None = None,
    per_agent: bool = False,
) -> torch.Tensor:
    """Mean Huber or squared TD error; with `weights` (prioritized replay) the mean of weight * loss; with
    `per_agent`, (K, B) inputs of a population give each agent's mean, (K,)."""
    if weights is None and not per_agent:
        if kind == "huber":
            return F.huber_loss(q, y, delta=huber_delta)
        return F.mse_loss(q, y)
    if kind == "huber":
        per_sample = F.huber_loss(q, y, delta=huber_delta, reduction="none")
    else:
        per_sample = F.mse_loss(q, y, reduction="none")
    if weights is not None:
        per_sample = weights * per_sample
    return per_sample.mean(dim=-1) if per_agent else per_sample.mean()


ADAM_BETAS = (0.9, 0.999)


def autocast(cfg: Config, device_type: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when `amp` is on, for the networks' convolutions (networks.py keeps every fully connected layer,
    and so the Q-values, in float32). No weight-cast cache: each weight is cast once per step anyway, and a cache
    must be off inside a CUDA-graph capture."""
    if not cfg.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)


def batch_td_loss(
    cfg: Config,
    q_net: Callable[[torch.Tensor], torch.Tensor],
    target_net: nn.Module | None,
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    discounts: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """(loss, Q(s,a), TD targets) of one batch. `q_net` gives the online Q-values (the module itself, or the module
    on stand-in parameter tensors in the single-graph step); `target_net` None is the no-target-network ablation."""
    q, y = q_and_targets(cfg, q_net, target_net, obs, actions, rewards, next_obs, terminated, discounts)
    return td_loss(q, y, cfg.loss, cfg.huber_delta, weights), q, y


def q_and_targets(
    cfg: Config,
    q_net: Callable[[torch.Tensor], torch.Tensor],
    target_net: Callable[[torch.Tensor], torch.Tensor] | None,
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    discounts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q(s,a), TD targets) of a batch (B,), or of a population's batches (K, B) on stacked networks."""
    with autocast(cfg, obs.device.type):  # the networks return float32 Q-values: only convolutions run in bf16
        q_all = q_net(obs)
    y = batch_targets(cfg, q_net, target_net, rewards, next_obs, terminated, discounts)
    return q_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1), y


@torch.no_grad()  # s' passes need no gradient, so backward only runs over the s batch
def batch_targets(
    cfg: Config,
    q_net: Callable[[torch.Tensor], torch.Tensor],
    target_net: Callable[[torch.Tensor], torch.Tensor] | None,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    discounts: torch.Tensor | None,
    next_q_target: torch.Tensor | None = None,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """The TD targets of a batch (B,) or of a population's batches (K, B) (see `td_targets`); `next_q_target` and
    `next_q_online`, when given, are the target and online nets' Q-values of next_obs computed beforehand."""
    with autocast(cfg, next_obs.device.type):
        if next_q_online is None and (target_net is None or cfg.double_dqn):
            next_q_online = q_net(next_obs)
        if target_net is None:  # the online net is its own target
            next_q_target = next_q_online
        elif next_q_target is None:
            next_q_target = target_net(next_obs)
    assert next_q_target is not None
    gamma = cfg.gamma if discounts is None else discounts
    return td_targets(rewards, terminated, gamma, next_q_target, next_q_online if cfg.double_dqn else None)


def td_loss_grad(
    q: torch.Tensor, y: torch.Tensor, kind: str, huber_delta: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient of `td_loss` with respect to q: of a batch's mean loss (B,), or of the sum of a population's
    per-agent means (K, B), in which each agent's gradient is that of its own mean."""
    error = q - y
    grad = error.clamp(-huber_delta, huber_delta) if kind == "huber" else 2.0 * error
    if weights is not None:
        grad = grad * weights
    return grad / q.shape[-1]


def hand_gradients(
    cfg: Config,
    q_net: nn.Module,
    target_net: nn.Module | None,
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    discounts: torch.Tensor | None,
    weights: torch.Tensor | None,
    per_agent: bool = False,
    next_q_target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(loss, Q(s,a), TD targets, the loss's gradients in `q_net.parameters()` order) of a plain MLP, without the
    autograd engine: `batch_td_loss`'s values, differentiated by `td_loss_grad` and `MLPQNetwork.backward_from`.
    With `per_agent` (a population's stacked networks), each agent's loss (K,) and its own gradients;
    `next_q_target` as in `batch_targets`. Where the targets need the online net's Q(s') (Double DQN, or no target
    net) one forward pass takes s and s' together: one matmul per layer instead of two."""
    assert by_hand(q_net), "hand gradients are those of a plain MLP"
    net = cast(MLPQNetwork, q_net)
    next_q_online = None
    if target_net is None or cfg.double_dqn:  # the targets need the online net's Q(s'): one pass over s and s'
        rows = obs.shape[-2]
        q_both, saved = net.forward_saving(torch.cat([obs, next_obs], dim=-2))
        q_all, next_q_online = q_both[..., :rows, :], q_both[..., rows:, :]
        saved = [a[..., :rows, :] for a in saved]  # the backward pass is over s only
    else:
        q_all, saved = net.forward_saving(obs)
    y = batch_targets(cfg, q_net, target_net, rewards, next_obs, terminated, discounts, next_q_target, next_q_online)
    index = actions.unsqueeze(-1)
    q = q_all.gather(-1, index).squeeze(-1)
    loss = td_loss(q, y, cfg.loss, cfg.huber_delta, weights, per_agent)
    grad_q = torch.zeros_like(q_all).scatter_(
        -1, index, td_loss_grad(q, y, cfg.loss, cfg.huber_delta, weights)[..., None]
    )
    return loss, q, y, net.backward_from(saved, grad_q)


# The most activations per layer one batched target pass holds (4 MB of float32). Five default agents' update on 2
# CPU threads took 2,080 us with chunks of this size, 2,366 us with chunks of one update, 2,071 us with twice the size
# (benchmarks/layouts.py)
TARGET_PASS_FLOATS = 1 << 20


def updates_per_target_pass(cfg: Config, agents: int = 1) -> int:
    """How many updates a chunk holds when a training phase's updates take their targets from one forward pass per
    chunk (the target net, copied only after the phase, stays as it is until then)."""
    widest = max(cfg.hidden_sizes, default=1)
    return max(1, TARGET_PASS_FLOATS // (agents * cfg.batch_size * widest))


def targets_beforehand(cfg: Config, q_net: nn.Module, target_net: nn.Module | None) -> bool:
    """Can a phase's target Q-values be computed before its updates: hand gradients (which take them) and a target
    net that changes only by a hard copy after the phase?"""
    return by_hand(q_net) and target_net is not None and cfg.target_update == "hard"


def by_hand(net: nn.Module) -> bool:
    """Whether `hand_gradients` takes this network (a plain MLP: no dueling head, no convolutions)."""
    return isinstance(net, MLPQNetwork) and net.plain


def clip_scale(cfg: Config, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(global gradient norm, the factor that clips it to cfg.max_grad_norm, or None without clipping), computed as
    torch's clip_grad_norm_ computes them."""
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if cfg.max_grad_norm <= 0:
        return norm, None
    return norm, torch.clamp(cfg.max_grad_norm / (norm + 1e-6), max=1.0)


@torch.no_grad()
def soft_update_(target: nn.Module, q: nn.Module, tau: float) -> None:
    """Polyak update: theta_target <- tau * theta + (1 - tau) * theta_target; buffers are copied."""
    torch._foreach_lerp_(list(target.parameters()), list(q.parameters()), tau)
    buffers = list(target.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(q.buffers()))


def single_graph_step(
    cfg: Config,
    q: nn.Module,
    target: nn.Module | None,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: torch.Tensor,
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_obs: torch.Tensor,
    terminated: torch.Tensor,
    discounts: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update step written for torch.compile to trace as ONE graph: gradients by torch.func instead of the
    autograd engine, clipping as in clip_grad_norm_, and torch's own functional Adam on the optimizer's state
    tensors (so checkpoints are unchanged), updating the weights in place through detached aliases.

    A plain function of its arguments, so every learner in a process shares one compiled graph (a method would
    be compiled again for each new learner, and past torch's recompile limit run eagerly without a word).
    """
    names = [name for name, _ in q.named_parameters()]
    params = [p.detach() for p in q.parameters()]  # same storage: Adam writes the real weights

    def loss_of(stand_ins: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        by_name = dict(zip(names, stand_ins))
        loss, q_sa, y = batch_td_loss(
            cfg,
            lambda x: functional_call(q, by_name, (x,)),
            target,
            obs,
            actions,
            rewards,
            next_obs,
            terminated,
            discounts,
            weights,
        )
        return loss, (q_sa.detach(), y)

    grads, (loss, (q_sa, y)) = grad_and_value(loss_of, has_aux=True)(tuple(params))
    grad_norm, scale = clip_scale(cfg, list(grads))
    if scale is not None:
        grads = torch._foreach_mul(grads, scale)
    # On CUDA the step counts live on the device and must stay there: with capturable=False torch runs this Adam
    # outside the compiled graph (a graph break) and reads each step count with .item(), a host sync per tensor
    # that also makes the step impossible to capture in a CUDA graph.
    adam(
        params,
        list(grads),
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        foreach=False,
        amsgrad=False,
        beta1=ADAM_BETAS[0],
        beta2=ADAM_BETAS[1],
        lr=lr,
        weight_decay=0.0,
        eps=cfg.adam_eps,
        maximize=False,
        capturable=params[0].device.type == "cuda",
    )
    if cfg.target_update == "soft":
        assert target is not None, "a soft target update has a target net"
        soft_update_(target, q, cfg.tau)
    return torch.stack([loss.detach(), q_sa.mean(), grad_norm]), (y - q_sa).abs()


class DQNLearner:
    """Owns the networks and the optimizer; knows nothing about environments or replay storage."""

    def __init__(self, cfg: Config, obs_shape: tuple[int, ...], n_actions: int, device: torch.device):
        self.cfg, self.device, self.n_actions = cfg, device, n_actions
        self.q = build_q_network(obs_shape, n_actions, cfg).to(device)
        # "none" is the no-target-network ablation: targets come from the online net itself.
        self.target = self.q if cfg.target_update == "none" else copy.deepcopy(self.q).requires_grad_(False)
        # A tensor learning rate: the LR schedule changes it in place, so a compiled step never recompiles.
        self.lr = torch.tensor(cfg.learning_rate, dtype=torch.float32, device=device)
        # Fused on every device: one kernel for all parameters, and with the step counts and the tensor LR on the
        # device it never syncs with the host, so a CUDA graph can capture it.
        self.optimizer = FusedAdam(list(self.q.parameters()), self.lr, ADAM_BETAS, cfg.adam_eps)
        self.by_hand = by_hand(self.q)  # the eager step differentiates a plain MLP by hand (`hand_gradients`)
        convolutions = any(isinstance(m, nn.Conv2d) for m in self.q.modules())  # all that amp runs in bf16
        if cfg.amp and convolutions and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.warn(
                "amp: this CPU has no native bf16 (AVX512-BF16/AMX), so convolutions under bf16 autocast "
                "are several times slower than fp32 here; leave amp off on this machine",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def target_net(self) -> nn.Module | None:
        """The target network, or None in the no-target-network ablation."""
        return None if self.target is self.q else self.target

    # --- the update -----------------------------------------------------------------------------------
    def step_on(self, batch: Batch, next_q_target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager update: one gradient step on `batch`; returns ([loss, mean Q(s,a), grad norm], per-sample
        |TD error|), both device tensors.

        The batch's `discounts` (gamma^k of n-step returns) replace gamma and its `weights` (prioritized replay)
        weight the loss; both are tensors or None. `next_q_target`: the target net's Q-values of the batch's
        next_obs, computed beforehand (hand gradients only, see `targets_beforehand`).
        """
        if self.by_hand:
            loss, q, y, grads = hand_gradients(
                self.cfg, self.q, self.target_net, *batch.loss_inputs(), next_q_target=next_q_target
            )
        else:
            loss, q, y = batch_td_loss(self.cfg, self.q, self.target_net, *batch.loss_inputs())
            self.optimizer.zero_grad()
            loss.backward()
            grads = cast(list[torch.Tensor], [p.grad for p in self.optimizer.params])  # backward set every one
        grad_norm, scale = clip_scale(self.cfg, grads)
        if scale is not None:
            torch._foreach_mul_(grads, scale)
        self.optimizer.step(grads)
        if self.cfg.target_update == "soft":
            soft_update_(self.target, self.q, self.cfg.tau)
        return torch.stack([loss.detach(), q.detach().mean(), grad_norm]), (y - q).detach().abs()

    def functional_state(self) -> tuple:
        """The arguments of `single_graph_step` before the batch: networks, Adam's state tensors and the learning
        rate (lists the optimizer built once, or again after a load)."""
        opt = self.optimizer
        return self.cfg, self.q, self.target_net, opt.exp_avgs, opt.exp_avg_sqs, opt.steps, self.lr

    def set_learning_rate(self, value: float) -> None:
        self.lr.fill_(value)

    # --- target network -------------------------------------------------------------------------------
    def _tensors(self, net: nn.Module) -> list[torch.Tensor]:
        return [*net.parameters(), *net.buffers()]

    @torch.no_grad()
    def sync_target(self) -> None:
        """Hard update: theta_target <- theta (parameters and buffers such as normalizer statistics)."""
        if self.target is not self.q:
            torch._foreach_copy_(self._tensors(self.target), self._tensors(self.q))

    # --- acting ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, epsilon: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Epsilon-greedy actions for a batch of observations, decided on the device.

        No forward pass at epsilon 1, when every env explores (the random draws are the same). Always fp32, also with
        `amp`: bf16
        keeps 8 bits of mantissa, so Q-values near 100 are rounded to steps of 0.5, which ties or flips the greedy
        action between close Q-values (and acting on N observations is cheap). The random draws come from
        `generator` (a population agent's own), else torch's default one.
        """
        n = obs.shape[0]
        explore = torch.rand(n, device=self.device, generator=generator) < epsilon
        random_actions = torch.randint(0, self.n_actions, (n,), device=self.device, generator=generator)
        if epsilon >= 1.0:
            return random_actions
        return torch.where(explore, random_actions, self.q(obs).argmax(dim=1))

    def observe(self, obs: torch.Tensor) -> None:
        """Feed collected observations to the running normalizer, when there is one."""
        normalizer = getattr(self.q, "normalizer", None)
        if normalizer is not None:
            normalizer.update(obs)

    # --- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"q": self.q.state_dict(), "target": self.target.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.q.load_state_dict(state["q"])
        if self.target is not self.q:
            self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])  # its own flags and lr tensor, at the saved rate
