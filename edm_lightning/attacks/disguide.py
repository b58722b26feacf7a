"""DisGUIDE, disagreement-guided data-free model extraction (Rosenthal, Enouen, Pham and Tan, AAAI 2023).

DFME's generator and data-free setting, with two (or more) clone students instead of one. The generator G is
trained to make the students *disagree* on its samples, a signal the attacker computes alone: no gradient is
estimated through the victim V, so the generator's steps cost no query (DFME pays ``batch * (m + 1)`` per
generator step; here only the students' training batches are queried). Per iteration (paper Sec. 3, and the
authors' ``train.py``):

- ``generator_steps`` updates of G, students frozen, minimising (per batch of ``N`` samples, ``S`` students,
  ``K`` classes, ``p_s(x)`` student ``s``'s softmax)

      L_G = -(1 / NK) sum_{n,k} std_s p_s(x_n)_k  +  lambda * sum_k pbar_k log pbar_k,
      pbar = mean_{n,s} p_s(x_n),

  the disagreement term (the students' standard deviation, to maximise) and the class-diversity term (the
  negative entropy of the batch's mean soft vote, to minimise: every class gets explored);
- ``clone_steps`` batches of G's samples bought from V, each training every student on V's answers (soft
  answers: DFME's l1 between logits and V's recovered logits; a label-only victim: cross-entropy on V's top-1);
  every bought pair goes into a replay buffer;
- ``replay_steps`` more student updates on pairs drawn from the buffer: no query.

One iteration costs ``batch * clone_steps`` queries; the run stops when the budget cannot pay another, so it
spends exactly what it reports. The clone is the students' soft vote (the mean of their softmaxes), the figure
the authors' code reports. Paper settings (CIFAR-10): 2 students, batch 256, 1 generator step, 1 query batch
and 3 replay steps per iteration, ``lambda = 0.2`` (0.04 for CIFAR-100), generator Adam lr 1e-4, student SGD,
both rates x0.3 at 40% and 80% of the budget, a 1M replay buffer, 20M queries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from edm_lightning.attacks.dfme import GeneratorAttackModule, ReplayBuffer, data_free_job, to_images, victim_logits
from edm_lightning.attacks.oracle import BlackBoxOracle
from edm_lightning.attacks.registry import CACHE_DIR, SECONDS_PER_QUERY, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig

__all__ = ["DisGUIDEModule", "SoftVote", "check_disguide", "disguide_cost", "disguide_job",
           "generator_loss"]

#: The student losses: ``l1`` on logits (soft answers, the paper's default) or ``ce`` on the victim's top-1.
STUDENT_LOSSES = ("l1", "ce")

#: :func:`disguide_job`'s query batch, which :func:`check_disguide` assumes when ``options`` leave it out.
DEFAULT_BATCH_SIZE = 256

#: Seconds of the generator's forward pass per 28x28 image on the 2-core CPU (a step, with backward: about 3x).
GENERATOR_SECONDS_PER_IMAGE = 1.4e-3


class SoftVote(nn.Module):
    """The students and their soft vote: :meth:`forward` is the clone the attack reports.

    Args:
        students: the student nets (images in [0, 1] to logits).
    """

    def __init__(self, students: Sequence[nn.Module]):
        super().__init__()
        self.students = nn.ModuleList(students)

    def student_logits(self, x: Tensor) -> Tensor:
        """Each student's logits ``(N, S, K)`` for images ``x`` ``(N, C, H, W)``."""
        return torch.stack([student(x) for student in self.students], dim=1)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """The soft vote as logits: ``log mean_s softmax(student_s(x))`` ``(N, K)`` (its softmax is the mean)."""
        return self.student_logits(x).softmax(dim=-1).mean(dim=1).clamp_min(1e-12).log()


