"""Q-networks, chosen by the observation's shape: an MLP for vectors (optional running normalization), the Nature
CNN for (C, 84, 84) frame stacks, the MinAtar CNN for (H, W, C) grids.

Under bf16 autocast (`amp`) only the convolutions run in bf16; every fully connected layer runs in float32. bf16
keeps 8 bits of mantissa: Q-values near 100 leaving the network in bf16 are rounded to steps of 0.5, about the size
of late TD errors, and the TD targets inherit that. An output layer in float32 after bf16 hidden layers is not
enough: on a CartPole MLP trained to Q ~ 100 the hidden layers' rounding still moves Q by more than 0.05
(tests/test_amp.py). So the MLP runs in float32 entirely, and the CNNs' fully connected heads do too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from fastdqn.config import Config


class RunningNormalizer(nn.Module):
    """Running mean/variance of observations (parallel Welford), applied as (x - mean) / std.

    Its statistics are buffers, so they travel with state_dict, target copies and checkpoints.
    """

    mean: torch.Tensor  # buffers, registered below (nn.Module's attribute lookup would type them loosely)
    var: torch.Tensor
    count: torch.Tensor

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("var", torch.ones(shape))
        self.register_buffer("count", torch.tensor(eps))
        self.clip, self.eps = clip, eps

    @torch.no_grad()
    def update(self, batch: torch.Tensor) -> None:
        batch = batch.float().reshape(-1, *self.mean.shape)
        b_mean, b_var, b_count = batch.mean(0), batch.var(0, unbiased=False), batch.shape[0]
        total = self.count + b_count
        delta = b_mean - self.mean
        self.mean += delta * (b_count / total)
        self.var.copy_(
            (self.var * self.count + b_var * b_count + delta.square() * self.count * b_count / total) / total
        )
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


# Stacked layers take batches of fewer rows than this (acting, evaluation) as x W^T: on 2 CPU threads five default
# agents' forward pass took 86.6 against 127.9 us for 8 rows that way, and 135.7 against 120.4 us for 16
# (benchmarks/layouts.py).
FEW_ROWS = 16


class Linear(nn.Linear):
    """nn.Linear that also takes a population's stacked weights: with a (K, out, in) weight and (K, out) bias (K
    agents, see population.py) it maps (K, B, in) to (K, B, out), one batched matmul for all agents."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight_and_bias()
        if weight.dim() != 3:
            return F.linear(x, weight, bias)
        if x.shape[-2] < FEW_ROWS:
            return torch.baddbmm(bias.unsqueeze(-2), x, weight.transpose(1, 2))
        # (W x^T + b)^T: every operand, and the weight gradient, contiguous (the update's batches)
        return torch.baddbmm(bias.unsqueeze(-1), weight, x.transpose(1, 2)).transpose(1, 2)

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias, read from the parameter dict: nn.Module's attribute lookup took about 0.7 us each,
        a third of a 16-row layer's time outside its matmul (acting)."""
        params = self._parameters
        return cast(torch.Tensor, params["weight"]), cast(torch.Tensor, params["bias"])


