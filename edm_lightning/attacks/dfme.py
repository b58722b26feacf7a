"""DFME, data-free model extraction (Truong et al., CVPR 2021): a generator, a clone, and no data at all.

A generator G synthesises queries; the clone S is trained to match the victim V on them (l1 loss
between S's logits and V's logits recovered from its probabilities, ``log p - mean(log p)``), while G
is trained to *maximise* that disagreement, steering queries to where the clone is still wrong.
V is a black box, so the gradient of G's loss through V is estimated by forward differences along
``m`` random unit directions ``u`` (DFME Eq. 6):

    grad_x L ~ (d / m) * sum_j [L(x + eps u_j) - L(x)] / eps * u_j,

at the generator's pre-activation ``x`` (images are ``(tanh(x) + 1) / 2``, so every probe stays a
valid image). One iteration costs ``batch * ((m + 1) * generator_steps + clone_steps)`` queries, all
through the oracle; the run stops when the budget cannot pay for another, so it spends exactly what
it reports. Literature: m = 1, eps = 1e-3, 1 generator and 5 clone steps per iteration, clone SGD
lr 0.1, generator Adam lr 1e-4, and millions of queries (20M for CIFAR-10).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from edm_lightning.attacks.datamodule import AttackDataModule
from edm_lightning.attacks.oracle import BlackBoxOracle, Ledger
from edm_lightning.attacks.purchase import QueryLedger
from edm_lightning.attacks.registry import CACHE_DIR, SECONDS_PER_QUERY, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob, require_single_process
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.models.clone import CloneModule
from edm_lightning.optim import OptimConfig, build_optimizer

__all__ = ["DFMEModule", "DataFreeDataModule", "Generator", "GeneratorAttackModule", "ReplayBuffer", "data_free_job",
           "dfme_cost", "dfme_job", "l1_logit_disagreement", "run_dfme", "to_images", "victim_logits",
           "zeroth_order_gradient"]


class GeneratorAttackModule(CloneModule):
    """What the data-free attacks share: a clone and a generator of queries, trained with manual optimisation (the
    clone's optimiser from ``optim`` and its schedule, stepped once an epoch; the generator's Adam), one iteration at
    a time while the budget, carried over runs by the DataModule's ledger, pays a whole one.

    Subclasses give :meth:`queries_per_iteration`, :meth:`check_budget` and ``training_step`` (which calls
    :meth:`out_of_budget` first).

    Args:
        arch, num_classes, input_shape, mean, std, optim: see :class:`CloneModule`.
        generator_lr: the generator's Adam learning rate.
        latent_dim: size of the generator's noise input.
    """

    #: The attack's name in messages.
    title = "data-free attack"

    def __init__(self, arch: str, num_classes: int, input_shape: tuple[int, int, int], mean: tuple[float, ...] | None,
                 std: tuple[float, ...] | None, optim: OptimConfig, generator_lr: float, latent_dim: int):
        super().__init__(arch, num_classes, input_shape, mean, std, optim)
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, input_shape)
        self._generator_lr, self._latent_dim = generator_lr, latent_dim

    def queries_per_iteration(self, batch_size: int) -> int:
        """Queries one training iteration spends."""
        raise NotImplementedError

    def check_budget(self, batch_size: int, budget: int) -> None:
        """Refuse a budget that cannot pay one iteration.

        Raises:
            ConfigError: it cannot (the message says what an iteration costs).
        """
        raise NotImplementedError

    @override
    def on_fit_start(self) -> None:
        require_single_process(self.trainer, self.title)
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, AttackDataModule):
            raise TypeError(f"{type(self).__name__} needs an attack DataModule (its oracle), got {type(datamodule).__name__}")
        size, budget = datamodule.hparams.batch_size, datamodule.hparams.budget
        self.check_budget(size, budget)
        oracle: BlackBoxOracle = datamodule.oracle
        cost = self.queries_per_iteration(size)
        if oracle.remaining is not None and oracle.remaining < cost:
            raise ConfigError(
                f"earlier runs of this attack against this victim spent {oracle.queries_spent} of its {budget} queries "
                f"(recorded in {str(datamodule.ledger_path)!r}), which leaves less than one iteration ({cost}): raise the "
                "budget, or delete that file to start a new attack (the victim answered those queries all the same)."
            )

    def out_of_budget(self, oracle: BlackBoxOracle, batch_size: int) -> bool:
        """Whether the budget left cannot pay another whole iteration (the fit is then stopped)."""
        if oracle.remaining is not None and oracle.remaining < self.queries_per_iteration(batch_size):
            self.trainer.should_stop = True
            return True
        return False

    @override
    def on_train_epoch_end(self) -> None:
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    @override
    def configure_optimizers(self):
        clone = build_optimizer(self.net.parameters(), self.optim, self.trainer.max_epochs)
        generator = torch.optim.Adam(self.generator.parameters(), lr=self._generator_lr)
        if isinstance(clone, dict):
            return [clone["optimizer"], generator], [clone["lr_scheduler"]["scheduler"]]
        return [clone, generator]

    def _noise(self, size: int) -> Tensor:
        return torch.randn(size, self._latent_dim, device=self.device)


class DFMEModule(GeneratorAttackModule):
    """The DFME attacker: clone + generator, the generator steered by gradients estimated through the victim.

    Args:
        arch, num_classes, input_shape, mean, std: see :class:`CloneModule`.
        optim: the clone's optimiser (DFME: SGD, lr 0.1).
        generator_lr: the generator's Adam learning rate.
        latent_dim: size of the generator's noise input.
        directions: random directions ``m`` of the gradient estimate.
        grad_epsilon: finite-difference step ``eps``.
        generator_steps: generator updates per iteration.
        clone_steps: clone updates per iteration.
    """

    title = "DFME"

    def __init__(
        self,
        arch: str = "lenet5",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        optim: OptimConfig | None = None,
        generator_lr: float = 1e-4,
        latent_dim: int = 256,
        directions: int = 1,
        grad_epsilon: float = 1e-3,
        generator_steps: int = 1,
        clone_steps: int = 5,
    ):
        for key, value in {"directions": directions, "generator_steps": generator_steps, "clone_steps": clone_steps,
                           "latent_dim": latent_dim}.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if not grad_epsilon > 0 or not generator_lr > 0:
            raise ConfigError("grad_epsilon and generator_lr must be positive")
        super().__init__(arch, num_classes, input_shape, mean, std, optim or OptimConfig(name="sgd", lr=0.1), generator_lr,
                         latent_dim)
        self.save_hyperparameters()

    def queries_per_iteration(self, batch_size: int) -> int:
        """Queries one training iteration spends: ``batch_size * ((directions + 1) * generator_steps + clone_steps)``."""
        hp = self.hparams
        return batch_size * ((hp.directions + 1) * hp.generator_steps + hp.clone_steps)

    @override
    def check_budget(self, batch_size: int, budget: int) -> None:
        cost = self.queries_per_iteration(batch_size)
        if cost > budget:
            raise ConfigError(
                f"one DFME iteration costs {cost} queries (batch {batch_size} x ((directions + 1) x generator_steps + "
                f"clone_steps)) but the budget is {budget}: raise the budget or lower batch_size."
            )

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        datamodule = self.trainer.datamodule
        oracle: BlackBoxOracle = datamodule.oracle
        size, hp = datamodule.hparams.batch_size, self.hparams
        if self.out_of_budget(oracle, size):
            return
        clone_opt, generator_opt = self.optimizers()
        self.generator.train()
        for _ in range(hp.generator_steps):
            pre = self.generator(self._noise(size))
            grad, generator_loss = zeroth_order_gradient(oracle, self.net, pre, hp.directions, hp.grad_epsilon,
                                                         self.disagreement)
            generator_opt.zero_grad()
            self.manual_backward(pre, gradient=grad)
            generator_opt.step()
        for _ in range(hp.clone_steps):
            with torch.no_grad():
                x = to_images(self.generator(self._noise(size)))
            loss = self.clone_step(clone_opt, x, oracle(x))
        self.after_clone_steps(clone_opt, size)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/generator_loss", generator_loss)
        self.log("attack/queries", float(oracle.queries_spent))

    @staticmethod
    def disagreement(clone_logits: Tensor, answers: Tensor) -> Tensor:
        """The per-input disagreement the generator maximises: DFME's l1 on logits (:func:`l1_logit_disagreement`)."""
        return l1_logit_disagreement(clone_logits, answers)

    def clone_step(self, optimizer, x: Tensor, answers: Tensor) -> Tensor:
        """One clone update on bought answers (DFME: l1 between the clone's and the victim's logits); its loss."""
        loss = F.l1_loss(self(x), victim_logits(answers))
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def after_clone_steps(self, optimizer, batch_size: int) -> None:
        """What an iteration does after its clone steps, without queries (DFME: nothing; MAZE: experience replay)."""

    def figures(self) -> dict[str, Any]:
        """The attack's name for the results."""
        return {"attack": "dfme"}


