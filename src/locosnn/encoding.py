"""Encoders: static input x (B, ...) in [0, 1] -> sequence (T, B, ...).

direct:  x[t] = x (constant current, default for static images);
rate:    x[t] ~ Bernoulli(x) (Poisson-like rate code);
latency: one spike at t = round((1 - x) (T - 1)) for x > threshold, brighter = earlier.
"""
from __future__ import annotations

import torch

from .errors import LocosnnError

ENCODERS = ("direct", "rate", "latency")


def encode(x: torch.Tensor, T: int, kind: str = "direct", generator: torch.Generator | None = None,
           threshold: float = 0.01) -> torch.Tensor:
    """Encode a batch x (B, ...) in [0, 1] as a (T, B, ...) input sequence: ``direct`` (the
    value as a constant current every step), ``rate`` (Bernoulli spikes with probability x,
    drawn from ``generator``) or ``latency`` (one spike, earlier for larger x; values below
    ``threshold`` never spike)."""
    if T < 1:
        raise LocosnnError(f"T must be >= 1, got {T}")
    if kind == "direct":
        return x.unsqueeze(0).expand(T, *x.shape)
    if kind == "rate":
        p = x.clamp(0, 1).unsqueeze(0).expand(T, *x.shape)
        if generator is not None and generator.device != p.device:  # draw on the generator's device
            return torch.bernoulli(p.to(generator.device), generator=generator).to(p.device)
        return torch.bernoulli(p, generator=generator)
    if kind == "latency":
        t_spike = torch.round((1 - x.clamp(0, 1)) * (T - 1)).long()
        steps = torch.arange(T, device=x.device).view(T, *([1] * x.dim()))
        return ((steps == t_spike.unsqueeze(0)) & (x.unsqueeze(0) > threshold)).to(x.dtype)
    raise LocosnnError(f"unknown encoder {kind!r}; choose one of {', '.join(ENCODERS)}")
