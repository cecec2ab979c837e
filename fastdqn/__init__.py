"""fastdqn: the fastest correct DQN trainer for PyTorch."""

from fastdqn.config import Config

__all__ = ["Config"]
__version__ = "0.1.0"
