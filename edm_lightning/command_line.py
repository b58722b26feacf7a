"""The command line and configs as the CLIs parse them: shipped configs found by name, sweeps' ``None`` read as
``null``, classes written as ``{class_path, init_args}``, the init arguments (and defaults) they may set, and
secrets refused where the shell history and ``ps`` would keep them.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, auto_cli
from jsonargparse.typing import SecretStr

from edm_lightning.errors import ConfigError, exit_if_user_error
from edm_lightning.files import SHIPPED_CONFIGS, to_plain
from edm_lightning.routing import ROUTER_KEY_ENV, ROUTER_KEY_FILE_ENV, SECRET_MASK

__all__ = [
    "CONCISE_USAGE",
    "SHIPPED_CONFIGS",
    "arguments_of",
    "check_argument_values",
    "class_config",
    "default_of",
    "parse_command_line",
    "prepare_command_line",
    "refuse_keys_on_command_line",
    "refuse_nan",
    "shipped_config",
]


#: The usage line of the project's commands (``main.py``'s subcommands, the ``python -m`` ones). argparse's own lists
#: every nested option (about a hundred lines for the experiment), burying the one-line error printed under it.
CONCISE_USAGE = "%(prog)s [--config FILE ...] [--KEY VALUE ...]"


def parse_command_line(component: Any, argv: list[str] | None, prog: str, **parser_kwargs: Any) -> tuple[Any, list[str]]:
    """A ``python -m`` tool's config: its command line prepared (:func:`prepare_command_line`) and parsed into
    ``component`` by jsonargparse's ``auto_cli``, with exact option names only and the concise usage line.

    A value the component's own class refuses (its ``__post_init__``, e.g. ``optim.lr: .nan``) ends the tool with its
    one-line message and exit status 2, as jsonargparse's own errors do, never with a traceback.

    Args:
        component: the dataclass or function ``auto_cli`` parses into.
        argv: the arguments (``None``: ``sys.argv[1:]``).
        prog: the tool's name as the user called it, for its help and errors.
        **parser_kwargs: more ``ArgumentParser`` arguments (``description``).

    Returns:
        The parsed config and the prepared arguments.

    Raises:
        SystemExit: status 2 for any mistake in the command line or config.
    """
    try:
        argv = prepare_command_line(sys.argv[1:] if argv is None else list(argv))
        config = auto_cli(component, args=argv, prog=prog, usage=CONCISE_USAGE, allow_abbrev=False, **parser_kwargs)
    except Exception as err:
        exit_if_user_error(err)
        raise
    return config, argv


def refuse_nan(config: Any, where: str = "") -> None:
    """Refuse NaN anywhere in a config: no setting means "not a number", and a class that compares with ``<``
    lets it through (a NaN ``gradient_clip_val`` turned every gradient into NaN without a word).

    Args:
        config: a parsed config (a jsonargparse ``Namespace``, a dataclass, dicts and lists).
        where: the name its keys are under, for the message.

    Raises:
        ConfigError: the first NaN, by its dotted key.
    """
    plain = to_plain(config.as_dict() if hasattr(config, "as_dict") else config)
    stack = [(where, plain)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{key}.{name}" if key else name, item) for name, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{key}[{position}]", item) for position, item in enumerate(value))
        elif isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{key} is NaN; no setting takes NaN: give it a number")


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


def class_config(cls: type, init_args: dict[str, Any]) -> dict[str, Any]:
    """``{class_path, init_args}`` for a LightningCLI config: dataclasses as mappings, secrets left out (``None``).

    Returns:
        Plain data (``yaml.safe_dump`` writes it).
    """
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": to_plain(init_args)}


def default_of(cls: type, argument: str) -> Any:
    """The default of ``cls``'s init ``argument``: the schema's defaults are the job classes' own.

    Returns:
        The default value.
    """
    return inspect.signature(cls).parameters[argument].default


def arguments_of(obj: Any) -> set[str]:
    """The named arguments of a function, or the init arguments of a class and of the classes it forwards
    ``**kwargs`` to (the project's Trainer to Lightning's).

    Returns:
        The argument names (``self`` and ``*args`` / ``**kwargs`` left out).
    """
    names: set[str] = set()
    for target in obj.__mro__ if isinstance(obj, type) else (obj,):
        if isinstance(obj, type) and "__init__" not in vars(target):
            continue
        parameters = inspect.signature(target.__init__ if isinstance(obj, type) else target).parameters
        names |= {name for name, p in parameters.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return names


def check_argument_values(target: Any, values: dict[str, Any], where: str, settable: set[str] | None = None) -> None:
    """Refuse values that ``target``'s type hints do not accept, as the CLI would when it builds ``target`` from a
    config, but before anything runs (a wrong type found by the job itself would surface after earlier stages trained).

    Args:
        target: a class (its init arguments, those it forwards ``**kwargs`` to included) or a function.
        values: argument name -> value.
        where: the config path of ``values`` in messages (``edm.model``).
        settable: the names ``values`` may hold (default: every argument of ``target``).

    Raises:
        ConfigError: a name not in ``settable`` (the message lists those that are), or the first value that does
            not fit (``None`` included, unless the hint allows it), with the type expected.
    """
    if not values:
        return
    takes = arguments_of(target)
    settable = takes if settable is None else settable
    unknown = sorted(set(values) - settable)
    if unknown:
        raise ConfigError(f"{where}: {unknown} are not arguments of {target.__name__} it may set; it may set: "
                          f"{', '.join(sorted(settable))}")
    parser = ArgumentParser(exit_on_error=False)
    add = parser.add_class_arguments if isinstance(target, type) else parser.add_function_arguments
    add(target, "given", skip=takes - set(values), fail_untyped=False)
    try:  # validate() too: parse_object lets None through for any type
        parser.validate(parser.parse_object({"given": values}), skip_unset=False)
    except Exception as err:  # jsonargparse's ArgumentError: 'Parser key "given.x": Expected ...'
        reason = " ".join(str(err).split()).replace('Parser key "given.', "", 1).replace('":', ":", 1)
        raise ConfigError(f"{where}.{reason}") from None


def refuse_keys_on_command_line(config: Any, argv: Sequence[str]) -> None:
    """Refuse a run whose parsed ``config`` holds a secret (a ``SecretStr``) that was typed in ``argv``.

    A command line is kept by the shell's history, shown by ``ps`` to every user of the machine and recorded
    by W&B with the run, so a router key must come from ``$EDM_ROUTER_KEY``, ``$EDM_ROUTER_KEY_FILE`` or a
    config file the user keeps private.

    Raises:
        ConfigError: a secret's value appears in ``argv``.
    """
    secrets = [value.get_secret_value() for value in _secrets(config)]
    if any(secret and secret != SECRET_MASK and secret in arg for secret in secrets for arg in argv):
        raise ConfigError(
            f"a secret (a router key or an API key) was given on the command line, where the shell history, `ps` and "
            f"W&B's run metadata keep it: set ${ROUTER_KEY_ENV} (or ${ROUTER_KEY_FILE_ENV} to a file only you can "
            f"read) for a router key, $EDM_API_KEY for an API key, or put it in a config file only you can read"
        )


def _secrets(node: Any) -> list[SecretStr]:
    if isinstance(node, SecretStr):
        return [node]
    if is_dataclass(node) and not isinstance(node, type):
        node = vars(node)
    elif hasattr(node, "as_dict") and not isinstance(node, dict):  # a jsonargparse Namespace
        node = vars(node)
    if isinstance(node, dict):
        return [s for value in node.values() for s in _secrets(value)]
    if isinstance(node, (list, tuple)):
        return [s for value in node for s in _secrets(value)]
    return []