def in_float32(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`module(x)` in float32 even under autocast: the Q head, and what follows it (targets, loss), stay exact.
    Without autocast on, no context is entered (entering and leaving one costs several us, as much as a small
    layer)."""
    if not torch.is_autocast_enabled(x.device.type):
        return module(x.float())
    with torch.autocast(x.device.type, enabled=False):
        return module(x.float())


class DuelingHead(nn.Module):
    """features (..., B, F) -> Q (..., B, n_actions) = V(s) + A(s, a) - mean_a A(s, a) (Wang et al., 2016).

    Subtracting the mean advantage makes V and A identifiable. With `hidden` > 0 each stream has its own
    ReLU hidden layer of that width (the Atari CNN's 512), else each stream is one linear layer.
    """

    def __init__(self, in_features: int, n_actions: int, hidden: int = 0):
        super().__init__()

        def stream(out: int) -> nn.Module:
            if hidden > 0:
                return nn.Sequential(Linear(in_features, hidden), nn.ReLU(), Linear(hidden, out))
            return Linear(in_features, out)

        self.value, self.advantage = stream(1), stream(n_actions)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        advantage = self.advantage(features)
        return self.value(features) + advantage - advantage.mean(dim=-1, keepdim=True)


class MLPQNetwork(nn.Module):
    """obs (B, obs_dim) -> Q-values (B, n_actions) through ReLU hidden layers, then a linear or dueling head; all of
    it in float32, also under autocast (see the module doc). On a population's stacked weights (K, B, obs_dim) ->
    (K, B, n_actions)."""

    def __init__(
        self, obs_dim: int, n_actions: int, hidden_sizes: list[int], normalize_obs: bool = False, dueling: bool = False
    ):
        super().__init__()
        self.normalizer = RunningNormalizer((obs_dim,)) if normalize_obs else None
        layers: list[nn.Module] = []
        width = obs_dim
        for hidden in hidden_sizes:
            layers += [Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(DuelingHead(width, n_actions) if dueling else Linear(width, n_actions))
        self.net = nn.Sequential(*layers)
        self.plain = not dueling  # only Linear and ReLU layers: `forward_saving` / `backward_from` apply

    def inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """What the first layer takes: the observations as float32, normalized when there is a normalizer."""
        x = obs.float()
        return x if self.normalizer is None else self.normalizer(x)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return in_float32(self.layers, self.inputs(obs))

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """The layers in turn, each by its `forward`: on a few rows (acting) nn.Module's call wrapper and Sequential's
        cost about as much as a small layer's matmul, and no hooks are set on the layers inside."""
        for layer in self.net:
            x = layer.forward(x)
        return x

    def forward_saving(self, obs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(Q-values, what `backward_from` needs: the first layer's input and every layer's output), computed as
        `forward` computes them, in float32 and without recording an autograd graph. Plain networks only."""
        with torch.no_grad():
            saved = [self.inputs(obs)]
            for layer in self.net:
                saved.append(layer.forward(saved[-1]))
        return saved[-1], saved

    @torch.no_grad()
    def backward_from(self, saved: list[torch.Tensor], grad_q: torch.Tensor) -> list[torch.Tensor]:
        """The gradients of a loss with respect to the parameters (in `parameters()` order), given its gradient
        `grad_q` with respect to the Q-values of `forward_saving`: the backward pass of Linear and ReLU layers
        written out (dW = g^T x, db = sum of g over the batch, g <- g W; a ReLU zeroes g where it output 0).

        The same values as autograd's, for (B, ...) batches and a population's stacked (K, B, ...) ones. It exists for
        speed: a small MLP's eager update spent more time in autograd's bookkeeping than in its matmuls."""
        grads: list[torch.Tensor] = []
        g = grad_q
        layers = list(self.net)  # indexing a Sequential copies its module list each time
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            if isinstance(layer, nn.ReLU):  # autograd's own ReLU backward: g where the output > 0, else 0
                g = torch.ops.aten.threshold_backward(g, saved[i + 1], 0)
                continue
            weight = cast(Linear, layer).weight_and_bias()[0]
            if weight.dim() == 2:
                grads += [g.sum(dim=0), g.t().mm(saved[i])]  # bias, weight: reversed below
                if i > 0:
                    g = g.mm(weight)
                continue
            # stacked (K, out, in) weights: networks.Linear keeps activations as (K, features, B) in memory, so the
            # backward works on g^T and keeps that layout (elementwise ops on mismatched layouts are slow)
            g_t = g.transpose(1, 2)
            grads += [g_t.sum(dim=2), torch.bmm(g_t, saved[i])]
            if i > 0:
                g = torch.bmm(weight.transpose(1, 2), g_t).transpose(1, 2)
        return grads[::-1]


class NatureCNN(nn.Module):
    """uint8 frame stacks (B, C, 84, 84) -> Q-values: the Nature DQN net (Mnih et al., 2015).

    Three convolutions (bf16 under autocast) and a 512-unit layer (or a dueling head with 512-unit streams) in
    float32. The uint8 -> [0, 1] scaling happens here, so replay and acting move 1 byte per pixel. On CUDA the input
    goes channels_last, the layout cuDNN's fastest convolutions (and bf16 tensor cores) want.
    """

    def __init__(self, in_channels: int, n_actions: int, dueling: bool = False):
        super().__init__()
        self.torso = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        features = 64 * 7 * 7
        self.head = (
            DuelingHead(features, n_actions, hidden=512)
            if dueling
            else nn.Sequential(nn.Linear(features, 512), nn.ReLU(), nn.Linear(512, n_actions))
        )
        self.channels_last: bool | None = None  # None: only on CUDA

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float() * (1.0 / 255.0)
        if self.channels_last if self.channels_last is not None else x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return in_float32(self.head, self.torso(x))


class MinAtarCNN(nn.Module):
    """(B, H, W, C) grids (bool or small integer cells) -> Q-values: the MinAtar paper's network (Young & Tian,
    2019), one 3x3 convolution of 16 channels (bf16 under autocast), then a 128-unit layer and a linear or dueling
    head in float32.

    Cells are used as they are (no scaling): MinAtar's are 0/1. The channels-last grid becomes the NCHW tensor the
    convolution takes by a permuted view, whose memory is then already in cuDNN's channels_last layout.
    """

    def __init__(self, grid_shape: tuple[int, int, int], n_actions: int, dueling: bool = False):
        super().__init__()
        height, width, channels = grid_shape
        self.torso = nn.Sequential(nn.Conv2d(channels, 16, 3, stride=1), nn.ReLU(), nn.Flatten())
        features = 16 * (height - 2) * (width - 2)
        self.head = (
            DuelingHead(features, n_actions, hidden=128)
            if dueling
            else nn.Sequential(nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, n_actions))
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return in_float32(self.head, self.torso(obs.permute(0, 3, 1, 2).float()))


def is_pixel_shape(obs_shape: tuple[int, ...]) -> bool:
    """(C, 84, 84) frame stacks (made by fastdqn from screens) go to the Nature CNN."""
    return len(obs_shape) == 3 and tuple(obs_shape[1:]) == (84, 84)


def is_grid_shape(obs_shape: tuple[int, ...]) -> bool:
    """(H, W, C) grids of at least 3x3 cells, other than frame stacks, go to the MinAtar CNN."""
    return len(obs_shape) == 3 and not is_pixel_shape(obs_shape) and min(obs_shape[:2]) >= 3


def build_q_network(obs_shape: tuple[int, ...], n_actions: int, cfg: Config) -> nn.Module:
    """The Q-network for an observation shape (envs.check_spaces has refused the shapes none of them takes)."""
    if is_pixel_shape(obs_shape):
        return NatureCNN(int(obs_shape[0]), n_actions, cfg.dueling)
    if is_grid_shape(obs_shape):
        height, width, channels = obs_shape
        return MinAtarCNN((height, width, channels), n_actions, cfg.dueling)
    if len(obs_shape) != 1:
        raise ValueError(f"no Q-network takes observations of shape {obs_shape}")
    return MLPQNetwork(int(obs_shape[0]), n_actions, cfg.hidden_sizes, cfg.normalize_obs, cfg.dueling)
