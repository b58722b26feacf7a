"""The served model as one graph: routing, members and post-processors inside, for ONNX and ``torch.export``.

:class:`~edm_lightning.defense.Victim` routes in Python (each member runs on its own inputs only, the
keyed router hashes bytes with BLAKE2b), which ``torch.jit.trace`` would silently freeze to the example
batch's routing. :class:`ExportableVictim` computes the same answer in tensor operations only:

* the route: the router's own :meth:`~edm_lightning.routing.Router.export_route` (the fixed member, or the paper's
  neural hash formula on the hash network's logits);
* every member on every input, then each input's routed answer picked with ``gather`` (N times one
  member's compute: the price of a static graph; the eager server runs each member on its inputs only);
* the post-processors, as in the eager victim;
* the input checks: a row that is non-finite or outside the input range gets ``valid = False``, NaN
  probabilities and member ``-1`` (a graph cannot raise), so no consumer can mistake it for an answer. Shape
  and dtype are fixed by the graph's input, ``float32 (N, C, H, W)`` with N dynamic.

The neural router's hash network runs on the whole batch the graph is called with (a graph cannot loop over
the eager router's fixed blocks of 64 rows), so an input's member is batch-independent only up to the
runtime's float rounding: a serving layer that must deny an attacker control over batching calls the graph
on fixed blocks of 64 rows, as the eager router does (the manifest says so).

A keyed router is refused (:func:`check_exportable`): BLAKE2b has no ONNX or ``torch.export`` operator,
and a hash written in tensor operations would store the key as a constant that anyone holding the file reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edm_lightning.defense import PredictionPoisoning, Victim
from edm_lightning.errors import ConfigError
from edm_lightning.routing import ROUTERS

__all__ = ["OUTPUT_NAMES", "ExportableVictim", "ExportError", "check_exportable"]

#: The exported graph's outputs, in order.
OUTPUT_NAMES = ("probabilities", "member", "valid")


class ExportError(ConfigError):
    """The victim cannot be written as one graph; the message says why and what to use instead."""


def check_exportable(victim: Victim) -> None:
    """Refuse a victim whose router or post-processors cannot be written in tensor operations.

    Raises:
        ExportError: a keyed router, a router without an exportable form, or Prediction Poisoning (MAD), with the
            reason and the alternative.
    """
    router = type(victim.router)
    if router.keyed:
        raise ExportError(
            f"the keyed router ({router.__name__}) cannot be exported: it hashes each input's bytes with "
            "keyed BLAKE2b, which no ONNX or torch.export operator computes, and a hash written in tensor operations "
            "would store the key in the file as a constant anyone holding the file can read. Export router 'neural' "
            "(the paper's) or 'fixed', or serve the keyed router with `python -m edm_lightning.serve`, where the key "
            "stays in the server's environment."
        )
    if not router.exportable:
        exportable = ", ".join(name for name, kind in ROUTERS.items() if kind.exportable)
        raise ExportError(f"router {router.__name__} has no exportable form ({exportable} have)")
    for post in victim.postprocessors:
        if isinstance(post, PredictionPoisoning):
            raise ExportError(
                "PredictionPoisoning (MAD) cannot be exported: it differentiates a proxy model for every answer "
                "(torch.func.jacrev), which an inference graph does not do. Serve it with `python -m edm_lightning.serve`."
            )


class ExportableVictim(nn.Module):
    """A :class:`~edm_lightning.defense.Victim` in tensor operations only (see the module docstring).

    ``forward(images)`` with ``images`` ``(N, C, H, W)`` float32 returns ``(probabilities (N, K) float32,
    member (N,) int64, valid (N,) bool)``; rows with ``valid = False`` hold NaN and member ``-1``.

    Raises:
        ExportError: the victim's router or a post-processor cannot be exported (:func:`check_exportable`).
    """

    def __init__(self, victim: Victim):
        super().__init__()
        check_exportable(victim)
        self.members = victim.members
        self.router = victim.router
        self.postprocessors = victim.postprocessors
        self.input_range = victim.input_range

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(probabilities (N, K), member (N,), valid (N,))`` for ``images`` ``(N, C, H, W)``."""
        flat = images.flatten(1)
        low, high = self.input_range
        valid = torch.isfinite(flat).all(dim=1) & (flat >= low).all(dim=1) & (flat <= high).all(dim=1)
        x = torch.where(valid[:, None, None, None], images, torch.zeros_like(images))  # nothing invalid reaches a net
        member = self.route(x)
        answers = torch.stack([net(x).softmax(dim=-1) for net in self.members])  # (members, N, K)
        probs = answers.gather(0, member[None, :, None].expand(1, -1, answers.shape[-1])).squeeze(0)
        for post in self.postprocessors:
            probs = post(x, probs)
        probs = torch.where(valid[:, None], probs, torch.full_like(probs, float("nan")))
        return probs, torch.where(valid, member, torch.full_like(member, -1)), valid

    def route(self, x: Tensor) -> Tensor:
        """Member indices ``(N,)``: the eager router's formula in tensor operations (:meth:`Router.export_route`)."""
        return self.router.export_route(x)
