"""The run's progress counters, on the host, shared by the units that advance them and saved in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Counters:
    """Host-side progress counters; env_step is the unit of everything (one transition of one env)."""

    env_step: int = 0
    updates: int = 0
    target_syncs: int = 0
    episodes: int = 0
    nonfinite_skips: int = 0  # roll-backs after a non-finite learner state (at most cfg.nonfinite_skips)

    def load(self, saved: dict[str, Any]) -> None:
        """Take the saved values in place: every unit that counts holds this same object."""
        for name, value in Counters(**saved).__dict__.items():
            setattr(self, name, value)
