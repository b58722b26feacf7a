"""Errors that are the user's to fix: the CLI prints their message alone, without a traceback."""

import pickle
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = [
    "CheckpointNotFoundError",
    "ConfigError",
    "UserError",
    "exit_if_user_error",
    "unreadable_file_reason",
]


class UserError(Exception):
    """Base of every error whose message tells the user what was wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A checkpoint a config names does not exist; the message says how to produce it."""


def exit_if_user_error(err: BaseException) -> None:
    """Print the UserError (or Lightning's MisconfigurationException) behind ``err`` and exit 2.

    jsonargparse wraps the errors of the classes it builds, so the chain of causes is searched.

    Returns without doing anything when no UserError is behind ``err``: the caller re-raises it.

    Raises:
        SystemExit: status 2, when a UserError is behind ``err``.
    """
    seen = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (UserError, MisconfigurationException)):  # Lightning's own word for a bad setting
            print(f"error: {cause}", file=sys.stderr)
            raise SystemExit(2) from None
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def unreadable_file_reason(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line.

    A file holding Python objects other than tensors and plain data is refused on purpose (unpickling it
    could run code); torch's own message suggests turning that protection off, which is exactly what must
    not be done with a file from someone else, so it is replaced by this line.

    Returns:
        One line, without torch's advice to load unsafely.
    """
    if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in str(err).lower():
        return "it holds Python objects other than tensors and plain data; refused, because loading it could run code"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
