"""PRADA (Juuti, Szyller, Marchal and Asokan, EuroS&P 2019, "PRADA: Protecting against DNN Model Stealing Attacks").

Benign clients send natural images, whose distances to each other are spread roughly normally; an attacker who
synthesises queries a small step from earlier ones (JBDA and its kin) sends many tiny and a few large distances.
For each client PRADA keeps, per predicted class ``c``, a growing set ``G_c`` of that client's queries, and for
every new query ``x`` of class ``c`` (paper Algorithm 1):

    d_min = min_{y in G_c} ||x - y||_2                          appended to the client's distances D
    if d_min > T_c:  G_c += {x};  T_c = max(T_c, mean(D_Gc) - std(D_Gc))   (D_Gc: the d_min of G_c's members)

Every ``test_every`` queries it tests D, pooled over the classes with at least ``min_per_class`` distances and
without values more than ``outlier_std`` standard deviations from their mean, once it holds more than
``min_distances`` of them: the client is flagged when the Shapiro-Wilk statistic ``W(D) < delta`` (W near 1: normal).
Our one change: a flag is kept (the paper re-tests and may unflag): a defender blocks an account once.

Queries are compared as 8-bit images (``round(255 x)``), what an image is before it is a float: distances are then
sums of whole numbers, exact in float64 whatever the thread count, and a client's history is stored in a byte per
pixel. Distances are reported in pixel units of [0, 1] images.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from edm_lightning.errors import ConfigError

__all__ = ["ClientHistory", "Prada", "as_bytes"]


@dataclass(frozen=True)
class Prada:
    """PRADA's settings (paper Sec. IV; defaults as its code: test every 10 queries, over > 100 distances).

    Args:
        delta: flag a client when the Shapiro-Wilk statistic of its distances falls below this, in (0, 1). The paper
            sets it per dataset so that no benign client is flagged (0.95 for MNIST); the experiment runner measures
            the false-positive rate of the value you choose on benign streams.
        test_every: queries between two tests.
        min_distances: no test until more than this many distances are pooled.
        min_per_class: a class's distances join the test once it has this many.
        outlier_std: distances this many standard deviations from the mean are left out of a test.

    Raises:
        ConfigError: a setting out of its range.
    """

    delta: float = 0.95
    test_every: int = 10
    min_distances: int = 100
    min_per_class: int = 10
    outlier_std: float = 3.0

    def __post_init__(self) -> None:
        for name in ("delta", "outlier_std"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ConfigError(f"Prada: {name} must be a number, got {getattr(self, name)!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"Prada: delta (threshold on the Shapiro-Wilk W) must be in (0, 1), got {self.delta!r}")
        for name in ("test_every", "min_distances", "min_per_class"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Prada: {name} must be a whole number >= 1, got {value!r}")
        if self.min_distances < 3:
            raise ConfigError(f"Prada: min_distances must be >= 3 (the Shapiro-Wilk test needs 3), got {self.min_distances}")
        if not 0 < self.outlier_std < math.inf:
            raise ConfigError(f"Prada: outlier_std must be a finite number > 0, got {self.outlier_std!r}")


def as_bytes(x: Tensor) -> Tensor:
    """Images in [0, 1] as PRADA compares them: ``round(255 x)`` flattened, ``(N, C, H, W)`` -> uint8 ``(N, C*H*W)``."""
    return x.detach().reshape(len(x), -1).mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu()


@dataclass
class ClientHistory:
    """One client's PRADA state: its growing sets, distances and, once flagged, the query that flagged it.

    Everything in it follows from the client's queries and their classes in order (:meth:`observe` on the same
    rows rebuilds it exactly), which is how :class:`~edm_lightning.defense.detectors.DetectorStore` stores it.

    Attributes:
        queries: queries seen.
        flagged_at: the number of queries seen when the client was flagged (so queries ``flagged_at`` onwards, counted
            from 1, were answered as flagged); ``None`` while it is not.
        last_w: the last test's Shapiro-Wilk statistic (``None`` before the first test).
        min_w: the lowest statistic of this process's tests (``None`` before the first; not stored): how close an
            honest client came to ``delta``.
    """

    settings: Prada
    queries: int = 0
    flagged_at: int | None = None
    last_w: float | None = None
    min_w: float | None = None
    growing: dict[int, Tensor] = field(default_factory=dict)  # class -> uint8 (n, D) images of G_c
    growing_sums: dict[int, tuple[int, float, float]] = field(default_factory=dict)  # class -> count, sum, sum of squares
    threshold: dict[int, float] = field(default_factory=dict)  # class -> T_c (pixel units)
    row_class: list[int] = field(default_factory=list)  # every query's class, in order
    row_distance: list[float] = field(default_factory=list)  # every query's d_min (NaN: the first of its class)

    @property
    def flagged(self) -> bool:
        """Whether the client has been flagged."""
        return self.flagged_at is not None

    def observe(self, images: Tensor, classes: Tensor) -> tuple[Tensor, list[tuple[int, int, float, bool]]]:
        """Take a batch of this client's queries, in order, and say which were answered as flagged.

        Args:
            images: uint8 ``(N, D)`` queries as :func:`as_bytes` makes them.
            classes: int ``(N,)`` the class each was answered with (the victim's top-1).

        Returns:
            ``(flags, rows)``: bool ``(N,)``, True from the query that flagged the client on (all True once it is
            flagged); ``rows`` the new history rows ``(class, query index, d_min or NaN, joined its growing set)``
            for a store (none once flagged: a flagged client's queries no longer matter).

        Raises:
            ValueError: shapes or dtypes other than those above.
        """
        if images.dtype != torch.uint8 or images.ndim != 2 or classes.ndim != 1 or len(classes) != len(images):
            raise ValueError(f"observe takes uint8 images (N, D) and classes (N,), got {images.dtype} {tuple(images.shape)} "
                             f"and {tuple(classes.shape)}")
        n = len(images)
        flags = torch.zeros(n, dtype=torch.bool)
        if self.flagged:
            self.queries += n
            flags[:] = True
            return flags, []
        classes_list = [int(c) for c in classes]
        distances, grows = self._grow(images, classes_list)
        first = self.queries
        self.row_class.extend(classes_list)
        self.row_distance.extend(distances)
        all_classes, all_distances = np.asarray(self.row_class), np.asarray(self.row_distance, dtype=np.float64)
        kept = n
        for i in range(n):
            index = first + i  # the query's 0-based index in the client's stream: tested at 0, 10, 20, ...
            if index % self.settings.test_every == 0 and self._test(all_classes[:index + 1], all_distances[:index + 1]):
                self.flagged_at = index + 1
                flags[i:] = True
                kept = i + 1
                break
        del self.row_class[first + kept:], self.row_distance[first + kept:]  # a flagged client's later rows do not matter
        self.queries += n
        rows = [(classes_list[i], first + i, distances[i], grows[i]) for i in range(kept)]
        return flags, rows

    def replay(self, images: Tensor, classes: list[int], distances: list[float], grows: list[bool]) -> None:
        """Rebuild the growing sets from stored rows (the images of the rows that joined one, in order)."""
        members: dict[int, list[int]] = {}  # class -> positions in ``images`` of its growing set, in order
        for c, d, g in zip(classes, distances, grows):
            if g:
                self._join(c, 0.0 if math.isnan(d) else d, first=math.isnan(d))
                members.setdefault(c, []).append(sum(len(m) for m in members.values()))
        for c, positions in members.items():
            self.growing[c] = images[positions].clone()
        self.row_class.extend(classes)
        self.row_distance.extend(distances)

    def _grow(self, images: Tensor, classes: list[int]) -> tuple[list[float], list[bool]]:
        """Each row's ``d_min`` to its class's growing set as it stands when the row comes, and whether it joins."""
        distances, grows = [math.nan] * len(images), [False] * len(images)
        x = images.to(torch.float64)
        norms = x.square().sum(dim=1)
        for c in sorted(set(classes)):
            rows = [i for i, k in enumerate(classes) if k == c]
            xc, nc = x[rows], norms[rows]
            before = self.growing.get(c)
            if before is not None:  # distances to G_c as the batch found it: one exact matrix product
                g = before.to(torch.float64)
                old = (nc[:, None] + g.square().sum(dim=1)[None, :] - 2 * xc @ g.T).clamp_(min=0).amin(dim=1)
                old = old.sqrt().div_(255).tolist()
            else:
                old = [math.inf] * len(rows)
            within = (nc[:, None] + nc[None, :] - 2 * xc @ xc.T).clamp_(min=0).sqrt_().div_(255).numpy()
            joined: list[int] = []  # positions (in rows) that joined G_c in this batch
            for j, i in enumerate(rows):
                d = min([old[j], *within[j, joined]]) if joined else old[j]
                if math.isinf(d):  # the first query of its class: G_c = {x}
                    self._join(c, 0.0, first=True)
                    grows[i] = True
                    joined.append(j)
                    continue
                distances[i] = d
                if d > self.threshold[c]:
                    self._join(c, d, first=False)
                    grows[i] = True
                    joined.append(j)
            if joined:  # one copy per class and batch, not one per member
                added = images[[rows[j] for j in joined]]
                self.growing[c] = added.clone() if before is None else torch.cat([before, added])
        return distances, grows

    def _join(self, c: int, distance: float, first: bool) -> None:
        """Count one more member of ``G_c`` (its image is added by the caller) and move ``T_c`` (paper Algorithm 1;
        the first member's distance counts as 0).
        """
        count, total, squares = (0, 0.0, 0.0) if first else self.growing_sums[c]
        count, total, squares = count + 1, total + distance, squares + distance * distance
        self.growing_sums[c] = (count, total, squares)
        if first:
            self.threshold[c] = 0.0
            return
        mean = total / count
        std = math.sqrt(max(0.0, squares / count - mean * mean))
        self.threshold[c] = max(self.threshold[c], mean - std)

    def _test(self, classes: np.ndarray, distances: np.ndarray) -> bool:
        """Test the pooled distances of the queries so far (their classes and d_min, NaN for none).

        Returns:
            Whether they fail the Shapiro-Wilk test (``W < delta``), which flags the client.
        """
        settings = self.settings
        measured = ~np.isnan(distances)
        counts = np.bincount(classes[measured], minlength=int(classes.max()) + 1)
        pooled = distances[measured & (counts[classes] >= settings.min_per_class)]
        if len(pooled):
            pooled = pooled[np.abs(pooled - pooled.mean()) < settings.outlier_std * pooled.std()]
        if len(pooled) <= settings.min_distances:
            return False
        with warnings.catch_warnings():  # past 5,000 values scipy warns about its p-value; PRADA reads only W
            warnings.simplefilter("ignore", UserWarning)
            self.last_w = float(stats.shapiro(pooled).statistic)
        self.min_w = self.last_w if self.min_w is None else min(self.min_w, self.last_w)
        return self.last_w < settings.delta
