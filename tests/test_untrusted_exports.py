"""Exported models are files someone else may have written: each load checks the SHA-256 its manifest records,
and refuses a ``pt2`` archive that would unpickle (or otherwise run code) and an ONNX model reading outside itself."""

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

from edm_lightning.defense import VictimConfig
from edm_lightning.export import ExportedFileError, export_victim, load_exported
from edm_lightning.export.__main__ import ExportConfig, ExportMismatch, run_export
from edm_lightning.export.__main__ import main as export_main
from edm_lightning.export.writer import partial_path
from edm_lightning.models import ClassifierModule
from tests.helpers.victims import linear_victim, synthetic_images

REDO = "Export the model again"


class _Payload:
    """Unpickling this runs ``Path.touch`` on the marker: what an attacker's planted archive would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """One tiny victim (a linear layer) exported once in each format, with its manifest."""
    folder = tmp_path_factory.mktemp("exported")
    return {format: export_victim(linear_victim(), folder / f"victim.{format}", format) for format in ("onnx", "pt2")}


def copy_export(source: Path, folder: Path, name: str | None = None) -> Path:
    """``source`` and its manifest copied into ``folder`` (as ``name``: the manifest then names the new file)."""
    path = folder / (name or source.name)
    shutil.copyfile(source, path)
    manifest = json.loads(Path(f"{source}.json").read_text()) | {"file": path.name}
    Path(f"{path}.json").write_text(json.dumps(manifest))
    return path


def record_digest(path: Path) -> None:
    """Rewrite the manifest's SHA-256 to match the file: an attacker ships a model and its manifest together."""
    manifest = json.loads(Path(f"{path}.json").read_text())
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    Path(f"{path}.json").write_text(json.dumps(manifest))


def rewrite_archive(path: Path, change) -> None:
    """Rewrite a pt2 archive's members (``change(records)`` edits the name -> bytes dict) with torch's own writer."""
    reader = PT2ArchiveReader(io.BytesIO(path.read_bytes()))
    records = {name: reader.read_bytes(name) for name in reader.get_file_names() if not name.startswith(".data/")}
    change(records)
    path.unlink()
    with PT2ArchiveWriter(str(path)) as writer:
        for name, data in records.items():
            writer.write_bytes(name, data)
    record_digest(path)


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def edit_json(records: dict, name: str, edit) -> None:
    document = json.loads(records[name])
    edit(document)
    records[name] = json.dumps(document).encode()


def first_node(program: dict) -> dict:
    return program["graph_module"]["graph"]["nodes"][0]


def test_a_pt2_whose_sample_inputs_hold_a_pickle_is_refused_and_runs_nothing(exported, tmp_path: Path):
    path = copy_export(exported["pt2"], tmp_path)
    marker = tmp_path / "payload.ran"
    rewrite_archive(path, lambda records: records.update({"data/sample_inputs/model.pt": pickled(((_Payload(marker),), {}))}))
    with pytest.raises(ExportedFileError, match="sample inputs .* do not load with weights_only=True.*could run code"):
        load_exported(path)
    assert not marker.exists()
    # The attack is real: torch.export.load runs the payload (whether it then fails depends on torch's build).
    with contextlib.suppress(Exception):
        torch.export.load(str(path))
    assert marker.exists()


def _pickled_weight(records: dict, marker: Path) -> None:
    def edit(config):
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        records[f"data/weights/{first['path_name']}"] = pickled(_Payload(marker))

    edit_json(records, "data/weights/model_weights_config.json", edit)


def _shape_code(records: dict, marker: Path) -> None:
    def edit(program):
        text = json.dumps(program)
        symbol = text.split('"expr_str": "', 1)[1].split('"', 1)[0]
        program.update(json.loads(text.replace(symbol, f"__import__('pathlib').Path({str(marker)!r}).touch()")))

    edit_json(records, "models/model.json", edit)


