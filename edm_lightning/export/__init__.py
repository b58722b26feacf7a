"""The served model as one file: ONNX or a ``torch.export`` program with routing inside (``python -m edm_lightning.export``)."""

from edm_lightning.export.graph import OUTPUT_NAMES, ExportableVictim, ExportError, check_exportable
from edm_lightning.export.verify import ExportedFileError, read_manifest
from edm_lightning.export.writer import FORMATS, check_format, compare_with_eager, export_victim, load_exported, write_manifest

__all__ = [
    "FORMATS",
    "OUTPUT_NAMES",
    "ExportError",
    "ExportableVictim",
    "ExportedFileError",
    "check_exportable",
    "check_format",
    "compare_with_eager",
    "export_victim",
    "load_exported",
    "read_manifest",
    "write_manifest",
]
