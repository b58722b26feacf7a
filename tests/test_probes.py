"""Test-only jobs of a trained victim: the defender's accuracy as served, EDM's diagnostics, the copies' spread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edm_lightning.cli import main
from edm_lightning.data import ProbeDataModule, load_images
from edm_lightning.defense import CopySpreadModule, DiagnosticsModule, ServedVictimModule, VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.models import EnsembleModule


@pytest.fixture
def ensemble(fake_root: Path, checkpoint_factory) -> str:
    torch.manual_seed(0)
    return checkpoint_factory(EnsembleModule("lenet5", num_members=3), "ensemble.ckpt")


def probe(model, fake_root: Path, **data) -> dict:
    """Run ``model``'s test loop on a ProbeDataModule of the fake data root."""
    import lightning as L

    datamodule = ProbeDataModule(root=str(fake_root), **data)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, inference_mode=False).test(
        model, datamodule=datamodule, verbose=False)
    return model.figures


def test_served_accuracy_counts_every_test_image_once(fake_root: Path, ensemble: str):
    """``main.py test`` of a served victim: its accuracy is correct answers over test images, exactly."""
    config = fake_root / "served.yaml"
    config.write_text(f"""
trainer: {{logger: false, enable_progress_bar: false, inference_mode: false}}
model:
  class_path: edm_lightning.defense.ServedVictimModule
  init_args: {{victim: {{checkpoint: {ensemble}, router: keyed}}}}
data:
  class_path: edm_lightning.data.ClassificationDataModule
  init_args: {{dataset: fashionmnist, root: {fake_root}, batch_size: 7, test_size: 50}}
""")
    cli = main(["test", "--config", str(config)])
    images, labels = load_images("fashionmnist", fake_root, train=False)
    victim = VictimConfig(ensemble, router="keyed").build()
    expected = int((victim(images[:50].float().div(255)).argmax(-1) == labels[:50]).sum()) / 50
    assert cli.model.tested_accuracy == expected


def test_served_accuracy_on_corrupted_images_answers_each_image_as_a_benign_client_sends_it(fake_root: Path, ensemble: str):
    """``noise`` / ``shift``: each test image is corrupted by its place in the test set, whatever the batch size."""
    from edm_lightning.data.perturbations import noisy_copies

    images, labels = load_images("fashionmnist", fake_root, train=False)
    x = images[:50].float().div(255)
    victim = VictimConfig(ensemble, router="keyed").build()
    corrupted = noisy_copies(x, 1, 0.05, seed=3, shift=1)
    expected = int((victim(corrupted).argmax(-1) == labels[:50]).sum()) / 50
    assert expected != int((victim(x).argmax(-1) == labels[:50]).sum()) / 50  # the corruption changes answers here
    for batch_size in (7, 50):
        cli = main(["test", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                    "--trainer.inference_mode", "false", "--model", "edm_lightning.defense.ServedVictimModule",
                    "--model.victim", f"{{checkpoint: {ensemble}, router: keyed}}", "--model.noise", "0.05",
                    "--model.shift", "1", "--model.seed", "3", "--data", "edm_lightning.data.ClassificationDataModule",
                    "--data.dataset", "fashionmnist", "--data.root", str(fake_root), "--data.batch_size", str(batch_size),
                    "--data.test_size", "50"])
        assert cli.model.tested_accuracy == expected
    with pytest.raises(ConfigError, match="^shift must be an integer in \\[0, 8\\]"):
        ServedVictimModule(VictimConfig(ensemble), shift=9)


def test_diagnostics_shares_and_histograms_add_up(fake_root: Path, ensemble: str):
    model = DiagnosticsModule(VictimConfig(ensemble, router="keyed"), bins=10)
    figures = probe(model, fake_root, sets=["test", "ood", "surrogate"], images=30, test_size=50)
    assert len(figures["share_test"]) == len(figures["share_surrogate"]) == 3
    assert sum(figures["share_test"]) == pytest.approx(1.0) and sum(figures["share_surrogate"]) == pytest.approx(1.0)
    assert sum(figures["coherence_id"]) == 50 and sum(figures["coherence_ood"]) == 30  # every image in one bin
    assert len(figures["coherence_edges"]) == 11


