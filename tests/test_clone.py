"""The clone: soft- or hard-label training, accuracy and agreement on the victim's test set."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from edm_lightning.models import CloneModule, OptimConfig
from edm_lightning.models.clone import clone_loss
from tests.helpers.victims import linear_victim, synthetic_images


def test_soft_loss_equals_cross_entropy_for_one_hot_and_rewards_matching():
    logits = torch.randn(5, 10)
    labels = torch.randint(0, 10, (5,))
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(clone_loss(logits, one_hot), clone_loss(logits, labels))
    target = torch.softmax(torch.randn(5, 10), dim=1)
    assert clone_loss(target.log(), target) < clone_loss(torch.zeros(5, 10), target)
    with pytest.raises(ValueError, match="shape"):
        clone_loss(logits, torch.rand(5, 9))


def test_logs_accuracy_and_agreement_separately():
    x = torch.rand(40, 1, 28, 28)
    module = CloneModule(num_classes=10)
    with torch.no_grad():
        predicted = module(x).argmax(dim=1)
    labels = predicted.clone()
    labels[:10] = (labels[:10] + 1) % 10  # accuracy 30/40
    victim_labels = predicted.clone()
    victim_labels[:20] = (victim_labels[:20] + 1) % 10  # agreement 20/40
    loader = DataLoader(TensorDataset(x, labels, victim_labels), batch_size=16)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    metrics = trainer.test(module, loader, verbose=False)[0]
    assert metrics["test/acc"] == pytest.approx(0.75)
    assert metrics["test/agreement"] == pytest.approx(0.5)


@pytest.mark.parametrize("soft", [True, False])
def test_learns_from_victim_answers(soft):
    torch.manual_seed(0)
    x = synthetic_images(256, seed=1)[0].float() / 255
    probs = linear_victim()(x)
    labels = probs.argmax(dim=1)
    target = probs if soft else labels
    module = CloneModule(num_classes=10, optim=OptimConfig(lr=3e-3, schedule="constant"))
    trainer = L.Trainer(max_epochs=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu")
    trainer.fit(module, DataLoader(TensorDataset(x, target), batch_size=64, shuffle=True))
    test = DataLoader(TensorDataset(x, labels, labels), batch_size=128)
    assert trainer.test(module, test, verbose=False)[0]["test/acc"] > 0.8
