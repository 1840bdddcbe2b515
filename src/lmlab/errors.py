"""The one exception type for bad user input, and how entry points report it."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""

    exit_code = EXIT_USER_ERROR


def brief(error: BaseException) -> str:
    """A library's error message on one line, cut to 300 characters, to end a UserError's."""
    return " ".join(str(error).split())[:300]


class RunInterrupted(UserError):
    """Something outside this process stopped the run (another of its processes is gone).

    Reported like bad input, as one line that says how to go on, but with exit
    code 1: the command itself was right.
    """

    exit_code = 1


def report_user_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Turn a `UserError` into one line on stderr and exit code 2 (its `exit_code`).

    Tracebacks are for bugs; a wrong path or value is not a bug.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(user_error.exit_code)

    return wrapper


def find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`, also when a library wrapped it (Hydra's instantiate does)."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__
    return None
