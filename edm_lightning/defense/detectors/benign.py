"""How many honest clients a detector flags: the false-positive side of a stateful defense (PRADA paper Sec. V-B)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edm_lightning.data.perturbations import noisy_copies
from edm_lightning.defense.detectors.prada import ClientHistory, Prada, as_bytes

__all__ = ["benign_clients"]

#: A benign client's mild corruption (every other client): camera noise and a framing off by a pixel.
BENIGN_NOISE, BENIGN_SHIFT = 0.02, 1


@torch.no_grad()
def benign_clients(victim: nn.Module, images: Tensor, settings: Prada, clients: int, queries: int, seed: int,
                   batch_size: int = 128) -> dict:
    """Stream the defender's own images through the detector as ``clients`` honest clients.

    Client ``i`` sends ``queries`` of ``images`` in an order drawn from ``(seed, i)``, each image at most once; every
    odd client sends them mildly corrupted (Gaussian noise of std :data:`BENIGN_NOISE`, a shift of up to
    :data:`BENIGN_SHIFT` pixel). The classes PRADA groups by are the victim's answers, as served.

    Args:
        victim: images ``(N, C, H, W)`` in [0, 1] -> probabilities ``(N, K)``.
        images: the defender's test images ``(M, C, H, W)`` in [0, 1], ``M >= queries``.
        settings: the detector.
        clients: honest clients (>= 1).
        queries: queries per client.
        seed: seeds every client's order and corruption.
        batch_size: queries per request.

    Returns:
        ``benign_clients``, ``benign_flagged`` (clients flagged), ``benign_fpr`` (their share),
        ``benign_flagged_at`` (the query count at which each flagged client was), ``benign_w_min`` (the lowest
        Shapiro-Wilk W any client's test reached: the margin to ``delta``).

    Raises:
        ValueError: fewer images than ``queries``, or ``clients < 1``.
    """
    if len(images) < queries or clients < 1 or queries < 1:
        raise ValueError(f"benign clients need at least 1 client and queries <= the {len(images)} images, got "
                         f"{clients} clients of {queries} queries")
    flagged_at, w_min = [], math.inf
    for client in range(clients):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed * 100_003 + client))[:queries]
        stream = images[order]
        if client % 2:
            stream = noisy_copies(stream, 1, BENIGN_NOISE, seed=seed * 100_003 + client, shift=BENIGN_SHIFT)
        history = ClientHistory(settings)
        for part in stream.split(batch_size):
            flags, _ = history.observe(as_bytes(part), victim(part).argmax(dim=1).cpu())
            if flags.any():
                flagged_at.append(history.flagged_at)
                break
        if history.min_w is not None:
            w_min = min(w_min, history.min_w)
    return {"benign_clients": clients, "benign_flagged": len(flagged_at), "benign_fpr": len(flagged_at) / clients,
            "benign_flagged_at": flagged_at, "benign_w_min": None if math.isinf(w_min) else w_min}
