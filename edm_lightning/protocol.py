"""The prediction API's wire format, shared by the server (:mod:`edm_lightning.serve`) and its client (the HTTP oracle).

A request is ``POST /v1/predict`` with the client's key in ``X-API-Key`` (or ``Authorization: Bearer``) and a
batch of images in [0, 1] as one of: a NumPy ``.npy`` array ``(N, C, H, W)`` (``application/x-npy``, read
without pickle; floating point, other dtypes are refused as images), JSON ``{"inputs": [[[[...]]]]}``
(``application/json``), or one opaque PNG file of the model's size (``image/png``; each pixel becomes
``value / (2**depth - 1)`` for its own bit depth, 1 to 16; a grey image may have any colour type whose pixels are
grey). The answer is JSON:
``{"probabilities": [[...]]}`` or ``{"labels": [...]}`` (the server's policy), with ``queries_spent``
and ``budget`` of the key. Errors are JSON ``{"detail": message}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

__all__ = ["API_KEY_HEADER", "INFO_PATH", "NPY", "PREDICT_PATH", "USAGE_PATH", "decode_npy", "encode_npy"]

PREDICT_PATH = "/v1/predict"
INFO_PATH = "/v1/info"  # input shape, class count, answer policy, the served model's public identity
USAGE_PATH = "/v1/usage"  # the key's queries spent and budget
API_KEY_HEADER = "X-API-Key"
NPY = "application/x-npy"


def encode_npy(x: Tensor) -> bytes:
    """A tensor as ``.npy`` bytes (its dtype kept)."""
    buffer = io.BytesIO()
    np.save(buffer, x.detach().cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> Tensor:
    """``.npy`` bytes as a tensor, never unpickling (object arrays are refused).

    Returns:
        The array as a tensor (its dtype kept).

    Raises:
        ValueError: not a ``.npy`` file, or one holding Python objects.
    """
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, OSError or EOFError for bad bytes
        raise ValueError(f"the body is not a readable .npy array ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiub":
        raise ValueError(f"the .npy array must hold numbers, got dtype {getattr(array, 'dtype', type(array))}")
    return torch.from_numpy(np.ascontiguousarray(array))
