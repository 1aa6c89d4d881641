"""Continual learning: task streams, the accuracy matrix and its metrics, and ``locosnn continual``.

One network, one rule instance and one optimiser learn a stream of tasks in
order (rule state such as LOCO's cluster memory or OWM's projectors carries
over task boundaries, as it must). After each task the network is evaluated on
the test split of *every* task of the stream, which fills one row of the
accuracy matrix R[i][j] = accuracy on task j after training task i.

Streams (built from any loaded :class:`~locosnn.data.Dataset`)
---------------------------------------------------------------
* ``class`` (alias ``split``; class-incremental): the classes are cut into
  ``n_tasks`` disjoint groups of ``classes_per_task`` that together cover every
  class (Fashion-MNIST: 5 tasks of 2 classes, {0,1}, {2,3}, ...). The order is
  0..C-1 unless ``class_order`` is a list, or ``"seeded"`` (a permutation drawn
  from the run seed). Each task's train / val / test splits hold only its classes.
* ``permuted`` (domain-incremental): every task has all classes; task t applies
  a fixed permutation of the input features (pixels) to train, val and test
  alike. **Task 0 is the identity** (the unpermuted data, the usual
  permuted-MNIST convention); tasks 1.. use permutations drawn from
  ``(seed, t)``, so they are fixed by the seed and differ across tasks and seeds.
  The permutation is applied on the fly (:class:`PermutedFeatures`): a stream
  of 10 permuted copies of a 60k-image set holds no copies in memory.
* ``label_sorted``: the stream the LOCO authors' code trains on. The training
  set is sorted by label (stable sort) and cut into ``n_tasks`` consecutive,
  equal-size chunks, each passed **in that order, without shuffling** (with
  ``epochs = 1``, one pass over the sorted set, as the authors do). A chunk's
  classes are the labels it contains (a class may straddle two chunks when
  n_tasks does not divide the classes); its val / test splits are the samples
  of those classes.

Evaluation modes
----------------
* ``task-agnostic``: the prediction is the argmax over all outputs (the
  network must also tell the tasks apart: the hard class-incremental setting).
* ``task-aware``: the task identity is given at test time; logits of classes
  outside the task's class list are masked out before the argmax (multi-head
  evaluation on a single head).
For ``permuted`` streams every task has every class, so both modes coincide.

Metrics (pure functions of R; T = number of rows = tasks trained)
------------------------------------------------------------------
* ``ACC`` (average accuracy) = mean_j R[T-1][j], after the last task;
* ``BWT`` (backward transfer, Lopez-Paz & Ranzato 2017) =
  mean_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgetting;
* ``forgetting`` (Chaudhry et al. 2018, RWalk) = mean_{j<T-1} f_j with
  f_j = max_{i<T-1} R[i][j] - R[T-1][j] (the max runs over every earlier row,
  as in the paper; rows before task j is trained are ~chance and rarely the max);
* ``forgetting_per_task`` = [f_0, ..., f_{T-2}];
* ``last_task_acc`` = R[T-1][T-1];  ``LA`` (learning accuracy) = mean_j R[j][j].
BWT and forgetting are NaN for a single task. Extra columns (tasks not trained
yet) are ignored: the metrics use the leading T x T block.

Replay (``replay`` = buffer size in samples, 0 = off; works with any rule)
---------------------------------------------------------------------------
A class-balanced episodic memory (:class:`ReplayBuffer`). At the end of each
task it is re-balanced over every (task, class) group seen so far: each group
gets an equal share of ``replay`` slots (old groups keep the first samples
they stored, a new group's samples are drawn uniformly without replacement from
its task's training split). While training a later task, every mini-batch of
new samples is concatenated with ``replay_batch`` (default: ``batch_size``)
samples drawn uniformly without replacement from the buffer, and the rule sees
the mixed batch like any other (its ``.grad`` is for the mixed batch). The
buffer only ever holds samples of *finished* tasks.

Run directory (``out``), written atomically after every task
--------------------------------------------------------------
  config.json     settings (TrainConfig fields + continual fields), git SHA, versions, machine, dataset, tasks
  matrix.json     R per evaluation mode, the metrics per mode, the tasks and a per-task training history
  results.csv     tidy: one row per (after_task, eval_task, mode) with acc (pandas.read_csv)
  checkpoint.pt   network, optimiser, rule state, replay buffer, RNG states, R, tasks done
``resume=True`` continues exactly after the last finished task (bit-identical
to an uninterrupted run); work done on an unfinished task is discarded. A
non-finite loss or update raises :class:`~locosnn.errors.NonFiniteError` and
keeps the last checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, save_checkpoint
from .config import DTYPES, TrainConfig, load_config_file, resolve_device
from .data import Dataset, Split, batches, load_dataset
from .encoding import encode
from .errors import LocosnnError, NonFiniteError, interrupt_exit_code
from .network import SpikingNetwork
from .provenance import git_sha, machine, peak_rss_mb, versions
from .rules import LearningRule, make_rule
from .train import build_network, build_optimizer, check_compatible, check_finite, check_weights_finite, to_net

STREAMS = ("class", "permuted", "label_sorted")
STREAM_ALIASES = {"split": "class", "class-incremental": "class", "class_incremental": "class",
                  "label-sorted": "label_sorted", "labelsorted": "label_sorted", "domain": "permuted"}
AWARE, AGNOSTIC = "task-aware", "task-agnostic"
EVAL_CHOICES = {"both": (AWARE, AGNOSTIC), "aware": (AWARE,), "agnostic": (AGNOSTIC,),
                AWARE: (AWARE,), AGNOSTIC: (AGNOSTIC,)}


# -- settings -----------------------------------------------------------------------------------------
@dataclass
class ContinualConfig:
    """The continual-learning settings on top of :class:`~locosnn.config.TrainConfig`
    (whose ``epochs`` are epochs *per task*)."""

    stream: str = "class"
    n_tasks: int = 5
    classes_per_task: Optional[int] = None  # class stream: default n_classes // n_tasks
    class_order: Any = None  # class stream: None (0..C-1), "seeded" (permuted by the seed) or a list of classes
    replay: int = 0  # replay buffer size in samples (0 = off)
    replay_batch: Optional[int] = None  # replayed samples mixed into each batch (default: batch_size)
    eval: str = "both"  # "agnostic" | "aware" | "both"

    def validate(self) -> "ContinualConfig":
        s = str(self.stream).strip().lower()
        s = STREAM_ALIASES.get(s, s)
        if s not in STREAMS:
            raise LocosnnError(f"unknown stream {self.stream!r}; choose one of {', '.join(STREAMS)} "
                               "(or 'split' = class)")
        self.stream = s
        if isinstance(self.n_tasks, bool) or not isinstance(self.n_tasks, int) or self.n_tasks < 1:
            raise LocosnnError(f"n_tasks must be an integer >= 1, got {self.n_tasks!r}")
        cpt = self.classes_per_task
        if cpt is not None and (isinstance(cpt, bool) or not isinstance(cpt, int) or cpt < 1):
            raise LocosnnError(f"classes_per_task must be an integer >= 1, got {self.classes_per_task!r}")
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or self.replay < 0:
            raise LocosnnError(f"replay (buffer size in samples) must be an integer >= 0, got {self.replay!r}")
        if self.replay_batch is not None and (not isinstance(self.replay_batch, int) or self.replay_batch < 1):
            raise LocosnnError(f"replay_batch must be an integer >= 1, got {self.replay_batch!r}")
        if str(self.eval) not in EVAL_CHOICES:
            raise LocosnnError(f"unknown eval mode {self.eval!r}; choose agnostic, aware or both")
        if isinstance(self.class_order, str) and self.class_order not in ("seeded", "random"):
            raise LocosnnError(f"class_order must be a list of classes or 'seeded', got {self.class_order!r}")
        if self.class_order is not None and not isinstance(self.class_order, str):
            try:
                self.class_order = [int(c) for c in self.class_order]
            except (TypeError, ValueError):
                raise LocosnnError(f"class_order must be a list of classes or 'seeded', got {self.class_order!r}") from None
        if self.class_order is not None and self.stream != "class":
            raise LocosnnError(f"class_order only applies to the class stream, not {self.stream!r}")
        return self

    @property
    def modes(self) -> tuple[str, ...]:
        return EVAL_CHOICES[str(self.eval)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONTINUAL_KEYS = tuple(f.name for f in dataclasses.fields(ContinualConfig))
DEFAULT_EPOCHS_PER_TASK = 1


def split_settings(settings: dict[str, Any]) -> tuple[TrainConfig, ContinualConfig]:
    """Settings dict (TrainConfig fields + continual fields; dashes read as underscores) ->
    validated (TrainConfig, ContinualConfig). ``epochs`` (per task) defaults to 1 here."""
    s = {str(k).replace("-", "_"): v for k, v in dict(settings).items()}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(s) - train_keys - set(CONTINUAL_KEYS))
    if unknown:
        raise LocosnnError(f"unknown continual setting(s): {', '.join(unknown)}; continual settings: "
                           f"{', '.join(CONTINUAL_KEYS)} plus the train settings {', '.join(sorted(train_keys))}")
    tr = {k: v for k, v in s.items() if k in train_keys}
    tr.setdefault("epochs", DEFAULT_EPOCHS_PER_TASK)
    ccfg = ContinualConfig(**{k: v for k, v in s.items() if k in CONTINUAL_KEYS}).validate()
    return TrainConfig.from_dict(tr).validate(), ccfg


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


# -- evaluation ----------------------------------------------------------------------------------------
def task_aware_predictions(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """argmax over the task's classes only (the other logits masked to -inf)."""
    allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    allowed[torch.as_tensor(list(classes), dtype=torch.long)] = True
    return logits.masked_fill(~allowed, float("-inf")).argmax(1)


