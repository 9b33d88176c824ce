"""Command-line plumbing shared by the ``main_*.py`` entry points."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from ivreg.errors import IvregError

F = TypeVar("F", bound=Callable[..., Any])


def user_message(exc: BaseException) -> str:
    """The message of ``exc`` without the worker traceback a DataLoader wraps around it."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        text = text.split(prefix, 1)[-1]
    return text


MULTIRUN_FLAGS = ("-m", "--multirun")


def multirun_flag_first(argv: list[str]) -> list[str]:
    """``argv`` with Hydra's ``-m``/``--multirun`` moved before the other arguments: Hydra's
    argparse takes the overrides as one positional list, so ``a=1 -m lr=0.1,1`` (an override
    list that a sweep flag interrupts) was refused as ``unrecognized arguments``."""
    flags = [a for a in argv[1:] if a in MULTIRUN_FLAGS]
    return argv[:1] + flags[:1] + [a for a in argv[1:] if a not in MULTIRUN_FLAGS] if flags else list(argv)


# The failed jobs of this process's Hydra sweep (-m), one line each, for ``exit_after_sweep``.
SWEEP_FAILURES: list[str] = []


def sweep_job() -> str | None:
    """``job <n> (<its overrides>)`` when this runs as one job of a Hydra sweep, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # no Hydra, or not launched by it
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"


def exit_on_user_error(fn: F) -> F:
    """Run ``fn``; an ``IvregError`` becomes one line ``error: ...`` on stderr and exit status 2.

    In a sweep (``-m``) a failed job does not stop the jobs after it (an lr search expects some
    to diverge): its error is printed (with the traceback when it is not an ``IvregError``)
    and recorded, and ``exit_after_sweep`` names the failures and exits with 1 at the end."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            job = sweep_job()
            if not isinstance(exc, IvregError) and job is None:
                raise
            message = user_message(exc) if isinstance(exc, IvregError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, IvregError):
                traceback.print_exc()
            print(f"error: {message}" + (f" [{job}]" if job else ""), file=sys.stderr, flush=True)
            if job is None:
                sys.exit(2)
            SWEEP_FAILURES.append(f"{job}: {message}")
            return None

    return wrapper  # type: ignore[return-value]


def exit_after_sweep() -> None:
    """After ``main()``: exit with status 1, naming them, when jobs of a sweep failed."""
    if SWEEP_FAILURES:
        lines = "\n".join(f"  {line}" for line in SWEEP_FAILURES)
        print(f"error: {len(SWEEP_FAILURES)} job(s) of the sweep failed:\n{lines}", file=sys.stderr, flush=True)
        sys.exit(1)
