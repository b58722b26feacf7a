"""The attack registry: each attack declares, next to its job function, what a runner needs to know of it.

An attack is a ``*_job`` function (victim first, then keyword arguments, returning an
:class:`~edm_lightning.attacks.run.AttackJob`) decorated with :func:`register_attack`. The experiment
runner names no attack: it reads the entry for the config's ``name`` and asks it which arguments it
sets, whether it reads a surrogate pool, whether the budgets of one curve share one purchase, and how
long a run takes. Adding an attack is its module (with the decorator), its YAML and its test.

Example:
    >>> from edm_lightning.attacks import ATTACKS
    >>> entry = ATTACKS.get("knockoff")
    >>> entry.surrogate_pool, entry.shares_purchase, entry.queries_in_training
    (True, True, False)
    >>> ATTACKS.get("jbda_tr").fixed
    {'targeted': True}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edm_lightning.command_line import arguments_of, check_argument_values, default_of
from edm_lightning.errors import ConfigError
from edm_lightning.registry import Registry

__all__ = ["ATTACKS", "AVERAGING_OPTIONS", "CACHE_DIR", "SECONDS_PER_QUERY", "AttackEntry", "register_attack"]

#: Where an attack keeps what it bought (``cache_dir``) unless told otherwise: the default of every attack's DataModule
#: and ``*_job`` function (so of ``run_knockoff`` ...), and what ``configs/attack/*.yaml`` set, so that a victim's
#: queries bought from Python are not bought again by ``main.py`` (or the other way round).
CACHE_DIR = "runs/attack/cache"

#: Seconds one query costs on the 2-core CPU the estimates were measured on (the victim's answer, the save).
SECONDS_PER_QUERY = 5e-5

#: The options of an attack that sends each query as several perturbed copies and averages the answers
#: (EDM's adaptive attacker), with their types; an attack taking ``query_copies`` is measured as one.
AVERAGING_OPTIONS = (("query_copies", int), ("copy_noise", float), ("copy_shift", int))


def _nothing_to_check(budget: int, options: Mapping[str, Any]) -> None:
    return None


def _no_estimate(budget: int, epochs: int, seconds_per_image_epoch: float, options: Mapping[str, Any]) -> float:
    return budget * SECONDS_PER_QUERY


@dataclass(frozen=True)
class AttackEntry:
    """One registered attack: its job function and what a runner needs to know to plan, check and run it.

    Args:
        name: the name configs use (``AttackConfig.name``).
        job: the ``*_job`` function: ``job(victim, **arguments) -> AttackJob``.
        forwards_to: the class ``job`` hands its ``**options`` to (their names are options too), or ``None``.
        fixed: job arguments this entry always sets (``jbda_tr``: ``targeted=True``).
        epochs_argument: the job argument a runner's epoch count sets (``max_epochs``; JBDA: ``epochs_per_round``).
        surrogate_pool: the attack queries natural images of another dataset (its ``surrogate`` argument): a
            runner checks that dataset before the first stage and passes its own ``surrogate``.
        queries_in_training: the attack queries the victim inside its training loop (one process only: under
            DDP every process would spend the budget; the module refuses DDP, and the budgets of a curve never share
            a purchase: each stage keeps its own cache, which its re-run reads).
        shares_purchase: the budgets of one curve read prefixes of one purchase (a transfer set bought once):
            a runner gives them one shared cache and runs the smaller budget first.
        cost: ``(budget, epochs, seconds per training image and epoch of the clone's architecture, options) ->
            seconds`` on a 2-core CPU, what a runner's ETA starts from.
        setup: ``(seconds per training image and epoch, options) -> (identity, seconds)``: work done once and reused
            by every victim's run (D-DAE's shadow kit), left out of ``cost``; a runner's estimate counts it once per
            attack, surrogate, clone architecture, seed and identity (``None``: nothing is shared).
        check: ``(budget, options) -> None``, raising :class:`~edm_lightning.errors.ConfigError` for a setting the
            attack would refuse at that budget (the attack's own check, which a runner calls before its first stage).
    """

    name: str
    job: Callable[..., Any]
    forwards_to: type | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    epochs_argument: str = "max_epochs"
    surrogate_pool: bool = False
    queries_in_training: bool = False
    shares_purchase: bool = False
    cost: Callable[[int, int, float, Mapping[str, Any]], float] = _no_estimate
    setup: Callable[[float, Mapping[str, Any]], tuple[str, float]] | None = None
    check: Callable[[int, Mapping[str, Any]], Any] = _nothing_to_check

    def options(self) -> set[str]:
        """Every argument ``options`` may name: the job's own and those of ``forwards_to`` (the victim aside)."""
        forwarded = arguments_of(self.forwards_to) if self.forwards_to is not None else set()
        return (arguments_of(self.job) | forwarded) - {"victim"} - set(self.fixed)

    def default(self, option: str) -> Any:
        """The default of ``option``, from the job's signature or else from ``forwards_to``'s.

        Returns:
            The default value.

        Raises:
            ConfigError: neither declares ``option``.
        """
        for where in (self.job, self.forwards_to):
            if where is not None and option in arguments_of(where):
                return default_of(where, option)
        raise ConfigError(f"attack {self.name!r} takes no argument {option!r}")

    def averaging(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Query averaging as ``options`` set it, defaults filled in: ``query_copies`` (1: none), ``copy_noise``,
        ``copy_shift``; an attack without these arguments averages nothing.

        Returns:
            The three settings.
        """
        if "query_copies" not in self.options():
            return {"query_copies": 1, "copy_noise": 0.0, "copy_shift": 0}
        return {name: kind(options.get(name, self.default(name))) for name, kind in AVERAGING_OPTIONS}

    def check_options(self, options: Mapping[str, Any], set_by_runner: set[str], where: str) -> None:
        """Refuse options the attack does not take, that the runner sets itself, or of a type the job (or the class
        it forwards them to) does not accept.

        Raises:
            ConfigError: an unknown or runner-set option (the message lists those that can be set), or a value of the
                wrong type.
        """
        settable = self.options() - set_by_runner
        wrong = sorted(set(options) - settable)
        if wrong:
            raise ConfigError(f"{where}: options {wrong} are not arguments it takes, or are set by the experiment; it "
                              f"takes: {', '.join(sorted(settable))}")
        own = arguments_of(self.job)
        check_argument_values(self.job, {k: v for k, v in options.items() if k in own}, f"{where}: options")
        if self.forwards_to is not None:
            forwarded = {k: v for k, v in options.items() if k not in own}
            check_argument_values(self.forwards_to, forwarded, f"{where}: options")

    def runner_arguments(self, epochs: int, surrogate: str, cache_dir: str) -> dict[str, Any]:
        """What a runner sets: the epochs (as ``epochs_argument``), the cache folder, and the surrogate for a pool attack.

        Returns:
            Keyword arguments of ``job``.
        """
        arguments: dict[str, Any] = {self.epochs_argument: epochs, "cache_dir": cache_dir}
        if self.surrogate_pool:
            arguments["surrogate"] = surrogate
        return arguments

    def build(self, victim: Any, **arguments: Any) -> Any:
        """The attack's job against ``victim`` (nothing is built or bought yet).

        Returns:
            The :class:`~edm_lightning.attacks.run.AttackJob`.
        """
        return self.job(victim, **self.fixed, **arguments)

    def run(self, victim: Any, *, trainer: dict[str, Any] | None = None, **arguments: Any) -> dict[str, Any]:
        """The attack end to end from Python (what ``run_knockoff`` ... do for theirs): fit, test, the figures.

        Args:
            victim: the victim to steal from (a ``VictimConfig``, a ``RemoteVictimConfig`` or a built victim).
            trainer: Trainer arguments (``accelerator``, ``devices``, ``precision``, ``logger``, ...).
            arguments: the job function's arguments (``budget``, ``surrogate``, ...).

        Returns:
            The figures of :func:`~edm_lightning.attacks.run_attack` plus the attack's own.
        """
        return self.build(victim, **arguments).run(trainer)


#: Every attack by the name configs use; filled by :func:`register_attack` next to each attack.
ATTACKS: Registry[AttackEntry] = Registry("attack")


def register_attack(name: str, **declared: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a ``*_job`` function as attack ``name`` (``declared``: :class:`AttackEntry`'s fields).

    Several decorators on one function register variants (``jbda`` and ``jbda_tr``, by ``fixed``).

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def add(job: Callable[..., Any]) -> Callable[..., Any]:
        ATTACKS.register(name)(AttackEntry(name, job, **declared))
        return job

    return add
