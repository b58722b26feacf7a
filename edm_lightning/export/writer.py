"""Writing the served model as ONNX or a ``torch.export`` program, and checking it against the eager model.

``jit.trace`` is never used (it freezes one batch's routing); TorchScript is refused (``torch.jit`` is deprecated
by PyTorch and cannot compile this package's annotated modules). :func:`export_victim` writes a file next to its
target and renames it into place, so a failed export leaves nothing that looks like a model; the export command
checks the file against the eager model before the rename, so a file that answers differently never replaces a
good one. Its manifest (``<out>.json``) records the file's SHA-256, what the graph computes, how its inputs must
look, and how it compared with the eager model; :func:`load_exported` loads nothing that its manifest does not
vouch for, or that could run code (:mod:`edm_lightning.export.verify`).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from edm_lightning.defense import Victim
from edm_lightning.errors import ConfigError
from edm_lightning.export.graph import OUTPUT_NAMES, ExportableVictim, ExportError
from edm_lightning.export.verify import ExportedFileError, manifest_path, verified_bytes
from edm_lightning.files import file_digest, write_atomic

__all__ = ["FORMATS", "check_format", "compare_with_eager", "export_victim", "load_exported", "partial_path", "write_manifest"]

Format = Literal["onnx", "pt2"]
FORMATS: tuple[str, ...] = ("onnx", "pt2")
EXTRA = "pip install 'edm-lightning[serve]'"  # onnx, onnxscript and onnxruntime come with serving


def export_victim(victim: Victim, out: str | Path, format: Format = "onnx", source: dict[str, Any] | None = None) -> Path:
    """Write ``victim`` as one graph with a dynamic batch size (see :class:`ExportableVictim`), and its manifest.

    Args:
        victim: the eager victim (router, members, post-processors).
        out: the file to write (``.onnx`` or ``.pt2`` by convention); the manifest goes to ``<out>.json``.
        format: ``onnx`` (opset of ``torch.onnx``'s exporter; run with onnxruntime) or ``pt2``
            (``torch.export.save``; load with :func:`load_exported`).
        source: how the victim was built, recorded in the manifest (no secrets).

    Returns:
        ``out`` as a path, written completely (or not at all), beside the manifest recording its SHA-256.

    Raises:
        ExportError: an unknown format, TorchScript, or a victim that cannot be exported.
        ConfigError: the ONNX exporter's packages are missing (the message names the extra).
    """
    check_format(format)
    graph = ExportableVictim(victim).eval()
    example = torch.rand(2, *victim.input_shape)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1)}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    partial.unlink(missing_ok=True)  # never write through a link planted at the temporary name
    try:
        with torch.no_grad():
            if format == "pt2":
                program = torch.export.export(graph, (example,), dynamic_shapes=dynamic, strict=False)
                torch.export.save(program, partial)
            else:
                torch.onnx.export(graph, (example,), str(partial), input_names=["images"], output_names=list(OUTPUT_NAMES),
                                  dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
        sha256 = file_digest(partial)  # of the bytes just written, before anyone else can see them
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    write_manifest(out, victim, format, source, None, sha256=sha256)
    return out


def partial_path(out: Path) -> Path:
    """Where ``out`` is written before it is renamed into place (same folder, same suffix: torch.export wants .pt2)."""
    return out.with_name(f".{out.stem}.partial{out.suffix}")


def check_format(format: str) -> None:
    """Refuse a format this package does not write, or whose exporter is not installed.

    Raises:
        ExportError: TorchScript (why not) or an unknown format (the known ones listed).
        ConfigError: the ONNX exporter is missing (the message names the extra).
    """
    if format == "torchscript":
        raise ExportError("TorchScript is not offered: torch.jit is deprecated by PyTorch and cannot compile this "
                          "package's modules; use --format pt2 (torch.export) or --format onnx")
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}. Known formats: {', '.join(FORMATS)}")
    if format == "onnx":
        _require("onnxscript", "the ONNX exporter")


def load_exported(path: str | Path, format: Format | None = None) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """A function running an exported file: images ``(N, C, H, W)`` float32 -> ``(probabilities, member, valid)``.

    The file is read once and checked before it is loaded (:func:`~edm_lightning.export.verify.verified_bytes`):
    its SHA-256 against its manifest, and its content against what the export writes, so that a changed model,
    a missing or edited manifest, or an archive that would unpickle or otherwise run code is refused. ONNX runs
    on onnxruntime's CPU provider; ``pt2`` through ``torch.export.load``, from the checked bytes.

    Returns:
        The runner; its outputs are torch tensors.

    Raises:
        ExportError: the format is unknown (from the suffix when ``format`` is ``None``).
        ExportedFileError: the file or its manifest is refused; the message says why and to export again.
        ConfigError: onnx or onnxruntime is missing (the message names the extra).
    """
    path = Path(path)
    format = format or path.suffix.lstrip(".")
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r} for {str(path)!r}. Known formats: {', '.join(FORMATS)}")
    if format == "onnx":
        _require("onnx", "checking an ONNX model")
        _require("onnxruntime", "running an ONNX model")
    data = verified_bytes(path, format)
    if format == "onnx":
        import onnxruntime  # optional: the [serve] extra

        try:
            session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own classes for a model it cannot run
            raise ExportedFileError(f"onnxruntime cannot load {str(path)!r}: {str(err).strip()[:300]}") from None

        def run_onnx(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            outputs = session.run(list(OUTPUT_NAMES), {"images": images.float().numpy()})
            return tuple(torch.from_numpy(o) for o in outputs)

        return run_onnx
    try:
        module = torch.export.load(io.BytesIO(data)).module()
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for an archive it cannot deserialize
        reason = f"{type(err).__name__}: {str(err).strip()[:300]}"
        raise ExportedFileError(f"torch.export cannot load {str(path)!r}: {reason}") from None

    def run_pt2(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            return module(images.float())

    return run_pt2


def compare_with_eager(
    victim: Victim, run: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], images: Tensor, batch_size: int = 500
) -> dict[str, Any]:
    """How the exported model's answers compare with the eager victim's on ``images`` (valid inputs).

    Returns:
        ``inputs``, ``same_member`` (share of inputs routed to the eager member), ``member_mismatches``,
        ``max_abs_diff`` (largest probability difference over the inputs routed alike; infinite where the
        export answered NaN) and ``all_valid`` (the export accepted every input).
    """
    same, valid_all, worst = 0, True, 0.0
    for part in images.split(batch_size):
        part = part.float()
        probs, member, valid = run(part)
        eager_member = victim.router(part)
        eager = victim(part)
        alike = member.long() == eager_member
        same += int(alike.sum())
        valid_all &= bool(valid.all())
        if alike.any():
            difference = (probs[alike] - eager[alike]).abs().nan_to_num(nan=float("inf"))  # NaN must not compare as 0
            worst = max(worst, float(difference.max()))
    return {"inputs": len(images), "same_member": same / max(len(images), 1), "member_mismatches": len(images) - same,
            "max_abs_diff": worst, "all_valid": valid_all}


def write_manifest(out: Path, victim: Victim, format: str, source: dict[str, Any] | None, check: dict[str, Any] | None,
                   *, sha256: str) -> Path:
    """``<out>.json``: the file's SHA-256, what the graph computes, its input contract, its source and its comparison
    with eager.

    Args:
        out: the exported file.
        victim: the eager victim it was exported from.
        format: ``onnx`` or ``pt2``.
        source: how the victim was built (no secrets), or ``None``.
        check: :func:`compare_with_eager`'s result, or ``None`` when the file was not compared.
        sha256: the SHA-256 (hex) of the bytes the export wrote, which every load checks.

    Returns:
        The manifest's path.
    """
    channels, height, width = victim.input_shape
    manifest = {
        "format": format,
        "file": out.name,
        "sha256": sha256,
        "input": {"name": "images", "dtype": "float32", "shape": ["N", channels, height, width],
                  "range": list(victim.input_range)},
        "outputs": {
            "probabilities": f"float32 (N, {victim.num_classes}): the routed member's answer after the post-processors; "
                             "NaN where valid is false",
            "member": "int64 (N,): the member that answered, -1 where valid is false (the defender's record; do not "
                      "return it to clients)",
            "valid": "bool (N,): the input was finite and inside the range; refuse the query where false",
        },
        "num_classes": victim.num_classes,
        "members": len(victim.members),
        "router": type(victim.router).__name__,
        "postprocessors": [type(p).__name__ for p in victim.postprocessors],
        "routing_blocks": "the neural router's eager form hashes fixed blocks of 64 rows; call this graph on blocks of "
                          "64 rows (pad the last) where clients must not control which inputs share a call",
        "source": source,
        "equivalence": check,
    }
    path = manifest_path(out)
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs the {module!r} package: {EXTRA}")
