"""Command-line plumbing shared by the ``main_*.py`` entry points."""

from __future__ import annotations

import functools
import sys
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


def exit_on_user_error(fn: F) -> F:
    """Run ``fn``; an ``IvregError`` becomes one line ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except IvregError as exc:
            print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
