"""What every output-perturbation defense is, and how configs name and build them.

A post-processor changes a victim's answers, never its weights. Each is a :class:`Postprocessor`
called as ``probs = post(x, probs)`` by :class:`~edm_lightning.defense.Victim` after routing, so the
same defense applies to an undefended target and to an EDM ensemble, and several compose in a
configured order (:class:`~edm_lightning.defense.VictimConfig` ``postprocessors``). Every one

* checks its strength parameter at construction (:class:`~edm_lightning.errors.ConfigError` naming the
  expected range), and
* returns valid probability vectors: non-negative rows that sum to 1 (within float rounding).

The defenses, one file each (as ART's ``defences/postprocessor/``), register themselves in
:data:`POSTPROCESSORS`: :class:`TopLabel`, :class:`Rounding` (Tramer et al. 2016),
:class:`ReverseSigmoid` (Lee et al. 2019), :class:`PredictionPoisoning` (MAD, Orekondy et al. 2020),
:class:`AdaptiveMisinformation` (Kariyappa and Qureshi 2020).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import register_type
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.checkpoints import load_classifier_net
from edm_lightning.errors import ConfigError
from edm_lightning.registry import Registry

__all__ = [
    "POSTPROCESSORS",
    "Postprocessor",
    "PostprocessorConfig",
    "build_postprocessor",
    "build_postprocessors",
    "check_classes",
    "frozen_classifier",
    "resolve_postprocessor",
]

#: Post-processor classes by config name (the class name).
POSTPROCESSORS: Registry[type[Postprocessor]] = Registry("post-processor")


class Postprocessor(nn.Module):
    """An output-perturbation defense: ``forward(x, probs) -> probs'``.

    Contract of :meth:`forward`:

    * ``x``: the queries as served, ``(N, C, H, W)`` floats in [0, 1], already validated;
    * ``probs``: the answers so far, ``(N, K)``, non-negative rows summing to 1;
    * returns ``(N, K)`` probability rows of ``probs``' dtype and device, each row depending only on its
      own query and answer (never on the rest of the batch), with ``N = 0`` answered by an empty batch.

    Constructors take their strength parameters and, where they need them, ``num_classes`` and
    ``input_shape``, which the victim loader fills in from the victim.
    """

    @override
    def forward(self, x: Tensor, probs: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def build_postprocessors(
    configs: Sequence[dict[str, Any]], num_classes: int, input_shape: tuple[int, int, int]
) -> list[Postprocessor]:
    """The post-processors ``configs`` describe, in order (see :func:`build_postprocessor`)."""
    return [build_postprocessor(config, num_classes, input_shape, position=i) for i, config in enumerate(configs)]


def build_postprocessor(
    config: dict[str, Any], num_classes: int, input_shape: tuple[int, int, int], position: int = 0
) -> Postprocessor:
    """One post-processor from ``{"class_path": ..., "init_args": {...}}``, as LightningCLI configs write classes.

    ``class_path`` is a name of :data:`POSTPROCESSORS` (``ReverseSigmoid``) or a dotted path to a
    :class:`Postprocessor` subclass. The victim's ``num_classes`` and ``input_shape``
    are passed to classes that take them, as LightningCLI links data to model: a config never types
    them, and a value that disagrees with the victim is refused.

    Returns:
        The post-processor.

    Raises:
        ConfigError: a malformed config, an unknown class, arguments it does not take, a value of a type its
            hints do not accept, or a ``num_classes`` / ``input_shape`` other than the victim's.
    """
    # names and value types checked as a parsed config is (a dict made in code, e.g. by the experiment, is not)
    cls, init_args = resolve_postprocessor(PostprocessorConfig.parse(config, position).as_dict(), position)
    signature = inspect.signature(cls)
    where = f"postprocessors[{position}] ({cls.__name__})"
    for key, value in (("num_classes", int(num_classes)), ("input_shape", tuple(input_shape))):
        if key not in signature.parameters:
            continue
        given = init_args.get(key)
        if given is not None and (tuple(given) if key == "input_shape" else int(given)) != value:
            raise ConfigError(f"{where}: {key}={given!r} but the victim has {key}={value!r}; leave it out")
        init_args[key] = value
    try:
        signature.bind(**init_args)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}. Its arguments: {', '.join(signature.parameters)}") from None
    return cls(**init_args)


def resolve_postprocessor(config: Any, position: int | None = 0) -> tuple[type[Postprocessor], dict[str, Any]]:
    """The class and a copy of the init args a config names; a malformed config fails with what was expected.

    Returns:
        ``(class, init_args)``.

    Raises:
        ConfigError: not a ``{class_path, init_args}`` mapping, or a class that is no known post-processor.
    """
    where = "post-processor" if position is None else f"postprocessors[{position}]"
    if not isinstance(config, dict) or "class_path" not in config or not set(config) <= {"class_path", "init_args"}:
        raise ConfigError(
            f"{where} must be a mapping with class_path (one of {', '.join(POSTPROCESSORS)} or a dotted path) "
            f"and optional init_args, got {config!r}"
        )
    path, init_args = str(config["class_path"]), config.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ConfigError(f"{where}: init_args must be a mapping of argument names to values, got {init_args!r}")
    cls = POSTPROCESSORS.get(path) if path in POSTPROCESSORS else None
    if cls is None and "." in path:
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, Postprocessor)):
        raise ConfigError(
            f"{where}: unknown post-processor {path!r}. Known: {', '.join(POSTPROCESSORS)} "
            "(or a dotted path to a Postprocessor subclass)."
        )
    return cls, dict(init_args)


class PostprocessorConfig:
    """One ``{class_path, init_args}`` entry of ``VictimConfig.postprocessors``, checked when the config is parsed.

    Registered as a jsonargparse type: a misspelt class, an argument the class does not take (``betaa``) or a
    value of the wrong type fails while the config is parsed (``--print_config`` included), not when the
    victim is built. ``num_classes`` and ``input_shape`` are left out: the victim loader fills them in.

    Args:
        class_path: a name of :data:`POSTPROCESSORS` or a dotted path to a :class:`Postprocessor` subclass.
        init_args: its arguments.
    """

    def __init__(self, class_path: str, init_args: dict[str, Any] | None = None):
        self.class_path, self.init_args = class_path, dict(init_args or {})

    @classmethod
    def parse(cls, value: Any, position: int | None = None) -> PostprocessorConfig:
        """The checked entry (``position``: its index in the list, for messages).

        Returns:
            The entry (``value`` itself if it already is one).

        Raises:
            ConfigError: a malformed entry, an unknown class, unknown arguments or values of the wrong type.
        """
        if isinstance(value, cls):
            return value
        post, init_args = resolve_postprocessor(value, position)
        parser = _init_args_parser(post)
        try:
            parser.validate(parser.parse_object({k: v for k, v in init_args.items() if k not in LINKED}),
                            skip_unset=False)  # validate(): parse_object lets None through for any type
        except (ArgumentError, SystemExit, TypeError, ValueError) as err:  # validate() raises the last two
            detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            where = "post-processor" if position is None else f"postprocessors[{position}]"
            raise ConfigError(f"{where} ({post.__name__}): {detail}. Its arguments: "
                              f"{', '.join(p for p in inspect.signature(post).parameters if p not in LINKED)}") from None
        return cls(value["class_path"], init_args)

    def as_dict(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``, as configs write it."""
        return {"class_path": self.class_path, "init_args": dict(self.init_args)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PostprocessorConfig) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"PostprocessorConfig({self.class_path!r}, {self.init_args!r})"


