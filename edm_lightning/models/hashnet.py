"""Training the neural router's hash network: a :class:`~edm_lightning.models.ClassifierModule` plus the
callback that stores, in each of its checkpoints, the logit offsets balancing its classes.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from edm_lightning.data.datamodules import seeded_indices
from edm_lightning.data.images import load_images
from edm_lightning.routing import BALANCE_KEY, balance_logit_bias

__all__ = ["HashBalanceCallback"]


class HashBalanceCallback(Callback):
    """Stores, in every checkpoint of the hash network, logit offsets that balance its classes on ``dataset``.

    ``dataset`` is the defender's in-distribution data (its training split, never the test split the
    balance is measured on): routing is balanced for benign traffic. The attacker's queries are not
    known to the defender and stay as (un)balanced as H makes them.

    Args:
        dataset: registry name of the defender's in-distribution data.
        root: data root.
        size: number of (seeded, random) training images to balance on.
        seed: seed of that draw.
    """

    def __init__(self, dataset: str = "fashionmnist", root: str = "data", size: int = 10000, seed: int = 0):
        super().__init__()
        self.dataset, self.root, self.size, self.seed = dataset, root, size, seed
        self._images: Tensor | None = None

    @override
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        input_shape = tuple(pl_module.hparams.input_shape)
        if self._images is None:
            images, _ = load_images(self.dataset, self.root, train=True, input_shape=input_shape)
            _, keep = seeded_indices(len(images), 0, min(self.size, len(images)), self.seed)
            self._images = images[keep]
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = torch.cat([
                pl_module(chunk.to(pl_module.device).float().div_(255)).cpu() for chunk in self._images.split(1024)
            ])
        pl_module.train(was_training)
        checkpoint[BALANCE_KEY] = {"logit_bias": balance_logit_bias(logits).tolist(), "dataset": self.dataset}
