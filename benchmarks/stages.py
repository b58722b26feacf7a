"""Every training stage of the experiment against a bare PyTorch loop doing the same work, plus the query rates.

    python benchmarks/stages.py                     # FashionMNIST / Animal-MNIST / MNIST, LeNet-5, N = 5
    python benchmarks/stages.py --train_size 20000  # shorter epochs

For each training kind (target, hash network, EDM ensemble, clone) one epoch runs through the project
(its DataModule, its LightningModule, a Lightning Trainer with the runner's settings) and one through a
plain loop over the same uint8 tensors, model, batch size and optimiser (Adam); the ratio is the share of
a bare loop's throughput the project keeps (1.0: no overhead). The first epoch of each is a warm-up and is
not timed. The EDM epoch is also timed with the headline's Jacobian synthesis (against the paper's epoch), and
one batch's Jacobian points against stepping every image the most steps. Then queries per second of buying a
transfer set (KnockoffNets through the oracle) and of serving (``Victim``), for the undefended target and EDM
behind both routers. Everything is measured
with 1 thread and with the machine's default thread count, in this one run; the untrained models here
are timed, never evaluated (their answers are not results). Figures are printed, never asserted.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jsonargparse import CLI  # noqa: E402

from edm_lightning.attacks.oracle import BlackBoxOracle  # noqa: E402
from edm_lightning.attacks.transfer_set import build_transfer_set  # noqa: E402
from edm_lightning.data import ClassificationDataModule, EDMDataModule, load_images  # noqa: E402
from edm_lightning.data.images import BatchTensorDataset, batch_loader  # noqa: E402
from edm_lightning.data.perturbations import jacobian_augmentation  # noqa: E402
from edm_lightning.defense import Victim  # noqa: E402
from edm_lightning.losses import diversity_loss  # noqa: E402
from edm_lightning.models import ClassifierModule, CloneModule, EnsembleModule, OptimConfig, Synthesis  # noqa: E402
from edm_lightning.models.clone import clone_loss  # noqa: E402
from edm_lightning.models.synthesis import jacobian_points  # noqa: E402
from edm_lightning.nets import build_net  # noqa: E402
from edm_lightning.routing import (  # noqa: E402
    FixedRouter,  # noqa: E402
    KeyedHashRouter,
    NeuralHashRouter,
)


def main(num_members: int = 5, arch: str = "lenet5", hash_arch: str = "small_cnn", dataset: str = "fashionmnist",
         ood_dataset: str = "animal-mnist", surrogate: str = "mnist", root: str = "data", train_size: int | None = None,
         batch_size: int = 128, queries: int = 10_000) -> None:
    """Print, for 1 thread and the default thread count, each stage's epoch time against a bare loop.

    Args:
        num_members: N of the ensemble.
        arch: architecture of target, members and clone.
        hash_arch: architecture of the neural router's hash network.
        dataset: the defender's dataset.
        ood_dataset: the defender's OOD set (also the hash network's training set, as in the runner).
        surrogate: the attacker's surrogate set (the clone's transfer-set images).
        root: data root.
        train_size: training images per epoch (``None``: the training split less 5,000 for validation).
        batch_size: batch size of every stage and of each oracle call.
        queries: queries bought and served for the rate figures.
    """
    default_threads = torch.get_num_threads()
    for threads in dict.fromkeys([1, default_threads]):
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s) ({arch}, N={num_members}, batch {batch_size}) ==")
        rows = []
        data = ClassificationDataModule(dataset, root, batch_size, train_size=train_size)
        target = ClassifierModule(arch, data.num_classes, data.input_shape, data.mean, data.std)
        rows.append(("target", *_compare(target, data, _bare_classifier(arch, data, batch_size))))
        hash_data = ClassificationDataModule(ood_dataset, root, batch_size, val_size=1000)
        hashnet = ClassifierModule(hash_arch, hash_data.num_classes, data.input_shape, hash_data.mean, hash_data.std)
        rows.append(("hash network", *_compare(hashnet, hash_data, _bare_classifier(hash_arch, hash_data, batch_size))))
        edm_data = EDMDataModule(dataset, ood_dataset, root, batch_size, train_size=train_size)
        edm = EnsembleModule(arch, num_members, edm_data.num_classes, edm_data.input_shape, edm_data.mean, edm_data.std)
        edm_s, edm_bare_s = _compare(edm, edm_data, _bare_ensemble(arch, num_members, edm_data, batch_size))
        rows.append(("EDM ensemble", edm_s, edm_bare_s))
        clone_data = _CloneData(surrogate, root, data, batch_size, train_size)
        clone = CloneModule(arch, data.num_classes, data.input_shape, data.mean, data.std, OptimConfig())
        rows.append(("clone", *_compare(clone, clone_data, _bare_clone(arch, clone_data, batch_size))))
        print(f"{'stage':<14}{'project epoch':>15}{'bare epoch':>12}{'throughput ratio':>18}")
        for name, project_s, bare_s in rows:
            print(f"{name:<14}{project_s:>13.2f} s{bare_s:>10.2f} s{bare_s / project_s:>17.2f}x")
        print(f"EDM epoch / (N x target epoch): {edm_s / (num_members * rows[0][1]):.2f}")
        _synthesis_cost(arch, num_members, edm_data, batch_size, edm_s)
        _query_rates(arch, hash_arch, num_members, data, surrogate, root, batch_size, queries)


class _CloneData(L.LightningDataModule):
    """A clone's training data at transfer-set size: surrogate images with soft answers (timing only)."""

    def __init__(self, surrogate: str, root: str, data: ClassificationDataModule, batch_size: int, size: int | None):
        super().__init__()
        images, _ = load_images(surrogate, root, train=True, input_shape=data.input_shape)
        images = images[: size or 55_000]
        answers = torch.randn(len(images), data.num_classes).softmax(dim=-1)
        self.x, self.answers, self.batch_size = images.float().div_(255), answers, batch_size

    def train_dataloader(self):
        return batch_loader(BatchTensorDataset(self.x, self.answers), self.batch_size, shuffle=True)