def test_copies_spread_over_members_as_the_router_decides(fake_root: Path, ensemble: str):
    """The keyed router sends noisy copies anywhere (about the uniform figure); without noise or shift every copy is the
    image itself, so it reaches exactly the plain image's member."""
    noisy = probe(CopySpreadModule(VictimConfig(ensemble, router="keyed"), copies=8, copy_noise=0.05), fake_root,
                  sets=["surrogate"], ood_dataset=None, images=40, batch_size=16)
    assert noisy["distinct_members"] == pytest.approx(noisy["distinct_if_random"], abs=0.5)
    exact = probe(CopySpreadModule(VictimConfig(ensemble, router="keyed"), copies=8), fake_root,
                  sets=["surrogate"], ood_dataset=None, images=40, batch_size=16)
    assert exact["distinct_members"] == 1.0 and exact["share_on_plain_member"] == 1.0


def test_a_victim_of_another_shape_and_a_probe_without_its_dataset_are_refused(fake_root: Path, ensemble: str):
    with pytest.raises(ConfigError, match="answers 10 classes for inputs of shape .* but the data has 10 classes of shape"):
        ServedVictimModule(VictimConfig(ensemble), input_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="sets include 'surrogate' but surrogate is None"):
        ProbeDataModule(sets=["surrogate"], surrogate=None)
    with pytest.raises(ConfigError, match="only tested"):
        ServedVictimModule(VictimConfig(ensemble)).configure_optimizers()


@pytest.mark.parametrize("make_model, data, message", [
    (lambda v: ServedVictimModule(v), dict(sets=["test"]), "needs labelled test images"),
    (lambda v: CopySpreadModule(v, copies=4), dict(sets=["test", "surrogate"]), "a ProbeDataModule with sets: \\[surrogate\\]"),
], ids=["served-on-unlabelled-images", "spread-on-other-images"])
def test_a_probe_refuses_data_it_cannot_read(fake_root: Path, ensemble: str, make_model, data, message):
    with pytest.raises(ConfigError, match=message):
        probe(make_model(VictimConfig(ensemble)), fake_root, images=10, **data)


def test_diagnostics_need_the_probe_sets(fake_root: Path, ensemble: str):
    import lightning as L

    from edm_lightning.data import ClassificationDataModule

    with pytest.raises(ConfigError, match="probed with a ProbeDataModule"):
        L.Trainer(logger=False, enable_progress_bar=False).test(
            DiagnosticsModule(VictimConfig(ensemble)), datamodule=ClassificationDataModule(root=str(fake_root)))
    for sets in ([], ["test", "test"], ["train"]):
        with pytest.raises(ConfigError, match="sets must name each of test, ood, surrogate"):
            ProbeDataModule(sets=sets)


def test_a_victim_config_and_an_ensemble_refuse_a_router_key_other_than_the_one_they_record(ensemble: str):
    """What a stage's config.yaml holds instead of the key: re-run without the experiment's key, it is refused."""
    from edm_lightning.models import EnsembleModule
    from edm_lightning.routing import key_fingerprint

    recorded = key_fingerprint("the experiment's key")
    with pytest.raises(ConfigError, match=f"router key of fingerprint {recorded}.* set \\$EDM_ROUTER_KEY"):
        VictimConfig(ensemble, router="keyed", key="another key", key_fingerprint=recorded).build()
    assert VictimConfig(ensemble, router="keyed", key="the experiment's key", key_fingerprint=recorded).build()
    for router in ("keyed", "coarse"):  # an EDM training stage whose validation routes with the experiment's key
        with pytest.raises(ConfigError, match=f"router key of fingerprint {recorded}"):
            EnsembleModule(num_members=2, router=router, router_key="another key", router_key_fingerprint=recorded)
        model = EnsembleModule(num_members=2, router=router, router_key="the experiment's key",
                               router_key_fingerprint=recorded)
        assert "router_key_fingerprint" not in model.hparams  # a serving choice, like the key: not in checkpoints
