"""The EDM ensemble: its loss, a step that lowers OOD coherence, its data, and a short CLI fit on real data."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from edm_lightning.data import EDMDataModule
from edm_lightning.defense import VictimConfig
from edm_lightning.losses import coherence, diversity_loss
from edm_lightning.models import EnsembleModule

ROOT = Path(__file__).resolve().parents[1]


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return {"id": (torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)),
            "ood": torch.rand(n, 1, 28, 28, generator=g)}


def test_members_are_independently_initialised():
    torch.manual_seed(0)
    module = EnsembleModule(num_members=3)
    first = [m[1].features[0].weight for m in module.members]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert module.hparams.num_members == 3 and module(torch.rand(4, 1, 28, 28)).shape == (3, 4, 10)


def test_training_loss_is_mean_member_cross_entropy_plus_lambda_times_ood_diversity():
    torch.manual_seed(0)
    module = EnsembleModule(num_members=3, diversity_weight=0.7)
    data = batch()
    loss = module.training_step(data, 0)
    (x, y), x_ood = data["id"], data["ood"]
    with torch.no_grad():
        ce = torch.stack([torch.nn.functional.cross_entropy(m(x), y) for m in module.members]).mean()
        div = diversity_loss(module(x_ood).softmax(-1))
    torch.testing.assert_close(loss.detach(), ce + 0.7 * div)


def test_a_gradient_step_lowers_ood_coherence():
    data = batch()

    def coherence_after_one_step(diversity_weight):
        torch.manual_seed(0)
        module = EnsembleModule(num_members=3, diversity_weight=diversity_weight)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        with torch.no_grad():
            before = coherence(module(data["ood"]).softmax(-1)).mean()
        module.training_step(data, 0).backward()
        optimizer.step()
        with torch.no_grad():
            return before, coherence(module(data["ood"]).softmax(-1)).mean()

    before, with_diversity = coherence_after_one_step(10.0)
    same_before, accuracy_only = coherence_after_one_step(0.0)
    assert before == same_before and before > 0.9  # fresh members answer alike (near-uniform softmax)
    assert with_diversity < before
    assert with_diversity < accuracy_only - 1e-3, (before, with_diversity, accuracy_only)


def test_ensemble_arguments_are_checked():
    with pytest.raises(ValueError, match="num_members >= 2"):
        EnsembleModule(num_members=1)
    with pytest.raises(ValueError, match="hash_checkpoint"):
        EnsembleModule(router="neural")


def test_edm_data_exposes_the_in_distribution_description_and_refuses_the_same_ood_set():
    data = EDMDataModule(dataset="fashionmnist", ood_dataset="animal-mnist")
    assert (data.num_classes, data.input_shape) == (10, (1, 28, 28))
    assert data.mean == (0.2860,) and data.std == (0.3530,)
    with pytest.raises(ValueError, match="must differ.*'mnist'"):
        EDMDataModule(dataset="mnist", ood_dataset="mnist")
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        EDMDataModule(ood_dataset="nope")


@pytest.mark.integration
def test_cli_fit_and_test_of_the_ensemble_on_real_data(tmp_path, real_data_root):
    from edm_lightning.cli import main

    # Small and in tmp_path: the committed config, with logger, checkpoints and sizes overridden.
    override = {
        "trainer": {
            "max_epochs": 2, "limit_train_batches": 20, "limit_val_batches": 4, "limit_test_batches": 4,
            "default_root_dir": str(tmp_path), "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "best",
                                         "monitor": "val/acc", "mode": "max"}}],
        },
        "model": {"init_args": {"num_members": 3}},
        "data": {"init_args": {"root": str(real_data_root), "train_size": 4000, "val_size": 1000,
                               "test_size": 512, "ood_holdout_size": 512}},
    }
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(override))
    configs = ["--config", str(ROOT / "configs/edm.yaml"), "--config", str(tmp_path / "small.yaml")]
    main(["fit", *configs])
    checkpoint = tmp_path / "ckpt" / "best.ckpt"
    assert checkpoint.is_file()

    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    last = [r for r in rows if r.get("val/acc")][-1]
    for key in ["val/acc", "val/member_0/acc", "val/member_2/acc", "val/id/coherence", "val/ood/coherence",
                "val/id/coherent_share", "val/ood/coherent_share", "val/member_1/share"]:
        assert last[key] != "", key
    assert float(last["val/acc"]) > 0.3  # 40 steps of 3 LeNets on FashionMNIST: well above chance (0.1)
    assert float(last["val/ood/coherence"]) < float(last["val/id/coherence"])
    assert sum(float(last[f"val/member_{i}/share"]) for i in range(3)) == pytest.approx(1.0)

    cli = main(["test", *configs, "--ckpt_path", str(checkpoint)])
    results = cli.trainer.callback_metrics
    assert float(results["test/acc"]) > 0.3

    model = VictimConfig(str(checkpoint), router="keyed").build()
    x, y = next(iter(cli.datamodule.test_dataloader()[0]))
    assert (model(x).argmax(-1) == y).float().mean() > 0.3


def test_one_forward_over_both_batches_gives_the_loss_and_gradients_of_two():
    """Members without BatchNorm see the in-distribution and OOD batches together: same loss, same gradients."""
    data = batch(seed=3)

    def loss_and_grads(fused: bool):
        torch.manual_seed(0)
        module = EnsembleModule(num_members=3, diversity_weight=0.7)
        assert module._mixes_batch is False  # LeNet-5 has no BatchNorm
        module._mixes_batch = not fused
        loss = module.training_step(data, 0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.parameters()]

    fused_loss, fused_grads = loss_and_grads(True)
    separate_loss, separate_grads = loss_and_grads(False)
    torch.testing.assert_close(fused_loss, separate_loss, rtol=1e-5, atol=1e-6)
    for fused, separate in zip(fused_grads, separate_grads, strict=True):
        torch.testing.assert_close(fused, separate, rtol=1e-4, atol=1e-6)


def test_members_with_batchnorm_see_each_batch_alone():
    module = EnsembleModule(arch="resnet18", num_members=2, input_shape=(3, 32, 32))
    assert module._mixes_batch is True
    calls = []
    for member in module.members:
        member.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    module.member_logits(torch.rand(3, 3, 32, 32), torch.rand(5, 3, 32, 32))
    assert calls == [3, 3, 5, 5]  # each member: the in-distribution batch, then the OOD batch, never mixed