def predictions(logits: torch.Tensor, classes: Sequence[int], mode: str) -> torch.Tensor:
    if mode == AWARE:
        return task_aware_predictions(logits, classes)
    if mode == AGNOSTIC:
        return logits.argmax(1)
    raise LocosnnError(f"unknown evaluation mode {mode!r}; choose {AWARE} or {AGNOSTIC}")


@torch.no_grad()
def evaluate_task(net: SpikingNetwork, task: Task, cfg: TrainConfig, modes: Sequence[str] = (AWARE, AGNOSTIC),
                  split: str = "test", batch_size: int = 1000) -> dict[str, float]:
    """Accuracy on one task's split in each mode; one forward pass per batch serves every mode.
    Encoder noise comes from a fixed generator, so the evaluation is repeatable."""
    s: Split = getattr(task, split)
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    correct = {m: 0 for m in modes}
    for x, y in batches(s, batch_size, shuffle=False):
        x, y = to_net(net, x, y)
        out = net.run(encode(x, cfg.T, cfg.encoder, g)).out
        for m in modes:
            correct[m] += int((predictions(out, task.classes, m) == y).sum())
    return {m: (correct[m] / len(s) if len(s) else float("nan")) for m in modes}


def evaluate_tasks(net: SpikingNetwork, tasks: Sequence[Task], cfg: TrainConfig,
                   modes: Sequence[str] = (AWARE, AGNOSTIC)) -> dict[str, list[float]]:
    """One row of R per mode: the test accuracy on every task."""
    rows: dict[str, list[float]] = {m: [] for m in modes}
    for task in tasks:
        acc = evaluate_task(net, task, cfg, modes)
        for m in modes:
            rows[m].append(acc[m])
    return rows