class DataFreeDataModule(AttackDataModule):
    """The victim side of a data-free attack: an oracle, the evaluation set, and no attacker data.

    The training loader only paces the attack: ``steps_per_epoch`` items, one generator/clone
    iteration each, so validation (clone accuracy) runs every ``steps_per_epoch`` iterations.

    Args:
        victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed:
            see :class:`~edm_lightning.attacks.AttackDataModule`; ``batch_size`` is the query batch.
        steps_per_epoch: attack iterations between two evaluations.
    """

    def __init__(
        self,
        victim: VictimConfig | RemoteVictimConfig,
        dataset: str = "fashionmnist",
        budget: int = 1_000_000,
        label_only: bool = False,
        steps_per_epoch: int = 50,
        root: str = "data",
        batch_size: int = 256,
        test_size: int | None = None,
        cache_dir: str = CACHE_DIR,
        num_workers: int = 0,
        seed: int = 0,
    ):
        if steps_per_epoch <= 0:
            raise ConfigError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        super().__init__(victim, dataset, budget, label_only, root, batch_size, test_size, cache_dir, num_workers, seed)
        self.save_hyperparameters(ignore=["victim"])

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(self.hparams.steps_per_epoch)), batch_size=1)

    @override
    def open_oracle(self, spent: int, ledger: Ledger | None = None) -> BlackBoxOracle:
        """The oracle, charged what earlier runs of the same attack spent (its :attr:`ledger`) and writing every call
        to it: a data-free attack keeps nothing it could resume from, so a re-run after a kill starts afresh with what
        is left of the budget, and the victim answers at most the budget over all runs (runs at the same time share it).

        Returns:
            The oracle.
        """
        ledger = ledger or QueryLedger(self.ledger_path)
        return super().open_oracle(max(spent, min(ledger.spent, self.hparams.budget)), ledger)

    @property
    def ledger_path(self) -> Path:
        """The query ledger of this attack: keyed by victim, seed, answer kind and the attacker's module and settings."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        attacker = {"module": type(module).__name__, "settings": dict(module.hparams)} if module is not None else {}
        key = self.cache_key(attack="data-free", steps_per_epoch=self.hparams.steps_per_epoch,
                             batch_size=self.hparams.batch_size, **attacker)
        return self.cache_dir / f"datafree-{key}.ledger.json"


class Generator(nn.Module):
    """DFME's generator (DFAD's "GeneratorA"): noise -> linear -> two upsampling conv blocks -> image.

    ``forward`` returns the pre-activation (the space the gradient is estimated in); :func:`to_images`
    maps it to images in [0, 1].
    """

    def __init__(self, latent_dim: int, input_shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        channels, height, width_px = input_shape
        if height % 4 or width_px % 4:
            raise ConfigError(f"the generator upsamples x4: image sides must be multiples of 4, got {height}x{width_px}")
        self.start = (height // 4, width_px // 4)
        self.project = nn.Linear(latent_dim, 2 * width * self.start[0] * self.start[1])
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1), nn.BatchNorm2d(channels, affine=False),
        )

    @override
    def forward(self, z: Tensor) -> Tensor:
        return self.blocks(self.project(z).view(z.shape[0], -1, *self.start))


class ReplayBuffer:
    """The (query, answer) pairs bought so far, up to ``capacity`` (the oldest replaced first), kept on the CPU.

    Sampling it asks the victim nothing: the experience replay of MAZE and DisGUIDE.

    Args:
        capacity: most pairs kept.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._x: Tensor | None = None
        self._answers: Tensor | None = None
        self._next, self._count = 0, 0

    def __len__(self) -> int:
        return self._count

    def add(self, x: Tensor, answers: Tensor) -> None:
        """Keep queries ``x`` ``(N, C, H, W)`` and their answers ``(N, K)`` (as float32, on the CPU)."""
        if self._x is None:
            self._x = torch.empty((self.capacity, *x.shape[1:]))
            self._answers = torch.empty((self.capacity, answers.shape[1]))
        rows = (self._next + torch.arange(len(x))) % self.capacity
        self._x[rows], self._answers[rows] = x.detach().float().cpu(), answers.detach().float().cpu()
        self._next = int(rows[-1] + 1) % self.capacity
        self._count = min(self._count + len(x), self.capacity)

    def sample(self, size: int, device: torch.device | str = "cpu", replace: bool = False) -> tuple[Tensor, Tensor]:
        """``size`` pairs drawn uniformly, on ``device``: distinct ones (all of them while fewer are kept), or with
        ``replace`` independent draws (MAZE's).

        Returns:
            ``(x, answers)``.

        Raises:
            RuntimeError: nothing was kept yet.
        """
        if not self._count:
            raise RuntimeError("the replay buffer is empty: buy a batch before replaying")
        rows = torch.randint(self._count, (size,)) if replace else torch.randperm(self._count)[:size]
        return self._x[rows].to(device), self._answers[rows].to(device)


