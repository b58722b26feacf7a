r"""Is an exported file the one the export wrote, and can it be loaded without running code?

An exported file may come from someone else, whatever its format. Its manifest (``<file>.json``) records the
SHA-256 that the export computed, so a model changed after the export (16 flipped bytes of an ONNX file answer
differently without a word), a model swapped for another, or a manifest that is missing, edited or another
file's is refused before anything is loaded.

The digest proves nothing when whoever changed the model also rewrote its manifest, so the content is checked
too, in the form this package writes, before a loader sees it:

* ONNX: no tensor may keep its data outside the file (onnxruntime would read whichever file or memory address
  the model names).
* pt2: ``torch.export.load`` runs code when the archive asks it to: it unpickles payloads (falling back to
  ``weights_only=False`` when the safe load fails), loads compiled AOTInductor libraries, ``exec``\ s guard code
  and evaluates symbolic shapes with ``sympy.sympify``. An archive is accepted only with the members
  ``torch.export.save`` writes for this package's graphs, every weight and constant stored as raw tensor bytes,
  sample inputs that load with ``weights_only=True``, no guard code, every operator an ATen overload, every
  symbolic shape plain arithmetic, and no control character that generated code could be broken by.

The bytes are read once, checked, and handed to the loader from memory, so the file cannot change in between
(nor through a symbolic link).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.utils._sympy.functions as shape_functions
from torch.export.pt2_archive import PT2ArchiveReader

from edm_lightning.errors import UserError, unreadable_file_reason

__all__ = ["ExportedFileError", "check_onnx_model", "check_pt2_archive", "manifest_path", "read_manifest", "verified_bytes"]

#: The members ``torch.export.save`` writes for one graph named ``model`` (paths inside the archive's folder).
PT2_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
)
_PAYLOADS = {"data/weights/model_weights_config.json": re.compile(r"weight_\d+"),
             "data/constants/model_constants_config.json": re.compile(r"tensor_\d+")}
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_PROGRAM = "models/model.json"
#: What a symbolic shape may name: sympy's arithmetic, comparisons and logic, and torch's shape functions.
_SHAPE_NAMES = frozenset(
    {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Mod", "Abs", "Eq", "Ne", "Lt", "Le", "Gt",
     "Ge", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "Equality", "Unequality", "And", "Or",
     "Not", "true", "false", "True", "False", "oo", "zoo", "nan"}
    | {name for name, value in vars(shape_functions).items() if isinstance(value, type) and issubclass(value, sympy.Basic)}
)
_SHAPE_SYNTAX = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.keyword, ast.Constant, ast.BinOp, ast.UnaryOp,
                 ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # \r ends a comment in generated Python code; \n is split off


class ExportedFileError(UserError, ValueError):
    """An exported file or its manifest is refused: changed since the export, not what the export writes, or
    able to run code when loaded; the message says which, and to export again.
    """


def manifest_path(path: str | Path) -> Path:
    """Where the manifest of the exported file ``path`` is: ``<path>.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_manifest(path: str | Path, format: str) -> dict[str, Any]:
    """The manifest of the exported file ``path``, checked to describe that file, in ``format``, with its digest.

    Returns:
        The manifest (its ``sha256`` 64 lowercase hex digits).

    Raises:
        ExportedFileError: the manifest is missing, unreadable, not a JSON object, records no SHA-256, or names
            another file or format.
    """
    path, where = Path(path), manifest_path(path)
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportedFileError(f"{str(path)!r} has no manifest {str(where)!r} recording its SHA-256 digest, so it cannot "
                                f"be checked. {_redo(path)}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ExportedFileError(f"the manifest {str(where)!r} of {str(path)!r} is not readable JSON "
                                f"({unreadable_file_reason(err)}). {_redo(path)}") from None
    if not isinstance(manifest, dict):
        raise ExportedFileError(f"the manifest {str(where)!r} holds {type(manifest).__name__}, not an object. {_redo(path)}")
    digest = manifest.get("sha256")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ExportedFileError(f"the manifest {str(where)!r} records no SHA-256 digest of {str(path)!r} (written by an "
                                f"older version, or edited), so the model cannot be checked. {_redo(path)}")
    if manifest.get("file") != path.name or manifest.get("format") != format:
        raise ExportedFileError(
            f"the manifest {str(where)!r} describes {manifest.get('file')!r} in format {manifest.get('format')!r}, "
            f"not {path.name!r} in format {format!r}. {_redo(path)}"
        )
    return manifest


