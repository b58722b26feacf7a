"""A victim watched per client by PRADA, which misinforms or refuses a client once it is flagged."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from edm_lightning.defense.detectors.prada import ClientHistory, Prada, as_bytes
from edm_lightning.defense.detectors.store import DetectorStore
from edm_lightning.errors import ConfigError, UserError

__all__ = ["ClientRefused", "ClientWatch", "DetectorConfig", "MonitoredVictim", "misinform", "open_store"]


@dataclass
class DetectorConfig:
    """PRADA beside a victim (:class:`~edm_lightning.defense.detectors.prada.Prada` for the detector's settings).

    Args:
        delta: flag a client when the Shapiro-Wilk W of its query distances falls below this, in (0, 1).
        response: what a flagged client gets: ``misinform`` (every answer's classes rotated by a shift drawn from a
            keyed hash of its image: confident, consistent and wrong, :func:`misinform`) or ``refuse`` (no answer:
            :class:`ClientRefused`; the prediction API's 403).
        state: the SQLite file of the clients' histories (:class:`~edm_lightning.defense.detectors.DetectorStore`);
            ``None``: the attack's own cache folder chooses one (the experiment runner's case).
        test_every: queries between two tests.
        min_distances: no test until more than this many distances are pooled.
        min_per_class: a class's distances join the test once it has this many.
        outlier_std: distances this many standard deviations from the mean are left out of a test.
    """

    delta: float = 0.95
    response: Literal["misinform", "refuse"] = "misinform"
    state: str | None = None
    test_every: int = 10
    min_distances: int = 100
    min_per_class: int = 10
    outlier_std: float = 3.0

    def __post_init__(self) -> None:
        if self.response not in ("misinform", "refuse"):
            raise ConfigError(f"detector response must be 'misinform' or 'refuse', got {self.response!r}")
        self.prada()  # settings out of range fail here, when the config is read

    def prada(self) -> Prada:
        """The detector's settings."""
        return Prada(self.delta, self.test_every, self.min_distances, self.min_per_class, self.outlier_std)

    def identity(self) -> dict:
        """What decides the answers (everything but where the histories are kept)."""
        return {k: v for k, v in asdict(self).items() if k != "state"}


class ClientRefused(UserError, RuntimeError):
    """The defender flagged this client and answers it no more (PRADA with ``response: refuse``): the prediction API
    answers 403; an attack run in-process ends with this message (its batch stays charged).

    Attributes:
        answers: the answers to the batch's rows before the flag, ``(k, num_classes)``.
    """

    def __init__(self, message: str, answers: Tensor):
        super().__init__(message)
        self.answers = answers


def misinform(probs: Tensor, images: Tensor, key: bytes) -> Tensor:
    """``probs`` ``(N, K)`` with each row's classes rotated by a shift in [1, K) drawn from a keyed hash of its image:
    every answer keeps its confidence and names a wrong class, the same one each time the same image is sent, so the
    answers look like a model's, not like noise, and no one shift undoes them all (a client that re-sends an image it
    was told the truth about learns only that it was flagged).

    Args:
        probs: the victim's answers ``(N, K)``.
        images: the queries as :func:`~edm_lightning.defense.detectors.prada.as_bytes` makes them, uint8 ``(N, D)``.
        key: the defender's secret (:attr:`DetectorStore.key`); without it the shifts cannot be computed.

    Returns:
        ``(N, K)`` probabilities.
    """
    k = probs.shape[1]
    shifts = [1 + int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), key=key, digest_size=8).digest(), "big") % (k - 1)
              for row in images]
    index = (torch.arange(k)[None, :] - torch.tensor(shifts)[:, None]) % k
    return probs.gather(1, index.to(probs.device))


class ClientWatch:
    """PRADA over every client of one victim: each client's history (read from the store on its first query) and what
    a flagged client gets (``config.response``). The prediction API keeps one; :class:`MonitoredVictim` one per attack.

    Each batch's rows are committed to the store before its answers are returned, so a killed run or a restarted
    server resumes every client's history where it stood (and a flagged client stays flagged). Not thread-safe:
    callers answer one batch at a time (the API holds its model lock).

    Args:
        config: the detector.
        store: the clients' histories.
    """

    def __init__(self, config: DetectorConfig, store: DetectorStore):
        self.config, self.store = config, store
        self._histories: dict[str, ClientHistory] = {}

    def history(self, client: str) -> ClientHistory:
        """``client``'s history (read from the store the first time)."""
        if client not in self._histories:
            self._histories[client] = self.store.load(client)
        return self._histories[client]

    def refused(self, client: str) -> bool:
        """Whether ``client`` is flagged and the response is to refuse it (nothing more to answer or count)."""
        return self.config.response == "refuse" and self.history(client).flagged

    def respond(self, client: str, x: Tensor, answers: Tensor) -> Tensor:
        """What ``client`` gets for queries ``x`` ``(N, C, H, W)`` that the victim answered with ``answers`` ``(N, K)``.

        Returns:
            ``answers`` up to the query that flagged the client, misinformation (:func:`misinform`) from it on.

        Raises:
            ClientRefused: the client is flagged and ``response`` is ``refuse``.
        """
        history = self.history(client)
        images = as_bytes(x)
        try:
            flags, rows = history.observe(images, answers.argmax(dim=1).cpu())
            self.store.save(client, history, rows, images)
        except BaseException:  # the batch is in memory but maybe not on disk: read the client back from the store
            self._histories.pop(client, None)
            raise
        if not flags.any():
            return answers
        if self.config.response == "refuse":
            first = int(flags.nonzero()[0])
            raise ClientRefused(f"the defender flagged this client after {history.flagged_at} queries (PRADA: its "
                                f"queries' distances have Shapiro-Wilk W {history.last_w:.3f} < delta "
                                f"{self.config.delta}) and answers it no more", answers[:first])
        answers = answers.clone()
        answers[flags.to(answers.device)] = misinform(answers[flags.to(answers.device)], images[flags], self.store.key)
        return answers


class MonitoredVictim(nn.Module):
    """A victim that one client queries, watched by PRADA (:class:`ClientWatch`): the victim's answers until the
    client is flagged, then misinformation or refusal.

    Args:
        victim: what answers (a :class:`~edm_lightning.defense.Victim`).
        config: the detector.
        store: the clients' histories.
        client: the name the client's history is kept under.
    """

    def __init__(self, victim: nn.Module, config: DetectorConfig, store: DetectorStore, client: str):
        super().__init__()
        self.victim, self.client = victim, client
        self.watch = ClientWatch(config, store)
        self.input_shape, self.num_classes = victim.input_shape, victim.num_classes
        self.name = getattr(victim, "name", None)

    @property
    def history(self) -> ClientHistory:
        """The client's history."""
        return self.watch.history(self.client)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Answers to ``x`` ``(N, C, H, W)`` in [0, 1] (:meth:`ClientWatch.respond`).

        Returns:
            Probabilities ``(N, num_classes)``: the victim's, misinformation from the flagging query on.

        Raises:
            ValueError: the victim refused the queries (nothing seen or stored).
            ClientRefused: the client is flagged and ``response`` is ``refuse``.
        """
        return self.watch.respond(self.client, x, self.victim(x))

    def figures(self) -> dict:
        """``flagged_at`` (queries seen when the client was flagged, ``None``: never) and ``detector_queries``."""
        return {"flagged_at": self.history.flagged_at, "detector_queries": self.history.queries}


def open_store(config: DetectorConfig, default: Path) -> DetectorStore:
    """The store ``config.state`` names, or ``default``."""
    return DetectorStore(config.state or default, config.prada())