CRAFTED = {
    "weights stored as pickles": (_pickled_weight, "stores .* as pickles"),
    "a symbolic shape that is code": (_shape_code, "symbolic shape .* not plain arithmetic"),
    "a compiled library": (lambda records, marker: records.update({"data/aotinductor/model/model.so": b"\x7fELF"}),
                           "members the export never writes .*aotinductor"),
    "a legacy pickled state dict": (lambda records, marker: records.update({"data/weights/model.pt": pickled({})}),
                                    "members the export never writes"),
    "guard code": (lambda records, marker: edit_json(records, "models/model.json", lambda program: program.update(
        guards_code=[f"__import__('pathlib').Path({str(marker)!r}).touch()"])), "guard code"),
    "an operator outside ATen": (lambda records, marker: edit_json(records, "models/model.json", lambda program: first_node(
        program).update(target="torch.serialization.os.system")), "calls 'torch.serialization.os.system'"),
    "a carriage return in generated code": (lambda records, marker: edit_json(records, "models/model.json", lambda program: (
        first_node(program)["metadata"].update(stack_trace='File "x.py", line 1, in f\n    x\rimport os'))),
        "control character"),
}


@pytest.mark.parametrize("craft", list(CRAFTED), ids=list(CRAFTED))
def test_a_pt2_that_could_run_code_is_refused_even_with_a_matching_digest(exported, tmp_path: Path, craft):
    change, message = CRAFTED[craft]
    path = copy_export(exported["pt2"], tmp_path)
    marker = tmp_path / "payload.ran"
    rewrite_archive(path, lambda records: change(records, marker))
    with pytest.raises(ExportedFileError, match=message):
        load_exported(path)
    assert not marker.exists()


def test_the_symbolic_shape_attack_is_real_without_the_check(exported, tmp_path: Path):
    path = copy_export(exported["pt2"], tmp_path)
    marker = tmp_path / "payload.ran"
    rewrite_archive(path, lambda records: _shape_code(records, marker))
    with pytest.raises(Exception):  # noqa: B017 - torch evaluates the expression, then fails on what it returned
        torch.export.load(str(path))
    assert marker.exists()


