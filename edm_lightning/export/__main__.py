"""``python -m edm_lightning.export --victim.checkpoint ... --format onnx --out model.onnx``

Writes the victim (router, members, post-processors) as one graph, then loads it back as any user would (its
SHA-256 and content checked) and runs it on ``--check`` held-out images of the victim's dataset beside the eager
model: the export is kept only if every input goes to the same member and every answer is within ``--tolerance``.
Its manifest (``<out>.json``) records the file's SHA-256, which every load checks.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from edm_lightning.command_line import parse_command_line, refuse_keys_on_command_line
from edm_lightning.data import get_spec, load_images
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError, exit_if_user_error
from edm_lightning.export.verify import manifest_path, read_manifest
from edm_lightning.export.writer import (
    check_format,
    compare_with_eager,
    export_victim,
    load_exported,
    partial_path,
    write_manifest,
)
from edm_lightning.files import to_plain

__all__ = ["ExportConfig", "main", "run_export"]


@dataclass
class ExportConfig:
    """What to export, where, and how to check it.

    Args:
        victim: the model to export, as attacks and the server name it (checkpoint, router, post-processors).
        out: the file to write (default ``model.<format>``); its manifest goes to ``<out>.json``.
        format: ``onnx`` (run with onnxruntime) or ``pt2`` (``torch.export``).
        check: held-out images compared with the eager model after writing (0: no check).
        tolerance: largest accepted difference of a probability between the exported and the eager model.
        root: the data root holding the victim's dataset (for the check).
        dataset: the held-out images' dataset (default: the one the victim's checkpoint was trained on).
    """

    victim: VictimConfig
    out: str | None = None
    format: str = "onnx"
    check: int = 10000
    tolerance: float = 1e-5
    root: str = "data"
    dataset: str | None = None


class ExportMismatch(RuntimeError):
    """The exported model answered differently from the eager one; nothing was kept (the command exits 1)."""


def run_export(config: ExportConfig) -> dict:
    """Export, check and keep (or remove) the file; returns the manifest written beside it.

    Raises:
        ConfigError: bad settings, a victim that cannot be exported, or missing data for the check.
        ExportMismatch: the exported model routed or answered differently from the eager model.
    """
    if config.check < 0 or not config.tolerance >= 0:
        raise ConfigError(f"check must be >= 0 and tolerance >= 0, got {config.check} and {config.tolerance}")
    check_format(config.format)  # before anything is loaded
    victim = config.victim.build()
    dataset = config.dataset or victim.trained_on
    if config.check and dataset is None:
        raise ConfigError("the victim's checkpoint does not say which dataset it was trained on: name it with --dataset")
    if config.check:
        images, _ = load_images(dataset, config.root, train=False, input_shape=get_spec(dataset).input_shape)
        images = images[: config.check].float().div_(255)
    out = Path(config.out or f"model.{config.format}")
    source = to_plain(config.victim)  # the key as None
    written = export_victim(victim, partial_path(out), config.format, source)  # checked before it may replace `out`
    check = None
    try:
        if config.check:  # loaded as any user loads it: digest and content checked
            check = compare_with_eager(victim, load_exported(written, config.format), images) | {"dataset": f"{dataset} test"}
            if check["member_mismatches"] or not check["all_valid"] or check["max_abs_diff"] > config.tolerance:
                raise ExportMismatch(
                    f"the exported model differs from the eager one on {dataset}'s test images: "
                    f"{check['member_mismatches']} of {check['inputs']} inputs routed to another member, largest probability "
                    f"difference {check['max_abs_diff']:.2e} (tolerance {config.tolerance:.0e}), every input accepted: "
                    f"{check['all_valid']}; nothing was written"
                )
        sha256 = read_manifest(written, config.format)["sha256"]  # what export_victim wrote, not what `out` holds later
        os.replace(written, out)
    finally:
        written.unlink(missing_ok=True)
        manifest_path(written).unlink(missing_ok=True)
    path = write_manifest(out, victim, config.format, source, check, sha256=sha256)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None, prog: str = "python -m edm_lightning.export") -> dict:
    """Parse the export config (YAML plus overrides), export, and print where the files went; ``prog`` is the
    command as the user called it (``edm-lightning export`` from the dispatcher), for the help and usage lines."""
    config, argv = parse_command_line(ExportConfig, argv, prog)
    try:
        refuse_keys_on_command_line(config, argv)
        manifest = run_export(config)
    except ExportMismatch as err:  # not the user's settings: the export itself failed
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:
        exit_if_user_error(err)
        raise
    check = manifest["equivalence"]
    print(f"wrote {manifest['file']} ({config.format}) and its manifest {manifest['file']}.json", file=sys.stderr)
    if check:
        print(f"checked on {check['inputs']} {check['dataset']} images: same member for all, largest probability "
              f"difference {check['max_abs_diff']:.1e}", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
