"""LOCO: LOw-rank Cluster Orthogonal weight modification (Ma & Yu, arXiv 2602.22259).

LOCO is node perturbation (see ``np.py``) whose per-layer estimate is projected on
its presynaptic (input) side, bias included as the constant-1 input:

    G_l <- G_l P_l,   P_l = Q_l Q_l^T

Q_l is rebuilt every batch from the layer's *clean* inputs (time-averaged over
the T steps; conv layers use im2col patches, subsampled to ``max_rows``):

1. low-rank part: the normalised batch mean plus the top (rank - 1) principal
   directions of the batch inputs;
2. cluster-orthogonal part: a per-layer memory of past input directions is
   clustered by k-means (k clusters); the part-1 basis is made orthogonal to
   the centroids that the current batch does not belong to (Gram-Schmidt,
   directions with residual < ``tol`` dropped).

Variants (``variant=``):

* ``"faithful"`` (the authors' code): the memory holds up to ``memory`` normalised
  batch-mean inputs; the one centroid nearest the current batch mean is dropped,
  the other k - 1 are protected. This presumes label-sorted batches (then batch
  means are class-like); on shuffled i.i.d. batches every batch mean is nearly
  the same, the centroids collapse onto it, and protecting k - 1 of them removes
  the mean input direction that every class needs.
* ``"sample"`` (ours, the default for shuffled data): the memory holds normalised
  *per-sample* inputs (``per_batch`` drawn from each batch, FIFO up to ``memory``),
  so clusters are input modes (classes, tasks) whatever the batch order. A
  centroid is protected only if (a) fewer than ``min_share`` of the current
  batch's samples fall in it and (b) none of its members was stored in the last
  ``window`` batches, i.e. it is a mode of *earlier* inputs, not a small mode of
  the current distribution. On i.i.d. batches every cluster keeps receiving
  members, nothing is protected, and LOCO reduces to the low-rank variance
  reduction; on a task stream, clusters of earlier tasks are protected once the
  stream has moved on for ``window`` batches, which is the OWM intent.

``drop_mean=True`` (ours, behind a flag) also removes the current batch's mean
input direction from the update space. Why: NP's noise term sum_b n_b x_b^T puts
its energy on input directions in proportion to the inputs' *uncentred* second
moment, which non-negative spike inputs concentrate on the mean direction, while
the gradient signal lives mostly in the centred directions. The faithful variant
on shuffled batches does this by accident (its protected centroids collapse onto
the mean), and it learned faster than the sample variant in our benchmark.

``whiten=lam`` (ours, behind a flag; R7 of ``docs/deep.md``): instead of the orthogonal
projector Q Q^T, use the input-whitening preconditioner truncated to LOCO's subspace,

    P_w = Q V (Lambda + lam mean(Lambda) I)^-1 V^T Q^T * mean(Lambda)

where V Lambda V^T is the eigendecomposition of Q^T (X^T X / n) Q, the batch's uncentred input
second moment inside the subspace (K-FAC's input factor, the object OWM's recursion
approximates). Directions of small input variance get larger steps; the update still lies
in the subspace, orthogonal to the protected centroids. ``whiten=0`` (default) is LOCO.

``projection=False`` returns plain NP (bit-identical under the same seed: the
projector draws from its own generator).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LocosnnError
from ..network import SpikingNetwork, Trace
from .np import NodePerturbation
from .projector import ClusterMemory, loco_basis, project

VARIANTS = ("faithful", "sample")


class LOCO(NodePerturbation):
    """Node perturbation + per-layer low-rank, cluster-orthogonal input projection.

    rank r (110 in the authors' code), k clusters (10), memory size (1000), tol (0.1),
    variant ("sample" | "faithful"), min_share, per_batch and window (sample variant),
    max_rows (conv patch rows used for the basis), projection (False = plain NP), whiten (0 = off;
    > 0: whitening preconditioner inside the subspace with relative damping ``whiten``)."""

    name = "loco"

    def __init__(self, rank: int = 110, k: int = 10, memory: int = 1000, tol: float = 0.1,
                 variant: str = "sample", projection: bool = True, min_share: float = 0.05,
                 per_batch: int = 16, max_rows: int = 2048, kmeans_iters: int = 5, window: int = 20,
                 drop_mean: bool = False, whiten: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        if whiten < 0:
            raise LocosnnError(f"whiten must be >= 0 (0 = off), got {whiten}")
        self.whiten = float(whiten)
        self.drop_mean = bool(drop_mean)
        if variant not in VARIANTS:
            raise LocosnnError(f"unknown LOCO variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if rank < 1:
            raise LocosnnError(f"rank must be >= 1, got {rank}")
        self.rank, self.k, self.memory_size, self.tol = rank, k, memory, tol
        self.variant, self.projection, self.min_share = variant, bool(projection), min_share
        self.per_batch, self.max_rows, self.kmeans_iters = per_batch, max_rows, kmeans_iters
        self.window = window
        self.proj_generator = torch.Generator().manual_seed(10_007 * self.seed + 2)
        self.memories: list[ClusterMemory] = []
        self.last_projector_s = 0.0
        self.last_ranks: list[int] = []

    def layer_inputs(self, network: SpikingNetwork, clean: Trace, li: int) -> torch.Tensor:
        """Rows of presynaptic vectors (time-averaged clean input), with the bias input 1 appended."""
        layer = network.layers[li]
        xbar = torch.stack(clean.inputs[li]).mean(0)
        if layer.kind == "linear":
            X = xbar.reshape(xbar.shape[0], -1)
        else:
            X = layer.patches(xbar)
            if X.shape[0] > self.max_rows:
                X = X[torch.randperm(X.shape[0], generator=self.proj_generator)[: self.max_rows].to(X.device)]
        return torch.cat([X, X.new_ones(X.shape[0], 1)], 1)

    def excluded_centroids(self, mem: ClusterMemory, X: torch.Tensor) -> torch.Tensor | None:
        """Centroids to protect (rows), after adding this batch to the memory."""
        if self.variant == "faithful":
            m = X.mean(0, keepdim=True)
            mem.add(m, self.proj_generator)
            C = mem.centroids
            nearest = torch.cdist(m / m.norm(), C).argmin()
            keep = torch.ones(C.shape[0], dtype=torch.bool, device=C.device)
            keep[nearest] = False
            return C[keep]
        take = torch.randperm(X.shape[0], generator=self.proj_generator)[: self.per_batch].to(X.device)
        mem.add(X[take], self.proj_generator)
        C = mem.centroids
        Xn = X / (X.norm(dim=1, keepdim=True) + 1e-12)
        share = torch.bincount(torch.cdist(Xn, C).argmin(1), minlength=C.shape[0]).to(X.dtype) / X.shape[0]
        occupied = share >= self.min_share
        Cn = C / (C.norm(dim=1, keepdim=True) + 1e-12)
        # a centroid (near-)identical to an occupied one is the batch's own mode, not an earlier one
        near_occupied = (Cn @ Cn[occupied].T).max(1).values > 0.99 if occupied.any() else torch.zeros_like(occupied)
        # a cluster still fed by recent batches belongs to the current input distribution
        recent = mem.recent(self.window)
        return C[~occupied & ~near_occupied & ~recent]

    def projector_basis(self, network: SpikingNetwork, clean: Trace, li: int) -> torch.Tensor:
        X = self.layer_inputs(network, clean, li)
        while len(self.memories) <= li:
            self.memories.append(ClusterMemory(self.memory_size, self.k, self.kmeans_iters))
        excluded = self.excluded_centroids(self.memories[li], X) if self.k > 0 else None
        if self.drop_mean:
            m = X.mean(0, keepdim=True)
            excluded = m if excluded is None else torch.cat([excluded, m])
        return loco_basis(X, self.rank, excluded, self.tol)

    def layer_transform(self, network: SpikingNetwork, clean: Trace, li: int, gw: torch.Tensor,
                        gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project layer li's update on its input side: [G_W | G_b] <- [G_W | G_b] Q Q^T."""
        if not self.projection:
            return gw, gb
        Q = self.projector_basis(network, clean, li)
        self.last_ranks.append(Q.shape[1])
        G = torch.cat([gw, gb[:, None]], 1)
        if self.whiten > 0:
            X = self.layer_inputs(network, clean, li)
            XQ = X.to(Q.dtype) @ Q
            lam, V = torch.linalg.eigh((XQ.T @ XQ / X.shape[0]).double())
            lam = lam.clamp_min(0).to(Q.dtype)
            m = lam.mean().clamp_min(1e-12)
            QV = Q @ V.to(Q.dtype)
            G = ((G @ QV) * (m / (lam + self.whiten * m))) @ QV.T
        else:
            G = project(G, Q)
        return G[:, :-1], G[:, -1]

    def transform(self, network: SpikingNetwork, clean: Trace, grads):
        if not self.projection:
            return grads
        t0 = time.perf_counter()
        self.last_ranks = []
        out = super().transform(network, clean, grads)
        self.last_projector_s = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        report = super().step(network, x_seq, y)
        report["projector_s"] = self.last_projector_s
        return report

    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s.update({"proj_generator": self.proj_generator.get_state(), "memories": [m.state_dict() for m in self.memories]})
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.proj_generator.set_state(state["proj_generator"])
        self.memories = []
        for ms in state["memories"]:
            m = ClusterMemory(self.memory_size, self.k, self.kmeans_iters)
            m.load_state_dict(ms)
            self.memories.append(m)
