"""Export: the victim as one graph (ONNX through onnxruntime, torch.export's pt2) answers as the eager victim does."""

import json
from pathlib import Path

import pytest
import torch

from edm_lightning.defense import (
    AdaptiveMisinformation,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopLabel,
    Victim,
)
from edm_lightning.export import ExportableVictim, ExportError, compare_with_eager, export_victim, load_exported
from edm_lightning.export.__main__ import main as export_main
from edm_lightning.models import ClassifierModule, EnsembleModule
from edm_lightning.nets import build_net
from edm_lightning.routing import CoarseKeyedHashRouter, FixedRouter, KeyedHashRouter, NeuralHashRouter

SHAPE = (1, 28, 28)


def nets(count: int, seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [build_net("lenet5", SHAPE, 10).eval() for _ in range(count)]


def neural_victim(postprocessors=()) -> Victim:
    torch.manual_seed(1)
    hash_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))  # varied argmax and confidence
    torch.nn.init.normal_(hash_net[1].weight, std=0.3)
    router = NeuralHashRouter(hash_net, 3, logit_bias=torch.randn(10))
    return Victim(nets(3), router, SHAPE, 10, postprocessors).eval()


def images(count: int, seed: int = 0) -> torch.Tensor:
    """Structured inputs (blurred blobs) that spread over the hash network's classes, unlike uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 1, 7, 7, generator=generator)
    return torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear").clamp(0, 1)


@pytest.mark.parametrize("router", ["fixed", "neural"])
def test_the_graph_routes_and_answers_as_the_eager_victim(router):
    victim = neural_victim() if router == "neural" else Victim(nets(3), FixedRouter(3, 2), SHAPE, 10).eval()
    x = images(300)
    probs, member, valid = ExportableVictim(victim)(x)
    assert torch.equal(member, victim.router(x)) and bool(valid.all())
    if router == "neural":
        assert len(member.unique()) == 3  # the check means something: every member answers some inputs
    torch.testing.assert_close(probs, victim(x))


def test_invalid_rows_are_flagged_and_never_answered():
    x = images(4)
    x[1, 0, 0, 0] = float("nan")
    x[2, 0, 3, 3] = 1.5
    x[3, 0, 5, 5] = -0.01
    probs, member, valid = ExportableVictim(neural_victim())(x)
    assert valid.tolist() == [True, False, False, False] and member[1:].tolist() == [-1, -1, -1] and member[0] >= 0
    assert torch.isfinite(probs[0]).all() and torch.isnan(probs[1:]).all()


@pytest.mark.parametrize("format", ["onnx", "pt2"])
@pytest.mark.parametrize("router", ["fixed", "neural"])
def test_exported_files_route_every_input_alike_and_answer_within_1e5(tmp_path: Path, format, router):
    misinformation = nets(1, seed=5)[0]
    posts = [ReverseSigmoid(beta=0.3), AdaptiveMisinformation(0.6, 1000.0, misinformation, 10, SHAPE)]
    victim = neural_victim(posts) if router == "neural" else Victim(nets(3), FixedRouter(3, 1), SHAPE, 10, posts).eval()
    path = export_victim(victim, tmp_path / f"victim.{format}", format)
    run = load_exported(path)
    check = compare_with_eager(victim, run, images(1000, seed=3), batch_size=300)  # batches of another size than exported
    assert check["member_mismatches"] == 0 and check["all_valid"] and check["max_abs_diff"] <= 1e-5, check
    probs, _, valid = run(torch.full((2, *SHAPE), float("nan")))
    assert not valid.any() and torch.isnan(probs).all()
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("post", [TopLabel(), Rounding(decimals=1)])
def test_label_and_rounding_defenses_export(tmp_path: Path, post):
    victim = neural_victim([post])
    run = load_exported(export_victim(victim, tmp_path / "victim.onnx", "onnx"))
    check = compare_with_eager(victim, run, images(200, seed=4))
    assert check["member_mismatches"] == 0 and check["max_abs_diff"] <= 1e-5, check


def test_what_cannot_be_exported_is_refused_with_the_reason(tmp_path: Path):
    keyed = Victim(nets(3), KeyedHashRouter(3, "not-the-default-key"), SHAPE, 10)
    with pytest.raises(ExportError, match="keyed router .KeyedHashRouter. cannot be exported.*BLAKE2b.*edm_lightning.serve"):
        export_victim(keyed, tmp_path / "keyed.onnx")
    coarse = Victim(nets(3), CoarseKeyedHashRouter(3, "not-the-default-key"), SHAPE, 10)
    with pytest.raises(ExportError, match="keyed router .CoarseKeyedHashRouter. cannot be exported"):
        export_victim(coarse, tmp_path / "coarse.pt2", "pt2")
    mad = neural_victim([PredictionPoisoning(epsilon=0.5, proxy=nets(1)[0], num_classes=10)])
    with pytest.raises(ExportError, match="PredictionPoisoning.*differentiates"):
        export_victim(mad, tmp_path / "mad.pt2", "pt2")
    with pytest.raises(ExportError, match="torch.jit is deprecated.*pt2"):
        export_victim(neural_victim(), tmp_path / "m.pt", "torchscript")
    assert not any(tmp_path.iterdir())  # nothing written that looks like a model


@pytest.mark.integration
def test_the_export_command_checks_10k_real_images_and_writes_a_manifest(checkpoint_factory, real_data_root, tmp_path):
    ensemble = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    hash_net = checkpoint_factory(ClassifierModule(), "hash.ckpt")
    out = tmp_path / "served" / "edm.onnx"
    manifest = export_main(["--victim.checkpoint", ensemble, "--victim.router", "neural", "--victim.hash_checkpoint",
                            hash_net, "--format", "onnx", "--out", str(out), "--dataset", "fashionmnist",
                            "--root", str(real_data_root)])
    assert out.is_file() and json.loads(Path(f"{out}.json").read_text()) == manifest
    check = manifest["equivalence"]
    assert check["inputs"] == 10000 and check["member_mismatches"] == 0 and check["max_abs_diff"] <= 1e-5
    assert manifest["router"] == "NeuralHashRouter" and manifest["members"] == 3


@pytest.mark.integration
def test_a_file_that_fails_the_check_never_replaces_the_one_at_out(checkpoint_factory, real_data_root, tmp_path, capsys):
    ensemble = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    out = tmp_path / "edm.onnx"
    out.write_bytes(b"the model that was there")
    args = ["--victim.checkpoint", ensemble, "--out", str(out), "--dataset", "fashionmnist", "--root", str(real_data_root),
            "--check", "500", "--tolerance", "0"]  # onnxruntime's float rounding differs from torch's by ~1e-7
    with pytest.raises(SystemExit) as exit_info:
        export_main(args)
    assert exit_info.value.code == 1 and "nothing was written" in capsys.readouterr().err
    assert out.read_bytes() == b"the model that was there"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm.ckpt", "edm.onnx"]


def test_nan_answers_never_pass_the_check_as_a_difference_of_zero():
    victim = neural_victim()

    def broken(batch):
        probs, member, valid = ExportableVictim(victim)(batch)
        return torch.full_like(probs, float("nan")), member, valid

    assert compare_with_eager(victim, broken, images(8))["max_abs_diff"] == float("inf")


def test_the_export_command_refuses_the_keyed_router_with_exit_status_2(checkpoint_factory, tmp_path, capsys):
    ensemble = checkpoint_factory(EnsembleModule(num_members=3), "edm.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--victim.checkpoint", ensemble, "--victim.router", "keyed", "--out", str(tmp_path / "m.onnx"),
                     "--check", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot be exported" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
