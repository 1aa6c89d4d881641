"""The class-balanced episodic replay buffer (works with any rule)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .streams import Task

# -- replay ---------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Class-balanced episodic memory of at most ``capacity`` samples of finished tasks.

    :meth:`add_task` re-balances it over every (task, class) group seen so far: group k of G
    gets capacity // G slots (+1 for the first capacity % G groups); old groups keep the first
    samples they stored, a new group draws its samples uniformly without replacement from the
    task's training split. :meth:`sample` draws without replacement (with, if asked for more
    than it holds)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.groups: list[tuple[int, int]] = []
        self.store: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._x: Optional[torch.Tensor] = None
        self._y: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self._y is None else len(self._y)

    def _shares(self, G: int) -> list[int]:
        return [self.capacity // G + (1 if k < self.capacity % G else 0) for k in range(G)]

    def add_task(self, task: Task, generator: torch.Generator) -> None:
        new = [(task.index, c) for c in task.classes]
        G = len(self.groups) + len(new)
        if not self.capacity or not G:
            return
        shares = self._shares(G)
        store = [(x[:n], y[:n]) for (x, y), n in zip(self.store, shares)]
        for (t, c), n in zip(new, shares[len(self.groups):]):
            idx = (task.train.y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=generator)[:n]]
            store.append((task.train.x[idx].clone(), task.train.y[idx].clone()))
        self.groups += new
        self.store = store
        self._rebuild()

    def _rebuild(self) -> None:
        kept = [(x, y) for x, y in self.store if len(y)]
        self._x = torch.cat([x for x, _ in kept]) if kept else None
        self._y = torch.cat([y for _, y in kept]) if kept else None

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._x is not None and self._y is not None
        N = len(self._y)
        idx = torch.randperm(N, generator=generator)[:n] if n <= N else torch.randint(N, (n,), generator=generator)
        return self._x[idx], self._y[idx]

    def counts(self) -> dict[str, int]:
        """Stored samples per group, as 'task:class' -> count."""
        return {f"{t}:{c}": len(y) for (t, c), (_, y) in zip(self.groups, self.store)}

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "groups": list(self.groups), "store": list(self.store)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.capacity = int(s["capacity"])
        self.groups = [tuple(g) for g in s["groups"]]  # type: ignore[misc]
        self.store = [(x, y) for x, y in s["store"]]
        self._rebuild()
