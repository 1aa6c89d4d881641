"""Losses on the readout, per sample (rules such as NP need one scalar per sample)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LocosnnError

LOSSES = ("ce", "mse")


def per_sample_loss(out: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """ce: cross-entropy of softmax(out); mse: 0.5 * ||out - onehot(y)||^2. Returns (B,)."""
    if kind == "ce":
        return F.cross_entropy(out, y, reduction="none")
    if kind == "mse":
        return 0.5 * ((out - F.one_hot(y, out.shape[1]).to(out.dtype)) ** 2).sum(1)
    raise LocosnnError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def output_error(out: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Closed-form e = dL/d out per sample (B, n_out), for DFA/OPZO-style rules."""
    onehot = F.one_hot(y, out.shape[1]).to(out.dtype)
    if kind == "ce":
        return torch.softmax(out, 1) - onehot
    if kind == "mse":
        return out - onehot
    raise LocosnnError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
