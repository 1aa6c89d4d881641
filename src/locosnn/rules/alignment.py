"""Alignment metrics the rules report themselves (e.g. FA's and SAL's angle(B, W^T) per epoch).

They live beside the rules so that a rule never imports :mod:`locosnn.diagnostics` (a higher layer);
``locosnn.diagnostics`` re-exports them."""
from __future__ import annotations

import math

import torch


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in degrees between two tensors of the same number of elements, seen as flat
    vectors (0: same direction, 90: orthogonal, 180: opposite). Used for angle(B, W^T)."""
    if a.numel() != b.numel():
        raise ValueError(f"angle_deg needs equal sizes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    den = a.norm() * b.norm()
    if float(den) == 0.0:
        return float("nan")
    c = float((a @ b) / den)
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))
