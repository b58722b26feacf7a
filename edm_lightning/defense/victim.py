"""The victim: the model an oracle serves, members behind a router, then post-processors.

An undefended target is the same thing with one member and a fixed router, so every attack and
every measurement treats both alike; "defended" only ever means "behind a defense".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from edm_lightning.defense.fused import FusedMembers
from edm_lightning.defense.postprocessors.base import Postprocessor
from edm_lightning.routing import Router, answer_routed

__all__ = ["Victim", "validate_inputs"]


class Victim(nn.Module):
    """Members + router (+ post-processors): images in [0, 1] in, probability vectors out.

    Each member runs only on the inputs routed to it, so a batch costs about one member plus the
    router, not N members; after :meth:`stack_members` (the prediction API), small members of one architecture
    answer it as one stacked network on the CPU, with the same routes and the same answers up to float
    rounding. Post-processors (output-perturbation defenses) are applied in order,
    each as ``probs = p(x, probs)``. Queries are validated first (shape, floating point, finite, in range,
    real data), then cast to the members' dtype; a large call is answered ``chunk_size`` rows at a time, so
    its memory does not grow with the call. A member or post-processor that produces a non-finite answer
    is refused by name: a broken model must not serve NaN probabilities.

    Args:
        members: classifiers returning logits, all with the same input shape and class count.
        router: chooses the member that answers each input.
        input_shape: (channels, height, width) every query must have.
        num_classes: length of every answer.
        postprocessors: optional output perturbations applied after routing.
        input_range: closed interval every input value must lie in.
        chunk_size: most rows answered at once.

    Raises:
        ValueError: a query batch the model must not answer (the message says what was expected).
        RuntimeError: a member or post-processor produced non-finite values.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        router: Router,
        input_shape: tuple[int, int, int],
        num_classes: int,
        postprocessors: Sequence[Postprocessor] = (),
        input_range: tuple[float, float] = (0.0, 1.0),
        chunk_size: int = 4096,
    ):
        super().__init__()
        if len(members) == 0:
            raise ValueError("a Victim needs at least one member")
        if router.num_members != len(members):
            raise ValueError(f"router routes to {router.num_members} members but {len(members)} were given")
        self.members = nn.ModuleList(members)
        self.router = router
        self.postprocessors = nn.ModuleList(postprocessors)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.chunk_size = int(chunk_size)
        self.trained_on: str | None = None  # the dataset its checkpoint says it was trained on (set by the loader)
        self._fused: FusedMembers | None = None  # set by stack_members; not a submodule: nothing in the state dict

    def stack_members(self) -> Victim:
        """Answer from prepared copies of the members (:class:`~edm_lightning.defense.fused.FusedMembers`): on the
        CPU, small members in channels-last order and members of one architecture as one grouped network. The
        prediction API serves this way (EDM's serving cost). Routes are unchanged and answers equal up to float
        rounding, which is why the experiments' in-process victims keep the per-member loop: their answers, and
        so the committed clone accuracies, stay bit for bit what they were.

        Returns:
            This victim.
        """
        self._fused = FusedMembers(self.members)
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Probabilities ``(N, num_classes)`` for images ``x`` ``(N, C, H, W)`` in ``input_range``."""
        validate_inputs(x, self.input_shape, self.input_range)
        dtype = next((p.dtype for p in self.members.parameters()), torch.float32)
        x = x.to(dtype)  # after validation: a float64 batch is checked as sent, then answered in the members' dtype
        if x.shape[0] == 0:
            return x.new_zeros((0, self.num_classes))
        return torch.cat([self._answer(part) for part in x.split(self.chunk_size)])

    def _answer(self, x: Tensor) -> Tensor:
        probs = self.route_and_answer(x)
        for post in self.postprocessors:
            probs = post(x, probs)
            if not torch.isfinite(probs).all():
                raise RuntimeError(f"post-processor {type(post).__name__} produced non-finite answers; refusing to serve them")
        return probs

    def route_and_answer(self, x: Tensor) -> Tensor:
        """Softmax of the routed member for each input (no validation, no post-processing)."""
        return answer_routed(self.members, self.router(x), x, self.num_classes, self._fused)


def validate_inputs(x: Tensor, input_shape: tuple[int, int, int], input_range: tuple[float, float]) -> None:
    """Refuse, with a message saying what was expected, any batch a deployed model should not answer.

    Raises:
        ValueError: ``x`` is not a tensor, lives on the meta device, has another shape than
            ``(N, *input_shape)``, is not floating point, or holds non-finite or out-of-range values.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"queries must be a torch.Tensor of shape (N, {', '.join(map(str, input_shape))}), got "
                         f"{type(x).__name__}; convert with torch.as_tensor(x, dtype=torch.float32)")
    if x.device.type == "meta":
        raise ValueError("queries must hold data: got a tensor on the meta device")
    if x.ndim != 4:
        raise ValueError(f"queries must be a batch of shape (N, {', '.join(map(str, input_shape))}), "
                         f"got rank {x.ndim} {tuple(x.shape)}")
    if x.shape[1] != input_shape[0]:
        raise ValueError(f"queries must have {input_shape[0]} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"queries must have shape (N, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"queries must be floating point images in [{input_range[0]}, {input_range[1]}], got dtype {x.dtype}")
    if x.numel() == 0:
        return
    low, high = (value.item() for value in torch.aminmax(x))  # one pass; NaN propagates, Inf is an extreme
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("queries contain NaN or Inf values")
    if low < input_range[0] or high > input_range[1]:
        raise ValueError(  # full precision: 1.0000001 must not read as 1
            f"query values must lie in [{input_range[0]!r}, {input_range[1]!r}] (images as floats), got [{low!r}, {high!r}]"
        )
