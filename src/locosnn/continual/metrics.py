"""Filling the accuracy matrix R (task-aware / task-agnostic evaluation) and its metrics (pure functions of R)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .. import seeds
from ..config import TrainConfig
from ..data import Split, batches
from ..encoding import encode
from ..errors import LocosnnError
from ..factory import to_net
from ..network import SpikingNetwork
from .settings import AGNOSTIC, AWARE
from .streams import Task

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
    g = torch.Generator().manual_seed(seeds.eval_encoder_seed(cfg.seed))
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
