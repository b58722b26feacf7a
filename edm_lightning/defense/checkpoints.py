"""Reading the checkpoints a served model is built from: one safe read, nets rebuilt from their hyper-parameters.

Checkpoints may come from someone else, so a file is read once with ``torch.load(weights_only=True)`` and
every net is rebuilt by name (:func:`~edm_lightning.nets.build_net`) from the hyper-parameters it was saved
with, then given its weights: no training class is imported or instantiated to serve a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edm_lightning.errors import CheckpointNotFoundError, ConfigError, unreadable_file_reason
from edm_lightning.nets import build_net

__all__ = ["classifier_net", "load_classifier_net", "read_checkpoint"]


def read_checkpoint(path: str | Path, what: str, train_hint: str = "python main.py fit --config ...") -> dict[str, Any]:
    """The contents of a Lightning checkpoint, read without running any code it may hold.

    Raises:
        CheckpointNotFoundError: no file at ``path`` (the message says how to train it: ``train_hint``).
        ConfigError: the file is not a readable checkpoint (truncated, or holding other Python objects).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{what} checkpoint {str(path)!r} does not exist. Train it first ({train_hint}).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{what} checkpoint {str(path)!r} is not a readable Lightning checkpoint: "
                          f"{unreadable_file_reason(err)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("hyper_parameters"), dict):
        raise ConfigError(f"{what} checkpoint {str(path)!r} is not a Lightning checkpoint with hyper-parameters")
    return state


def classifier_net(hp: dict[str, Any], weights: dict[str, torch.Tensor]) -> nn.Module:
    """The net ``hp`` describes (``arch``, ``input_shape``, ``num_classes``, ``mean``, ``std``) with ``weights``, frozen.

    Raises:
        ConfigError: unknown architecture or a value out of range (from :func:`~edm_lightning.nets.build_net`).
        RuntimeError: the weights do not fit the net.
    """
    net = build_net(hp["arch"], tuple(hp["input_shape"]), int(hp["num_classes"]), hp.get("mean"), hp.get("std"))
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False)


def load_classifier_net(path: str | Path, what: str = "classifier",
                        train_hint: str = "python main.py fit --config ...") -> tuple[nn.Module, dict[str, Any], dict]:
    """The frozen net of a single-classifier checkpoint (``ClassifierModule``, ``MisinformationModule``,
    ``CloneModule``), its hyper-parameters, and the whole checkpoint (for entries beside the weights).

    Raises:
        CheckpointNotFoundError: no file at ``path``.
        ConfigError: not a readable single-classifier checkpoint; the message names the file.
    """
    state = read_checkpoint(path, what, train_hint)
    hp = state["hyper_parameters"]
    try:
        weights = {k[len("net."):]: v for k, v in state["state_dict"].items() if k.startswith("net.")}
        net = classifier_net(hp, weights)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{what} {str(path)!r} is not a single-classifier Lightning checkpoint: "
                          f"{unreadable_file_reason(err)}") from None
    return net, dict(hp), state
