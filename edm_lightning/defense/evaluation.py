"""The defended model as served, as LightningModules for ``python main.py test``: the defender's accuracy, and
the diagnostics of why EDM works or fails behind a router (members' shares, coherence), and how far an
attacker's perturbed copies of one query spread over the members.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import SumMetric
from typing_extensions import override

from edm_lightning.data.datamodules import ProbeDataModule
from edm_lightning.data.perturbations import check_copies, check_corruption, noisy_copies
from edm_lightning.defense.loader import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.losses import coherence

__all__ = ["CopySpreadModule", "DiagnosticsModule", "ServedVictimModule", "VictimProbe"]


class VictimProbe(L.LightningModule):
    """A trained victim, as its clients see it (router and post-processors on), probed by a test loop; nothing is trained.

    Args:
        victim: the victim (checkpoint, router, post-processors); its router key comes from ``$EDM_ROUTER_KEY``
            when the config leaves ``key`` out, as configs should.
        num_classes: linked from the DataModule; must be the victim's.
        input_shape: linked from the DataModule; must be the victim's.
        mean: linked from the DataModule; unused (the victim normalises its own inputs).
        std: linked from the DataModule; unused.

    Raises:
        ConfigError: the victim answers another number of classes, or takes another input shape, than the data has.
    """

    def __init__(self, victim: VictimConfig, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28),
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.victim = victim.build()
        if self.victim.num_classes != num_classes or tuple(self.victim.input_shape) != tuple(input_shape):
            raise ConfigError(f"the victim {victim.checkpoint!r} answers {self.victim.num_classes} classes for inputs of shape "
                              f"{tuple(self.victim.input_shape)}, but the data has {num_classes} classes of shape "
                              f"{tuple(input_shape)}: probe it with the dataset it was trained on")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The victim's answers ``(B, K)`` to images ``(B, C, H, W)`` in [0, 1]."""
        return self.victim(x)

    @override
    def on_test_start(self) -> None:
        if self.trainer.world_size > 1:  # figures gathered per process, and samplers pad the last batch
            raise ConfigError(f"{type(self).__name__} probes the victim in one process: run it with trainer.devices: 1")
        self.check_data(self.trainer.datamodule)

    def check_data(self, datamodule: L.LightningDataModule | None) -> None:
        """Refuse a DataModule the probe cannot read (each probe says which it needs).

        Raises:
            ConfigError: the DataModule does not serve what this probe reads.
        """

    @override
    def configure_optimizers(self) -> Any:
        raise ConfigError(f"{type(self).__name__} is only tested (python main.py test --config ...): it has nothing to train")


class ServedVictimModule(VictimProbe):
    """The defender's accuracy as served: ``python main.py test`` with the victim's own labelled test set logs
    ``test/acc``, the figure every results table pairs with a clone's accuracy.

    With ``noise`` or ``shift``, each test image is first corrupted as a benign client's camera would
    (:func:`~edm_lightning.data.perturbations.noisy_copies`: a shift of up to ``shift`` pixels per axis, then Gaussian
    noise of std ``noise``; drawn per image from ``seed`` and its place in the test set), and ``test/acc`` is the
    accuracy on those: the benign cost of a defense beyond clean images.

    Args:
        noise: std of the corruption noise (images in [0, 1]; 0: none).
        shift: largest shift of the corruption, in pixels (0: none).
        seed: seed of the corruption.
        others: as :class:`VictimProbe`.

    Raises:
        ConfigError: ``noise`` outside [0, 1] or ``shift`` outside 0..8.
    """

    def __init__(self, victim: VictimConfig, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28),
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, noise: float = 0.0,
                 shift: int = 0, seed: int = 0):
        super().__init__(victim, num_classes, input_shape, mean, std)
        check_corruption(noise, shift, ("noise", "shift"))
        self.noise, self.shift, self.seed = noise, shift, seed
        self.correct, self.total = SumMetric(), SumMetric()
        self.tested_accuracy: float | None = None  # the last test's, exactly (the logged value is a float32)
        self._seen = 0  # test images answered so far: each image's corruption is drawn from its place

    @override
    def check_data(self, datamodule: L.LightningDataModule | None) -> None:
        if isinstance(datamodule, ProbeDataModule):
            raise ConfigError("ServedVictimModule needs labelled test images (a ClassificationDataModule of the victim's "
                              "dataset), not a ProbeDataModule")

    @override
    def on_test_epoch_start(self) -> None:
        self._seen = 0

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        if self.noise or self.shift:
            x = noisy_copies(x, 1, self.noise, self.seed, start=self._seen, shift=self.shift)
        self._seen += len(x)
        self.correct.update((self(x).argmax(-1) == y).sum())
        self.total.update(len(y))

    @override
    def on_test_epoch_end(self) -> None:
        total = int(self.total.compute().item())
        if total == 0:
            raise ConfigError("no test images reached ServedVictimModule: check the DataModule's test_size")
        self.tested_accuracy = int(self.correct.compute().item()) / total
        self.log("test/acc", self.tested_accuracy)
        self.correct.reset()
        self.total.reset()


