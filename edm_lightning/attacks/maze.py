"""MAZE, data-free model stealing with zeroth-order gradient estimation (Kariyappa, Prakash and Qureshi, CVPR 2021).

By EDM's own authors, and concurrent with DFME: a generator G makes queries where the clone C disagrees most
with the victim V, C learns V's answers on them, and V's gradient is estimated from forward differences
along random directions (:func:`~edm_lightning.attacks.dfme.zeroth_order_gradient`). What MAZE does its own
way (paper Sec. 3): the disagreement is the KL divergence ``KL(V(x) || C(x))`` on probabilities (DFME: l1 on
recovered logits), the estimate averages ``m = 10`` directions, and every answer bought is kept in an
*experience replay* buffer on which C takes ``replay_steps`` more steps per iteration, for free: replay
spends no query. One iteration costs ``batch * ((m + 1) * generator_steps + clone_steps)`` queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from typing_extensions import override

from edm_lightning.attacks.dfme import DFMEModule, ReplayBuffer, data_free_job
from edm_lightning.attacks.registry import CACHE_DIR, SECONDS_PER_QUERY, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.optim import OptimConfig

__all__ = ["MAZEModule", "kl_disagreement", "maze_cost", "maze_job", "run_maze"]


def kl_disagreement(clone_logits: Tensor, answers: Tensor) -> Tensor:
    """MAZE's disagreement per input ``(N,)``: ``KL(victim || clone)`` of the probability vectors."""
    answers = answers.clamp_min(1e-8)
    return (answers * (answers.log() - clone_logits.log_softmax(dim=-1))).sum(dim=-1)


class MAZEModule(DFMEModule):
    """The MAZE attacker: DFME's clone and generator, MAZE's loss and experience replay.

    Args:
        arch, num_classes, input_shape, mean, std, optim, generator_lr, latent_dim, grad_epsilon,
            generator_steps, clone_steps: see :class:`~edm_lightning.attacks.DFMEModule`.
        directions: random directions ``m`` of the gradient estimate (MAZE: 10).
        replay_steps: clone steps on replayed answers per iteration (no queries).
        replay_size: most answers kept for replay (the oldest are replaced).

    Raises:
        ConfigError: a negative ``replay_steps`` or a ``replay_size`` below 1 (and DFME's own checks).
    """

    title = "MAZE"

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
        directions: int = 10,
        grad_epsilon: float = 1e-3,
        generator_steps: int = 1,
        clone_steps: int = 5,
        replay_steps: int = 10,
        replay_size: int = 50_000,
    ):
        if replay_steps < 0 or replay_size < 1:
            raise ConfigError(f"replay_steps must be >= 0 and replay_size >= 1, got {replay_steps} and {replay_size}")
        super().__init__(arch, num_classes, input_shape, mean, std, optim, generator_lr, latent_dim, directions,
                         grad_epsilon, generator_steps, clone_steps)
        self.save_hyperparameters()
        self._replay = ReplayBuffer(replay_size)

    @staticmethod
    @override
    def disagreement(clone_logits: Tensor, answers: Tensor) -> Tensor:
        """MAZE's disagreement: ``KL(victim || clone)`` (:func:`kl_disagreement`)."""
        return kl_disagreement(clone_logits, answers)

    @override
    def clone_step(self, optimizer, x: Tensor, answers: Tensor) -> Tensor:
        """Keep the bought answers for replay, then one clone update on their KL divergence; its loss."""
        self._replay.add(x, answers)
        return self._kl_step(optimizer, x, answers)

    @override
    def after_clone_steps(self, optimizer, batch_size: int) -> None:
        """Experience replay: ``replay_steps`` clone updates on answers already bought (no query)."""
        for _ in range(self.hparams.replay_steps):
            self._kl_step(optimizer, *self._replay.sample(batch_size, self.device, replace=True))

    def _kl_step(self, optimizer, x: Tensor, answers: Tensor) -> Tensor:
        loss = kl_disagreement(self(x), answers).mean()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    @override
    def figures(self) -> dict[str, Any]:
        """The attack's name for the results."""
        return {"attack": "maze"}


def maze_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU: DFME's generator and clone steps, fewer per query (10 directions per gradient
    estimate), plus the replay steps; 50k queries took 35 s in ``fashionmnist_full_cpu.yaml``.

    Returns:
        The estimate, in seconds.
    """
    return budget * SECONDS_PER_QUERY * 14


@register_attack("maze", forwards_to=MAZEModule, queries_in_training=True, cost=maze_cost)
def maze_job(
    victim: VictimConfig | RemoteVictimConfig,
    *,
    dataset: str = "fashionmnist",
    budget: int = 1_000_000,
    steps_per_epoch: int = 50,
    max_epochs: int = 1000,
    batch_size: int = 128,
    label_only: bool = False,
    arch: str = "lenet5",
    optim: OptimConfig | None = None,
    cache_dir: str = CACHE_DIR,
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> AttackJob:
    """MAZE as a job: what ``python main.py fit --config configs/attack/maze.yaml`` builds; it runs until the
    budget cannot pay another iteration (or ``max_epochs``). ``options`` go to :class:`MAZEModule`
    (``directions``, ``replay_steps``, ``generator_lr``, ...).

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`).
    """
    return data_free_job(MAZEModule, victim, dataset=dataset, budget=budget, steps_per_epoch=steps_per_epoch,
                         max_epochs=max_epochs, batch_size=batch_size, label_only=label_only, arch=arch, optim=optim,
                         cache_dir=cache_dir, root=root, test_size=test_size, seed=seed, **options)


def run_maze(victim: VictimConfig | RemoteVictimConfig, *, trainer: dict[str, Any] | None = None,
             **settings: Any) -> dict[str, Any]:
    """MAZE end to end from Python.

    Args:
        victim: the victim to steal from.
        trainer: Trainer arguments (``accelerator``, ``devices``, ``precision``, ``logger``, ...).
        settings: :func:`maze_job`'s arguments (``budget``, ``directions``, ``replay_steps`` ...).

    Returns:
        The figures of :func:`~edm_lightning.attacks.run_attack` plus the attack's own.
    """
    return maze_job(victim, **settings).run(trainer)