def to_images(pre: Tensor) -> Tensor:
    """Generator pre-activations to images in [0, 1] (DFME's tanh, rescaled to this framework's range)."""
    return (torch.tanh(pre) + 1) / 2


def victim_logits(probs: Tensor) -> Tensor:
    """Logits recovered from probabilities up to a per-input constant (DFME's logit approximation)."""
    log_probs = probs.clamp_min(1e-8).log()
    return log_probs - log_probs.mean(dim=-1, keepdim=True)


def l1_logit_disagreement(clone_logits: Tensor, answers: Tensor) -> Tensor:
    """DFME's disagreement per input ``(N,)``: l1 between the clone's logits and the victim's recovered ones."""
    return (clone_logits - victim_logits(answers)).abs().mean(dim=-1)


def zeroth_order_gradient(
    oracle: BlackBoxOracle, clone: nn.Module, pre: Tensor, directions: int, epsilon: float,
    disagreement: Callable[[Tensor, Tensor], Tensor] = l1_logit_disagreement,
) -> tuple[Tensor, Tensor]:
    """Forward-difference estimate of d(-disagreement(clone, victim)) / d(pre) per generated input (DFME Eq. 6).

    ``disagreement(clone logits, victim answers)`` is per input: DFME's l1 on logits by default, MAZE's KL
    divergence in :class:`~edm_lightning.attacks.maze.MAZEModule`. Costs ``len(pre) * (directions + 1)``
    oracle queries (each point and its probes). Returns the estimate (to backpropagate into the generator)
    and the generator loss at the unperturbed points.

    Returns:
        ``(gradient estimate like pre, generator loss)``.
    """
    with torch.no_grad():
        n, dim = pre.shape[0], pre[0].numel()
        u = torch.randn(n, directions, *pre.shape[1:], device=pre.device)
        u = u / u.flatten(2).norm(dim=2).view(n, directions, *([1] * (pre.ndim - 1)))
        probes = torch.cat([pre.detach().unsqueeze(1) + epsilon * u, pre.detach().unsqueeze(1)], dim=1)
        x = to_images(probes.flatten(0, 1))
        answers = oracle(x)
        losses = -disagreement(clone(x), answers).view(n, directions + 1)
        differences = (losses[:, :-1] - losses[:, -1:]) / epsilon
        grad = dim * (differences.view(n, directions, *([1] * (pre.ndim - 1))) * u).mean(dim=1)
        return grad / n, losses[:, -1].mean()  # the generator loss is the batch mean