def verified_bytes(path: str | Path, format: str) -> bytes:
    """The bytes of the exported file ``path``, read once, after its digest and content are checked.

    Returns:
        The file's bytes, to hand to the loader (never the path: the file could change after the check).

    Raises:
        ExportedFileError: the manifest is refused (:func:`read_manifest`), the file is unreadable, its SHA-256
            differs from the manifest's, or its content could run code or read outside the file.
    """
    path = Path(path)
    expected = read_manifest(path, format)["sha256"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExportedFileError(f"cannot read the exported model {str(path)!r}: {err.strerror or err}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ExportedFileError(
            f"SHA-256 digest mismatch: {str(path)!r} hashes to {actual[:16]}..., its manifest {str(manifest_path(path))!r} "
            f"records {expected[:16]}...: the model changed after it was exported (or the manifest is another "
            f"model's). {_redo(path)}"
        )
    (check_onnx_model if format == "onnx" else check_pt2_archive)(data, path)
    return data


def check_onnx_model(data: bytes, path: str | Path = "the model") -> None:
    """Refuse ONNX bytes that do not parse, or whose tensors keep their data outside the file.

    Raises:
        ExportedFileError: not an ONNX model, or a tensor with external data (the export writes none).
    """
    import onnx  # optional: the [serve] extra, checked by the caller

    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError, among others
        raise ExportedFileError(f"{str(path)!r} is not an ONNX model ({unreadable_file_reason(err)}). {_redo(path)}") from None
    for message in _protobuf_messages(model):
        external = isinstance(message, onnx.TensorProto) and message.data_location == onnx.TensorProto.EXTERNAL
        if external or isinstance(message, onnx.TensorProto) and message.external_data:
            raise ExportedFileError(
                f"{str(path)!r}: tensor {message.name!r} keeps its data outside the file (external data), which the "
                f"export never writes and onnxruntime would read from a file or memory the model names; refused. "
                f"{_redo(path)}"
            )


def check_pt2_archive(data: bytes, path: str | Path = "the archive") -> None:
    """Refuse a ``torch.export`` archive that ``torch.export.load`` could run code for (see the module docstring).

    Raises:
        ExportedFileError: not an archive ``torch.export.save`` wrote, or what in it could run code.
    """
    reason = _code_in_pt2(*_read_pt2(data, path))
    if reason:
        raise ExportedFileError(f"{str(path)!r} {reason}; refused, because loading it could run code. {_redo(path)}")


def _read_pt2(data: bytes, path: str | Path) -> tuple[list[str], dict[str, dict], dict, bytes]:
    """Read an archive with torch's own reader, so what is checked is what ``torch.export.load`` would read.

    Returns:
        The member names, the payload configs (weights, constants), the program (``models/model.json``) and the
        sample inputs' bytes.

    Raises:
        ExportedFileError: not an archive, or a member missing or malformed.
    """
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
        configs = {config: json.loads(reader.read_string(config)) for config in _PAYLOADS if config in names}
        program = json.loads(reader.read_string(_PROGRAM))
        sample_inputs = reader.read_bytes(_SAMPLE_INPUTS)
    except (RuntimeError, ValueError) as err:  # torch's reader raises RuntimeError for a missing member or a bad zip
        raise ExportedFileError(f"{str(path)!r} is not an archive torch.export.save wrote "
                                f"({unreadable_file_reason(err)}). {_redo(path)}") from None
    payloads = {config: value.get("config") if isinstance(value, dict) else None for config, value in configs.items()}
    if not isinstance(program, dict) or not all(
        isinstance(config, dict) and all(isinstance(entry, dict) for entry in config.values()) for config in payloads.values()
    ):
        raise ExportedFileError(f"{str(path)!r} is not an archive torch.export.save wrote (its program or payload "
                                f"configs are not the JSON objects torch writes). {_redo(path)}")
    return names, payloads, program, sample_inputs


def _code_in_pt2(names: list[str], payloads: dict[str, dict], program: dict, sample_inputs: bytes) -> str | None:
    """What in an archive's contents would make ``torch.export.load`` run code, or ``None``."""
    unexpected = sorted({name for name in names if not PT2_MEMBERS.fullmatch(name) or names.count(name) > 1})
    if unexpected:
        return (f"holds members the export never writes ({', '.join(unexpected[:4])}: pickled objects, compiled "
                "libraries, extra programs or duplicates)")
    for config, raw_name in _PAYLOADS.items():
        pickled = [fqn for fqn, payload in payloads.get(config, {}).items()
                   if payload.get("use_pickle") is not False or not raw_name.fullmatch(str(payload.get("path_name")))]
        if pickled:
            return f"stores {', '.join(pickled[:4])} as pickles, not raw tensor bytes"
    try:
        torch.load(io.BytesIO(sample_inputs), weights_only=True)  # torch falls back to weights_only=False if this fails
    except Exception as err:  # noqa: BLE001 - any failure means torch would unpickle it unsafely
        return f"holds sample inputs ({_SAMPLE_INPUTS}) that do not load with weights_only=True: {unreadable_file_reason(err)}"
    if program.get("guards_code"):
        return "holds guard code, which torch runs with exec (the export writes none)"
    for key, value in _json_items(program):
        if _CONTROL.search(key) or (isinstance(value, str) and _CONTROL.search(value)):
            return f"holds a control character in {key!r}, which could break the code torch generates from the graph"
        if key == "target" and not _is_aten_overload(value):
            return f"calls {value!r}, which is not an ATen operator"
        if key == "expr_str" and not _is_plain_arithmetic(value):
            return f"holds the symbolic shape {str(value)[:80]!r}, which is not plain arithmetic (sympy evaluates it)"
    return None


def _is_aten_overload(target: Any) -> bool:
    """``torch.ops.aten.<op>.<overload>`` naming a registered ATen operator, resolved as torch resolves it."""
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) != 5 or parts[:3] != ["torch", "ops", "aten"]:
        return False
    return isinstance(getattr(getattr(torch.ops.aten, parts[3], None), parts[4], None), torch._ops.OpOverload)


