"""benchmarks/matmul_floor.py counts an update's matrix-product FLOPs as torch's own FLOP counter does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdqn.config import Config
from fastdqn.learner import DQNLearner, batch_td_loss
from fastdqn.replay import Batch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("matmul_floor", ROOT / "benchmarks" / "matmul_floor.py")
assert spec is not None and spec.loader is not None
floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor)


@pytest.mark.parametrize("double_dqn", [True, False])
def test_update_flops_are_what_an_autograd_update_multiplies(double_dqn):
    dims, batch = [6, 32, 16, 3], 8
    cfg = Config(device="cpu", hidden_sizes=dims[1:-1], double_dqn=double_dqn, batch_size=batch).validate()
    learner = DQNLearner(cfg, (dims[0],), dims[-1], torch.device("cpu"))
    b = Batch(
        torch.randn(batch, dims[0]),
        torch.randint(0, dims[-1], (batch,)),
        torch.randn(batch),
        torch.randn(batch, dims[0]),
        torch.zeros(batch),
    )
    with FlopCounterMode(display=False) as counter:
        loss = batch_td_loss(cfg, learner.q, learner.target_net, *b.loss_inputs())[0]
        loss.backward()
    matmuls = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "mm" in str(op))
    assert matmuls == floor.update_flops(dims, batch, double_dqn)