def dfme_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU: a generator and a clone step per few hundred queries.

    Returns:
        The estimate, in seconds.
    """
    return budget * SECONDS_PER_QUERY * 35


@register_attack("dfme", forwards_to=DFMEModule, queries_in_training=True, cost=dfme_cost)
def dfme_job(
    victim: VictimConfig | RemoteVictimConfig,
    *,
    dataset: str = "fashionmnist",
    budget: int = 1_000_000,
    steps_per_epoch: int = 50,
    max_epochs: int = 1000,
    batch_size: int = 256,
    label_only: bool = False,
    arch: str = "lenet5",
    optim: OptimConfig | None = None,
    cache_dir: str = CACHE_DIR,
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> AttackJob:
    """DFME as a job: what ``python main.py fit --config configs/attack/dfme.yaml`` builds; it runs until the
    budget cannot pay another iteration (or ``max_epochs``). ``options`` go to :class:`DFMEModule`
    (``directions``, ``grad_epsilon``, ``generator_lr``, ...).

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`).
    """
    return data_free_job(DFMEModule, victim, dataset=dataset, budget=budget, steps_per_epoch=steps_per_epoch,
                         max_epochs=max_epochs, batch_size=batch_size, label_only=label_only, arch=arch, optim=optim,
                         cache_dir=cache_dir, root=root, test_size=test_size, seed=seed, **options)


def run_dfme(victim: VictimConfig | RemoteVictimConfig, *, trainer: dict[str, Any] | None = None,
             **settings: Any) -> dict[str, Any]:
    """DFME end to end from Python.

    Args:
        victim: the victim to steal from.
        trainer: Trainer arguments (``accelerator``, ``devices``, ``precision``, ``logger``, ...).
        settings: :func:`dfme_job`'s arguments (``budget``, ``steps_per_epoch``, ``directions`` ...).

    Returns:
        The figures of :func:`~edm_lightning.attacks.run_attack` plus the attack's own.
    """
    return dfme_job(victim, **settings).run(trainer)


def data_free_job(module_class: type[CloneModule], victim: VictimConfig | RemoteVictimConfig, *, dataset: str,
                  budget: int, steps_per_epoch: int, max_epochs: int, batch_size: int, label_only: bool, arch: str,
                  optim: OptimConfig | None, cache_dir: str, root: str, test_size: int | None, seed: int,
                  **options: Any) -> AttackJob:
    """A data-free attack (``module_class``: DFME, MAZE or DisGUIDE) against ``victim``: what :func:`dfme_job` and
    :func:`~edm_lightning.attacks.maze.maze_job` share.

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`).
    """
    data_args = dict(victim=victim, dataset=dataset, budget=budget, label_only=label_only, steps_per_epoch=steps_per_epoch,
                     root=root, batch_size=batch_size, test_size=test_size, cache_dir=cache_dir, seed=seed)
    return AttackJob(module_class, dict(arch=arch, optim=optim, **options), DataFreeDataModule, data_args, max_epochs, seed)