def _is_plain_arithmetic(expr: Any) -> bool:
    """An expression of sympy's shape classes over numbers and symbol names: nothing else can be called or named."""
    try:
        tree = ast.parse(expr, mode="eval") if isinstance(expr, str) else None
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    if tree is None:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _SHAPE_SYNTAX):
            return False
        if isinstance(node, ast.Name) and node.id not in _SHAPE_NAMES:
            return False
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return False
        if isinstance(node, ast.Constant) and not (
            isinstance(node.value, (bool, int, float)) or (isinstance(node.value, str) and re.fullmatch(r"[\w.+-]*", node.value))
        ):
            return False
    return True


def _json_items(value: Any) -> Iterator[tuple[str, Any]]:
    """Every ``(key, value)`` of every object in a parsed JSON document, depth first (list items under their list's key)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        key, item = stack.pop()
        yield key, item
        if isinstance(item, dict):
            stack.extend(item.items())
        elif isinstance(item, list):
            stack.extend((key, element) for element in item)


def _protobuf_messages(message: Any) -> Iterator[Any]:
    """``message`` and every message nested in it (graphs, subgraphs, attributes, functions), depth first."""
    stack = [message]
    while stack:
        current = stack.pop()
        yield current
        for field, value in current.ListFields():
            if field.message_type is not None:  # one message, or a repeated field of them
                stack.extend([value] if hasattr(value, "ListFields") else value)


def _redo(path: Path | str) -> str:
    return (f"Export the model again (python -m edm_lightning.export ... --out {path}), which writes the file and its "
            "manifest together, and load only exports you made or received with their manifest from someone you trust")
