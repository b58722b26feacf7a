"""D-DAE (Chen et al., IEEE S&P 2023, "D-DAE: Defense-Penetrating Model Extraction Attacks"): detect the defense,
restore the answers, then KnockoffNets on the restored answers.

The attacker holds a ``share`` of the victim task's training split (D-DAE's 2%, with true labels) and the surrogate
pool of KnockoffNets. Offline, it trains the shadow kit (:mod:`~edm_lightning.attacks.shadows`): shadow models with
and without each candidate defense (shadow EDM ensembles included), a meta-classifier naming the defense from the
answers on ``probes`` pool images (paper Sec. IV-B), and a restorer per defense mapping a defended answer to an
undefended one (Sec. IV-C, L1 loss, Eq. 3). Online (Sec. IV-D), it buys the answers on the probes, detects the
defense, buys KnockoffNets' transfer set (the same purchase as KnockoffNets with the same victim, seed, surrogate and
sampling, its pool as it is, ``pool_transform: none``: D-DAE reads its first ``budget - probes`` queries), restores
every answer with the detected defense's restorer (``none``: as they are) and trains the clone on the restored
answers (the probes' included).

Budget: the probes are bought first, then the transfer set with what is left, both under a
:class:`~edm_lightning.attacks.purchase.Purchase`, so the victim answers at most ``budget`` over all runs, kills
included: a probe batch lost to a kill is charged and the transfer set shrinks by it. The authors' code has no
shadow-free variant (its restorer takes a generator argument it never uses), so neither has this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from edm_lightning.attacks.knockoff import KnockoffDataModule
from edm_lightning.attacks.purchase import Purchase
from edm_lightning.attacks.registry import CACHE_DIR, SECONDS_PER_QUERY, register_attack
from edm_lightning.attacks.remote import RemoteVictimConfig
from edm_lightning.attacks.run import AttackJob
from edm_lightning.attacks.shadows import EDM, NONE, ShadowKit, ShadowSettings, parse_defenses, pool_draw, shadow_kit
from edm_lightning.attacks.transfer_set import Reward, Strategy, TransferSet
from edm_lightning.data.images import BatchTensorDataset
from edm_lightning.defense import VictimConfig
from edm_lightning.errors import ConfigError
from edm_lightning.files import save_atomic
from edm_lightning.models.clone import CloneModule
from edm_lightning.nets import build_net
from edm_lightning.optim import OptimConfig

__all__ = ["DEFAULT_DEFENSES", "DDAEDataModule", "check_ddae", "ddae_cost", "ddae_job", "ddae_kit_cost"]

#: The candidate defenses of the default kit: EDM and each published defense of the experiments at a middle strength.
DEFAULT_DEFENSES: tuple[str | dict[str, Any], ...] = (
    EDM,
    {"class_path": "ReverseSigmoid", "init_args": {"beta": 0.7, "gamma": 1.0}},
    {"class_path": "Rounding", "init_args": {"decimals": 1}},
    {"class_path": "PredictionPoisoning", "init_args": {"epsilon": 1.0, "norm": "l1", "preserve_argmax": True}},
    {"class_path": "AdaptiveMisinformation", "init_args": {"tau": 0.6, "nu": 1000.0}},
    "TopLabel",
)

DEFAULTS = {"share": 0.02, "probes": 128, "shadows": 8, "held_out": 2, "batch_size": 128}
#: The shadow kit's training settings (checked with the rest before a runner's first stage).
KIT_DEFAULTS = {"shadow_epochs": 30, "edm_members": 5, "pool_images": 2000, "kit_steps": 1500}


class DDAEDataModule(KnockoffDataModule):
    """D-DAE's data: the shadow kit, the probes and KnockoffNets' transfer set bought from the victim, restored.

    Args:
        victim, dataset, surrogate, strategy, reward, budget, label_only, policy_arch, policy_lr, diversity_window,
            query_batch_size, root, batch_size, test_size, cache_dir, num_workers, seed: see
            :class:`~edm_lightning.attacks.knockoff.KnockoffDataModule`; ``budget`` pays the probes and the transfer set.
        share: fraction of the victim task's training split the attacker holds (with labels), in (0, 1]; drawn with
            ``seed``.
        probes: P, pool images whose answers name the defense (bought first; they count against the budget).
        shadows: shadow models per defense (and undefended); ``held_out`` of them measure the kit.
        held_out: shadows kept out of training, on which detection accuracy and restoration error are reported.
        shadow_epochs: training epochs of each shadow model.
        edm_members: members of each shadow EDM ensemble.
        pool_images: pool images besides the probes (the shadow EDM's OOD set; with the share, the restorers' inputs).
        kit_steps: Adam steps of the meta-classifier and of each restorer.
        defenses: candidate defenses (``None``: :data:`DEFAULT_DEFENSES`): ``EDM``, a post-processor's name, or
            ``{class_path, init_args}`` as victims' ``postprocessors``.
        shadow_arch: the shadows' architecture (the job sets the clone's).
        assume_defense: restore with this candidate's restorer (a name of the kit's: ``none``, ``EDM``,
            ``ReverseSigmoid(beta=0.7, gamma=1.0)`` ...) whatever the meta-classifier says: the ablation that gives the
            attacker a perfect detector, to measure the restorer alone (the detection is still made and reported).

    Raises:
        ConfigError: a setting :func:`check_ddae` refuses, or KnockoffNets' DataModule does.
    """

    def __init__(
        self,
        victim: VictimConfig | RemoteVictimConfig,
        dataset: str = "fashionmnist",
        surrogate: str = "mnist",
        strategy: Strategy = "random",
        reward: Reward = "all",
        budget: int = 50_000,
        share: float = DEFAULTS["share"],
        probes: int = DEFAULTS["probes"],
        shadows: int = DEFAULTS["shadows"],
        held_out: int = DEFAULTS["held_out"],
        shadow_epochs: int = KIT_DEFAULTS["shadow_epochs"],
        edm_members: int = KIT_DEFAULTS["edm_members"],
        pool_images: int = KIT_DEFAULTS["pool_images"],
        kit_steps: int = KIT_DEFAULTS["kit_steps"],
        defenses: list[str | dict[str, Any]] | None = None,
        shadow_arch: str = "lenet5",
        assume_defense: str | None = None,
        label_only: bool = False,
        policy_arch: str = "lenet5",
        policy_lr: float = 1e-3,
        diversity_window: int = 1000,
        query_batch_size: int = 1024,
        root: str = "data",
        batch_size: int = DEFAULTS["batch_size"],
        test_size: int | None = None,
        cache_dir: str = CACHE_DIR,
        num_workers: int = 0,
        seed: int = 0,
    ):
        candidates = check_ddae(budget, dict(share=share, probes=probes, shadows=shadows, held_out=held_out,
                                             defenses=defenses, batch_size=batch_size, shadow_epochs=shadow_epochs,
                                             edm_members=edm_members, pool_images=pool_images, kit_steps=kit_steps))
        super().__init__(victim, dataset, surrogate, strategy, reward, budget, label_only, policy_arch, policy_lr,
                         diversity_window, 1, 0.0, 0, query_batch_size, root, batch_size, test_size, cache_dir,
                         num_workers, seed)
        self.save_hyperparameters(ignore=["victim"])
        self.hparams.update(query_copies=1, copy_noise=0.0, copy_shift=0)  # KnockoffNets' plain purchase (its cache key)
        build_net(shadow_arch, self.input_shape, self.num_classes)  # an unknown or unfitting architecture fails now
        self.candidates = candidates
        labels = [NONE, *(candidate.name for candidate in candidates)]
        if assume_defense is not None and assume_defense not in labels:
            raise ConfigError(f"assume_defense={assume_defense!r} is not a candidate of the kit: expected one of "
                              f"{', '.join(labels)} (or null: the meta-classifier decides)")
        self.kit: ShadowKit | None = None
        self.detected: tuple[str, dict[str, float]] | None = None
        self.probe_queries = 0

    @property
    def settings(self) -> ShadowSettings:
        """The shadow kit's settings (its cache key): the task, pool, share, seed and shadow settings, not the victim."""
        hp = self.hparams
        return ShadowSettings(hp.dataset, hp.surrogate, float(hp.share), hp.seed, hp.shadows, hp.held_out, hp.shadow_arch,
                              tuple(self.candidates), hp.probes, hp.pool_images, hp.shadow_epochs, hp.edm_members,
                              hp.batch_size, hp.kit_steps)

    @override
    def prepare_data(self) -> None:
        """Nothing: D-DAE buys in :meth:`setup` (the probes first, then the transfer set with what they leave)."""

    @override
    def setup(self, stage: str | None = None) -> None:
        super(KnockoffDataModule, self).setup(stage)  # the evaluation set (KnockoffNets' own setup would read its set)
        if stage not in (None, "fit") or self.train_set is not None:
            return
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError(f"D-DAE trains its shadow kit and buys its probes and transfer set in setup: under DDP each "
                              f"of the {self.trainer.world_size} processes would do it. Run it on one device "
                              "(trainer.devices: 1)")
        images, labels = self._surrogate_images()
        pool = images.float().div_(255)
        self.kit = self._shadow_kit(pool)
        probe_x = pool[self.kit.probe_indices]
        probe_answers, transfer = self._buy(probe_x, images, labels)
        self.transfer = transfer
        self.detected = self.kit.detect(probe_answers)
        x = torch.cat([pool[transfer.indices], probe_x])
        answers = torch.cat([transfer.answers.to(probe_answers.dtype), probe_answers])
        self.train_set = BatchTensorDataset(x, self.kit.restore(self.hparams.assume_defense or self.detected[0], answers))

    def _shadow_kit(self, pool: Tensor) -> ShadowKit:
        settings = self.settings
        if len(pool) < settings.probes + 1:
            raise ConfigError(f"the surrogate {settings.surrogate!r} holds {len(pool)} images: too few for probes="
                              f"{settings.probes} and a shadow pool; lower probes")
        if len(pool) < settings.probes + settings.pool_images:  # a small pool: what is left after the probes
            settings = ShadowSettings(**{**settings.__dict__, "pool_images": len(pool) - settings.probes})
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        path = self.cache_dir / f"ddae-kit-{settings.key()}.pt"
        return shadow_kit(path, settings, self, self._attacker_share, pool, device)

    def _attacker_share(self) -> tuple[Tensor, Tensor]:
        """The attacker's ``share`` of the training split, drawn with the seed (read only when the kit is trained, not
        when it is cached).

        Returns:
            Images in [0, 1] ``(n, C, H, W)`` and their labels ``(n,)``.
        """
        images, labels = self.load_attacker_images(self.hparams.dataset, train=True)
        count = max(1, round(self.hparams.share * len(images)))
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.hparams.seed * 7919 + 3))[:count]
        return images[chosen].float().div_(255), labels[chosen]

    def _buy(self, probe_x: Tensor, images: Tensor, labels: Tensor) -> tuple[Tensor, TransferSet]:
        """The victim's answers on the probes and the transfer set; the probes first (see the module docstring)."""
        hp = self.hparams
        path = self.cache_dir / f"ddae-probes-{self.cache_key(attack='ddae', surrogate=hp.surrogate, probes=hp.probes)}.pt"
        expected = pool_draw(self.settings, len(images))[0]
        with Purchase(path) as purchase:
            if path.is_file():
                indices, answers, lost = self.read_round(path, "indices", lambda held: self._probes_problem(held, expected))
            else:
                answers, lost = probe_x.new_zeros((0, self.num_classes)), 0
            pending = purchase.take_pending()
            if pending is not None:  # a run was killed between the victim's answer and the save: charge it
                lost += pending["queries"]
                save_atomic({"indices": expected, "answers": answers, "lost": lost}, path)
                purchase.settle()
            self.probe_queries = hp.probes + lost
            prepaid, rest = len(answers) + lost, hp.budget - hp.probes - lost
            if rest < 1:
                raise ConfigError(f"budget={hp.budget} leaves nothing for the transfer set after probes={hp.probes} and "
                                  f"{lost} probe queries lost to interrupted runs ({str(path)!r}); raise the budget")
            bought = {"answers": answers}

            def open_and_buy_probes(spent: int):  # the transfer set opens the oracle; the probes are bought before it
                oracle = self.open_oracle(spent + prepaid)
                bought["answers"] = purchase.complete(
                    lambda: oracle, probe_x, answers, hp.batch_size,
                    lambda so_far: save_atomic({"indices": expected, "answers": so_far, "lost": lost}, path))
                return oracle

            transfer = self.buy_transfer_set(open_and_buy_probes, rest)
        return bought["answers"], transfer

    @staticmethod
    def _probes_problem(held: object, expected: Tensor) -> str | None:
        if not isinstance(held, Tensor) or held.shape != expected.shape or not torch.equal(held.long(), expected):
            return "its probes are not this attack's probe images"
        return None

    @override
    def figures(self) -> dict[str, Any]:
        """The detected defense (and the meta-classifier's belief), the kit's held-out figures, and the queries
        split into probes and transfer set.

        Returns:
            Name -> JSON-able value.
        """
        kit = self.kit.figures if self.kit is not None else {}
        items = len(self.transfer or ())
        return {"attack": "ddae", "surrogate": self.hparams.surrogate, "share": float(self.hparams.share),
                "detected_defense": self.detected[0] if self.detected else None,
                "restored_as": self.hparams.assume_defense or (self.detected[0] if self.detected else None),
                "detection_scores": self.detected[1] if self.detected else None,
                "detection_accuracy": kit.get("detection_accuracy"), "restoration_error": kit.get("restoration_error"),
                "held_out_shadows": kit.get("held_out"), "probes": self.hparams.probes,
                "probe_queries": self.probe_queries, "transfer_set": items,
                "transfer_queries": self.queries_spent - self.probe_queries}


