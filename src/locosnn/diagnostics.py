"""Gradient diagnostics shared by every rule: how close is a rule's update to BPTT's?

* :func:`rule_update` runs one ``rule.step`` and returns the per-layer update it
  wrote into ``.grad`` (weight and bias of a layer flattened into one vector),
  leaving the network's ``.grad`` and the rule's own state (RNG, projector
  memory, feedback matrices) as they were, so diagnostics never change training.
* :func:`alignment` compares that update with the reference gradient (BPTT with
  the network's surrogate by default) on the same batch: per-layer cosine and
  norm ratio ||update|| / ||reference||.
* :func:`estimate_variance` repeats the rule on the same batch with fresh noise
  draws: per layer the cosine of the mean update, the mean single-draw cosine,
  and the relative variance E||g_k - g_mean||^2 / ||g_mean||^2.

The sign convention is that of ``.grad``: the descent direction is ``-grad``
for every rule, so a cosine near +1 means "the rule agrees with BPTT".
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .network import SpikingNetwork
from .rules.alignment import angle_deg
from .rules.base import LearningRule
from .rules.bptt import bptt_gradients

__all__ = ["alignment", "angle_deg", "estimate_variance", "reference_gradient", "rule_update"]


def _layer_vectors(network: SpikingNetwork, grads: Optional[list[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """Per layer: weight and bias (of ``grads`` if given, else of ``.grad``) as one flat float64 vector."""
    out, i = [], 0
    for layer in network.layers:
        parts = []
        for p in (layer.weight, layer.bias):
            if p is None:
                continue
            g = grads[i] if grads is not None else p.grad
            i += 1
            parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if g is None
                         else g.detach().reshape(-1).double())
        out.append(torch.cat(parts))
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


def rule_update(rule: LearningRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor,
                restore: bool = True) -> list[torch.Tensor]:
    """The per-layer update one ``rule.step`` writes into ``.grad`` (flat float64 vectors)."""
    saved_grads = [None if p.grad is None else p.grad.clone() for p in network.parameters()]
    saved_state = copy.deepcopy(rule.state_dict()) if restore else None
    try:
        for p in network.parameters():
            p.grad = None
        rule.step(network, x_seq, y)
        return _layer_vectors(network)
    finally:
        for p, g in zip(network.parameters(), saved_grads):
            p.grad = g
        if restore:
            rule.load_state_dict(saved_state)


def reference_gradient(network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> list[torch.Tensor]:
    """BPTT (surrogate) gradient per layer, flat float64 vectors."""
    return _layer_vectors(network, bptt_gradients(network, x_seq, y, loss))


def alignment(rule: LearningRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor,
              reference: Optional[list[torch.Tensor]] = None) -> list[dict[str, float]]:
    """Per-layer cosine and norm ratio of the rule's update to the reference gradient on one batch."""
    ref = reference if reference is not None else reference_gradient(network, x_seq, y, rule.loss)
    upd = rule_update(rule, network, x_seq, y)
    return [{"layer": li, "cos": _cos(u, r), "norm_ratio": float(u.norm() / (r.norm() + 1e-30))}
            for li, (u, r) in enumerate(zip(upd, ref))]


def estimate_variance(rule: LearningRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor,
                      draws: int = 16, reference: Optional[list[torch.Tensor]] = None) -> list[dict[str, Any]]:
    """Repeat the rule ``draws`` times on one batch (fresh noise each time; rule state restored after)."""
    if draws < 2:
        raise ValueError("estimate_variance needs at least 2 draws")
    ref = reference if reference is not None else reference_gradient(network, x_seq, y, rule.loss)
    saved_state = copy.deepcopy(rule.state_dict())
    try:
        samples = [rule_update(rule, network, x_seq, y, restore=False) for _ in range(draws)]
    finally:
        rule.load_state_dict(saved_state)
    rows = []
    for li in range(len(ref)):
        G = torch.stack([s[li] for s in samples])
        mean = G.mean(0)
        rel_var = float(((G - mean) ** 2).sum(1).mean() / (mean.norm() ** 2 + 1e-30))
        rows.append({"layer": li, "draws": draws, "cos_mean": _cos(mean, ref[li]),
                     "cos_single": sum(_cos(g, ref[li]) for g in G) / draws, "rel_var": rel_var})
    return rows


