"""Errors that are the user's to fix: the CLI prints their message alone, without a traceback."""

import pickle
import sys
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = [
    "CheckpointNotFoundError",
    "ConfigError",
    "UserError",
    "exit_if_user_error",
    "prepare_command_line",
    "shipped_config",
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


def prepare_command_line(argv: list[str]) -> list[str]:
    """A command line as the CLIs parse it: W&B sweeps' ``None`` read as ``null``, shipped configs found by
    name (:func:`shipped_config`), empty config files refused.

    W&B renders a swept ``null`` as ``--key=None``, which jsonargparse would take as the string ``"None"``
    and refuse for an optional number; every ``None`` value becomes ``null``. A ``--config`` file that is
    empty would otherwise fail with jsonargparse's bare "Unexpected config".

    Returns:
        The arguments to parse.

    Raises:
        ConfigError: a ``--config`` / ``-c`` file that exists but holds nothing.
    """
    args = []
    for position, arg in enumerate(argv):
        if arg.startswith("--") and arg.endswith("=None"):
            arg = arg[: -len("None")] + "null"
        elif arg == "None" and position > 0 and argv[position - 1].startswith("--") and "=" not in argv[position - 1]:
            arg = "null"
        args.append(arg)
    for position, arg in enumerate(args):
        path = None
        if arg in ("--config", "-c") and position + 1 < len(args):
            path, where = args[position + 1], position + 1
        elif arg.startswith("--config="):
            path, where = arg.split("=", 1)[1], None
        if path is None:
            continue
        found = shipped_config(path)
        if where is None:
            args[position] = f"--config={found}"
        else:
            args[where] = str(found)
        if not found.read_text().strip():
            raise ConfigError(f"config file {path!r} is empty: expected a YAML mapping such as the files under configs/")
    return args


#: The committed configs, shipped inside the package (in a clone, a link to ``configs/``).
SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def shipped_config(path: str) -> Path:
    """``path`` itself if it is a file, else the shipped config it names (``edm.yaml``, ``configs/edm.yaml``).

    Returns:
        The file to read.

    Raises:
        ConfigError: no such file and no such shipped config (the message lists the shipped ones).
    """
    if Path(path).is_file():
        return Path(path)
    name = path.removeprefix("configs/").removeprefix("configs:")
    if (SHIPPED_CONFIGS / name).is_file():
        return SHIPPED_CONFIGS / name
    shipped = sorted(str(p.relative_to(SHIPPED_CONFIGS)) for p in SHIPPED_CONFIGS.rglob("*.yaml"))
    raise ConfigError(f"config {path!r} is neither a file nor a shipped config. Shipped configs: {', '.join(shipped)}")