def check_ddae(budget: int, options: Mapping[str, Any]) -> list:
    """Refuse D-DAE settings before anything is built or bought (the DataModule and a runner call it alike): ``share``,
    ``probes``, ``shadows``, ``held_out``, the kit's settings, ``batch_size`` and ``defenses`` from ``options``
    (defaults otherwise).

    Returns:
        The candidate defenses (:class:`~edm_lightning.attacks.shadows.CandidateDefense`).

    Raises:
        ConfigError: ``share`` outside (0, 1]; ``probes``, ``shadows``, ``held_out`` or the kit's settings
            (``shadow_epochs``, ``edm_members``, ``pool_images``, ``kit_steps``) not whole numbers (at least 1 probe,
            2 shadows, 1 held out and 1 training, 2 members); a budget that cannot pay the probes and one transfer-set batch;
            an unknown candidate defense (the message lists the allowed values).
    """
    get = {key: options.get(key, value) for key, value in DEFAULTS.items()}
    share, probes, shadows, held_out, batch = (get[k] for k in ("share", "probes", "shadows", "held_out", "batch_size"))
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:  # NaN fails too
        raise ConfigError(f"share (the attacker's fraction of the victim's training data) must be in (0, 1], e.g. 0.02 "
                          f"(D-DAE's 2%), got {share!r}")
    kit = {key: options.get(key, value) for key, value in KIT_DEFAULTS.items()}
    for key, value, low in (("probes", probes, 1), ("shadows", shadows, 2), ("held_out", held_out, 1),
                            ("shadow_epochs", kit["shadow_epochs"], 1), ("edm_members", kit["edm_members"], 2),
                            ("pool_images", kit["pool_images"], 1), ("kit_steps", kit["kit_steps"], 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    if held_out >= shadows:
        raise ConfigError(f"held_out={held_out} must be smaller than shadows={shadows}: at least one shadow per defense "
                          "trains the kit")
    if isinstance(batch, int) and budget < probes + batch:
        raise ConfigError(f"budget={budget} cannot pay the {probes} probes and one transfer-set batch of {batch} "
                          f"queries: raise the budget to at least {probes + batch}, or lower probes")
    return parse_defenses(_defenses(options))


def _defenses(options: Mapping[str, Any]) -> list:
    """The candidate defenses ``options`` names: :data:`DEFAULT_DEFENSES` only where it names none (``None``)."""
    defenses = options.get("defenses")
    return list(DEFAULT_DEFENSES) if defenses is None else defenses


def ddae_cost(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    """Seconds on a 2-core CPU of one victim's run once its shadow kit exists (:func:`ddae_kit_cost`): the probes,
    KnockoffNets' purchase and the clone on ``budget`` restored answers.

    Returns:
        The estimate, in seconds.
    """
    return budget * SECONDS_PER_QUERY + epochs * budget * seconds_per_image_epoch + 3.0  # the budget pays the probes


def ddae_kit_cost(seconds_per_image_epoch: float, options: Mapping[str, Any]) -> tuple[str, float]:
    """Seconds on a 2-core CPU of the shadow kit, trained once per task, pool, seed and kit settings and reused by
    every victim's run.

    The kit: ``shadows`` classifiers, an EDM ensemble (``edm_members`` members, each step also an OOD batch) and a
    misinformation net per shadow, ``shadow_epochs`` each on the share (60,000 training images assumed, the MNIST-sized
    tasks'), Prediction Poisoning's proxy Jacobians on every shadow answer (about 2 ms each), then the
    meta-classifier and the restorers.

    Returns:
        The kit's identity among D-DAE runs (the options the kit is made from, defaults filled in) and the estimate.
    """
    share = float(options.get("share", DEFAULTS["share"]))
    shadows = int(options.get("shadows", DEFAULTS["shadows"]))
    epochs_s, members = (int(options.get(key, KIT_DEFAULTS[key])) for key in ("shadow_epochs", "edm_members"))
    answered = (int(options.get("probes", DEFAULTS["probes"])) + int(options.get("pool_images", KIT_DEFAULTS["pool_images"]))
                + share * 60_000)
    per_shadow = epochs_s * share * 60_000 * seconds_per_image_epoch * (2 + 1.6 * members) + 2e-3 * answered + 5.0
    settings = {key: options.get(key, default) for key, default in {**DEFAULTS, **KIT_DEFAULTS}.items()}
    settings |= {"defenses": _defenses(options), "shadow_arch": options.get("shadow_arch")}
    return json.dumps(settings, sort_keys=True, default=str), shadows * per_shadow + 30.0


@register_attack("ddae", forwards_to=DDAEDataModule, surrogate_pool=True, shares_purchase=True, cost=ddae_cost,
                 setup=ddae_kit_cost, check=check_ddae)
def ddae_job(
    victim: VictimConfig | RemoteVictimConfig,
    *,
    dataset: str = "fashionmnist",
    surrogate: str = "mnist",
    budget: int = 50_000,
    label_only: bool = False,
    arch: str = "lenet5",
    shadow_arch: str | None = None,
    optim: OptimConfig | None = None,
    max_epochs: int = 20,
    batch_size: int = 128,
    cache_dir: str = CACHE_DIR,
    root: str = "data",
    test_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> AttackJob:
    """D-DAE as a job: what ``python main.py fit --config configs/attack/ddae.yaml`` builds; from Python,
    ``ATTACKS.get("ddae").run(victim, budget=50_000, ...)``. ``options`` go to :class:`DDAEDataModule` (``share``,
    ``probes``, ``shadows``, ``defenses`` ...); the shadows have the clone's architecture unless ``shadow_arch`` says.

    Returns:
        The job (:class:`~edm_lightning.attacks.run.AttackJob`); nothing is built, trained or bought yet.
    """
    data_args = dict(victim=victim, dataset=dataset, surrogate=surrogate, budget=budget, label_only=label_only,
                     shadow_arch=shadow_arch or arch, root=root, batch_size=batch_size, test_size=test_size,
                     cache_dir=cache_dir, seed=seed, **options)
    module_args = dict(arch=arch, optim=optim or OptimConfig(name="adam", lr=1e-3, schedule="cosine"))
    return AttackJob(CloneModule, module_args, DDAEDataModule, data_args, max_epochs, seed)

