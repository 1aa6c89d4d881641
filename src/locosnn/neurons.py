"""Pure neuron step functions with explicit state.

Discrete-time LIF (ALGORITHMS.md, "Neuron"), with soft reset (``reset="subtract"``, the default):

    v[t] = beta * v[t-1] + I[t] - theta * s[t-1]
    s[t] = H(v[t] - theta)

or hard reset (``reset="zero"``: after a spike the membrane restarts from 0, as NIR's LIF/IF with
v_reset = 0 and snnTorch's ``reset_mechanism="zero"``; see :mod:`locosnn.export`):

    v[t] = beta * (1 - s[t-1]) * v[t-1] + I[t]
    s[t] = H(v[t] - theta)

``v[t]`` is the membrane before its own reset (what the surrogate is evaluated at). Under autograd
(BPTT) the hard reset's gate ``(1 - s[t-1])`` is detached: no surrogate gradient flows through the
reset, only through ``v[t-1]`` on steps without a spike (the soft reset's ``- theta * s[t-1]`` is
not detached, as before).

IF is LIF with beta = 1. The rate proxy is the IF firing-rate function
f(z) = clip(z / theta, 0, 1) applied to the current, with no state.

The Heaviside step gets a surrogate derivative only when autograd is on
(BPTT); every other rule runs these functions under ``torch.no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import LocosnnError

NEURON_MODELS = ("lif", "if", "rate")
SURROGATES = ("fast_sigmoid", "atan")
RESETS = ("subtract", "zero")


@dataclass(frozen=True)
class NeuronConfig:
    """Constants of one neuron model.

    model: "lif", "if" (beta = 1) or "rate" (clipped-ReLU proxy).
    beta: membrane decay per step, exp(-dt/tau). Default 0.5 (tau = 1.44 dt).
    theta: firing threshold.
    surrogate: "fast_sigmoid" (d s/d v = 1 / (1 + k|v - theta|)^2) or
        "atan" (d s/d v = 1 / (1 + (pi k (v - theta) / 2)^2)); k = ``slope``.
    reset: "subtract" (soft reset: v -= theta after a spike) or "zero" (hard reset to 0; exports
        exactly to NIR's LIF/IF, see :mod:`locosnn.export`). Ignored by the rate proxy.
    """

    model: str = "lif"
    beta: float = 0.5
    theta: float = 1.0
    surrogate: str = "fast_sigmoid"
    slope: float = 5.0
    reset: str = "subtract"

    def __post_init__(self) -> None:
        if self.model not in NEURON_MODELS:
            raise LocosnnError(f"unknown neuron model {self.model!r}; choose one of {', '.join(NEURON_MODELS)}")
        if self.surrogate not in SURROGATES:
            raise LocosnnError(f"unknown surrogate {self.surrogate!r}; choose one of {', '.join(SURROGATES)}")
        if self.reset not in RESETS:
            raise LocosnnError(f"unknown reset {self.reset!r}; choose one of {', '.join(RESETS)}")
        if not 0.0 <= self.beta <= 1.0:
            raise LocosnnError(f"beta must lie in [0, 1], got {self.beta}")

    @property
    def decay(self) -> float:
        return 1.0 if self.model == "if" else self.beta


def surrogate_derivative(v: torch.Tensor, theta: float, kind: str, slope: float) -> torch.Tensor:
    """d s / d v of the surrogate at membrane ``v`` (used by BPTT and by local rules)."""
    x = v - theta
    if kind == "fast_sigmoid":
        return 1.0 / (1.0 + slope * x.abs()) ** 2
    return 1.0 / (1.0 + (math.pi * slope * x / 2.0) ** 2)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, theta, kind, slope):  # type: ignore[override]
        ctx.save_for_backward(v)
        ctx.cfg = (theta, kind, slope)
        return (v >= theta).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        theta, kind, slope = ctx.cfg
        return grad_out * surrogate_derivative(v, theta, kind, slope), None, None, None


def spike(v: torch.Tensor, cfg: NeuronConfig) -> torch.Tensor:
    """Heaviside H(v - theta), with the surrogate gradient when autograd is recording."""
    if torch.is_grad_enabled() and v.requires_grad:
        return _Spike.apply(v, cfg.theta, cfg.surrogate, cfg.slope)
    return (v >= cfg.theta).to(v.dtype)


def lif_step(v: torch.Tensor, s: torch.Tensor, current: torch.Tensor, cfg: NeuronConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One LIF/IF step: returns (v[t], s[t]) from (v[t-1], s[t-1], I[t])."""
    if cfg.reset == "zero":
        v_new = cfg.decay * (1.0 - s.detach()) * v + current
        return v_new, spike(v_new, cfg)
    v_new = cfg.decay * v + current - cfg.theta * s
    return v_new, spike(v_new, cfg)


def rate_proxy(current: torch.Tensor, theta: float = 1.0) -> torch.Tensor:
    """IF steady-state firing rate per step: f(z) = clip(z / theta, 0, 1)."""
    return torch.clamp(current / theta, 0.0, 1.0)


def rate_proxy_derivative(current: torch.Tensor, theta: float = 1.0) -> torch.Tensor:
    """f'(z) of the rate proxy: 1/theta on [0, theta], else 0 (the boundary convention of
    autograd's clamp, so that local rules and BPTT agree exactly at z = 0, e.g. zero patches)."""
    return ((current >= 0) & (current <= theta)).to(current.dtype) / theta


def leaky_integrator_step(v: torch.Tensor, current: torch.Tensor, beta: float) -> torch.Tensor:
    """Non-spiking readout neuron: v[t] = beta * v[t-1] + I[t]."""
    return beta * v + current
