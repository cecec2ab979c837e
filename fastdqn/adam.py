"""Adam for the eager update step: torch's fused Adam kernel, called on tensor lists built once.

`torch.optim.Adam(fused=True)` runs the same kernel, but every step first passes through the Optimizer machinery
(a profiler range, graph-break calls, regrouping every tensor by device and dtype and building the lists again):
for a small Q-network on a CPU that took as long as the forward and backward passes together. Creating a
torch.optim optimizer also imports torch._dynamo, a second or more of every run's start-up. `FusedAdam` keeps the
state in torch.optim.Adam's layout and gives the same `state_dict` (checkpoints load either way); its step is
bit-for-bit the step of `torch.optim.Adam(fused=True)` (tests/test_learner.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def fused_adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """torch's fused Adam kernel on these tensors, in place, with step counts already counted for this step."""
    torch._fused_adam_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        amsgrad=False,
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=0.0,
        eps=eps,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )


class FusedAdam:
    """Adam over a fixed list of parameters with a tensor learning rate (changed in place by the LR schedule).

    `state` maps each parameter to its step count (float32, on the parameter's device, where the fused kernel reads
    it) and its two moments, made up front; `param_groups` holds the one group with the learning rate and the flags
    torch.optim.Adam(fused=True) would have, so `state_dict` has its format.
    """

    def __init__(self, params: list[nn.Parameter], lr: torch.Tensor, betas: tuple[float, float], eps: float):
        self.params: list[torch.Tensor] = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.param_groups = [
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": 0,
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": True,
                "decoupled_weight_decay": False,
                "params": self.params,
            }
        ]
        self.use_state(self.fresh_state())

    def fresh_state(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """Step counts and moments at zero, as torch.optim.Adam makes them at its first step."""
        return {
            p: {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
            for p in self.params
        }

    def use_state(self, state: dict[torch.Tensor, dict[str, torch.Tensor]]) -> None:
        """Take `state` and build, once, the tensor lists the kernel is given."""
        self.state = state
        states = [state[p] for p in self.params]
        self.exp_avgs = [s["exp_avg"] for s in states]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        self.steps = [s["step"] for s in states]

    def zero_grad(self) -> None:
        """Drop the gradients (set to None, as torch's default): backward then writes new ones, adding nothing."""
        for p in self.params:
            p.grad = None

    def step(self, grads: list[torch.Tensor]) -> None:
        """One Adam step of every parameter with `grads` (one per parameter, in order)."""
        torch._foreach_add_(self.steps, 1)
        fused_adam_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps, self.lr, self.betas, self.eps)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.Adam's format: state by parameter index, the group's hyperparameters and flags."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {
            "state": {i: dict(self.state[p]) for i, p in enumerate(self.params)},
            "param_groups": [{**group, "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Take the state of `state_dict` (or of a torch.optim.Adam, e.g. an older checkpoint) as new tensors on
        each parameter's device; this optimizer keeps its own flags and learning-rate tensor, set to the saved
        rate. Parameters without saved state (no step taken yet) start afresh."""
        groups = saved["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"saved Adam state has {sum(len(g['params']) for g in groups)} parameters in "
                f"{len(groups)} groups, this optimizer one group of {len(self.params)}"
            )
        fresh = self.fresh_state()
        for index, p in zip(groups[0]["params"], self.params):
            for key, value in saved["state"].get(index, {}).items():
                if key in STATE_KEYS:
                    fresh[p][key] = value.to(
                        device=p.device, dtype=torch.float32 if key == "step" else p.dtype, copy=True
                    )
        self.use_state(fresh)
        self.lr.copy_(torch.as_tensor(groups[0]["lr"]))
