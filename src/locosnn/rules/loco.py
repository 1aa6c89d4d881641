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

How the projector is computed and how often (ours, behind flags; the defaults are the paper's):

* ``projector="batch"`` (default): the procedure above, every batch, by the reference code of
  ``projector.py`` (float64, the ordered Gram-Schmidt loop, Householder QR, k-means looping over
  clusters), after NP's estimate G: G <- (G Q) Q^T. On a 784-500-500-10 net on one CPU thread,
  with the memory full, this costs about as much as the NP step itself (``benchmarks/step_time.py``):
  k-means over the memory, the principal directions and the Gram-Schmidt loop, not the projection.
* ``projector="fast"``: the same projector, computed fast: ``fast_loco_basis`` (the same subspace
  and drop rule; for a batch no larger than the input dimension the orthonormalisation runs in
  the coefficient space of the batch's rows, ``row_space_basis``: the eigenproblem of the n x n
  Gram in the network's dtype, the drop rule's Cholesky factorisations in float64 on r x r
  matrices, one d x n product to form Q), ``kmeans_vectorised`` (stopped at its fixed point, which
  gives the result of every iteration bit for bit), and the projection fused into NP's estimate: for a fully
  connected layer G P = E^T ((X Q) Q^T) from the eligibilities E and inputs X of all T steps, which
  skips the n_out x d x TB product E^T X whenever that is cheaper (it is on the 500-wide layers:
  r = 110 < d). Equal to ``"batch"`` up to float rounding (tested per step, not bit for bit).
* ``kmeans_every=M``: k-means re-clusters the memory every M-th batch only (the memory still
  receives every batch; the exclusion test runs every batch on the current centroids). The memory
  changes by one batch mean (faithful) or ``per_batch`` samples (sample) per batch out of
  ``memory`` = 1000, so the centroids move little between re-clusterings.
* ``incremental_kmeans=True`` (with ``projector="fast"``): the same k-means (the same warm-started
  Lloyd iterations and stopping rule) without recomputing what did not change since the last
  batch: the distances of unchanged rows to unchanged centroids and the means of clusters whose
  members did not change are kept (``projector.IncrementalKMeans``; equal up to rounding, tested).
  With one new row per batch (faithful) it replaces about three memory x d x k GEMMs per layer by
  products with the one or two clusters that changed.
* ``projector_every=N``: the whole basis is rebuilt every N-th batch (the first included) and
  reused in between (the cluster memory still receives every batch, with the same draws a
  rebuild would make; k-means, the exclusion test and ``drop_mean``'s mean wait for the
  rebuild). Between rebuilds the update is projected on an earlier batch's low-rank subspace:
  on a stationary stream its leading directions are the current batch's (tested with principal
  angles), its weakest ones are not (6-epoch runs: N = 10 ended 1.1 points below the paper's
  projector (one seed), N = 2 with ``"fast"`` 0.7 below (5 seeds); ``docs/rules.md``).

* ``projector="tracked"`` (ours; not the paper's projector): the low-rank part is a running
  estimate of the layer's input subspace instead of each batch's own: the top-``rank`` eigenvectors
  of the decayed second moment of the inputs, M <- decay M + (1 - decay) X^T X / n with
  ``track_decay``, tracked by one step of subspace iteration per update
  (``projector.SubspaceTrack``: two n x d x r products, a d x r QR and an r x r SVD), started from
  the first batch's principal directions and updated every ``projector_every``-th batch (N = 1:
  every batch). The cluster-orthogonal part is the paper's, every batch, on the tracked basis
  (``projector.protect_basis``: the same in-order drop rule), reused while neither the basis nor
  the protected centroids change. Deviations from the per-batch basis: the directions are the
  input stream's (uncentred, so the mean direction is the leading one rather than a column of its
  own) rather than this batch's, and they include directions this batch has little of. Fused into
  the estimate as ``"fast"`` is. Measured (``docs/rules.md``): with ``projector_every=4,
  kmeans_every=10`` 0.44 +- 0.23 point below the paper's projector (10 seeds, 6 epochs) at 1.21x
  NP's step (depth 2; 1.09x at depth 10).

``projector_every=1, kmeans_every=1, projector="batch"`` is the paper's projector bit for bit;
with any of them changed the step counter (and Q_l when N > 1) is rule state (checkpointed).
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch

from ..errors import LocosnnError
from ..network import SpikingNetwork, Trace
from ..seeds import LOCO_PROJECTION, rule_generator
from .base import StepReport
from .np import NodePerturbation
from .projector import (ClusterMemory, SubspaceTrack, fast_loco_basis, loco_basis, project, protect_basis,
                        protected_basis)