def generator_loss(student_logits: Tensor, diversity_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """DisGUIDE's generator loss on the students' logits ``(N, S, K)`` (``S >= 2``), to minimise.

    ``disagreement`` is the students' standard deviation of each class probability, averaged over inputs and
    classes; ``diversity`` is the entropy of the batch's mean soft vote (``ln K`` when every class is predicted
    alike). The loss is ``-disagreement - diversity_weight * diversity`` (the 1e-6 the authors add inside the
    logarithm keeps it finite; the 1e-12 under the square root keeps the gradient finite where students agree exactly).

    Returns:
        ``(loss, disagreement, diversity)``, scalars; only ``loss`` carries gradients on purpose.
    """
    probs = student_logits.softmax(dim=-1)
    disagreement = (probs.var(dim=1) + 1e-12).sqrt().mean()
    vote = (probs + 1e-6).mean(dim=(0, 1))
    diversity = -(vote * vote.log()).sum()
    return -disagreement - diversity_weight * diversity, disagreement.detach(), diversity.detach()


def _check_settings(settings: Mapping[str, Any]) -> None:
    """Refuse a DisGUIDE setting out of range (those present in ``settings``), naming what is allowed."""
    whole = {"students": 2, "latent_dim": 1, "generator_steps": 1, "clone_steps": 1, "replay_steps": 0,
             "replay_size": 1}
    for key, least in whole.items():
        value = settings.get(key, least)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            why = " (the disagreement of one student is zero)" if key == "students" else ""
            raise ConfigError(f"{key} must be a whole number >= {least}{why}, got {value!r}")
    weight = settings.get("diversity_weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ConfigError(f"diversity_weight must be a finite number >= 0 (paper: 0.2 for 10 classes), got {weight!r}")
    lr = settings.get("generator_lr", 1.0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ConfigError(f"generator_lr must be a finite number > 0, got {lr!r}")
    if settings.get("student_loss", "l1") not in STUDENT_LOSSES:
        raise ConfigError(f"student_loss must be one of {', '.join(STUDENT_LOSSES)} (l1: soft answers; ce: the "
                          f"victim's top-1, for a label-only victim), got {settings['student_loss']!r}")
    milestones = list(settings.get("lr_milestones", ()))
    if any(isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1 for m in milestones) \
            or milestones != sorted(milestones):
        raise ConfigError(f"lr_milestones must be increasing fractions of the budget in (0, 1), got {milestones!r}")
    decay = settings.get("lr_decay", 0.5)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise ConfigError(f"lr_decay must be a number in (0, 1] (the learning rates' factor at each milestone), got "
                          f"{decay!r}")


class DisGUIDEModule(GeneratorAttackModule):
    """The DisGUIDE attacker: a generator and ``students`` clones, trained with manual optimisation.

    ``self.net`` is the students' :class:`SoftVote`, so the clone that is validated, tested and saved is their
    soft vote.

    Args:
        arch, num_classes, input_shape, mean, std: see :class:`~edm_lightning.models.CloneModule` (each student's).
        optim: the students' optimiser, one for all (paper: SGD, lr 0.1, momentum 0.9, weight decay 5e-4).
        generator_lr: the generator's Adam learning rate.
        latent_dim: size of the generator's noise input.
        students: clones whose disagreement guides the generator (paper: 2).
        diversity_weight: ``lambda``, the weight of the class-diversity term (paper: 0.2 for 10 classes).
        generator_steps: generator updates per iteration (no queries).
        clone_steps: query batches per iteration, one student update each.
        replay_steps: student updates per iteration on replayed pairs (no queries).
        replay_size: most pairs kept for replay (at most the budget is allocated).
        student_loss: ``l1`` (soft answers) or ``ce`` (the victim's top-1: a label-only victim).
        lr_milestones: fractions of the budget spent at which both learning rates are multiplied by ``lr_decay``.
        lr_decay: that factor.

    Raises:
        ConfigError: a setting out of range (the message names what is allowed).
    """

    title = "DisGUIDE"

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
        students: int = 2,
        diversity_weight: float = 0.2,
        generator_steps: int = 1,
        clone_steps: int = 1,
        replay_steps: int = 3,
        replay_size: int = 1_000_000,
        student_loss: Literal["l1", "ce"] = "l1",
        lr_milestones: tuple[float, ...] = (0.4, 0.8),
        lr_decay: float = 0.3,
    ):
        _check_settings(dict(generator_lr=generator_lr, latent_dim=latent_dim, students=students,
                             diversity_weight=diversity_weight, generator_steps=generator_steps, clone_steps=clone_steps,
                             replay_steps=replay_steps, replay_size=replay_size, student_loss=student_loss,
                             lr_milestones=lr_milestones, lr_decay=lr_decay))
        optim = optim or OptimConfig(name="sgd", lr=0.1, weight_decay=5e-4, schedule="constant")
        super().__init__(arch, num_classes, input_shape, mean, std, optim, generator_lr, latent_dim)
        self.save_hyperparameters()
        self.net = SoftVote([self.net, *(build_net(arch, input_shape, num_classes, mean, std)
                                         for _ in range(students - 1))])
        self.replay: ReplayBuffer | None = None  # sized by the budget when fitting starts
        self._lr_factor = 1.0

    def queries_per_iteration(self, batch_size: int) -> int:
        """Queries one training iteration spends: ``batch_size * clone_steps`` (the generator's steps are free)."""
        return batch_size * self.hparams.clone_steps

    @override
    def check_budget(self, batch_size: int, budget: int) -> None:
        check_disguide(budget, {"batch_size": batch_size, "clone_steps": self.hparams.clone_steps})

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.replay = ReplayBuffer(min(self.hparams.replay_size, self.trainer.datamodule.hparams.budget))

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        oracle: BlackBoxOracle = self.trainer.datamodule.oracle
        size, hp = self.trainer.datamodule.hparams.batch_size, self.hparams
        if self.out_of_budget(oracle, size):
            return
        student_opt, generator_opt = self.optimizers()
        self._decay_learning_rates(oracle, (student_opt, generator_opt))
        for _ in range(hp.generator_steps):
            generator_loss_value, disagreement = self.generator_step(generator_opt, size)
        self.generator.eval()  # the students' batches come from the generator as it stands (the authors' code)
        for _ in range(hp.clone_steps):
            with torch.no_grad():
                x = to_images(self.generator(self._noise(size)))
            answers = oracle(x)
            self.replay.add(x, answers)
            loss = self.student_step(student_opt, x, answers)
        self.generator.train()
        for _ in range(hp.replay_steps):
            self.replay_step(student_opt, size)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/generator_loss", generator_loss_value)
        self.log("train/disagreement", disagreement)
        self.log("attack/queries", float(oracle.queries_spent))

    def generator_step(self, optimizer, size: int) -> tuple[Tensor, Tensor]:
        """One generator update on ``size`` fresh samples, students frozen and in eval mode; asks the victim nothing.

        Returns:
            ``(generator loss, disagreement)`` (:func:`generator_loss`), detached.
        """
        self.net.eval().requires_grad_(False)
        self.generator.train()
        try:
            loss, disagreement, _ = generator_loss(self.net.student_logits(to_images(self.generator(self._noise(size)))),
                                                   self.hparams.diversity_weight)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        finally:
            self.net.train().requires_grad_(True)
        return loss.detach(), disagreement

    def student_step(self, optimizer, x: Tensor, answers: Tensor) -> Tensor:
        """One update of every student on answers ``(N, K)`` to ``x``: the sum of their losses; its mean per student."""
        logits = self.net.student_logits(x)
        if self.hparams.student_loss == "ce":
            per_student = F.cross_entropy(logits.transpose(1, 2), answers.argmax(dim=-1)[:, None].expand(-1, logits.shape[1]),
                                          reduction="none").mean(dim=0)
        else:
            per_student = (logits - victim_logits(answers)[:, None]).abs().mean(dim=(0, 2))
        loss = per_student.sum()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach() / len(per_student)

    def replay_step(self, optimizer, size: int) -> Tensor:
        """One student update on ``size`` pairs replayed from the buffer (no query); its loss."""
        x, answers = self.replay.sample(size, self.device)
        return self.student_step(optimizer, x, answers)

    def _decay_learning_rates(self, oracle: BlackBoxOracle, optimizers) -> None:
        """Both learning rates times ``lr_decay`` for each milestone the budget spent (over all runs) has passed."""
        if oracle.budget is None:
            return
        passed = sum(oracle.queries_spent >= m * oracle.budget for m in self.hparams.lr_milestones)
        factor = self.hparams.lr_decay ** passed
        if factor != self._lr_factor:
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= factor / self._lr_factor
            self._lr_factor = factor

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["disguide_lr_factor"] = self._lr_factor  # the optimisers it saves hold the decayed rates

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._lr_factor = float(checkpoint.get("disguide_lr_factor", 1.0))  # a resumed fit does not decay them twice

    def figures(self) -> dict[str, Any]:
        """The attack's name and its students for the results."""
        return {"attack": "disguide", "students": self.hparams.students}


def check_disguide(budget: int, options: Mapping[str, Any]) -> None:
    """Refuse settings DisGUIDE would refuse, and a budget that cannot pay one iteration (``batch_size *
    clone_steps`` queries); the module and a runner (before its first stage) call it alike.

    Raises:
        ConfigError: a setting out of range, or ``budget`` below one iteration's queries.
    """
    _check_settings(options)
    size, steps = options.get("batch_size", DEFAULT_BATCH_SIZE), options.get("clone_steps", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"batch_size must be a whole number >= 1, got {size!r}")
    if budget < size * steps:
        raise ConfigError(f"one DisGUIDE iteration costs {size * steps} queries (batch_size {size} x clone_steps {steps}) "
                          f"but the budget is {budget}: raise the budget or lower batch_size.")


def disguide_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU: per iteration, the generator's steps (forward and backward), its samples for the
    query batches, and every student's query and replay steps (``seconds_per_image_epoch`` per image each).

    Returns:
        The estimate, in seconds.
    """
    generator_steps, clone_steps = int(options.get("generator_steps", 1)), int(options.get("clone_steps", 1))
    student_steps = (clone_steps + int(options.get("replay_steps", 3))) * int(options.get("students", 2))
    per_batch_image = (3 * generator_steps + clone_steps) * GENERATOR_SECONDS_PER_IMAGE \
        + student_steps * seconds_per_image_epoch
    return budget * (SECONDS_PER_QUERY + per_batch_image / clone_steps)


@register_attack("disguide", forwards_to=DisGUIDEModule, queries_in_training=True, cost=disguide_cost,
                 check=check_disguide)
def disguide_job(
    victim: VictimConfig | RemoteVictimConfig,
    *,
    dataset: str = "fashionmnist",
    budget: int = 1_000_000,
    steps_per_epoch: int = 50,
    max_epochs: int = 1000,
    batch_size: int = DEFAULT_BATCH_SIZE,
    label_only: bool = False,
    arch: str = "lenet5",
    optim: OptimConfig | None = None,
    cache_dir: str = CACHE_DIR,
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> AttackJob:
    """DisGUIDE as a job: what ``python main.py fit --config configs/attack/disguide.yaml`` builds; it runs until
    the budget cannot pay another iteration (or ``max_epochs``). ``options`` go to :class:`DisGUIDEModule`
    (``students``, ``diversity_weight``, ``replay_steps``, ...).

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`).
    """
    return data_free_job(DisGUIDEModule, victim, dataset=dataset, budget=budget, steps_per_epoch=steps_per_epoch,
                         max_epochs=max_epochs, batch_size=batch_size, label_only=label_only, arch=arch, optim=optim,
                         cache_dir=cache_dir, root=root, test_size=test_size, seed=seed, **options)

