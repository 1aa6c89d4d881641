"""Cost of learning, measured rather than asserted.

:func:`update_stages` counts the sequential update stages a rule needs after its
forward pass(es), from the dependency structure of the code that computes the
update:

* rules that backpropagate (``uses_backprop``): the autograd graph of the loss is
  walked from the loss to each layer's weight; a layer's gradient can only be
  formed after the backward computation of every layer whose weight-op lies on
  a path between the loss and it. Stages = the largest such set of layers
  (BPTT on an L-layer feed-forward net: L).
* node-perturbation rules: each layer's update is recomputed with the forward
  records of *every other layer* replaced by NaN. If the update of every layer
  stays finite and unchanged, no layer waits for another: 1 stage (every layer
  updates in parallel from the broadcast loss differences).
* feedback rules (FA, DFA, OPZO): one feedback matrix at a time is set to NaN; a
  layer whose update turns NaN depends on that other layer's backward hop.
  FA: L (like BPTT, spatially); DFA and OPZO: 1.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from .losses import per_sample_loss
from .network import SpikingNetwork, Trace
from .rules.base import LearningRule


def _weight_layer(fn: Any, weights: dict[int, int]) -> int | None:
    """Layer index if ``fn`` is a weight-consuming op (its inputs reach a layer's weight within 2 hops)."""
    for nxt, _ in getattr(fn, "next_functions", ()):
        if nxt is None:
            continue
        var = getattr(nxt, "variable", None)
        if var is not None and id(var) in weights:
            return weights[id(var)]
        for nxt2, _ in getattr(nxt, "next_functions", ()):
            var2 = getattr(nxt2, "variable", None) if nxt2 is not None else None
            if var2 is not None and id(var2) in weights and type(nxt).__name__ in ("TBackward0", "PermuteBackward0",
                                                                                   "ViewBackward0", "ReshapeAliasBackward0"):
                return weights[id(var2)]
    return None


def autograd_stages(network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> list[int]:
    """Per layer: how many layers' backward computations its gradient depends on (itself included)."""
    weights = {id(layer.weight): li for li, layer in enumerate(network.layers)}
    out = network.run(x_seq, grad=True).out
    root = per_sample_loss(out, y, loss).mean().grad_fn
    # topological order of the backward graph (Kahn on in-degrees from the root)
    indeg: dict[Any, int] = {}
    stack, seen = [root], {root}
    while stack:
        fn = stack.pop()
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            indeg[nxt] = indeg.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    layers_on_path: dict[Any, frozenset] = {root: frozenset()}
    ready = [root]
    result = [0] * network.depth
    while ready:
        fn = ready.pop()
        here = layers_on_path[fn]
        lab = _weight_layer(fn, weights)
        if lab is not None:
            here = here | {lab}
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in weights:
            result[weights[id(var)]] = max(result[weights[id(var)]], len(here))
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            layers_on_path[nxt] = layers_on_path.get(nxt, frozenset()) | here
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                ready.append(nxt)
    return result


def _poisoned(tr: Trace, keep: int) -> Trace:
    nan = lambda lists: [per if li == keep else [torch.full_like(a, math.nan) for a in per]  # noqa: E731
                         for li, per in enumerate(lists)]
    return Trace(out=tr.out, inputs=nan(tr.inputs), currents=nan(tr.currents), membranes=nan(tr.membranes),
                 outputs=nan(tr.outputs), noise=nan(tr.noise))


def perturbation_stages(rule: Any, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Per layer: 1 if its update reads only its own forward records and the broadcast dL,
    else L (an upper bound: the update needs records of other layers)."""
    state = copy.deepcopy(rule.state_dict())
    clean, noisy, dl, _ = rule.perturbed_passes(network, x_seq, y)
    est = rule.estimate(network, noisy, dl)
    result = []
    for li in range(network.depth):
        with torch.no_grad():
            rule.load_state_dict(copy.deepcopy(state))
            full = rule.layer_transform(network, clean, li, *est[li])
            rule.load_state_dict(copy.deepcopy(state))
            g = rule.estimate(network, _poisoned(noisy, li), dl)[li]
            g = rule.layer_transform(network, _poisoned(clean, li), li, *g)
        rule.load_state_dict(copy.deepcopy(state))
        ok = all(torch.isfinite(t).all() for t in g) and all(torch.allclose(a, b) for a, b in zip(g, full))
        if ok:
            result.append(1)
            continue
        result.append(network.depth)  # reads other layers' records: counted as the upper bound, L
    return result


def feedback_stages(rule: Any, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Per layer: 1 + the number of *other* layers' feedback matrices (B_k, M_k; W_k for FA with
    feedback="transpose") on which its update depends: each is a sequential backward hop.
    Measured by setting one feedback matrix at a time to NaN."""
    from .diagnostics import rule_update
    if not rule.B:
        rule.init_feedback(network)
    saved = [b.clone() for b in rule.B]
    transpose = getattr(rule, "feedback", "") == "transpose"
    result = [1] * network.depth
    for k in range(len(saved)):
        if transpose:
            w = network.layers[k].weight
            keep = w.data.clone()
            w.data.fill_(math.nan)
        else:
            rule.B[k] = torch.full_like(saved[k], math.nan)
        try:
            upd = rule_update(rule, network, x_seq, y)
        finally:
            rule.B = [b.clone() for b in saved]
            if transpose:
                network.layers[k].weight.data.copy_(keep)
        for li, u in enumerate(upd):
            # with W poisoned the forward pass itself is NaN everywhere: only count the hop, not layer k
            if li != k and not torch.isfinite(u).all():
                result[li] += 1
    return result


def update_stages(rule: LearningRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> int:
    """Sequential update stages after the forward pass(es), measured (see module docstring)."""
    if rule.uses_backprop:
        return max(autograd_stages(network, x_seq, y, rule.loss))
    if hasattr(rule, "perturbed_passes") and hasattr(rule, "estimate"):
        return max(perturbation_stages(rule, network, x_seq, y))
    if hasattr(rule, "init_feedback"):
        return max(feedback_stages(rule, network, x_seq, y))
    raise NotImplementedError(f"no stage measurement for rule {rule.name!r} yet")


def state_bytes(obj: Any) -> int:
    """Bytes held in tensors inside a (nested) rule state_dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0
