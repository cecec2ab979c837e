"""Errors a user can fix. The CLI prints each as one line (problem and fix) and exits non-zero."""


class FastDQNError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in fastdqn."""

    exit_code = 2


class ConfigError(FastDQNError):
    """A config key, value or file that cannot be used."""


class EnvError(FastDQNError):
    """An environment that does not exist or that DQN cannot drive."""


class CheckpointError(FastDQNError):
    """A run dir or checkpoint that cannot be resumed or evaluated."""


class DeviceError(FastDQNError):
    """A device that was asked for but is not present."""


class TrainingDiverged(FastDQNError):
    """The loss or Q-values became non-finite; the last finite state was checkpointed."""

    exit_code = 3