# -- metrics ------------------------------------------------------------------------------------------
def _square(R: Any) -> np.ndarray:
    M = np.asarray(R, dtype=float)
    if M.ndim != 2 or M.shape[0] < 1 or M.shape[1] < M.shape[0]:
        raise LocosnnError(f"accuracy matrix must be T x N with N >= T >= 1 (rows = tasks trained), got shape "
                           f"{M.shape}")
    return M[:, :M.shape[0]]


def average_accuracy(R: Any) -> float:
    """ACC = mean_j R[T-1][j]: accuracy over all tasks after the last one."""
    return float(_square(R)[-1].mean())


def backward_transfer(R: Any) -> float:
    """BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017); NaN for T = 1."""
    M = _square(R)
    T = M.shape[0]
    return float(np.mean(M[-1, :-1] - np.diag(M)[:-1])) if T > 1 else float("nan")


def per_task_forgetting(R: Any) -> list[float]:
    """f_j = max_{i<T-1} R[i][j] - R[T-1][j] for j < T-1 (Chaudhry et al. 2018)."""
    M = _square(R)
    T = M.shape[0]
    return [float(M[:-1, j].max() - M[-1, j]) for j in range(T - 1)]


def forgetting(R: Any) -> float:
    """Average forgetting = mean_j f_j (Chaudhry et al. 2018); NaN for T = 1."""
    f = per_task_forgetting(R)
    return float(np.mean(f)) if f else float("nan")


