"""fastdqn: the fastest correct DQN trainer for PyTorch.

    import fastdqn
    result = fastdqn.train(fastdqn.Config(env_id="CartPole-v1"))

`train`, `evaluate` and `load_policy` import torch and gymnasium on first use, so `import fastdqn` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastdqn.config import Config

if TYPE_CHECKING:
    from fastdqn.api import (
        EvalResult,
        Policy,
        PopulationResult,
        TrainResult,
        evaluate,
        load_policy,
        train,
        train_population,
    )

__all__ = [
    "Config",
    "EvalResult",
    "Policy",
    "PopulationResult",
    "TrainResult",
    "evaluate",
    "load_policy",
    "train",
    "train_population",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The API's names, imported from `fastdqn.api` when first used."""
    if name in __all__:
        from fastdqn import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastdqn' has no attribute {name!r}")
