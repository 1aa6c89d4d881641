"""Task streams: class-incremental, permuted (domain-incremental) and label-sorted (see the package docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data import Dataset, Split
from ..errors import LocosnnError
from .settings import ContinualConfig

# -- streams --------------------------------------------------------------------------------------------
class PermutedFeatures:
    """Tensor-like view of ``base`` (N, ...) whose flattened features are permuted by ``perm``:
    indexing returns a permuted tensor (computed on access, so a permuted stream stores no
    copies); ``tensor()`` materialises the whole array."""

    def __init__(self, base: torch.Tensor, perm: torch.Tensor) -> None:
        self.base, self.perm = base, perm

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        rows = self.base[idx]
        if rows.dim() == self.base.dim():
            if not rows.shape[0]:
                return rows
            return rows.reshape(rows.shape[0], -1)[:, self.perm].reshape(rows.shape)
        return rows.reshape(-1)[self.perm].reshape(rows.shape)

    def tensor(self) -> torch.Tensor:
        return self[:]


@dataclass
class Task:
    """One task of a stream: its splits, its classes (the labels that occur in it) and, for
    permuted streams, the feature permutation. ``shuffle=False``: its training split is passed
    in stored order (label-sorted streams)."""

    index: int
    name: str
    classes: list[int]
    train: Split
    val: Split
    test: Split
    permutation: Optional[torch.Tensor] = None
    shuffle: bool = True

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "classes": list(self.classes), "n_train": len(self.train),
                "n_val": len(self.val), "n_test": len(self.test), "permuted": self.permutation is not None,
                "shuffle": self.shuffle}


def _subset(split: Split, classes: Sequence[int]) -> Split:
    keep = torch.isin(split.y, torch.as_tensor(list(classes), dtype=split.y.dtype))
    idx = keep.nonzero().flatten()
    return Split(split.x[idx], split.y[idx])


def _class_names(classes: Sequence[int]) -> str:
    return ",".join(str(c) for c in classes)


def class_incremental(data: Dataset, n_tasks: int = 5, classes_per_task: Optional[int] = None,
                      order: Optional[Sequence[int]] = None, seed: Optional[int] = None) -> list[Task]:
    """Class-incremental stream: ``n_tasks`` disjoint class groups covering every class.

    order: the class order (a permutation of 0..C-1); None = 0..C-1, or a permutation drawn
    from ``seed`` when a seed is given. classes_per_task: default C // n_tasks; n_tasks x
    classes_per_task must equal C."""
    C = data.n_classes
    if n_tasks < 1:
        raise LocosnnError(f"n_tasks must be >= 1, got {n_tasks}")
    if order is None:
        order = list(range(C)) if seed is None else [int(c) for c in np.random.default_rng(
            [abs(int(seed)), 17]).permutation(C)]
    else:
        order = [int(c) for c in order]
        if sorted(order) != list(range(C)):
            raise LocosnnError(f"class order {order} must list each of the {C} classes of {data.name!r} once")
    if classes_per_task is None:
        if C % n_tasks:
            divisors = [d for d in range(1, C + 1) if C % d == 0]
            raise LocosnnError(f"class stream: {n_tasks} tasks do not divide the {C} classes of {data.name!r}; "
                               f"choose n_tasks in {divisors}")
        classes_per_task = C // n_tasks
    if n_tasks * classes_per_task != C:
        raise LocosnnError(f"class stream: {n_tasks} tasks x {classes_per_task} classes != the {C} classes of "
                           f"{data.name!r}; the tasks must cover every class exactly once")
    tasks = []
    for t in range(n_tasks):
        cls = sorted(order[t * classes_per_task:(t + 1) * classes_per_task])
        task = Task(t, f"task{t + 1}:classes {_class_names(cls)}", cls, _subset(data.train, cls),
                    _subset(data.val, cls), _subset(data.test, cls))
        if not len(task.train):
            raise LocosnnError(f"class stream: task {t + 1} (classes {_class_names(cls)}) has no training samples "
                               f"in {data.name!r} (--limit too small?)")
        tasks.append(task)
    return tasks


def task_permutation(n_features: int, seed: int, t: int) -> torch.Tensor:
    """The fixed feature permutation of task ``t >= 1`` of a permuted stream with this seed."""
    rng = np.random.default_rng([abs(int(seed)), int(t), 7919])
    return torch.from_numpy(rng.permutation(n_features)).long()


def permuted(data: Dataset, n_tasks: int = 5, seed: int = 0) -> list[Task]:
    """Domain-incremental permuted stream: task 0 = the data as is (identity), task t >= 1 =
    a fixed permutation of the flattened input features drawn from (seed, t), applied to
    train, val and test alike. Every task has every class."""
    if n_tasks < 1:
        raise LocosnnError(f"n_tasks must be >= 1, got {n_tasks}")
    d = math.prod(data.shape)
    classes = list(range(data.n_classes))
    tasks = []
    for t in range(n_tasks):
        if t == 0:
            tasks.append(Task(0, "task1:identity", classes, data.train, data.val, data.test, None))
            continue
        perm = task_permutation(d, seed, t)
        view = lambda s: Split(PermutedFeatures(s.x, perm), s.y)  # noqa: E731
        tasks.append(Task(t, f"task{t + 1}:permutation {t}", classes, view(data.train), view(data.val),
                          view(data.test), perm))
    return tasks


def label_sorted(data: Dataset, n_tasks: int = 1) -> list[Task]:
    """The LOCO authors' stream: the training set sorted by label (stable) and cut into
    ``n_tasks`` consecutive equal chunks, each passed in that order (``shuffle=False``); a
    chunk's classes are the labels in it, its val/test splits the samples of those classes."""
    n = len(data.train)
    if n_tasks < 1:
        raise LocosnnError(f"n_tasks must be >= 1, got {n_tasks}")
    if n_tasks > n:
        raise LocosnnError(f"label_sorted stream: {n_tasks} tasks but only {n} training samples")
    order = torch.argsort(data.train.y, stable=True)
    tasks = []
    for t, idx in enumerate(torch.tensor_split(order, n_tasks)):
        y = data.train.y[idx]
        cls = sorted(int(c) for c in torch.unique(y))
        tasks.append(Task(t, f"task{t + 1}:sorted chunk, classes {_class_names(cls)}", cls,
                          Split(data.train.x[idx], y), _subset(data.val, cls), _subset(data.test, cls),
                          None, shuffle=False))
    return tasks


def build_stream(data: Dataset, ccfg: ContinualConfig, seed: int) -> list[Task]:
    if ccfg.stream == "class":
        order = ccfg.class_order
        if isinstance(order, str):
            return class_incremental(data, ccfg.n_tasks, ccfg.classes_per_task, None, seed)
        return class_incremental(data, ccfg.n_tasks, ccfg.classes_per_task, order, None)
    if ccfg.classes_per_task is not None:
        raise LocosnnError(f"classes_per_task only applies to the class stream, not {ccfg.stream!r}")
    if ccfg.stream == "permuted":
        return permuted(data, ccfg.n_tasks, seed)
    return label_sorted(data, ccfg.n_tasks)
