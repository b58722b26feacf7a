"""Whole datasets as uint8 tensors, converted once to a target input shape.

The datasets this field uses are small (MNIST-like, CIFAR, SVHN): holding them as one uint8 tensor is
cheap, makes an epoch on CPU a matter of seconds, and lets OOD data be converted to the victim's input
shape (channels and size) once instead of per item. Values reach models as floats in [0, 1];
normalisation is the model's first layer, so attackers and oracles speak in plain pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from edm_lightning.data.datasets import open_dataset
from edm_lightning.errors import ConfigError

__all__ = ["BatchTensorDataset", "ImageTensorDataset", "batch_loader", "check_convertible", "convert_images", "load_images"]


class ImageTensorDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` (and labels) served as float images in [0, 1].

    Without labels (OOD use) an item is the image alone, so a loader yields plain image batches.
    Whole batches are cut with one indexing operation (``__getitems__``) instead of an item loop and a
    collate: on a small CNN on CPU the per-item path cost a fifth of the training step. Build loaders
    with :func:`batch_loader`. With a ``transform`` (augmentation draws a crop per image) items go one
    by one, as before.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, transform: Callable | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index].float().div_(255)
        if self.transform is not None:
            image = self.transform(image)
        return image if self.labels is None else (image, self.labels[index])

    def __getitems__(self, indices: list[int]):
        """The batch at ``indices``: images ``(B, C, H, W)`` in [0, 1] (and labels ``(B,)``), already collated."""
        if self.transform is not None:
            return collate_items([self[i] for i in indices])
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index].float().div_(255)
        return images if self.labels is None else (images, self.labels[index])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


class BatchTensorDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` whose batches are cut with one indexing operation per tensor."""

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def batch_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, generator: torch.Generator | None = None
) -> DataLoader:
    """A DataLoader over a dataset that collates its own batches (``__getitems__``); DDP samplers still apply.

    Lightning rebuilds it with a ``DistributedSampler`` under DDP and keeps ``collate_fn``, so each
    process still gets whole batches of its own share.

    Returns:
        The loader.
    """
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator,
        collate_fn=collate_batch, persistent_workers=num_workers > 0,
    )


def collate_batch(batch):
    """The batch a ``__getitems__`` returned, as it is (module level so worker processes can pickle it)."""
    return batch


def collate_items(items: list) -> Tensor | tuple[Tensor, ...]:
    """Stack per-item images (or ``(image, label)`` pairs) into a batch, as the default collate would."""
    if isinstance(items[0], tuple):
        return tuple(torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(len(items[0])))
    return torch.stack(items)


def load_images(
    name: str, root: str | Path, train: bool, input_shape: tuple[int, int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """All images of a dataset split as uint8 ``(N, C, H, W)`` (converted to ``input_shape``) and labels."""
    dataset = open_dataset(name, root, train)
    images, labels = _materialise(dataset)
    if input_shape is not None:
        images = convert_images(images, input_shape)
    return images, labels


def convert_images(images: Tensor, input_shape: tuple[int, int, int], chunk: int = 4096) -> Tensor:
    """Convert uint8 ``(N, C, H, W)`` images to another (channels, height, width).

    Grey to colour repeats the channel; colour to grey uses ITU-R 601 luminance (torchvision's);
    resizing is bilinear with antialiasing. Any other channel change is refused.

    Returns:
        uint8 ``(N, *input_shape)`` (``images`` itself when nothing changes).

    Raises:
        ConfigError: a channel change other than 1 <-> 3.
    """
    channels, height, width = (int(v) for v in input_shape)
    have = images.shape[1]
    if have == channels and tuple(images.shape[2:]) == (height, width):
        return images
    check_convertible(have, channels, f"{have}-channel images")
    out = []
    for part in images.split(chunk):
        if have == 1 and channels == 3:
            part = part.expand(-1, 3, -1, -1)
        elif have == 3 and channels == 1:
            part = TF.rgb_to_grayscale(part, num_output_channels=1)
        if tuple(part.shape[2:]) != (height, width):
            part = TF.resize(part, [height, width], antialias=True)
        out.append(part.contiguous())
    return torch.cat(out)


def check_convertible(have: int, want: int, what: str) -> None:
    """Refuse a channel change :func:`convert_images` cannot make (only 1 <-> 3 exists).

    Args:
        have: channels of the images.
        want: channels wanted.
        what: the images, for the message ("surrogate 'cifar100'").

    Raises:
        ConfigError: ``have != want`` and the pair is not {1, 3}.
    """
    if have != want and {have, want} != {1, 3}:
        raise ConfigError(f"{what} have {have} channel(s); {want} are needed and only 1 <-> 3 channel conversion "
                          f"exists. Choose images with {want} channel(s).")


def _materialise(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """uint8 ``(N, C, H, W)`` images and int64 labels of a torchvision dataset, without a per-item loop."""
    data = getattr(dataset, "data", None)
    if isinstance(data, Tensor) and data.ndim == 3:  # MNIST family: (N, H, W)
        images = data.unsqueeze(1)
    elif isinstance(data, np.ndarray) and data.ndim == 4 and data.shape[-1] == 3:  # CIFAR: (N, H, W, 3)
        images = torch.from_numpy(data).permute(0, 3, 1, 2)
    elif isinstance(data, np.ndarray) and data.ndim == 4 and data.shape[1] == 3:  # SVHN: (N, 3, H, W)
        images = torch.from_numpy(data)
    else:  # anything else: one pass through the dataset's own loader
        to_tensor = v2.PILToTensor()
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([to_tensor(image) for image, _ in items])
        return images.to(torch.uint8).contiguous(), torch.as_tensor([label for _, label in items])
    raw = getattr(dataset, "targets", None)
    if raw is None:
        raw = getattr(dataset, "labels")
    labels = [int(t) for t in raw]
    target_transform = getattr(dataset, "target_transform", None)
    if target_transform is not None:
        labels = [target_transform(t) for t in labels]
    return images.to(torch.uint8).contiguous(), torch.as_tensor(labels, dtype=torch.int64)
