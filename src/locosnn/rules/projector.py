"""LOCO's input-side projector: a low-rank basis of the current inputs, made
orthogonal to the centroids of earlier input clusters (Ma & Yu 2026; the
cluster-orthogonal idea is OWM, Zeng et al. 2019).

Everything is kept as a thin orthonormal basis Q (d x r'), and the projection of
an update G (n x d) is applied as (G Q) Q^T: O(n d r), never a dense d x d matrix.
P = Q Q^T is symmetric and idempotent by construction.

Two implementations of the same basis: :func:`loco_basis` (the reference: float64, the
ordered Gram-Schmidt loop of :func:`gram_schmidt`, Householder QR) and :func:`fast_loco_basis`
(LOCO's ``projector="fast"``: the same subspace, the same drop rule, in the inputs' dtype with
Cholesky factorisations instead of the loop and the QR, and for n <= d the orthonormalisation in the
coefficient space of the batch's rows, :func:`row_space_basis`; equal up to rounding, tested). Likewise
:func:`kmeans` and :func:`kmeans_vectorised` (one GEMM per iteration instead of a loop over clusters,
stopped at its fixed point).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def low_rank_basis(X: torch.Tensor, r: int) -> torch.Tensor:
    """Normalised mean of the rows of X plus the top (r - 1) principal directions
    of X (rows centred), as columns (d x <=r); not yet orthonormalised."""
    mean = X.mean(0)
    cols = [mean / (mean.norm() + 1e-12)]
    if r > 1 and X.shape[0] > 1:
        Xc = X - mean
        q = min(r - 1, min(Xc.shape))
        if q > 0:
            V, S = principal_directions(Xc, q)
            keep = S > S[0] * 1e-6 if S.numel() else S.bool()
            cols.append(V[:, keep])
    return torch.cat([c if c.dim() == 2 else c[:, None] for c in cols], 1)


def principal_directions(Xc: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q right singular vectors (d x q) and singular values of a centred X (n x d).

    Uses the eigendecomposition of the smaller Gram matrix (n x n if n <= d, else
    d x d): O(min(n, d)^2 max(n, d)), deterministic, and it avoids LAPACK's
    divide-and-conquer SVD, which we measured to stall on rank-deficient inputs."""
    n, d = Xc.shape
    X64 = Xc.double()
    if n <= d:
        evals, U = torch.linalg.eigh(X64 @ X64.T)
        evals, U = evals.flip(0)[:q].clamp_min(0), U.flip(1)[:, :q]
        S = evals.sqrt()
        V = (X64.T @ U) / (S + 1e-30)
    else:
        evals, V = torch.linalg.eigh(X64.T @ X64)
        evals, V = evals.flip(0)[:q].clamp_min(0), V.flip(1)[:, :q]
        S = evals.sqrt()
    return V.to(Xc.dtype), S.to(Xc.dtype)


def gram_schmidt(vectors: torch.Tensor, against: Optional[torch.Tensor] = None, tol: float = 0.1) -> torch.Tensor:
    """Orthonormalise the columns of ``vectors`` (each first scaled to unit norm), in
    order, orthogonal to the orthonormal columns of ``against``; a column whose
    residual norm falls below ``tol`` is dropped (the authors' drop tolerance 0.1).

    Same result as classical Gram-Schmidt (:func:`gram_schmidt_loop`, the test
    oracle), computed without a loop over d-vectors: the residuals R after
    removing ``against`` are reduced through their small m x m Gram matrix by an
    in-order Cholesky that skips columns with residual < tol, then
    Q = R_kept L^-T, re-orthogonalised once (float64 throughout)."""
    d, m = vectors.shape
    if m == 0:
        return vectors.new_zeros(d, 0)
    V = vectors.double()
    V = V / (V.norm(dim=0, keepdim=True) + 1e-12)
    C = against.double() if against is not None and against.shape[1] else None
    R = V - C @ (C.T @ V) if C is not None else V
    # in-order pivoted Cholesky of the Gram matrix, on the CPU in float64 (m is small, the loop is
    # cheap, and its branches would synchronise an accelerator at every column)
    S = (R.T @ R).cpu().clone()
    Lf = torch.zeros(m, m, dtype=torch.float64)
    kept: list[int] = []
    tol2 = tol * tol
    for j in range(m):
        sjj = float(S[j, j])
        if sjj < tol2:
            continue
        col = S[:, j] / math.sqrt(sjj)
        col[:j] = 0.0
        Lf[:, len(kept)] = col
        S -= torch.outer(col, col)
        kept.append(j)
    if not kept:
        return vectors.new_zeros(d, 0)
    k = len(kept)
    L = Lf[kept, :k].to(R.device)
    Q = torch.linalg.solve_triangular(L, R[:, kept].T, upper=False).T  # R_K L^-T
    if C is not None:
        Q = Q - C @ (C.T @ Q)
    Q, _ = torch.linalg.qr(Q)
    return Q.to(vectors.dtype)


