"""Optimisers for perturbation-based rules.

:class:`NormalizedMomentum` (``--optimizer nmom``): a per-tensor normalised momentum
step (LARS-like; You et al. 2017), the stabiliser that node-perturbation studies
use in place of Adam (Hiratani et al. 2022; ``docs/deep.md``):

    m <- mu m + g
    p <- p - lr * max(||p||, floor * sqrt(numel)) * m / ||m||

Every weight tensor moves by the same *relative* amount ``lr`` per step whatever
the size of its estimate, which neutralises the ~1,000x spread of gradient norms
across the layers of a deep net. Adam instead moves every coordinate by ~lr
whatever its signal-to-noise ratio, a random walk when the estimate is mostly
noise. ``floor`` keeps tensors that start at zero (biases) moving.

``row_norm=True`` (Hiratani et al.'s weight normalisation): after the step, every
row of a weight tensor (one neuron's incoming weights) is rescaled to the norm it
had at the first step, which stops the weight diffusion of NP. 1-d tensors (biases)
are left alone.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

#: how a 1-d tensor (a bias) steps; see the module docstring
BIAS_STEPS: tuple[str, ...] = ("relative", "floor")


class NormalizedMomentum(torch.optim.Optimizer):
    """Per-tensor normalised momentum step; see the module docstring."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, floor: float = 1e-2,
                 row_norm: bool = False, weight_decay: float = 0.0, bias_step: str = "relative") -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if bias_step not in BIAS_STEPS:
            raise ValueError(f"bias_step must be one of {', '.join(BIAS_STEPS)}, got {bias_step!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, floor=floor, row_norm=row_norm,
                                      weight_decay=weight_decay, bias_step=bias_step))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * p
                st = self.state[p]
                if "m" not in st:
                    st["m"] = torch.zeros_like(p)
                    if group["row_norm"] and p.dim() >= 2:
                        st["row_norm"] = p.flatten(1).norm(dim=1)
                m = st["m"]
                m.mul_(group["momentum"]).add_(g)
                mn = m.norm()
                if float(mn) == 0.0:
                    continue
                if p.dim() == 1 and group.get("bias_step", "relative") == "floor":
                    scale = group["floor"] * p.numel() ** 0.5
                else:
                    scale = torch.clamp(p.norm(), min=group["floor"] * p.numel() ** 0.5)
                p.add_(m, alpha=-float(group["lr"] * scale / mn))
                if "row_norm" in st:
                    rows = p.flatten(1)
                    rows.mul_((st["row_norm"] / rows.norm(dim=1).clamp_min(1e-12))[:, None])
        return loss
