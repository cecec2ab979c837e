"""The DQN learner: online and target Q-networks, the TD update, target syncs and epsilon-greedy acting.

The update step is one function (`_update_step`) that runs eager or under `torch.compile`, with or without
bf16 autocast. Every value that changes during training (learning rate, epsilon) enters it as a tensor or
stays outside it, so a compiled step never recompiles. Metrics accumulate on the device and are read with
`read_metrics()` every `log_every` env steps, the only host-device synchronisation of the training loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastdqn.config import Config
from fastdqn.networks import build_q_network
from fastdqn.replay import Batch

METRICS = ("loss", "q_mean", "grad_norm")


def td_targets(rewards: torch.Tensor, terminated: torch.Tensor, gamma: float | torch.Tensor,
               next_q_target: torch.Tensor, next_q_online: torch.Tensor | None = None) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * V(s'); for n-step returns r is the discounted sum and gamma is gamma^k.

    DQN:        V(s') = max_a' Q_target(s', a').
    Double DQN: V(s') = Q_target(s', argmax_a' Q_online(s', a')), when `next_q_online` is given.
    A truncated (time-limit) transition has terminated = 0 and so bootstraps like any other.
    """
    if next_q_online is None:
        next_v = next_q_target.max(dim=1).values
    else:
        next_v = next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True)).squeeze(1)
    return rewards + gamma * (1.0 - terminated) * next_v