def last_task_accuracy(R: Any) -> float:
    """R[T-1][T-1]: accuracy on the task just learned."""
    return float(_square(R)[-1, -1])


def learning_accuracy(R: Any) -> float:
    """LA = mean_j R[j][j]: accuracy on each task right after learning it (plasticity)."""
    return float(np.mean(np.diag(_square(R))))


def continual_metrics(R: Any) -> dict[str, Any]:
    """Every metric of the accuracy matrix R (see the module docstring)."""
    return {"ACC": average_accuracy(R), "BWT": backward_transfer(R), "forgetting": forgetting(R),
            "forgetting_per_task": per_task_forgetting(R), "last_task_acc": last_task_accuracy(R),
            "LA": learning_accuracy(R), "tasks": int(_square(R).shape[0])}


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


# -- the runner ----------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class ContinualRun:
    """The state of one continual run; :func:`run_continual` is the entry point."""

    def __init__(self, settings: dict[str, Any], out: str | Path | None = None, resume: bool = False,
                 progress: bool = True, dataset: Optional[Dataset] = None, rule: Optional[LearningRule] = None,
                 on_task: Optional[Callable[[dict], None]] = None) -> None:
        self.cfg, self.ccfg = split_settings(settings)
        cfg, ccfg = self.cfg, self.ccfg
        self.settings = {**cfg.to_dict(), **ccfg.to_dict()}
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.on_task = on_task
        ck = self.out / "checkpoint.pt" if self.out is not None else None
        if self.out is not None and not resume and (ck.exists() or (self.out / "matrix.json").exists()):
            raise LocosnnError(f"{self.out} already holds a continual run; pass --resume to continue it or choose "
                               "another --out")
        # cheap checks first: a bad rule or spec fails before any data is read
        self.net = build_network(cfg)
        self.rule = rule or make_rule(cfg.rule, loss=cfg.loss, seed=cfg.seed, **cfg.rule_args)
        self.data = dataset or load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
        check_compatible(self.net, self.data, cfg.arch)
        self.tasks = build_stream(self.data, ccfg, cfg.seed)
        if getattr(self.rule, "name", "") == "owm" and cfg.optimizer == "adam":
            warnings.warn("rule 'owm' with optimizer adam: Adam's per-coordinate scaling undoes the orthogonal "
                          "projection; use optimizer sgd (--optimizer sgd)", stacklevel=2)
        self.opt = build_optimizer(cfg, self.net)
        self.enc_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.replay_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.buffer = ReplayBuffer(ccfg.replay)
        self.modes = ccfg.modes
        self.R: dict[str, list[list[float]]] = {m: [] for m in self.modes}
        self.history: list[dict[str, Any]] = []
        self.done = 0  # tasks finished
        if ck is not None and resume and ck.exists():
            self._load(ck)

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"format": 1, "tasks_done": self.done, "settings": self.settings, "model": self.net.state_dict(),
                "optimizer": self.opt.state_dict(), "rule": self.rule.state_dict(),
                "enc_gen": self.enc_gen.get_state(), "replay_gen": self.replay_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "replay": self.buffer.state_dict(), "R": self.R,
                "history": self.history}

    def _load(self, path: Path) -> None:
        st = load_checkpoint(path)
        old = dict(st["settings"])
        defaults = TrainConfig().to_dict()  # train settings added since the run was saved have their defaults
        # the device may differ: a run trained on cuda resumes on cpu
        diff = [k for k in self.settings if k != "device" and old.get(k, defaults.get(k)) != self.settings[k]]
        if diff:
            raise LocosnnError(f"cannot resume {path.parent}: settings differ in {', '.join(diff)} "
                               f"(saved: {', '.join(f'{k}={old.get(k)!r}' for k in diff)})")
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.rule.load_state_dict(st["rule"])
        self.enc_gen.set_state(st["enc_gen"])
        self.replay_gen.set_state(st["replay_gen"])
        torch.set_rng_state(st["torch_rng"])
        self.buffer.load_state_dict(st["replay"])
        self.R = {m: [list(r) for r in st["R"][m]] for m in self.modes}
        self.history = list(st["history"])
        self.done = int(st["tasks_done"])

    def _write_config(self) -> None:
        assert self.out is not None
        meta = {"settings": self.settings, "config": self.cfg.to_dict(), "continual": self.ccfg.to_dict(),
                "git_sha": git_sha(), "versions": versions(), "machine": machine(), "dataset": self.data.info(),
                "tasks": [t.info() for t in self.tasks], "n_params": sum(p.numel() for p in self.net.parameters()),
                "device_resolved": str(resolve_device(self.cfg.device))}
        atomic_write_json(self.out / "config.json", _json_safe(meta))

    def metrics(self) -> dict[str, dict[str, Any]]:
        return {m: continual_metrics(R) for m, R in self.R.items() if R}

    def _write_results(self) -> None:
        assert self.out is not None
        matrix = {"stream": self.ccfg.stream, "n_tasks": len(self.tasks), "tasks_done": self.done,
                  "modes": list(self.modes), "tasks": [t.info() for t in self.tasks], "R": self.R,
                  "metrics": self.metrics(), "history": self.history,
                  "definitions": {"R[i][j]": "test accuracy on task j after training task i",
                                  "ACC": "mean_j R[T-1][j]", "BWT": "mean_{j<T-1} R[T-1][j] - R[j][j]",
                                  "forgetting": "mean_{j<T-1} max_{i<T-1} R[i][j] - R[T-1][j] (Chaudhry et al. 2018)",
                                  "last_task_acc": "R[T-1][T-1]", "LA": "mean_j R[j][j]"}}
        atomic_write_json(self.out / "matrix.json", _json_safe(matrix))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["after_task", "eval_task", "mode", "acc", "eval_classes", "n_test", "rule", "dataset", "stream",
                    "seed"])
        for m in self.modes:
            for i, row in enumerate(self.R[m]):
                for j, acc in enumerate(row):
                    t = self.tasks[j]
                    w.writerow([i, j, m, repr(float(acc)), " ".join(map(str, t.classes)), len(t.test), self.cfg.rule,
                                self.cfg.dataset, self.ccfg.stream, self.cfg.seed])
        text = buf.getvalue().encode()
        atomic_write_bytes(self.out / "results.csv", lambda f: f.write(text))

    # -- training ---------------------------------------------------------------------------------
    def train_task(self, t: int) -> dict[str, Any]:
        cfg, task = self.cfg, self.tasks[t]
        self.net.train()
        n_batches = math.ceil(len(task.train) / cfg.batch_size)
        n_replay = self.ccfg.replay_batch or cfg.batch_size
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.epochs * n_batches, desc=f"task {t + 1}/{len(self.tasks)} [{cfg.rule}]", leave=False)
        loss_sum, correct, seen, replayed, step_time, steps = 0.0, 0, 0, 0, 0.0, 0
        extras: dict[str, Any] = {}
        try:
            for e in range(cfg.epochs):
                shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1009 * t + e)
                for step, (x, y) in enumerate(batches(task.train, cfg.batch_size, task.shuffle, shuffle)):
                    B = len(y)
                    if len(self.buffer):
                        xr, yr = self.buffer.sample(n_replay, self.replay_gen)
                        x, y = torch.cat([x, xr]), torch.cat([y, yr])
                        replayed += len(yr)
                    x, y = to_net(self.net, x, y)
                    x_seq = encode(x, cfg.T, cfg.encoder, self.enc_gen)
                    t0 = time.perf_counter()
                    self.opt.zero_grad(set_to_none=True)
                    report = self.rule.step(self.net, x_seq, y)
                    try:
                        check_finite(self.net, report, e + 1, step)
                    except NonFiniteError as err:
                        raise NonFiniteError(f"task {t + 1}/{len(self.tasks)}: {err}") from None
                    self.opt.step()
                    try:
                        check_weights_finite(self.net, e + 1, step)
                    except NonFiniteError as err:
                        raise NonFiniteError(f"task {t + 1}/{len(self.tasks)}: {err}") from None
                    step_time += time.perf_counter() - t0
                    steps += 1
                    loss_sum += report["loss"] * B
                    seen += B
                    if "out" in report:
                        correct += int((report["out"][:B].argmax(1) == y[:B]).sum())
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
                extras.update({f"rule_{k}": v for k, v in self.rule.end_epoch(self.net).items()})
        finally:
            if bar is not None:
                bar.close()
        end_task = getattr(self.rule, "end_task", None)
        if callable(end_task):
            extras.update({f"rule_{k}": v for k, v in (end_task(self.net) or {}).items()})
        return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                "replayed": replayed, "step_time_s": step_time / max(steps, 1), **extras}

    def run(self) -> dict[str, Any]:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config()
            if self.done:
                self._write_results()  # a crash between checkpoint and results must not lose a row
        while self.done < len(self.tasks):
            t = self.done
            task = self.tasks[t]
            t0 = time.perf_counter()
            row: dict[str, Any] = {"task": t, "name": task.name, "classes": list(task.classes)}
            row.update(self.train_task(t))
            t_train = time.perf_counter() - t0
            if self.ccfg.replay:
                self.buffer.add_task(task, self.replay_gen)
            accs = evaluate_tasks(self.net, self.tasks, self.cfg, self.modes)
            for m in self.modes:
                self.R[m].append(accs[m])
            if len(task.val):
                val = evaluate_task(self.net, task, self.cfg, self.modes, split="val")
                row.update({f"val_acc_{m}": v for m, v in val.items()})
            row.update({"task_time_s": t_train, "replay_size": len(self.buffer), "peak_rss_mb": peak_rss_mb()})
            self.history.append(row)
            self.done += 1
            if self.out is not None:
                save_checkpoint(self.out / "checkpoint.pt", self.state())
                self._write_results()
            if self.progress:
                m0 = self.modes[-1]
                print(f"task {t + 1}/{len(self.tasks)} ({task.name}): loss {row['train_loss']:.4f} "
                      f"train {row['train_acc']:.3f} | {m0} acc per task: "
                      + " ".join(f"{a:.3f}" for a in accs[m0]) + f" ({t_train:.1f}s)", flush=True)
            if self.on_task:
                self.on_task(row)
        return self.result()

    def result(self) -> dict[str, Any]:
        metrics = self.metrics()
        primary = AGNOSTIC if AGNOSTIC in self.modes else self.modes[0]
        res: dict[str, Any] = {"R": {m: [list(r) for r in R] for m, R in self.R.items()}, "metrics": metrics,
                               "mode": primary, "tasks_done": self.done, "n_tasks": len(self.tasks),
                               "tasks": [t.info() for t in self.tasks], "history": self.history}
        for k in ("ACC", "BWT", "forgetting", "last_task_acc", "LA"):
            if primary in metrics:
                res[k] = metrics[primary][k]
        return res