def _compare(module: L.LightningModule, data: L.LightningDataModule, bare) -> tuple[float, float]:
    """Seconds of the second epoch through a Trainer, and of the second epoch of the bare loop."""
    if hasattr(data, "setup"):
        data.setup("fit")
    timer = _EpochTimer()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    bare()  # warm-up epoch
    start = time.perf_counter()
    bare()
    return timer.seconds[-1], time.perf_counter() - start


class _EpochTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._start)


def _batches(n: int, batch_size: int):
    return torch.randperm(n).split(batch_size)


def _bare_classifier(arch: str, data: ClassificationDataModule, batch_size: int):
    data.setup("fit")
    images, labels = data.train_set.images, data.train_set.labels
    net = build_net(arch, data.input_shape, data.num_classes, data.mean, data.std)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def epoch():
        for index in _batches(len(images), batch_size):
            loss = F.cross_entropy(net(images[index].float().div_(255)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def _bare_ensemble(arch: str, members: int, data: EDMDataModule, batch_size: int):
    """The straightforward EDM step: every member on the in-distribution batch and on the OOD batch."""
    data.setup("fit")
    images, labels = data.id_data.train_set.images, data.id_data.train_set.labels
    ood = data.ood_data.train_set.images
    nets = [build_net(arch, data.input_shape, data.num_classes, data.mean, data.std) for _ in range(members)]
    optimizer = torch.optim.Adam([p for net in nets for p in net.parameters()], lr=1e-3)

    def epoch():
        ood_batches = _batches(len(ood), batch_size)
        for step, index in enumerate(_batches(len(images), batch_size)):
            x, y = images[index].float().div_(255), labels[index]
            x_ood = ood[ood_batches[step % len(ood_batches)]].float().div_(255)
            ce = torch.stack([F.cross_entropy(net(x), y) for net in nets]).mean()
            loss = ce + diversity_loss(torch.stack([net(x_ood) for net in nets]).softmax(dim=-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def _bare_clone(arch: str, data: _CloneData, batch_size: int):
    net = build_net(arch, tuple(data.x.shape[1:]), data.answers.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def epoch():
        for index in _batches(len(data.x), batch_size):
            loss = clone_loss(net(data.x[index]), data.answers[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def _synthesis_cost(arch: str, members: int, data: EDMDataModule, batch_size: int, edm_s: float) -> None:
    """What training on JBDA-TR's points costs (the headline's ``Synthesis``): one epoch against the paper's EDM
    epoch, and one batch's Jacobian points (each image 1 to 3 steps) against stepping every image 3 times."""
    synthesis = Synthesis(disagree_on=["jacobian"], epsilon=0.1, steps=3, agree_noise=0.02, agree_shift=1)
    edm = EnsembleModule(arch, members, data.num_classes, data.input_shape, data.mean, data.std, synthesis=synthesis)
    synthesis_s, _ = _compare(edm, data, lambda: None)
    net = edm.members[0]
    x = data.id_data.train_set.images[:batch_size].float().div_(255)
    y = data.id_data.train_set.labels[:batch_size]
    timings = {}
    for name, make in {"drawn steps": lambda: jacobian_points(net, x, y, data.num_classes, 0.1, 3),
                       "3 steps each": lambda: [jacobian_augmentation(net, x, y, 0.1, y) for _ in range(3)]}.items():
        make()  # warm-up
        start = time.perf_counter()
        for _ in range(20):
            make()
        timings[name] = (time.perf_counter() - start) / 20
    print(f"EDM + Jacobian synthesis epoch / EDM epoch: {synthesis_s / edm_s:.2f}; Jacobian points of one batch, "
          f"the drawn steps / 3 steps for every image: {timings['drawn steps'] / timings['3 steps each']:.2f}")


def _query_rates(arch: str, hash_arch: str, members: int, data: ClassificationDataModule, surrogate: str, root: str,
                 batch_size: int, queries: int) -> None:
    shape, classes = data.input_shape, data.num_classes
    images, labels = load_images(surrogate, root, train=True, input_shape=shape)
    images, labels = images[:queries], labels[:queries]
    nets = [build_net(arch, shape, classes, data.mean, data.std).eval() for _ in range(members)]
    hash_net = build_net(hash_arch, shape, 10).eval()
    served = {
        "undefended": Victim(nets[:1], FixedRouter(1), shape, classes),
        "EDM, neural router": Victim(nets, NeuralHashRouter(hash_net, members), shape, classes),
        "EDM, keyed router": Victim(nets, KeyedHashRouter(members, "benchmark-only-key"), shape, classes),
    }
    print(f"{'victim':<22}{'buying q/s':>12}{'serving q/s (batch 256)':>26}")
    for name, model in served.items():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            build_transfer_set(lambda spent, m=model: BlackBoxOracle(m, queries, spent=spent), images, labels, queries,
                               Path(tmp) / "transfer.pt", batch_size=batch_size)
            buying = queries / (time.perf_counter() - start)
        x = images.float().div_(255)
        start = time.perf_counter()
        for part in x.split(256):
            model(part)
        serving = len(x) / (time.perf_counter() - start)
        print(f"{name:<22}{buying:>12,.0f}{serving:>26,.0f}")


if __name__ == "__main__":
    CLI(main)
