"""How KnockoffNets picks the next surrogate images to query (paper Sec. 4.1): random, or a gradient bandit.

* :class:`RandomSampler`: uniform draws without replacement (cycling only when the budget exceeds the surrogate).
* :class:`BanditSampler`: the adaptive strategy, a gradient bandit over the surrogate's classes (Sutton & Barto
  2.8) whose rewards are the answers' certainty, diversity and the online clone's loss (paper Eq. 2-4).

Both resume from their ``state_dict``, which the transfer set keeps after every query batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from edm_lightning.models.clone import clone_loss

__all__ = ["BanditSampler", "RandomSampler", "Sampler"]


class Sampler(Protocol):
    """How KnockoffNets picks the next surrogate images to query; resumable from its ``state_dict``."""

    def draw(self, start: int, count: int) -> Tensor:
        """Surrogate indices ``(count,)`` of the transfer set's items ``start .. start + count - 1``."""
        ...

    def update(self, x: Tensor, answers: Tensor) -> None:
        """Learn from the victim's ``answers`` ``(n, K)`` to the queried images ``x`` ``(n, C, H, W)``: the first ``n``
        items of the last :meth:`draw` (all of them, unless the victim failed part-way through the batch).
        """
        ...

    def state_dict(self) -> dict | None:
        """What a resumed run needs to continue the same draws (``None``: nothing)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved :meth:`state_dict`.

        Raises:
            ValueError: ``state`` is not one this sampler saved (it is read back from a file).
        """
        ...


class RandomSampler:
    """Uniform draws without replacement; position ``i`` of the order depends only on ``seed`` and ``i``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, Tensor] = {}

    def draw(self, start: int, count: int) -> Tensor:
        """See :meth:`Sampler.draw`."""
        positions = torch.arange(start, start + count)
        return torch.stack([self._perm(int(p) // self.n)[int(p) % self.n] for p in positions]) if count else positions

    def _perm(self, cycle: int) -> Tensor:
        if cycle not in self._perms:
            self._perms[cycle] = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + cycle))
        return self._perms[cycle]

    def update(self, x: Tensor, answers: Tensor) -> None:
        """See :meth:`Sampler.update`."""
        pass

    def state_dict(self) -> None:
        """See :meth:`Sampler.state_dict`."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """See :meth:`Sampler.load_state_dict`."""
        pass


class BanditSampler:
    """KnockoffNets' adaptive strategy: a gradient bandit over surrogate classes (paper Sec. 4.1.2).

    Queries are drawn a batch at a time from the current policy; the policy then takes one
    gradient-bandit step per query, in order, with step size ``1 / N(z)`` (the arm's pull count),
    as in the paper's Algorithm 1. The loss reward uses the online clone's prediction *before* it is
    trained on the batch, i.e. how much the answer would still teach it.
    """

    #: What :meth:`state_dict` saves besides the policy, its optimiser and the random generator.
    _STATE = ("h", "pulls", "seen", "mean_reward", "reward_mean", "reward_var", "mean_answer", "cursor", "orders")

    def __init__(self, labels: Tensor, num_classes: int, policy: torch.nn.Module, lr: float, reward: str,
                 window: int, seed: int):
        self.classes = torch.unique(labels)
        self.members = [(labels == c).nonzero(as_tuple=True)[0] for c in self.classes]
        self.policy, self.reward, self.window = policy, reward, window
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        arms = len(self.classes)
        self.h = torch.zeros(arms, dtype=torch.float64)
        self.pulls = torch.zeros(arms, dtype=torch.float64)
        self.seen = 0
        self.mean_reward = 0.0
        self.reward_mean = torch.zeros(3, dtype=torch.float64)
        self.reward_var = torch.zeros(3, dtype=torch.float64)
        self.mean_answer = torch.zeros(num_classes, dtype=torch.float64)
        self.cursor = torch.zeros(arms, dtype=torch.long)
        self.orders = [m[torch.randperm(len(m), generator=self.generator)] for m in self.members]
        self._arms: Tensor | None = None

    def draw(self, start: int, count: int) -> Tensor:
        """See :meth:`Sampler.draw`."""
        pi = self.h.softmax(dim=0)
        self._arms = torch.multinomial(pi, count, replacement=True, generator=self.generator)
        chosen = []
        for arm in self._arms.tolist():
            order = self.orders[arm]
            chosen.append(order[self.cursor[arm] % len(order)])
            self.cursor[arm] += 1
        return torch.stack(chosen)

    def update(self, x: Tensor, answers: Tensor) -> None:
        """See :meth:`Sampler.update`."""
        self.policy.eval()
        with torch.no_grad():
            log_probs = self.policy(x).log_softmax(dim=-1)
        self.policy.train()
        self.optimizer.zero_grad()
        clone_loss(self.policy(x), answers).backward()
        self.optimizer.step()
        y = answers.double()
        top2 = y.topk(2, dim=-1).values
        certainty = (top2[:, 0] - top2[:, 1]).tolist()
        loss = (-(y * log_probs.double()).sum(dim=-1)).tolist()
        for i, arm in enumerate(self._arms[: len(x)].tolist()):  # a batch answered in part: its first items
            self.seen += 1
            self.mean_answer += (y[i] - self.mean_answer) / min(self.seen, self.window)
            diversity = float((y[i] - self.mean_answer).clamp(min=0).sum())
            reward = self._combine(torch.tensor([certainty[i], diversity, loss[i]], dtype=torch.float64))
            self.mean_reward += (reward - self.mean_reward) / self.seen
            self.pulls[arm] += 1
            pi = self.h.softmax(dim=0)
            step = (reward - self.mean_reward) / self.pulls[arm]
            self.h -= step * pi
            self.h[arm] += step

    def _combine(self, rewards: Tensor) -> float:
        if self.reward != "all":
            return float(rewards[("cert", "div", "loss").index(self.reward)])
        n = self.seen
        self.reward_mean += (rewards - self.reward_mean) / n
        self.reward_var += ((rewards - self.reward_mean) ** 2 - self.reward_var) / n
        if n == 1:
            return float(rewards.clamp(0, 1).mean())
        return float(((rewards - self.reward_mean) / self.reward_var.sqrt().clamp(min=1e-12)).mean())

    def state_dict(self) -> dict:
        """See :meth:`Sampler.state_dict`."""
        state = {key: getattr(self, key) for key in self._STATE}
        state.update(policy=self.policy.state_dict(), optimizer=self.optimizer.state_dict(),
                     generator=self.generator.get_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        """See :meth:`Sampler.load_state_dict`."""
        expected = {*self._STATE, "policy", "optimizer", "generator"}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"an adaptive sampler's state holds {', '.join(sorted(expected))}; got {keys}")
        for key in ("h", "pulls", "reward_mean", "reward_var", "mean_answer", "cursor"):
            mine = getattr(self, key)
            if not isinstance(state[key], Tensor) or state[key].shape != mine.shape or state[key].dtype != mine.dtype:
                raise ValueError(f"its {key!r} is not a {mine.dtype} tensor of shape {tuple(mine.shape)}")
        for key, value in state.items():
            if key == "policy":
                self.policy.load_state_dict(value)
            elif key == "optimizer":
                self.optimizer.load_state_dict(value)
            elif key == "generator":
                self.generator.set_state(value)
            else:
                setattr(self, key, value)