@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_16_flipped_bytes_are_refused_as_a_digest_mismatch(exported, tmp_path: Path, format):
    path = copy_export(exported[format], tmp_path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the weights: the model would still load and answer differently
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    message = f"SHA-256 digest mismatch: .*victim.{format}.* changed after it was exported.*{REDO}"
    with pytest.raises(ExportedFileError, match=message):
        load_exported(path)


def _manifest(edit):
    def change(path: Path) -> None:
        manifest = json.loads(Path(f"{path}.json").read_text())
        edit(manifest)
        Path(f"{path}.json").write_text(json.dumps(manifest))

    return change


MANIFESTS = {
    "missing": (lambda path: Path(f"{path}.json").unlink(), "has no manifest .* recording its SHA-256"),
    "not JSON": (lambda path: Path(f"{path}.json").write_text("{truncated"), "is not readable JSON"),
    "binary": (lambda path: Path(f"{path}.json").write_bytes(b"\xff\xfe\x00"), "is not readable JSON"),
    "a list": (lambda path: Path(f"{path}.json").write_text("[]"), "holds list, not an object"),
    "without a digest": (_manifest(lambda manifest: manifest.pop("sha256")), "records no SHA-256 digest"),
    "with a malformed digest": (_manifest(lambda manifest: manifest.update(sha256="0" * 63)), "records no SHA-256 digest"),
    "naming another file": (_manifest(lambda manifest: manifest.update(file="../elsewhere.onnx")),
                            "describes '../elsewhere.onnx'"),
    "of another format": (_manifest(lambda manifest: manifest.update(format="pt2")), "in format 'pt2', not 'victim.onnx'"),
    "a digest of other bytes": (_manifest(lambda manifest: manifest.update(sha256=hashlib.sha256(b"x").hexdigest())),
                                "SHA-256 digest mismatch"),
}


@pytest.mark.parametrize("case", list(MANIFESTS), ids=list(MANIFESTS))
def test_a_manifest_that_does_not_vouch_for_the_model_is_refused(exported, tmp_path: Path, case):
    change, message = MANIFESTS[case]
    path = copy_export(exported["onnx"], tmp_path)
    change(path)
    with pytest.raises(ExportedFileError, match=f"{message}.*{REDO}"):
        load_exported(path)


def test_a_model_swapped_for_another_export_or_linked_is_refused(exported, tmp_path: Path):
    path = copy_export(exported["onnx"], tmp_path)
    other = export_victim(linear_victim(seed=1), tmp_path / "other.onnx")
    shutil.copyfile(other, path)  # a valid model, not the one its manifest describes
    with pytest.raises(ExportedFileError, match="SHA-256 digest mismatch"):
        load_exported(path)
    link = tmp_path / "link.onnx"
    link.symlink_to(other)  # a link beside the other model's manifest, which names other.onnx
    shutil.copyfile(f"{other}.json", f"{link}.json")
    with pytest.raises(ExportedFileError, match="describes 'other.onnx' .* not 'link.onnx'"):
        load_exported(link)


def test_an_onnx_model_reading_external_data_is_refused(exported, tmp_path: Path):
    path = copy_export(exported["onnx"], tmp_path)
    model = onnx.load_model(str(path))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "secret.key"  # onnxruntime would read it from the folder it runs in
    onnx.save_model(model, str(path))
    record_digest(path)
    with pytest.raises(ExportedFileError, match="keeps its data outside the file"):
        load_exported(path)


@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_bytes_that_are_no_model_are_refused_even_with_a_matching_digest(exported, tmp_path: Path, format):
    path = copy_export(exported[format], tmp_path)
    path.write_bytes(b"PK\x03\x04" + bytes(60))
    record_digest(path)
    with pytest.raises(ExportedFileError, match="is not an (ONNX model|archive torch.export.save wrote)"):
        load_exported(path)


def test_an_untouched_export_loads_and_its_manifest_records_its_digest(exported, tmp_path: Path):
    for format, source in exported.items():
        path = copy_export(source, tmp_path)
        assert json.loads(Path(f"{path}.json").read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        probs, member, valid = load_exported(path)(synthetic_images(4, seed=0)[0].float() / 255)
        assert probs.shape == (4, 10) and bool(valid.all()) and format in path.suffix


def test_the_export_never_writes_through_a_link_at_its_temporary_name(tmp_path: Path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out = tmp_path / "victim.onnx"
    partial_path(out).symlink_to(precious)
    export_victim(linear_victim(), out)
    assert precious.read_text() == "keep me" and load_exported(out)


@pytest.fixture
def command(checkpoint_factory, monkeypatch, tmp_path: Path):
    """The export command on a tiny checkpoint, checked on synthetic images instead of the real test set."""
    monkeypatch.setattr("edm_lightning.export.__main__.load_images", lambda *args, **kwargs: synthetic_images(20, seed=2))
    target = checkpoint_factory(ClassifierModule(), "target.ckpt")
    return ExportConfig(victim=VictimConfig(checkpoint=target), out=str(tmp_path / "served" / "target.onnx"), check=20,
                        dataset="fashionmnist")


def test_the_export_command_writes_the_digest_and_checks_through_the_verified_load(command, monkeypatch, tmp_path):
    manifest = run_export(command)
    out = Path(command.out)
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and manifest["equivalence"]["inputs"] == 20
    assert sorted(p.name for p in out.parent.iterdir()) == ["target.onnx", "target.onnx.json"]

    real_export = export_victim

    def changed_after_writing(*args, **kwargs):  # the file changes between the export and the command's check
        written = real_export(*args, **kwargs)
        written.write_bytes(written.read_bytes()[:-16] + bytes(16))
        return written

    monkeypatch.setattr("edm_lightning.export.__main__.export_victim", changed_after_writing)
    command.out = str(tmp_path / "again" / "target.onnx")
    with pytest.raises(ExportedFileError, match="SHA-256 digest mismatch"):
        run_export(command)
    assert not any((tmp_path / "again").iterdir())  # nothing kept


def test_an_export_that_fails_its_check_leaves_neither_file_nor_manifest(command, tmp_path: Path):
    command.tolerance = 0.0  # onnxruntime's float rounding differs from torch's by ~1e-7
    with pytest.raises(ExportMismatch, match="nothing was written"):
        run_export(command)
    assert not any(Path(command.out).parent.iterdir())


@pytest.mark.parametrize("prog", [None, "edm-lightning export"])
def test_the_export_command_names_itself_as_called(capsys, prog):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"], **({"prog": prog} if prog else {}))
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog or 'python -m edm_lightning.export'} [--config FILE")
