"""Datasets by name, offline fetching, and the DataModules built on them."""

from edm_lightning.data.datamodules import ClassificationDataModule, OODDataModule, ProbeDataModule
from edm_lightning.data.edm import EDMDataModule
from edm_lightning.data.fetch import FetchError, fetch
from edm_lightning.data.integrity import DatasetCorruptError
from edm_lightning.data.images import ImageTensorDataset, convert_images, load_images
from edm_lightning.data.datasets import DATASETS, DatasetNotFoundError, DatasetSpec, get_spec, open_dataset, require_fetched

__all__ = [
    "DATASETS",
    "ClassificationDataModule",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "EDMDataModule",
    "FetchError",
    "ImageTensorDataset",
    "OODDataModule",
    "ProbeDataModule",
    "convert_images",
    "fetch",
    "get_spec",
    "load_images",
    "open_dataset",
    "require_fetched",
]