def gram_schmidt_loop(vectors: torch.Tensor, against: Optional[torch.Tensor] = None, tol: float = 0.1) -> torch.Tensor:
    """Reference classical Gram-Schmidt (two passes per vector) with the same drop rule; slow, for tests."""
    d = vectors.shape[0]
    basis = against if against is not None else vectors.new_zeros(d, 0)
    n_fixed = basis.shape[1]
    Q = basis
    for j in range(vectors.shape[1]):
        v = vectors[:, j]
        v = v / (v.norm() + 1e-12)
        for _ in range(2):
            if Q.shape[1]:
                v = v - Q @ (Q.T @ v)
        nv = v.norm()
        if nv < tol:
            continue
        Q = torch.cat([Q, (v / nv)[:, None]], 1)
    return Q[:, n_fixed:]


def orthonormal(vectors: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of the span of the columns (directions below tol dropped)."""
    return gram_schmidt(vectors, None, tol)


def _kmeans_start(X: torch.Tensor, k: int, init: Optional[torch.Tensor],
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """The starting centroids of both k-means: ``init`` when it has the shape (min(k, n), d), else
    min(k, n) distinct rows of X drawn from ``generator``."""
    n = X.shape[0]
    k = min(k, n)
    if init is not None and init.shape == (k, X.shape[1]):
        return init.clone()
    return X[torch.randperm(n, generator=generator)[:k].to(X.device)].clone()


def kmeans(X: torch.Tensor, k: int, iters: int = 10, init: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Plain Lloyd k-means on rows of X; returns (k', d) centroids, k' = min(k, len(X))."""
    C = _kmeans_start(X, k, init, generator)
    k = C.shape[0]
    for _ in range(iters):
        assign = torch.cdist(X, C).argmin(1)
        for j in range(k):
            m = assign == j
            if m.any():
                C[j] = X[m].mean(0)
    return C


class ClusterMemory:
    """A FIFO memory of up to ``size`` normalised input directions, the batch index
    at which each was stored (``stamps``), and their k-means centroids."""

    def __init__(self, size: int = 1000, k: int = 10, iters: int = 10, vectorised: bool = False,
                 incremental: bool = False) -> None:
        self.size, self.k, self.iters = size, k, iters
        self.vectorised = vectorised or incremental  # k-means by kmeans_vectorised (LOCO's projector="fast")
        self.incremental = incremental  # ... or by IncrementalKMeans (LOCO's incremental_kmeans=True)
        self.items: Optional[torch.Tensor] = None
        self.stamps: Optional[torch.Tensor] = None
        self.centroids: Optional[torch.Tensor] = None
        self.batches = 0
        self.pos = 0  # vectorised memory when full: the index of the oldest row (a ring)
        self.cache: Optional[IncrementalKMeans] = None

    def add(self, vecs: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """Store ``vecs`` (rows, normalised here) and re-cluster the memory."""
        self.push(vecs)
        self.recluster(generator)

    def push(self, vecs: torch.Tensor) -> None:
        """Store ``vecs`` (rows, normalised here) as one batch, without re-clustering (LOCO's
        ``kmeans_every`` and ``projector_every`` feed the memory at every batch and cluster it less often)."""
        vecs = vecs / (vecs.norm(dim=1, keepdim=True) + 1e-12)
        stamps = torch.full((vecs.shape[0],), self.batches, dtype=torch.long, device=vecs.device)
        if self.items is not None and (self.items.device != vecs.device or self.items.dtype != vecs.dtype):
            # the network was moved (.to()) after this memory was filled: the memory follows it
            self.items, self.stamps = self.items.to(vecs), self.stamps.to(vecs.device)
            self.centroids = self.centroids.to(vecs) if self.centroids is not None else None
            self.cache = None  # rebuilt by the next k-means (a full fit)
        self.batches += 1
        if self.items is None:
            self.items, self.stamps = vecs[-self.size:], stamps[-self.size:]
            self.cache = None
        elif self.vectorised and self.items.shape[0] == self.size and vecs.shape[0] < self.size:
            # full (projector="fast"): overwrite the oldest rows in place, a ring from self.pos, instead
            # of copying the whole memory every batch; the rows' order differs from the reference FIFO,
            # which k-means, the exclusion test and `recent` do not depend on (beyond rounding)
            idx = (self.pos + torch.arange(vecs.shape[0], device=vecs.device)) % self.size
            self.items[idx], self.stamps[idx] = vecs, stamps
            self.pos = int((self.pos + vecs.shape[0]) % self.size)
            if self.cache is not None:
                self.cache.replaced(idx)
        else:
            n_old = self.items.shape[0]
            self.items = torch.cat([self.items, vecs])[-self.size:]
            self.stamps = torch.cat([self.stamps, stamps])[-self.size:]
            self.pos = 0
            if self.cache is not None:
                self.cache.appended(n_old, vecs.shape[0], self.size)

    def recluster(self, generator: Optional[torch.Generator] = None) -> None:
        """k-means on the memory, warm-started from the current centroids."""
        if self.incremental:
            if self.cache is None or not self.cache.ready(self.items, self.centroids, self.k):
                self.centroids = kmeans_vectorised(self.items, self.k, self.iters, init=self.centroids,
                                                   generator=generator)
                self.cache = IncrementalKMeans.fitted(self.items, self.centroids)
            else:
                self.centroids = self.cache.lloyd(self.items, self.centroids, self.iters)
            return
        fit = kmeans_vectorised if self.vectorised else kmeans
        self.centroids = fit(self.items, self.k, self.iters, init=self.centroids, generator=generator)

    def nearest(self, X: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centroid for each row of X."""
        if self.vectorised:
            return nearest(X, self.centroids)
        return torch.cdist(X, self.centroids).argmin(1)

    def recent(self, window: int) -> torch.Tensor:
        """Per centroid: does it hold an item stored in the last ``window`` batches?"""
        assign = self.nearest(self.items)
        fresh = self.stamps >= self.batches - window
        hit = torch.zeros(self.centroids.shape[0], dtype=torch.bool, device=self.centroids.device)
        hit[assign[fresh]] = True
        return hit

    def state_dict(self) -> dict:
        s = {"items": self.items, "stamps": self.stamps, "centroids": self.centroids, "batches": self.batches}
        if self.pos:
            s["pos"] = self.pos
        if self.cache is not None:  # so that a resumed run continues bit for bit
            s["kmeans_cache"] = self.cache.state_dict()
        return s

    def load_state_dict(self, s: dict) -> None:
        self.items, self.stamps, self.centroids = s["items"], s.get("stamps"), s["centroids"]
        self.batches = s.get("batches", 0)
        self.pos = int(s.get("pos", 0))
        self.cache = IncrementalKMeans.from_state(s["kmeans_cache"]) if "kmeans_cache" in s else None
        if self.stamps is None and self.items is not None:
            self.stamps = torch.zeros(self.items.shape[0], dtype=torch.long, device=self.items.device)


class IncrementalKMeans:
    """Lloyd's k-means on a memory that changes by a few rows per batch, without recomputing what did not change.

    :func:`kmeans_vectorised` warm-started from the last centroids C recomputes, per iteration, the distances of
    every row to every centroid (an n x k x d GEMM) and every mean (another), and needs at least two iterations
    to see its fixed point: about three n x d x k GEMMs per batch, the largest part of LOCO's projector cost
    once its memory is full. Here the distances D[i, j] = |c_j|^2 - 2 x_i . c_j to the current centroids and the
    assignment ``owner`` whose means they are are kept between calls. Then the same iterations cost:

    * the first assignment (rows against the unchanged C): only the new rows' distances (``dirty``); a row that
      did not change keeps its row of D, which is exact (C is unchanged since D was computed);
    * a means update: only the clusters whose members changed (a cluster with the same member rows, none of them
      replaced, has the same mean);
    * the next assignment: only the columns of D for those clusters (n x d x |changed|).

    It runs the same iterations with the same stopping rule (a repeated assignment, or ``iters``) as
    :func:`kmeans_vectorised`, so it reaches the same centroids up to rounding (a mean summed over a cluster's
    rows instead of through the one-hot GEMM, distances computed for a subset of rows or columns); tested."""

    def __init__(self, dist: torch.Tensor, owner: torch.Tensor) -> None:
        self.dist, self.owner = dist, owner  # (n, k) distances to the current centroids; their assignment (n,)
        self.dirty = torch.zeros(owner.shape[0], dtype=torch.bool, device=owner.device)
        # the centroids may not be the means of ``owner`` (a fit stopped by its iteration cap, or rows dropped
        # from the memory's front): the next call's first means update then recomputes every cluster, as
        # kmeans_vectorised does
        self.stale = True

    @classmethod
    def fitted(cls, X: torch.Tensor, C: torch.Tensor) -> "IncrementalKMeans":
        """The cache for centroids C on the memory X: the assignment whose means are C, and D.
        (``kmeans_vectorised`` returns the means of the last assignment it computed; C's own nearest
        assignment equals it at a fixed point, which it almost always reaches; otherwise the cache's owner
        is the nearest assignment under C, and the next call's first means update makes C consistent.)"""
        D = torch.addmm(C.pow(2).sum(1), X, C.T, alpha=-2)
        return cls(D, D.argmin(1))

    def ready(self, X: Optional[torch.Tensor], C: Optional[torch.Tensor], k: int) -> bool:
        """Can the next k-means start from this cache (shapes agree; the memory had k rows or more)?"""
        return (X is not None and C is not None and C.shape[0] == min(k, X.shape[0]) and
                self.dist.shape == (X.shape[0], C.shape[0]) and self.dist.dtype == X.dtype and
                self.dist.device == X.device)

    def replaced(self, idx: torch.Tensor) -> None:
        """Rows ``idx`` of the memory were overwritten (a ring)."""
        self.dirty[idx] = True

    def appended(self, n_old: int, m: int, size: int) -> None:
        """m rows were appended to a memory of n_old rows, and the oldest dropped beyond ``size``."""
        n_new = min(n_old + m, size)
        drop = n_old + m - n_new
        fill = lambda t, v: torch.cat([t, t.new_full((m,) + tuple(t.shape[1:]), v)])[drop:]  # noqa: E731
        self.dist, self.owner, self.dirty = fill(self.dist, 0.0), fill(self.owner, -1), fill(self.dirty, True)
        self.stale = self.stale or drop > 0  # the dropped rows' clusters lost members we no longer know

    def lloyd(self, X: torch.Tensor, C: torch.Tensor, iters: int) -> torch.Tensor:
        """``kmeans_vectorised(X, k, iters, init=C)``, incrementally; returns the new centroids."""
        C = C.clone()
        D, k = self.dist, C.shape[0]
        if bool(self.dirty.any()):
            rows = self.dirty.nonzero().squeeze(1)
            D[rows] = torch.addmm(C.pow(2).sum(1), X[rows], C.T, alpha=-2)
        base = self.owner  # the assignment C holds the means of
        changed_rows = self.dirty.clone()  # rows whose content changed: their old cluster's mean changed too
        prev = None
        for _ in range(iters):
            assign = D.argmin(1)
            if prev is not None and torch.equal(assign, prev):
                break
            prev = assign
            if self.stale:
                touched, self.stale = torch.arange(k, device=X.device), False
            else:
                moved = changed_rows | (assign != base)
                touched = torch.unique(torch.cat([assign[moved], base[moved][base[moved] >= 0]]))
            if touched.numel():
                A = (assign[:, None] == touched[None, :]).to(X.dtype)  # (n, |touched|): the touched clusters' one-hot
                counts = A.sum(0)
                means = (A.T @ X) / counts.clamp_min(1)[:, None]
                C[touched] = torch.where(counts[:, None] > 0, means, C[touched])
                D[:, touched] = torch.addmm(C[touched].pow(2).sum(1), X, C[touched].T, alpha=-2)
            base, changed_rows = assign, torch.zeros_like(changed_rows)
        self.owner = base
        self.dirty.zero_()
        return C

    def state_dict(self) -> dict:
        return {"dist": self.dist, "owner": self.owner, "dirty": self.dirty, "stale": self.stale}

    @classmethod
    def from_state(cls, s: dict) -> "IncrementalKMeans":
        c = cls(s["dist"], s["owner"])
        c.dirty, c.stale = s["dirty"], bool(s.get("stale", True))
        return c


def ordered_cholesky(S: torch.Tensor, tol: float, max_drops: int = 16) -> Optional[tuple[list[int], torch.Tensor]]:
    """The in-order drop rule of :func:`gram_schmidt` on a Gram matrix S (m x m, float64), by
    re-factorisation: Cholesky of the kept columns; the first column whose residual L_jj (its norm
    after removing the kept columns before it) is below ``tol`` is dropped and the rest refactored
    (the factor of the columns before it does not change, so the decisions are the loop's). Returns
    (kept indices, L of the kept columns), or None after ``max_drops`` drops (the caller falls back
    to the loop, which costs one step per column instead of one factorisation per drop)."""
    keep = list(range(S.shape[0]))
    for _ in range(max_drops + 1):
        if not keep:
            return [], S.new_zeros(0, 0)
        if len(keep) == S.shape[0]:
            L, info = torch.linalg.cholesky_ex(S)
        else:
            idx = torch.tensor(keep, device=S.device)
            L, info = torch.linalg.cholesky_ex(S[idx][:, idx])
        bad = ~(L.diagonal() >= tol)  # NaN counts as bad
        failed = int(info)
        if failed > 0:  # not positive definite from minor `failed` on: those entries are not a factor
            bad[failed - 1:] = True
        if not bool(bad.any()):
            return keep, L
        keep.pop(int(bad.nonzero()[0]))
    return None


def fast_orthonormalise(vectors: torch.Tensor, against: Optional[torch.Tensor] = None,
                        tol: float = 0.1) -> torch.Tensor:
    """:func:`gram_schmidt` (same drop rule, same span up to rounding) without the loop over
    columns: R = V - C C^T V, the drop rule by :func:`ordered_cholesky` on R^T R, Q = R L^-T,
    then one Cholesky-QR pass (Q <- Q chol(Q^T Q)^-T) against the rounding of the first. The
    factorisations run in float64 on m x m matrices; the d x m products in the inputs' dtype."""
    d, m = vectors.shape
    if m == 0:
        return vectors.new_zeros(d, 0)
    V = vectors / (vectors.norm(dim=0, keepdim=True) + 1e-12)
    C = against if against is not None and against.shape[1] else None
    R = V - C @ (C.T @ V) if C is not None else V
    res = ordered_cholesky((R.T @ R).double(), tol)
    if res is None:
        return gram_schmidt(vectors, against, tol)
    kept, L = res
    if not kept:
        return vectors.new_zeros(d, 0)
    Q = torch.linalg.solve_triangular(L.to(R.dtype), R[:, kept].T, upper=False).T
    if C is not None:
        Q = Q - C @ (C.T @ Q)
    L2, info = torch.linalg.cholesky_ex((Q.T @ Q).double())
    if int(info) > 0:  # cannot happen for kept residuals >= tol; the exact path if it does
        return gram_schmidt(vectors, against, tol)
    return torch.linalg.solve_triangular(L2.to(Q.dtype), Q.T, upper=False).T


def fast_low_rank_basis(X: torch.Tensor, r: int) -> torch.Tensor:
    """:func:`low_rank_basis` with the principal directions from the smaller Gram matrix computed
    in X's dtype (the eigenproblem itself in float64) and V = Xc^T U S^-1 in X's dtype."""
    mean = X.mean(0)
    cols = [(mean / (mean.norm() + 1e-12))[:, None]]
    n, d = X.shape
    q = min(r - 1, n, d)
    if r > 1 and n > 1 and q > 0:
        Xc = X - mean
        if n <= d:
            evals, U = torch.linalg.eigh((Xc @ Xc.T).double())
            evals, U = evals.flip(0)[:q].clamp_min(0), U.flip(1)[:, :q]
            S = evals.sqrt()
            keep = S > S[0] * 1e-6
            cols.append(Xc.T @ (U[:, keep] / S[keep]).to(X.dtype))
        else:
            evals, V = torch.linalg.eigh((Xc.T @ Xc).double())
            evals, V = evals.flip(0)[:q].clamp_min(0), V.flip(1)[:, :q]
            S = evals.sqrt()
            cols.append(V[:, S > S[0] * 1e-6].to(X.dtype))
    return torch.cat(cols, 1)


def fast_loco_basis(X: torch.Tensor, r: int, excluded: Optional[torch.Tensor], tol: float = 0.1) -> torch.Tensor:
    """:func:`loco_basis` computed fast (see the module docstring): the same subspace up to rounding."""
    C = protected_basis(excluded) if excluded is not None and excluded.shape[0] else None
    if X.shape[0] <= X.shape[1]:
        return row_space_basis(X, r, C, tol)[:, :r]
    return fast_orthonormalise(fast_low_rank_basis(X, r), C, tol)[:, :r]


def protected_basis(excluded: torch.Tensor) -> torch.Tensor:
    """:func:`orthonormal` of the rows of ``excluded`` (at most k + 1 protected directions): one Householder QR
    in float64 when no direction falls below the drop tolerance (|R_jj| >= 1e-6 for the unit columns: then the
    in-order drop rule drops nothing and the span is the same), else the reference loop, which drops in order."""
    V = excluded.T.double()
    V = V / (V.norm(dim=0, keepdim=True) + 1e-12)
    Q, R = torch.linalg.qr(V)
    if bool((R.diagonal().abs() >= 1e-6).all()):
        return Q.to(excluded.dtype)
    return orthonormal(excluded.T)


def row_space_basis(X: torch.Tensor, r: int, C: Optional[torch.Tensor], tol: float = 0.1) -> torch.Tensor:
    """:func:`fast_loco_basis` for a batch no larger than its dimension (n <= d, LOCO's usual case), with
    the orthonormalisation done in coefficient space. Every column of the low-rank basis lies in
    span(mean, rows of Xc): v_0 = mean / |mean|, v_j = Xc^T u_j / s_j from the eigenpairs of the n x n
    Gram Xc Xc^T. So the Gram of the columns (V^T V), their components along the protected directions
    (C^T V = (Xc C)^T U S^-1 and C^T mean) and hence R^T R = V^T V - (C^T V)^T (C^T V) are small
    products; the drop rule runs on R^T R (:func:`ordered_cholesky`, as :func:`fast_orthonormalise`),
    and Q = R_kept L^-T is formed by one d x n product with the coefficients (plus rank-one and C terms)
    instead of building V, R and two d x m Gram matrices. Equal to :func:`loco_basis` up to rounding
    (tested); the small algebra in float64, the d-sized products in X's dtype."""
    n, d = X.shape
    mean = X.mean(0)
    Xc = X - mean
    q = min(r - 1, n, d)
    Kx = Xc @ Xc.T  # n x n
    f64 = {"dtype": torch.float64, "device": X.device}  # the small algebra
    if r > 1 and n > 1 and q > 0:
        # the eigenproblem in X's dtype (float32: ~30% faster at n = 128, the subspace equal to ~1e-6)
        evals, U = torch.linalg.eigh(Kx)
        evals, U = evals[-q:].flip(0).double().clamp_min(0), U[:, -q:].flip(1).double()
        S = evals.sqrt()
        keep = S > S[0] * 1e-6
        Us = U / S if bool(keep.all()) else U[:, keep] / S[keep]  # n x p: v_j = Xc^T Us[:, j]
    else:
        Us = torch.zeros(n, 0, **f64)
    p = Us.shape[1]
    m64 = mean.double()
    mnorm = m64.norm() + 1e-12
    xm = (Xc @ mean).double() / mnorm  # Xc v_0 (n)
    G = torch.empty(p + 1, p + 1, **f64)  # V^T V
    G[0, 0] = (m64 @ m64) / mnorm ** 2
    G[0, 1:] = G[1:, 0] = xm @ Us
    Usx = Us.to(X.dtype)
    G[1:, 1:] = (Usx.T @ (Kx @ Usx)).double()  # = I up to rounding: the column norms the reference divides by
    norms = G.diagonal().clamp_min(0).sqrt() + 1e-12  # the reference scales every column to unit norm
    G = G / norms[:, None] / norms[None, :]
    B = torch.cat([torch.zeros(n, 1, **f64), Us], 1) / norms  # V = Xc^T B + v_0 b_0^T
    b0 = torch.zeros(p + 1, **f64)
    b0[0] = 1.0 / norms[0]
    RtR = G
    A = None
    if C is not None and C.shape[1]:
        C64 = C.double()
        A = torch.cat([(C64.T @ m64 / mnorm)[:, None], (Xc @ C).double().T @ Us], 1) / norms  # C^T V
        RtR = G - A.T @ A
    res = ordered_cholesky(RtR, tol)
    if res is None:  # many drops: the reference loop on the explicit columns
        V = Xc.T @ B.to(X.dtype) + torch.outer(mean / mnorm.to(X.dtype), b0.to(X.dtype))
        return gram_schmidt(V, C, tol)
    kept, L = res
    if not kept:
        return X.new_zeros(d, 0)
    Linv_T = torch.linalg.solve_triangular(L, torch.eye(len(kept), dtype=L.dtype, device=L.device), upper=False).T
    if len(kept) < p + 1:
        idx = torch.tensor(kept, device=B.device)
        B, b0, A = B[:, idx], b0[idx], (A[:, idx] if A is not None else None)
    Q = Xc.T @ (B @ Linv_T).to(X.dtype) + torch.outer((m64 / mnorm).to(X.dtype), (b0 @ Linv_T).to(X.dtype))
    if A is not None:
        Q = Q - C @ (A @ Linv_T).to(X.dtype)
        Q = Q - C @ (C.T @ Q)  # against the rounding of the first pass, as the reference does
    return Q


def nearest(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of C for each row of X: argmin_j |c_j|^2 - 2 x.c_j, one GEMM
    (torch.cdist computes the distances themselves and is ~10x slower on a CPU at LOCO's sizes)."""
    return torch.addmm(C.pow(2).sum(1), X, C.T, alpha=-2).argmin(1)


def kmeans_vectorised(X: torch.Tensor, k: int, iters: int = 10, init: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """:func:`kmeans` (same initialisation, same updates; an empty cluster keeps its centroid) with
    each iteration's means as one GEMM with the assignment matrix instead of a loop over clusters."""
    C = _kmeans_start(X, k, init, generator)
    k = C.shape[0]
    prev = None
    for _ in range(iters):
        assign = nearest(X, C)
        if prev is not None and torch.equal(assign, prev):
            # a fixed point: the same assignment gives the same means, so every further iteration
            # repeats this one and the result is bit-identical to running all ``iters`` (warm-started
            # on a memory that changed by a few rows, k-means usually gets here in 1-3 iterations)
            break
        prev = assign
        A = F.one_hot(assign, k).to(X.dtype)  # (n, k)
        counts = A.sum(0)
        sums = A.T @ X
        C = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
    return C


def loco_basis(X: torch.Tensor, r: int, excluded: Optional[torch.Tensor], tol: float = 0.1) -> torch.Tensor:
    """Q (d x r') orthonormal: low-rank basis of X's rows, orthogonal to the rows of
    ``excluded`` (the protected centroids); r' <= r."""
    if excluded is not None and excluded.shape[0]:
        C = orthonormal(excluded.T)
    else:
        C = None
    return gram_schmidt(low_rank_basis(X, r), C, tol)[:, :r]


def project(G: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """G P with P = Q Q^T, computed as (G Q) Q^T."""
    return (G @ Q) @ Q.T


class SubspaceTrack:
    """LOCO's ``projector="tracked"``: a running estimate of a layer's input subspace instead of each
    batch's own. It keeps an orthonormal basis Q (d x r) of the top-r eigenvectors of the decayed
    (uncentred) second moment M_t = decay M_{t-1} + (1 - decay) X_t^T X_t / n, and their eigenvalue
    estimates ``lam``, through M's rank-r approximation Q diag(lam) Q^T. One update is one step of block
    power (subspace) iteration on that approximation plus the new batch,

        Y = Q diag(decay lam) + (1 - decay) / n X^T (X Q),   Y = Q1 R (Householder QR),   R = U S W^T,
        Q <- Q1 U,   lam <- S,

    so the columns stay orthonormal and sorted by eigenvalue (the order the drop rule of
    :func:`protect_basis` takes them in). Cost: two n x d x r products, a d x r QR and an r x r SVD, against
    the n x n eigenproblem, the k-means and the d x n product of a per-batch rebuild; run every
    ``projector_every``-th batch it costs a fraction of that. The first batch starts it from that batch's
    own top principal directions (uncentred; padded with random orthonormal directions of eigenvalue 0
    when the batch has fewer than r rows)."""

    def __init__(self, Q: torch.Tensor, lam: torch.Tensor, updates: int = 1) -> None:
        self.Q, self.lam, self.updates = Q, lam, updates

    @classmethod
    def start(cls, X: torch.Tensor, r: int, generator: Optional[torch.Generator] = None) -> "SubspaceTrack":
        n, d = X.shape
        r = min(r, d)
        if n <= d:
            evals, U = torch.linalg.eigh((X @ X.T).double())
            q = min(r, n)
            evals, U = evals[-q:].flip(0).clamp_min(0), U[:, -q:].flip(1)
            S = evals.sqrt()
            good = S > S[0] * 1e-6 if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
            Q = X.T @ (U[:, good] / S[good]).to(X.dtype)
            lam = evals[good] / n
        else:
            evals, V = torch.linalg.eigh((X.T @ X).double())
            evals, V = evals[-r:].flip(0).clamp_min(0), V[:, -r:].flip(1)
            Q, lam = V.to(X.dtype), evals / n
        if Q.shape[1] < r:  # pad with random directions orthogonal to the batch's (eigenvalue 0)
            Z = torch.randn(d, r - Q.shape[1], generator=generator, dtype=torch.float64).to(X)
            Z = Z - Q @ (Q.T @ Z)
            Q = torch.cat([Q, torch.linalg.qr(Z)[0]], 1)
            lam = torch.cat([lam, lam.new_zeros(r - lam.shape[0])])
        Q, _ = torch.linalg.qr(Q)  # orthonormal to working precision (the sign and order are kept)
        return cls(Q, lam.to(X.dtype))

    def update(self, X: torch.Tensor, decay: float) -> None:
        """One subspace-iteration step with the batch X (n x d)."""
        Q = self.Q if self.Q.dtype == X.dtype and self.Q.device == X.device else self.Q.to(X)
        lam = self.lam.to(X)
        Y = torch.addmm(Q * (decay * lam), X.T, X @ Q, alpha=(1.0 - decay) / X.shape[0])
        Q1, R = torch.linalg.qr(Y)
        U, S, _ = torch.linalg.svd(R.double())
        self.Q, self.lam = Q1 @ U.to(X.dtype), S.to(X.dtype)
        self.updates += 1

    def basis(self, rel: float = 1e-6) -> torch.Tensor:
        """Q without the directions whose eigenvalue (a second moment) is below ``rel`` of the largest, i.e.
        whose singular value is below sqrt(rel) of the largest (1e-3 by default: the float32 noise floor of
        a second moment; the per-batch basis cuts at 1e-6 of the singular values)."""
        lam = self.lam
        if not lam.numel() or not bool(lam[0] > 0):
            return self.Q[:, :0]
        keep = lam > lam[0] * rel
        return self.Q if bool(keep.all()) else self.Q[:, keep]

    def state_dict(self) -> dict:
        return {"Q": self.Q, "lam": self.lam, "updates": self.updates}

    @classmethod
    def from_state(cls, s: dict) -> "SubspaceTrack":
        return cls(s["Q"], s["lam"], int(s.get("updates", 1)))


def protect_basis(Q: torch.Tensor, C: Optional[torch.Tensor], tol: float = 0.1) -> torch.Tensor:
    """:func:`gram_schmidt` of the orthonormal columns of Q (in order) against the orthonormal columns of C:
    the same drop rule (a column whose residual norm falls below ``tol`` is dropped), computed from the
    small Gram of the residuals R = Q - C A, A = C^T Q: R^T R = I - A^T A (Q orthonormal), so the d-sized
    work is a few d x r x |C| products and one triangular solve. Falls back to the loop after many drops."""
    if C is None or not C.shape[1] or not Q.shape[1]:
        return Q
    A = C.T @ Q  # (m, r)
    A64 = A.double()
    S = torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device) - A64.T @ A64
    res = ordered_cholesky(S, tol)
    if res is None:
        return gram_schmidt(Q, C, tol)
    kept, L = res
    if not kept:
        return Q[:, :0]
    if len(kept) < Q.shape[1]:
        idx = torch.tensor(kept, device=Q.device)
        Q, A = Q[:, idx], A[:, idx]
    R = Q - C @ A
    Qp = torch.linalg.solve_triangular(L.to(R.dtype), R.T, upper=False).T
    return Qp - C @ (C.T @ Qp)  # against the rounding of the first pass, as the reference does
