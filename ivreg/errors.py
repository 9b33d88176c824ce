"""Errors that carry a message meant for the user, printed without a traceback."""


class IvregError(Exception):
    """Base class: the command line prints ``error: <message>`` and exits with status 2."""


class ConfigError(IvregError):
    """The configuration is inconsistent, names something unknown or holds a bad value."""


class DataError(IvregError):
    """A dataset is missing, unreadable or malformed."""


class TrainingError(IvregError):
    """Training cannot go on (for example, the loss became NaN or infinite)."""


class CheckpointError(IvregError):
    """A checkpoint is missing, corrupt or does not fit the requested model."""
