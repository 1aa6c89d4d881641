"""Helpers for rule tests: liveness guard, tiny networks and batches, alignment.

Every rule test should call :func:`assert_spiking` on the trace it learns from:
a silent network gives zero updates that trivially "match" many oracles.
"""
from __future__ import annotations

import torch

from .network import Trace


def assert_spiking(trace: Trace, min_rate: float = 0.01, max_rate: float = 0.99) -> None:
    """Fail unless every hidden layer emits events at a mean rate in (min_rate, max_rate)."""
    if not trace.outputs:
        raise AssertionError("liveness guard needs a trace recorded with record=True")
    for li, outs in enumerate(trace.outputs[:-1]):
        rate = float(torch.stack(outs).mean())
        if not (min_rate < rate < max_rate):
            raise AssertionError(f"liveness guard: hidden layer {li} fires at mean rate {rate:.4f}, "
                                 f"outside ({min_rate}, {max_rate}): the test would prove nothing")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm() + 1e-30))