def td_loss(q: torch.Tensor, y: torch.Tensor, kind: str, huber_delta: float,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Huber or squared TD error; with `weights` (prioritized replay) the mean of weight * loss."""
    if weights is None:
        if kind == "huber":
            return F.huber_loss(q, y, delta=huber_delta)
        return F.mse_loss(q, y)
    if kind == "huber":
        per_sample = F.huber_loss(q, y, delta=huber_delta, reduction="none")
    else:
        per_sample = F.mse_loss(q, y, reduction="none")
    return (weights * per_sample).mean()


def compile_mode(cfg: Config, device: torch.device) -> str:
    """torch.compile mode of the update step. auto: inductor's default on CPU; on CUDA autotuned kernels without
    inductor's own CUDA graphs, because fastdqn captures sampling + update in one graph itself (cuda_graph.py)."""
    if cfg.compile_mode != "auto":
        return cfg.compile_mode
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"


class DQNLearner:
    """Owns the networks and the optimizer; knows nothing about environments or replay storage."""

    def __init__(self, cfg: Config, obs_shape: tuple[int, ...], n_actions: int, device: torch.device):
        self.cfg, self.device, self.n_actions = cfg, device, n_actions
        self.q = build_q_network(obs_shape, n_actions, cfg).to(device)
        # "none" is the no-target-network ablation: targets come from the online net itself.
        self.target = self.q if cfg.target_update == "none" else copy.deepcopy(self.q).requires_grad_(False)
        # A tensor learning rate: the LR schedule changes it in place, so a compiled step never recompiles.
        self.lr = torch.tensor(cfg.learning_rate, dtype=torch.float32, device=device)
        # CUDA: capturable (state on the device, no host sync) so the step can live in a CUDA graph. CPU: fused,
        # one kernel for all parameters (the foreach path cannot take a tensor LR there and loops per tensor).
        on_cuda = device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.q.parameters(), lr=self.lr, eps=cfg.adam_eps, capturable=on_cuda,
                                          fused=None if on_cuda else True)
        self.metrics_sum = torch.zeros(len(METRICS), device=device)
        self.metrics_count = 0
        self.td_errors: torch.Tensor | None = None  # |TD error| per sample of the last update
        self.update_step = (torch.compile(self._update_step, mode=compile_mode(cfg, device)) if cfg.compile
                            else self._update_step)
        if cfg.amp and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            warnings.warn("amp: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 autocast is several times "
                          "slower than fp32 here; leave amp off on this machine", RuntimeWarning, stacklevel=2)

    # --- the update -----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when `amp` is on. No weight-cast cache: each weight is cast once per step anyway, and
        a cache must be off inside a CUDA-graph capture."""
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _update_step(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                     next_obs: torch.Tensor, terminated: torch.Tensor, discounts: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One gradient step on one batch; returns ([loss, mean Q(s,a), grad norm], per-sample |TD error|).

        `discounts` (gamma^k of n-step returns) replaces gamma and `weights` (prioritized replay) weight the
        loss; both are tensors or None, so a compiled step sees no changing Python values.
        """
        cfg = self.cfg
        batch_size = obs.shape[0]
        with self._autocast():
            if self.target is self.q or cfg.double_dqn:
                # One forward pass over s and s' together; the s' half is used without gradient.
                q_both = self.q(torch.cat([obs, next_obs])).float()
                q_all, next_q_online = q_both[:batch_size], q_both[batch_size:].detach()
            else:
                q_all, next_q_online = self.q(obs).float(), None
            with torch.no_grad():
                next_q_target = next_q_online if self.target is self.q else self.target(next_obs).float()
        gamma = cfg.gamma if discounts is None else discounts
        y = td_targets(rewards, terminated, gamma, next_q_target, next_q_online if cfg.double_dqn else None)
        q = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = td_loss(q, y, cfg.loss, cfg.huber_delta, weights)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.q.parameters(), max_norm)
        self.optimizer.step()
        if cfg.target_update == "soft":
            self._soft_update()
        return torch.stack([loss.detach(), q.detach().mean(), grad_norm.detach()]), (y - q).detach().abs()

    def update(self, batch: Batch) -> torch.Tensor:
        """Run one update step, add its metrics to the device-side running sums and return them.

        The batch's per-sample |TD errors| stay in `self.td_errors` (device tensor) for priority updates.
        """
        stats, self.td_errors = self.step_on(batch)
        self.metrics_sum += stats
        self.metrics_count += 1
        return stats

    def step_on(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The update step (eager or compiled) on one batch, without touching the metric sums."""
        return self.update_step(batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.terminated,
                                batch.discounts, batch.weights)

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

    @torch.no_grad()
    def _soft_update(self) -> None:
        """Polyak update: theta_target <- tau * theta + (1 - tau) * theta_target; buffers are copied."""
        torch._foreach_lerp_(list(self.target.parameters()), list(self.q.parameters()), self.cfg.tau)
        buffers = list(self.target.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(self.q.buffers()))

    # --- acting ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, epsilon: float) -> torch.Tensor:
        """Epsilon-greedy actions for a batch of observations, decided on the device.

        Always fp32, also with `amp`: bf16 keeps 8 bits of mantissa, so Q-values near 100 are rounded to steps of
        0.5, which ties or flips the greedy action between close Q-values (and acting on N observations is cheap).
        """
        greedy = self.q(obs).argmax(dim=1)
        n = obs.shape[0]
        explore = torch.rand(n, device=self.device) < epsilon
        random_actions = torch.randint(0, self.n_actions, (n,), device=self.device)
        return torch.where(explore, random_actions, greedy)

    def observe(self, obs: torch.Tensor) -> None:
        """Feed collected observations to the running normalizer, when there is one."""
        normalizer = getattr(self.q, "normalizer", None)
        if normalizer is not None:
            normalizer.update(obs)

    # --- metrics and state ----------------------------------------------------------------------------
    def read_metrics(self) -> dict[str, float]:
        """Mean of each metric since the last read (one device->host copy), then reset the sums."""
        if self.metrics_count == 0:
            return {}
        means = (self.metrics_sum / self.metrics_count).tolist()
        self.metrics_sum.zero_()
        self.metrics_count = 0
        return dict(zip(METRICS, means))

    def state_dict(self) -> dict:
        return {"q": self.q.state_dict(), "target": self.target.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.q.load_state_dict(state["q"])
        if self.target is not self.q:
            self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        # load_state_dict replaces the param group's lr with the saved tensor: point it back at ours.
        self.lr.copy_(torch.as_tensor(self.optimizer.param_groups[0]["lr"]))
        self.optimizer.param_groups[0]["lr"] = self.lr
