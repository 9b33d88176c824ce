"""Errors that carry a message meant for the user, printed without a traceback."""


class IvregError(Exception):
    """Base class: the command line prints ``error: <message>`` and exits with status 2."""


class ConfigError(IvregError):
    """The configuration is inconsistent, names something unknown or holds a bad value."""


class DataError(IvregError):
    """A dataset is missing, unreadable or malformed."""


class TrainingError(IvregError):
    """Training cannot go on (for example, the loss became NaN or infinite)."""


class DivergedError(TrainingError):
    """The loss or the projections became NaN or infinite: relaunching the same command would
    resume from the last checkpoint and, training being deterministic, diverge again."""


class CheckpointError(IvregError):
    """A checkpoint is missing, corrupt or does not fit the requested model."""


def first_line(exc: BaseException, last: bool = False) -> str:
    """The first (or ``last``) non-empty line of an exception's message, for a one-line
    report; the exception's type name when the message is empty."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(exc).__name__