VARIANTS = ("faithful", "sample")
PROJECTORS = ("batch", "fast", "tracked")


class LOCO(NodePerturbation):
    """Node perturbation + per-layer low-rank, cluster-orthogonal input projection.

    rank r (110 in the authors' code), k clusters (10), memory size (1000), tol (0.1),
    variant ("sample" | "faithful"), min_share, per_batch and window (sample variant),
    max_rows (conv patch rows used for the basis), projection (False = plain NP), whiten (0 = off;
    > 0: whitening preconditioner inside the subspace with relative damping ``whiten``),
    projector ("batch": reference | "fast": the same projector computed fast), projector_every
    (rebuild Q every N batches, reuse in between), kmeans_every (re-cluster every M batches),
    incremental_kmeans (k-means updating only what changed; with projector="fast" or "tracked"),
    track_decay (projector="tracked": the decay of the tracked input second moment per update)."""

    name = "loco"

    def __init__(self, rank: int = 110, k: int = 10, memory: int = 1000, tol: float = 0.1,
                 variant: str = "sample", projection: bool = True, min_share: float = 0.05,
                 per_batch: int = 16, max_rows: int = 2048, kmeans_iters: int = 5, window: int = 20,
                 drop_mean: bool = False, whiten: float = 0.0, projector: str = "batch",
                 projector_every: int = 1, kmeans_every: int = 1, incremental_kmeans: bool = False,
                 track_decay: float = 0.9, **kw: Any) -> None:
        super().__init__(**kw)
        if incremental_kmeans and projector == "batch":
            raise LocosnnError("incremental_kmeans needs projector='fast' or 'tracked' (the reference projector "
                               "keeps the authors' k-means)")
        if isinstance(track_decay, bool) or not isinstance(track_decay, (int, float)) or not 0 <= track_decay < 1:
            raise LocosnnError(f"track_decay must be a number in [0, 1), got {track_decay!r}")
        self.track_decay = float(track_decay)
        self.tracks: list[Optional[SubspaceTrack]] = []  # projector="tracked": the running basis per layer
        self.tracked_cache: list[Optional[tuple[int, Optional[torch.Tensor], torch.Tensor]]] = []
        self.incremental_kmeans = bool(incremental_kmeans)
        if projector not in PROJECTORS:
            raise LocosnnError(f"unknown LOCO projector {projector!r}; choose one of {', '.join(PROJECTORS)}")
        for name, v in (("projector_every", projector_every), ("kmeans_every", kmeans_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LocosnnError(f"{name} must be an integer >= 1, got {v!r}")
        self.projector, self.projector_every, self.kmeans_every = projector, projector_every, kmeans_every
        self.proj_step = 0  # batches projected so far (the schedules of projector_every and kmeans_every)
        self.bases: list[Optional[torch.Tensor]] = []  # projector_every > 1: the last rebuild's Q per layer
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
        self.proj_generator = rule_generator(self.seed, LOCO_PROJECTION)
        self.memories: list[ClusterMemory] = []
        self.last_projector_s = 0.0
        self.last_ranks: list[int] = []

    def layer_inputs(self, network: SpikingNetwork, clean: Trace, li: int) -> torch.Tensor:
        """Rows of presynaptic vectors (time-averaged clean input), with the bias input 1 appended."""
        layer = network.layers[li]
        if self.projector != "batch" and li == 0 and clean.static_input:  # the same input at every step
            xbar = clean.inputs[0][0]
        elif self.projector != "batch":  # the time mean without stacking the T steps
            xbar = sum(clean.inputs[li][1:], clean.inputs[li][0]) / len(clean.inputs[li])
        else:
            xbar = torch.stack(clean.inputs[li]).mean(0)
        if self.shard is not None:  # data-parallel: the projector is built from the global batch's inputs
            xbar = self.shard.gather_rows(xbar)
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
            self.store(mem, m)
            C = mem.centroids
            nearest = mem.nearest(m / m.norm())[0]
            keep = torch.ones(C.shape[0], dtype=torch.bool, device=C.device)
            keep[nearest] = False
            return C[keep]
        take = torch.randperm(X.shape[0], generator=self.proj_generator)[: self.per_batch].to(X.device)
        self.store(mem, X[take])
        C = mem.centroids
        Xn = X / (X.norm(dim=1, keepdim=True) + 1e-12)
        share = torch.bincount(mem.nearest(Xn), minlength=C.shape[0]).to(X.dtype) / X.shape[0]
        occupied = share >= self.min_share
        Cn = C / (C.norm(dim=1, keepdim=True) + 1e-12)
        # a centroid (near-)identical to an occupied one is the batch's own mode, not an earlier one
        near_occupied = (Cn @ Cn[occupied].T).max(1).values > 0.99 if occupied.any() else torch.zeros_like(occupied)
        # a cluster still fed by recent batches belongs to the current input distribution
        recent = mem.recent(self.window)
        return C[~occupied & ~near_occupied & ~recent]

    def store(self, mem: ClusterMemory, vecs: torch.Tensor) -> None:
        """Add this batch's vectors to a cluster memory; re-cluster it unless ``kmeans_every`` skips this batch."""
        mem.push(vecs)
        if self.kmeans_every == 1 or mem.centroids is None or self.proj_step % self.kmeans_every == 0:
            mem.recluster(self.proj_generator)

    def new_memory(self) -> ClusterMemory:
        return ClusterMemory(self.memory_size, self.k, self.kmeans_iters, vectorised=self.projector != "batch",
                             incremental=self.incremental_kmeans)

    def projector_basis(self, network: SpikingNetwork, clean: Trace, li: int) -> torch.Tensor:
        """Layer li's Q built from this batch (the cluster memory is updated)."""
        X = self.layer_inputs(network, clean, li)
        while len(self.memories) <= li:
            self.memories.append(self.new_memory())
        excluded = self.excluded_centroids(self.memories[li], X) if self.k > 0 else None
        if self.drop_mean:
            m = X.mean(0, keepdim=True)
            excluded = m if excluded is None else torch.cat([excluded, m])
        if self.projector == "fast":
            return fast_loco_basis(X, self.rank, excluded, self.tol)
        return loco_basis(X, self.rank, excluded, self.tol)

    def layer_basis(self, network: SpikingNetwork, clean: Trace, li: int) -> torch.Tensor:
        """This batch's Q for layer li: rebuilt (``projector_basis``) or, between rebuilds of
        ``projector_every`` > 1, the last rebuild's, with this batch stored in the cluster memory;
        projector="tracked": the tracked basis (``tracked_basis``)."""
        if self.projector == "tracked":
            return self.tracked_basis(network, clean, li)
        if self.projector_every == 1:
            return self.projector_basis(network, clean, li)
        while len(self.bases) <= li:
            self.bases.append(None)
        Q = self.bases[li]
        if Q is None or self.proj_step % self.projector_every == 0:
            Q = self.projector_basis(network, clean, li)
        else:
            self.feed_memory(network, clean, li)
            w = network.layers[li].weight
            if Q.dtype != w.dtype or Q.device != w.device:  # the network was moved since the rebuild
                Q = Q.to(w)
        self.bases[li] = Q
        return Q

    def tracked_basis(self, network: SpikingNetwork, clean: Trace, li: int) -> torch.Tensor:
        """projector="tracked": layer li's tracked basis (started from the first batch, updated every
        ``projector_every``-th batch) made orthogonal to this batch's protected centroids."""
        X = self.layer_inputs(network, clean, li)
        while len(self.memories) <= li:
            self.memories.append(self.new_memory())
        while len(self.tracks) <= li:
            self.tracks.append(None)
            self.tracked_cache.append(None)
        excluded = self.excluded_centroids(self.memories[li], X) if self.k > 0 else None
        if self.drop_mean:
            m = X.mean(0, keepdim=True)
            excluded = m if excluded is None else torch.cat([excluded, m])
        if excluded is not None and not excluded.shape[0]:
            excluded = None
        track = self.tracks[li]
        if track is None:
            track = self.tracks[li] = SubspaceTrack.start(X, self.rank, self.proj_generator)
        else:
            if track.Q.dtype != X.dtype or track.Q.device != X.device:  # the network was moved since the last batch
                track.Q, track.lam = track.Q.to(X), track.lam.to(X)
                self.tracked_cache[li] = None
            if self.proj_step % self.projector_every == 0:
                track.update(X, self.track_decay)
        cached = self.tracked_cache[li]
        if (cached is not None and cached[0] == track.updates and
                (excluded is None if cached[1] is None else
                 excluded is not None and excluded.shape == cached[1].shape and torch.equal(excluded, cached[1]))):
            Q = cached[2]
        else:
            C = protected_basis(excluded) if excluded is not None else None
            Q = protect_basis(track.basis(), C, self.tol)
            self.tracked_cache[li] = (track.updates, excluded, Q)
        w = network.layers[li].weight
        return Q if Q.dtype == w.dtype and Q.device == w.device else Q.to(w)

    def feed_memory(self, network: SpikingNetwork, clean: Trace, li: int) -> None:
        """Store this batch in layer li's cluster memory as a rebuild would (the same generator
        draws), without k-means: the batch mean (faithful) or ``per_batch`` sampled rows (sample)."""
        if self.k <= 0 or li >= len(self.memories):
            return
        mem = self.memories[li]
        xs = clean.inputs[li]
        if network.layers[li].kind != "linear" or self.shard is not None:  # conv patches; data-parallel: gathered rows
            X = self.layer_inputs(network, clean, li)
            if self.variant == "faithful":
                mem.push(X.mean(0, keepdim=True))
            else:
                mem.push(X[torch.randperm(X.shape[0], generator=self.proj_generator)[: self.per_batch].to(X.device)])
            return
        B = xs[0].shape[0]
        if self.variant == "faithful":  # the mean over the batch of the time-mean input, without stacking the trace
            m = sum(a.reshape(B, -1).mean(0) for a in xs) / len(xs)
            mem.push(torch.cat([m, m.new_ones(1)])[None])
        else:
            take = torch.randperm(B, generator=self.proj_generator)[: self.per_batch].to(xs[0].device)
            rows = torch.stack([a[take] for a in xs]).mean(0).reshape(take.shape[0], -1)
            mem.push(torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1))

    @staticmethod
    def projected_outer(layer, e: torch.Tensor, x: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[G_W | G_b] Q Q^T with [G_W | G_b] = layer.outer(e, x) (e, x: all steps' rows), fused for a fully
        connected layer when cheaper: E^T (([X | 1] Q) Q^T) never forms the n_out x d product E^T X."""
        n_rows, r = e.shape[0], Q.shape[1]
        if layer.kind == "linear":
            X = x.reshape(n_rows, -1)
            n_out, d = e.shape[1], X.shape[1]
            if n_rows * d * r + n_out * n_rows * r + n_out * r * d < n_out * n_rows * d + 2 * n_out * (d + 1) * r:
                XQ = torch.addmm(Q[-1], X, Q[:-1])  # [X | 1] Q
                G = (e.T @ XQ) @ Q.T
                return G[:, :-1], G[:, -1]
        gw, gb = layer.outer(e, x)
        G = project(torch.cat([gw, gb[:, None]], 1), Q)
        return G[:, :-1], G[:, -1]

    @property
    def fused(self) -> bool:
        """projector="fast" or "tracked" on the recorded path: the projection runs inside the estimate."""
        return (self.projection and self.projector != "batch" and self.whiten == 0 and not self.online
                and self.deep_estimator is None)

    def layer_transform(self, network: SpikingNetwork, clean: Trace, li: int, gw: torch.Tensor,
                        gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project layer li's update on its input side: [G_W | G_b] <- [G_W | G_b] Q Q^T."""
        if not self.projection:
            return gw, gb
        Q = self.layer_basis(network, clean, li)
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
        self.proj_step += 1
        self.last_projector_s = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> StepReport:
        if not self.fused:
            report = super().step(network, x_seq, y)
            report["projector_s"] = self.last_projector_s
            return report
        # projector="fast": NP's recorded step with the projection fused into the estimate; projector_s
        # counts building the bases (the fused product replaces NP's own, so it has no separate cost)
        clean, noisy, dl, l_clean = self.perturbed_passes(network, x_seq, y)
        self.last_ranks, grads, spent = [], [], 0.0
        for li, e, x in self.estimate_factors(network, noisy, dl):
            t0 = time.perf_counter()
            Q = self.layer_basis(network, clean, li)
            spent += time.perf_counter() - t0
            self.last_ranks.append(Q.shape[1])
            grads.append(self.projected_outer(network.layers[li], e, x, Q.to(e.dtype)))
        self.proj_step += 1
        self.last_projector_s = spent
        self.write_grads(network, grads)
        return {"loss": float(l_clean.mean()), "out": clean.out, "mean_abs_dl": float(dl.abs().mean()),
                "projector_s": spent}

    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s.update({"proj_generator": self.proj_generator.get_state(), "memories": [m.state_dict() for m in self.memories]})
        if (self.projector, self.projector_every, self.kmeans_every) != ("batch", 1, 1):
            s.update({"proj_step": self.proj_step, "bases": list(self.bases)})
        if self.projector == "tracked":
            s["tracks"] = [t.state_dict() if t is not None else None for t in self.tracks]
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.proj_generator.set_state(state["proj_generator"])
        self.memories = []
        for ms in state["memories"]:
            m = self.new_memory()
            m.load_state_dict(ms)
            self.memories.append(m)
        self.proj_step = int(state.get("proj_step", 0))
        self.bases = list(state.get("bases", []))
        self.tracks = [SubspaceTrack.from_state(t) if t is not None else None for t in state.get("tracks", [])]
        self.tracked_cache = [None] * len(self.tracks)  # rebuilt from the tracks (the same Q)