#: Arguments the victim loader gives post-processors from the victim itself; configs never set them.
LINKED = ("num_classes", "input_shape")


@functools.cache
def _init_args_parser(post: type[Postprocessor]) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(post, skip=set(LINKED))
    return parser


register_type(PostprocessorConfig, serializer=PostprocessorConfig.as_dict, deserializer=PostprocessorConfig.parse,
              deserializer_exceptions=(ConfigError, ValueError, TypeError))


def frozen_classifier(model: nn.Module | str | Path, what: str, num_classes: int | None,
                input_shape: tuple[int, int, int] | None) -> nn.Module:
    """A frozen classifier from a module or checkpoint path; a class count other than the victim's fails now.

    Returns:
        The classifier in eval mode, gradients off.

    Raises:
        ConfigError: not a module or a readable single-classifier checkpoint, or another input shape or class count.
    """
    if isinstance(model, (str, Path)):
        net, hp, _ = load_classifier_net(model, what)
        have_classes, have_shape = int(hp["num_classes"]), tuple(hp["input_shape"])
        if input_shape is not None and have_shape != tuple(input_shape):
            raise ConfigError(f"{what} {str(model)!r} takes inputs {have_shape}, the victim {tuple(input_shape)}")
    elif isinstance(model, nn.Module):
        net = model.eval().requires_grad_(False)
        have_classes = None
        if input_shape is not None:
            with torch.no_grad():
                have_classes = int(net(torch.zeros(1, *input_shape)).shape[-1])
    else:
        raise ConfigError(f"{what} must be an nn.Module or a checkpoint path, got {type(model).__name__}")
    if num_classes is not None and have_classes is not None:
        check_classes(have_classes, int(num_classes), what, error=ConfigError)
    return net


def check_classes(have: int, want: int, what: str, error: type[Exception] = ValueError) -> None:
    """Refuse a model of another class count than the victim.

    Raises:
        error: ``have != want`` (``ValueError`` at query time, ``ConfigError`` at construction).
    """
    if have != want:
        raise error(f"{what} predicts {have} classes but the victim {want}: train it on the victim's task")