def run_continual(settings: dict[str, Any], out: str | Path | None = None, resume: bool = False,
                  progress: bool = True, dataset: Optional[Dataset] = None, rule: Optional[LearningRule] = None,
                  on_task: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train one network on a task stream and fill the accuracy matrix R (see the module docstring).

    settings: TrainConfig fields (``epochs`` = epochs per task, default 1) plus stream, n_tasks,
    classes_per_task, class_order, replay, replay_batch, eval. ``dataset`` / ``rule``: use these
    instead of loading / building them (tests). ``on_task(row)``: called after each task.
    Returns {"R": {mode: R}, "metrics": {mode: metrics}, "mode", "ACC", "BWT", "forgetting",
    "last_task_acc", "LA" (of the task-agnostic mode when evaluated), "tasks", "history", ...}."""
    return ContinualRun(settings, out=out, resume=resume, progress=progress, dataset=dataset, rule=rule,
                        on_task=on_task).run()


# -- command line -----------------------------------------------------------------------------------------
EPILOG = """examples:
  locosnn continual --rule bptt --dataset fashion-mnist --arch 784-256-256-10 --stream class --n-tasks 5 --out runs/cl-bptt
  locosnn continual --rule owm --optimizer sgd --lr 0.05 --stream permuted --n-tasks 5 --out runs/cl-owm
  locosnn continual --rule loco --stream label_sorted --n-tasks 1 --rule-arg variant=faithful --out runs/cl-loco
  locosnn continual --rule bptt --replay 500 --out runs/cl-replay
  locosnn continual --out runs/cl-bptt --resume          # continue after the last finished task

writes into --out: config.json, matrix.json (R per mode + ACC/BWT/forgetting), results.csv
(one row per after_task, eval_task, mode), checkpoint.pt.
"""


def add_parser(sub: Any) -> None:
    from .config import OPTIMIZERS
    from .data import DATASETS
    from .rules import RULES

    d = TrainConfig()
    p = sub.add_parser("continual", help="train on a stream of tasks and measure forgetting",
                       description="Continual learning: train one network with one rule on a stream of tasks "
                                   "(class-incremental, permuted or label-sorted), evaluate on every task's test "
                                   "split after each task (task-aware and task-agnostic), and report the accuracy "
                                   "matrix R[after task i][task j] with average accuracy (ACC), backward transfer "
                                   "(BWT) and forgetting (Chaudhry et al. 2018). Resumable after each task.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML or YAML file of settings (train and continual keys); flags override it")
    p.add_argument("--rule", help=f"learning rule: {', '.join(sorted(RULES))} (default {d.rule})")
    p.add_argument("--dataset", help=f"dataset: {', '.join(DATASETS)} (default {d.dataset})")
    p.add_argument("--data-dir", dest="data_dir", help="directory of IDX files (mnist, kmnist, ...)")
    p.add_argument("--arch", help=f"architecture spec, e.g. 784-256-256-10 (default {d.arch})")
    p.add_argument("--stream", help="task stream: class (class-incremental; alias split), permuted "
                                    "(domain-incremental, task 1 unpermuted) or label_sorted (the training set "
                                    "sorted by label, cut into chunks, passed in order) (default class)")
    p.add_argument("--n-tasks", dest="n_tasks", type=int, help="number of tasks (default 5)")
    p.add_argument("--classes-per-task", dest="classes_per_task", type=int,
                   help="class stream: classes per task (default n_classes / n_tasks)")
    p.add_argument("--class-order", dest="class_order",
                   help="class stream: comma-separated class order (e.g. 3,1,0,...) or 'seeded' (default 0..C-1)")
    p.add_argument("--epochs", metavar="N", help=f"training epochs PER TASK (default {DEFAULT_EPOCHS_PER_TASK})")
    p.add_argument("--batch-size", dest="batch_size", metavar="N", help=f"mini-batch size (default {d.batch_size})")
    p.add_argument("--lr", metavar="LR", help=f"learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"optimiser, one for the whole stream; use sgd with owm (default {d.optimizer})")
    p.add_argument("--T", "-T", dest="T", metavar="T", help=f"time steps per sample (default {d.T})")
    p.add_argument("--encoder", choices=["direct", "rate", "latency"], help=f"input encoder (default {d.encoder})")
    p.add_argument("--loss", choices=["ce", "mse"], help=f"loss (default {d.loss})")
    p.add_argument("--seed", metavar="S", help=f"random seed; also fixes the permutations and a seeded class order "
                                            f"(default {d.seed})")
    p.add_argument("--val-size", dest="val_size", metavar="N",
                   help="validation samples held out of training: a count or a fraction < 1")
    p.add_argument("--limit", metavar="N", help="use only the first N train/val/test samples (quick runs)")
    p.add_argument("--device", metavar="DEV", help=f"where to compute: auto (cuda when available, else cpu), cpu, "
                                                   f"cuda or cuda:N (default {d.device})")
    p.add_argument("--dtype", choices=DTYPES, help=f"floating-point type of the weights, state and inputs "
                                                   f"(default {d.dtype})")
    p.add_argument("--replay", type=int, help="replay buffer size in samples, class-balanced over the finished "
                                              "tasks, mixed into every batch of later tasks (default 0 = off)")
    p.add_argument("--replay-batch", dest="replay_batch", type=int,
                   help="replayed samples per batch (default: --batch-size)")
    p.add_argument("--eval", help="evaluation: agnostic (argmax over all outputs), aware (logits masked to the "
                                  "task's classes) or both (default both)")
    p.add_argument("--rule-arg", dest="rule_arg", action="append", default=[], metavar="KEY=VALUE",
                   help="rule-specific setting, repeatable (cast to the type of the rule's setting: "
                        "booleans read true/false, yes/no, on/off, 1/0), e.g. alpha=0.1 for owm")
    p.add_argument("--out", default=None, help="run directory (default runs/continual-<rule>-<dataset>-<stream>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished task")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.set_defaults(func=cmd_continual)


def _cli():
    from . import cli
    return cli


FLAG_KEYS = ("rule", "dataset", "data_dir", "arch", "epochs", "batch_size", "lr", "optimizer", "T", "encoder", "loss",
             "seed", "val_size", "limit", "device", "dtype", "stream", "n_tasks", "classes_per_task", "class_order",
             "replay", "replay_batch", "eval")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --config (or the saved config of a run being resumed), overridden by flags."""
    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    if args.resume and args.out:
        _cli().check_out_dir(Path(args.out), "continual", resume=True)
        if not args.config:  # the run's own settings (from its checkpoint); flags given now still override
            settings = dict(load_checkpoint(Path(args.out) / "checkpoint.pt", expect=("settings",))["settings"])
    for k in FLAG_KEYS:
        v = getattr(args, k, None)
        if v is None:
            continue
        if k == "class_order" and v not in ("seeded", "random"):
            try:
                v = [int(c) for c in str(v).split(",") if c.strip()]
            except ValueError:
                raise LocosnnError(f"--class-order {args.class_order!r} must be comma-separated class numbers or "
                                   "'seeded'") from None
        settings[k] = v
    rule_args = settings.get("rule_args") or {}
    if not isinstance(rule_args, dict):
        raise LocosnnError(f"rule_args must be a table of rule settings (KEY = VALUE), got {rule_args!r}")
    settings["rule_args"] = _cli().parse_rule_args(args.rule_arg, rule_args)
    return settings


def format_matrix(R: Sequence[Sequence[float]]) -> str:
    n = len(R[0]) if R else 0
    lines = ["after \\ on " + " ".join(f"{'T' + str(j + 1):>6}" for j in range(n))]
    for i, row in enumerate(R):
        lines.append(f"{'T' + str(i + 1):>11} " + " ".join(f"{100 * a:6.1f}" for a in row))
    return "\n".join(lines)


def cmd_continual(args: argparse.Namespace) -> int:
    from .checkpoint import DirLock

    settings = settings_from_args(args)
    cfg, ccfg = split_settings(settings)
    out = Path(args.out or f"runs/continual-{cfg.rule}-{cfg.dataset}-{ccfg.stream}")
    if out.exists() and not out.is_dir():
        raise LocosnnError(f"--out {out} is an existing file, not a directory; choose another --out")
    try:
        with DirLock(out, "continual"):
            _cli().check_out_dir(out, "continual", args.resume)
            res = run_continual(settings, out=out, resume=args.resume, progress=args.progress)
    except KeyboardInterrupt as e:
        print(f"interrupted: the finished tasks are in {out}/checkpoint.pt; continue with --resume", file=sys.stderr)
        return interrupt_exit_code(e)
    for m, R in res["R"].items():
        met = res["metrics"].get(m)
        print(f"\n{m}: accuracy (%) after training task i (rows) on task j (columns)")
        print(format_matrix(R))
        if met:
            f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"  # noqa: E731
            print(f"ACC {f(met['ACC'])}  BWT {f(met['BWT'])}  forgetting {f(met['forgetting'])}  "
                  f"last task {f(met['last_task_acc'])}  LA {f(met['LA'])}")
    print(f"\ndone: {out}")
    return 0
