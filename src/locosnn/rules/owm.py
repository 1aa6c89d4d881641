"""OWM: orthogonal weight modification (Zeng, Chen, Cui & Yu, Nature Machine Intelligence 2019).

A continual-learning baseline: BPTT surrogate gradients, projected per layer on
the input side so that an update leaves the layer's response to earlier inputs
(approximately) unchanged. Layer l keeps a projector P_l (d+1 x d+1: its d
inputs plus the constant-1 input that carries the bias) and the update is

    [dW_l | db_l] <- [dW_l | db_l] P_l

P_l starts as the identity and is updated, recursive-least-squares style, with
the layer's input x (its time- and batch-mean presynaptic vector, bias input 1
appended):

    P_l <- P_l - (P_l x x^T P_l) / (alpha + x^T P_l x)

By Sherman-Morrison, after inputs x_1..x_k, P = (I + X^T X / alpha)^-1, so
P x_i -> 0 for every stored x_i as alpha -> 0 and any update G P satisfies
(G P) x_i ~ 0: the layer's current for earlier inputs does not move (to first
order). ``alpha`` trades protection (small) against plasticity (large); the
default 1.0 suits spike/pixel inputs in [0, 1] (on a 5-task split of the 8x8
digits it kept forgetting near 0 while still learning each task; 0.1 learned
little after the first task, 10 forgot more).

Use it with ``--optimizer sgd`` (momentum is fine): Adam's per-coordinate
scaling of the update undoes the projection (the update is no longer
orthogonal to the stored inputs), and OWM then forgets like plain BPTT.

When P is updated (``update=``):

* ``"batch"`` (default, as Zeng et al.): after every training step, with that
  batch's mean input; the update of batch i is projected with P from batches
  < i, so a task is also protected against its own later batches. This is the
  published algorithm and needs no task boundaries.
* ``"task"``: P stays fixed during a task (it only protects *earlier* tasks);
  the batch-mean inputs of the current task are kept in a pending list and
  folded into P one by one when the harness calls :meth:`end_task`.
  More plastic within a task; needs task boundaries (``locosnn continual``
  calls ``end_task``; the plain trainer never does, so there it is BPTT).

P is kept in float64 (the rank-1 downdates lose positive semi-definiteness in
float32 after thousands of batches) and lives in :meth:`state_dict`, so a
resumed run continues with the same projectors. Only fully connected layers are
supported (Zeng's conv variant projects im2col patches; not implemented):
a conv layer raises :class:`~locosnn.errors.LocosnnError` at the first step.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import LocosnnError
from ..network import SpikingNetwork
from .base import LearningRule, StepReport

UPDATES = ("batch", "task")


class OWM(LearningRule):
    """BPTT + per-layer OWM input projector. Settings: alpha (> 0, regulariser of the
    projector update), update ("batch" | "task"), project_bias (treat the bias as the
    constant-1 input, default True; False leaves bias updates unprojected)."""

    name = "owm"
    uses_backprop = True
    supports_conv = False

    def __init__(self, alpha: float = 1.0, update: str = "batch", project_bias: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        if not alpha > 0:
            raise LocosnnError(f"owm: alpha must be > 0, got {alpha}")
        if update not in UPDATES:
            raise LocosnnError(f"owm: unknown update {update!r}; choose one of {', '.join(UPDATES)}")
        self.alpha = float(alpha)
        self.update = update
        self.project_bias = bool(project_bias)
        self.P: list[torch.Tensor] = []
        self.pending: list[list[torch.Tensor]] = []  # update="task": the current task's batch-mean inputs
        self.n_updates = 0

    # -- the projector ----------------------------------------------------------------------------
    def _check(self, network: SpikingNetwork) -> None:
        for li, layer in enumerate(network.layers):
            if getattr(layer, "kind", "linear") != "linear":
                raise LocosnnError(f"rule 'owm' supports fully connected layers only, but layer {li} of "
                                   f"{network.arch!r} is convolutional; use an fc --arch such as 784-256-10")
        device = network.layers[0].weight.device
        if not self.P:  # float64 on the network's device (see the module docstring)
            self.P = [torch.eye(layer.weight.shape[1] + (1 if self.project_bias else 0), dtype=torch.float64,
                                device=device) for layer in network.layers]
            self.pending = [[] for _ in network.layers]
        elif len(self.P) != network.depth or any(P.shape[0] != layer.weight.shape[1] + int(self.project_bias)
                                                  for P, layer in zip(self.P, network.layers)):
            raise LocosnnError("rule 'owm': its projectors do not match this network (state from another --arch?)")
        if self.P[0].device != device:  # the network was moved after the projectors were made or loaded
            self.P = [P.to(device) for P in self.P]
            self.pending = [[x.to(device) for x in xs] for xs in self.pending]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """(d,) input vector -> the projector's space (bias input 1 appended if projected), float64."""
        x = x.detach().double().reshape(-1)
        return torch.cat([x, x.new_ones(1)]) if self.project_bias else x

    def absorb(self, li: int, x: torch.Tensor) -> None:
        """P_li <- P - P x x^T P / (alpha + x^T P x) for one input vector x (layer li's space, no bias entry)."""
        v = self._input(x)
        P = self.P[li]
        Pv = P @ v
        P -= torch.outer(Pv, Pv) / (self.alpha + v @ Pv)  # P symmetric: x^T P = (P x)^T
        self.P[li] = 0.5 * (P + P.T)  # keep it exactly symmetric against round-off drift

    def projector(self, li: int) -> torch.Tensor:
        return self.P[li]

    # -- the step -----------------------------------------------------------------------------------
    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> StepReport:
        self._check(network)
        network.zero_grad(set_to_none=True)
        tr = network.run(x_seq, grad=True, record=True)
        loss = self.loss_fn(tr.out, y).mean()
        loss.backward()
        means = [torch.stack([x.detach() for x in tr.inputs[li]]).reshape(len(tr.inputs[li]), x_seq.shape[1], -1)
                 .mean((0, 1)) for li in range(network.depth)]
        if self.shard is not None:  # data-parallel: the global batch's mean inputs, so P agrees everywhere
            means = self.shard.means(means)
        with torch.no_grad():
            for li, layer in enumerate(network.layers):
                gw = layer.weight.grad if layer.weight.grad is not None else torch.zeros_like(layer.weight)
                has_b = layer.bias is not None
                gb = layer.bias.grad if has_b and layer.bias.grad is not None else None
                P = self.P[li]
                if self.project_bias:
                    b = gb if gb is not None else gw.new_zeros(gw.shape[0])
                    G = torch.cat([gw, b[:, None]], 1).double() @ P
                    layer.weight.grad = G[:, :-1].to(gw.dtype).contiguous()
                    if has_b:
                        layer.bias.grad = G[:, -1].to(gw.dtype).contiguous()
                else:
                    layer.weight.grad = (gw.double() @ P).to(gw.dtype)
            for li, m in enumerate(means):
                if self.update == "batch":
                    self.absorb(li, m)
                else:
                    self.pending[li].append(m.clone())
            if self.update == "batch":
                self.n_updates += 1
        return {"loss": float(loss.detach()), "out": tr.out.detach()}

    def setup(self, network: SpikingNetwork, optimizer: Any) -> list[str]:
        """Adam's per-coordinate scaling undoes the projection: a warning line (every entry point prints it)."""
        if isinstance(optimizer, torch.optim.Adam):
            return ["rule 'owm' with optimizer adam: Adam's per-coordinate scaling undoes the orthogonal "
                    "projection; use optimizer sgd (--optimizer sgd)"]
        return []

    def end_task(self, network: Optional[SpikingNetwork] = None) -> dict[str, Any]:
        """Task boundary (called by ``locosnn continual``): with ``update="task"``, fold the
        finished task's batch-mean inputs into P. A no-op for ``update="batch"``."""
        n = 0
        if self.update == "task" and self.pending:
            for li, xs in enumerate(self.pending):
                for x in xs:
                    self.absorb(li, x)
                n = max(n, len(xs))
            self.pending = [[] for _ in self.pending]
            self.n_updates += n
        return {"absorbed": n}

    def trace_ratio(self) -> list[float]:
        """Per layer: trace(P) / dim, 1 = nothing protected yet, falling as inputs are absorbed."""
        return [float(P.trace() / P.shape[0]) for P in self.P]

    def end_epoch(self, network: SpikingNetwork) -> dict[str, Any]:
        return {"owm_trace": self.trace_ratio()} if self.P else {}

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"P": [P.clone() for P in self.P], "pending": [[x.clone() for x in xs] for xs in self.pending],
                "n_updates": self.n_updates, "alpha": self.alpha, "update": self.update,
                "project_bias": self.project_bias}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.P = [P.clone().double() for P in state.get("P", [])]
        self.pending = [[x.clone() for x in xs] for xs in state.get("pending", [[] for _ in self.P])]
        self.n_updates = int(state.get("n_updates", 0))