class DiagnosticsModule(VictimProbe):
    """Why EDM works or fails behind a router, probed with a :class:`~edm_lightning.data.ProbeDataModule`: each
    member's share of the defender's test images and of the attacker's surrogate images (fair: 1/N each), and
    histograms of the ensemble's coherence (in [0, 1], 1 when all members agree; EDM paper Eq. 3) on the test
    images and on held-out OOD images.

    After ``main.py test``, :attr:`figures` holds ``share_test`` / ``share_surrogate`` (per member, when
    those sets are probed), ``coherence_id`` / ``coherence_ood`` (counts per bin) and ``coherence_edges``; the
    shares and the histograms' counts are also logged (``test/share_<set>/member_<i>``, ``test/coherence_<id|ood>/bin_<k>``).

    Args:
        bins: coherence histogram bins over [0, 1].
        others: as :class:`VictimProbe`.
    """

    def __init__(self, victim: VictimConfig, bins: int = 20, num_classes: int = 10,
                 input_shape: tuple[int, int, int] = (1, 28, 28), mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None):
        super().__init__(victim, num_classes, input_shape, mean, std)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ConfigError(f"bins must be a positive whole number, got {bins!r}")
        self.bins = bins
        self.figures: dict[str, Any] = {}
        self._routes: dict[str, list[torch.Tensor]] = {}
        self._coherence: dict[str, list[torch.Tensor]] = {}

    @override
    def check_data(self, datamodule: L.LightningDataModule | None) -> None:
        if not isinstance(datamodule, ProbeDataModule):
            raise ConfigError(f"DiagnosticsModule is probed with a ProbeDataModule (sets: test, ood, surrogate), got "
                              f"{type(datamodule).__name__}")

    @override
    def on_test_epoch_start(self) -> None:
        self.sets = list(self.trainer.datamodule.sets)  # the ProbeDataModule's loaders, in order
        self._routes, self._coherence = {}, {}

    @override
    def test_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        probe = self.sets[dataloader_idx]
        if probe in ("test", "surrogate"):
            self._routes.setdefault(probe, []).append(self.victim.router(batch))
        if probe in ("test", "ood"):
            answers = torch.stack([member(batch) for member in self.victim.members]).softmax(dim=-1)
            self._coherence.setdefault(probe, []).append(coherence(answers))

    @override
    def on_test_epoch_end(self) -> None:
        members = self.victim.router.num_members
        figures: dict[str, Any] = {}
        for probe, routes in self._routes.items():
            counts = torch.bincount(torch.cat(routes), minlength=members).double()
            figures[f"share_{probe}"] = (counts / counts.sum()).tolist()
            for member, share in enumerate(figures[f"share_{probe}"]):
                self.log(f"test/share_{probe}/member_{member}", share)
        for probe, values in self._coherence.items():
            name = "coherence_id" if probe == "test" else "coherence_ood"
            figures[name] = torch.histc(torch.cat(values).clamp(0, 1), bins=self.bins, min=0, max=1).long().tolist()
            for index, count in enumerate(figures[name]):
                self.log(f"test/{name}/bin_{index:02d}", float(count))
        figures["coherence_edges"] = torch.linspace(0, 1, self.bins + 1).tolist()
        self.figures = figures


class CopySpreadModule(VictimProbe):
    """How far query averaging (EDM's adaptive attacker) spreads behind a router, probed with the attacker's surrogate images (a
    :class:`~edm_lightning.data.ProbeDataModule` with ``sets: [surrogate]``): how many distinct members the
    ``copies`` noisy copies of one image reach (:func:`noisy_copies`, the copies KnockoffNets' query averaging
    sends), and the share of copies answered by the member the unperturbed image gets.

    After ``main.py test``, :attr:`figures` holds ``distinct_members``, ``distinct_if_random`` (the same for a
    uniform random router: ``N (1 - (1 - 1/N)^K)``) and ``share_on_plain_member``; all three are also logged.

    Args:
        copies: copies per image (K).
        copy_noise: Gaussian noise std of each copy (images in [0, 1]).
        copy_shift: largest random shift of each copy, in pixels.
        seed: the copies' seed (as KnockoffNets' ``seed``).
        others: as :class:`~edm_lightning.defense.VictimProbe`.
    """

    def __init__(self, victim: VictimConfig, copies: int = 8, copy_noise: float = 0.0, copy_shift: int = 0, seed: int = 0,
                 num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28),
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__(victim, num_classes, input_shape, mean, std)
        check_copies(copies, copy_noise, copy_shift)
        self.copies, self.copy_noise, self.copy_shift, self.seed = copies, copy_noise, copy_shift, seed
        self.figures: dict[str, float] = {}
        self._distinct: list[Tensor] = []
        self._on_plain: list[Tensor] = []
        self._seen = 0

    @override
    def check_data(self, datamodule: L.LightningDataModule | None) -> None:
        if not isinstance(datamodule, ProbeDataModule) or datamodule.sets != ["surrogate"]:
            raise ConfigError("CopySpreadModule is probed with the attacker's images alone: a ProbeDataModule with "
                              "sets: [surrogate]")

    @override
    def on_test_epoch_start(self) -> None:
        self._distinct, self._on_plain, self._seen = [], [], 0

    @override
    def test_step(self, batch: Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        router = self.victim.router
        copies = noisy_copies(batch, self.copies, self.copy_noise, self.seed, start=self._seen, shift=self.copy_shift)
        self._seen += len(batch)
        plain, routes = router(batch), router(copies).view(len(batch), self.copies)
        self._distinct.append(torch.tensor([len(torch.unique(row)) for row in routes], dtype=torch.float64))
        self._on_plain.append(routes == plain[:, None])

    @override
    def on_test_epoch_end(self) -> None:
        if not self._distinct:
            raise ConfigError("no surrogate images reached CopySpreadModule: check the ProbeDataModule's images")
        members = self.victim.router.num_members
        self.figures = {"distinct_members": float(torch.cat(self._distinct).mean()),
                        "distinct_if_random": members * (1 - (1 - 1 / members) ** self.copies),
                        "share_on_plain_member": float(torch.cat(self._on_plain).double().mean())}
        for name, value in self.figures.items():
            self.log(f"test/{name}", value)
