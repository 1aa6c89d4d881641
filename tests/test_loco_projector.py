"""LOCO's projector options (issue 13): ``projector="batch"`` (the paper's projector by the reference
code, the default), ``projector="fast"`` (the same projector computed fast), ``kmeans_every=M``
(re-cluster every M batches) and ``projector_every=N`` (rebuild the basis every N batches, reuse it
in between).

* the defaults are the paper's projector; ``projector_every=1`` is it bit for bit, N > 1 is not
  (negative control);
* ``projector="fast"``: its basis spans the reference basis's subspace with the same rank (also where
  the drop rule drops columns), its k-means equals the loop's, and one step's update equals the
  reference step's up to float rounding (linear, conv, drop_mean, whiten, online, deep options; the
  fused projection included); another seed's update is not close (negative control);
* rebuilds happen at batches 0, N, 2N, ... only, the updates in between lie in the last rebuild's
  subspace, and the cluster memory still receives every batch exactly as the per-batch mode's does;
  ``kmeans_every`` re-clusters on its schedule only;
* on a stationary input stream the reused subspace stays close to the fresh one (principal angles);
  after the input distribution changes it does not, and a random subspace never is (negative controls);
* a run stopped and resumed from its checkpoint (rule state through ``torch.save``) continues
  bit for bit; without the projector's state it does not;
* bad settings are clear errors (rule constructor and config casting);
* ``projector="tracked"``: the tracked basis converges to the top eigenspace of a stationary stream's
  second moment (a random start does not span it; a stream that moves is followed), its protection
  by the centroids is the reference Gram-Schmidt with the same drops, a step's update is NP's estimate
  projected on that basis (fused), the basis is updated on its schedule only, and a resumed run
  continues bit for bit (not without the tracks).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

from locosnn.config import cast_rule_args
from locosnn.data import load_dataset
from locosnn.encoding import encode
from locosnn.errors import LocosnnError
from locosnn.network import SpikingNetwork
from locosnn.rules import make_rule
from locosnn.diagnostics import rule_update
from locosnn.rules.projector import (ClusterMemory, SubspaceTrack, fast_loco_basis, fast_orthonormalise, gram_schmidt_loop, kmeans,
                                     kmeans_vectorised, nearest, loco_basis, orthonormal, project, protect_basis)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _stream(ds, steps, n=32, T=4, conv=False):
    x, y = ds.train.x.float(), ds.train.y
    for i in range(steps):
        xb = x[i * n:(i + 1) * n]
        yield encode(xb if conv else xb.reshape(n, -1), T), y[i * n:(i + 1) * n]


def _train(rule, ds, steps, arch="64-40-30-10", net=None, opt=None, start=0):
    if net is None:
        torch.manual_seed(0)
        net = SpikingNetwork(arch)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    batches = list(_stream(ds, start + steps, conv=arch.startswith("1x")))[start:]
    for xs, y in batches:
        opt.zero_grad()
        rule.step(net, xs, y)
        opt.step()
    return net, opt


def _weights(net):
    return [p.detach().clone() for p in net.parameters()]


SETTINGS = [("64-40-30-10", {"variant": "sample", "drop_mean": True}),
            ("64-40-30-10", {"variant": "faithful"}),
            ("64-40-10", {"whiten": 0.1}),
            ("1x8x8-c6k3-10", {"max_rows": 200})]


@pytest.mark.parametrize("arch,kw", SETTINGS)
def test_every_one_batch_is_the_per_batch_projector_bit_for_bit(digits, arch, kw):
    base = dict(rank=8, k=3, memory=64, per_batch=8, seed=2, **kw)
    a = _weights(_train(make_rule("loco", **base), digits, 6, arch)[0])
    b = _weights(_train(make_rule("loco", projector_every=1, **base), digits, 6, arch)[0])
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # negative control: reusing the basis for 3 batches changes the run
    c = _weights(_train(make_rule("loco", projector_every=3, **base), digits, 6, arch)[0])
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("arch", ["64-40-30-10", "1x8x8-c6k3-10"])
@pytest.mark.parametrize("variant", ["sample", "faithful"])
def test_every_n_rebuilds_on_schedule_and_feeds_the_memory_every_batch(digits, variant, arch):
    N, steps = 3, 8
    torch.manual_seed(0)
    net = SpikingNetwork(arch)  # fixed weights: both modes see the same layer inputs
    # conv patches subsampled (max_rows) in the sample variant only: the faithful variant's memory grows one
    # item per batch, so k-means re-draws its initial centroids in each of the first k batches, which the
    # per-batch projector does at every batch and the cheap one at rebuilds only, shifting later draws
    kw = dict(rank=8, k=3, memory=64, per_batch=8, seed=1, variant=variant,
              max_rows=200 if variant == "sample" else 4096)
    cheap = make_rule("loco", projector_every=N, **kw)
    full = make_rule("loco", **kw)
    rebuilds = []
    real = cheap.projector_basis

    def counted(network, clean, li):
        rebuilds.append((cheap.proj_step, li))
        return real(network, clean, li)

    cheap.projector_basis = counted
    previous = None
    for step, (xs, y) in enumerate(_stream(digits, steps, conv=arch.startswith("1x"))):
        full.step(net, xs, y)
        cheap.step(net, xs, y)  # second: the .grad checked below is its update
        Qs = [Q.clone() for Q in cheap.bases]
        if step % N:
            assert all(torch.equal(q, p) for q, p in zip(Qs, previous)), f"step {step}: basis rebuilt"
        elif previous is not None:
            assert not any(torch.equal(q, p) for q, p in zip(Qs, previous)), f"step {step}: basis not rebuilt"
        previous = Qs
        # the update lies in the (possibly stale) subspace: G (I - Q Q^T) = 0
        for layer, Q in zip(net.layers, Qs):
            G = torch.cat([layer.weight.grad.flatten(1), layer.bias.grad[:, None]], 1)
            assert (G - project(G, Q)).norm() <= 1e-4 * G.norm() + 1e-8
    assert rebuilds == [(s, li) for s in range(0, steps, N) for li in range(net.depth)]
    assert cheap.proj_step == steps
    # the memory saw every batch, the same items the per-batch projector stored
    for mc, mf in zip(cheap.memories, full.memories):
        assert mc.batches == mf.batches == steps
        assert torch.equal(mc.items, mf.items) and torch.equal(mc.stamps, mf.stamps)


def _cosines(A, B):
    """Cosines of the principal angles between span(A) and span(B) (orthonormal columns), largest first."""
    return torch.linalg.svdvals(A.T.double() @ B.double())


def test_reused_subspace_stays_close_to_the_fresh_one_on_a_stationary_stream():
    """Layer-0 inputs from a fixed low-rank distribution (mean + 5 directions + small noise): the
    basis built on batch 0 and the basis a rebuild would make on a later batch span nearly the same
    space. Negative controls: after the distribution moves to other directions they do not, and a
    random subspace of the same dimension never does."""
    d, n, q = 40, 64, 5
    g = torch.Generator().manual_seed(0)
    net = SpikingNetwork(f"{d}-10")

    def source():
        A = torch.linalg.qr(torch.randn(d, q, generator=g))[0].T  # q orthonormal directions
        mean = torch.rand(d, generator=g)
        scales = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.5])
        return lambda: mean + (torch.randn(n, q, generator=g) * scales) @ A + 0.02 * torch.randn(n, d, generator=g)

    def batch(draw):
        return encode(draw(), 2), torch.randint(0, 10, (n,), generator=g)

    rule = make_rule("loco", rank=q + 1, k=3, memory=64, per_batch=8, projector_every=100)
    first = source()
    rule.step(net, *batch(first))  # the rebuild
    for _ in range(5):
        xs, y = batch(first)
        fresh = copy.deepcopy(rule).projector_basis(net, net.run(xs, record=True), 0)
        rule.step(net, xs, y)
        stale = rule.bases[0]
        assert stale.shape == fresh.shape == (d + 1, q + 1)
        assert _cosines(stale, fresh).min() > 0.99
    # negative control 1: a random subspace of the same dimension is far from the fresh one
    rand = torch.linalg.qr(torch.randn(d + 1, q + 1, generator=g))[0]
    assert _cosines(rand, fresh).min() < 0.5
    # negative control 2: the stream moves to other directions; the reused basis no longer fits
    second = source()
    xs, y = batch(second)
    fresh = copy.deepcopy(rule).projector_basis(net, net.run(xs, record=True), 0)
    rule.step(net, xs, y)
    assert _cosines(rule.bases[0], fresh).min() < 0.5


@pytest.mark.parametrize("variant,opts", [("sample", {"projector_every": 3}), ("faithful", {"projector_every": 3}),
                                          ("sample", {"projector": "fast", "kmeans_every": 3, "projector_every": 2}),
                                          ("faithful", {"projector": "fast", "incremental_kmeans": True,
                                                        "projector_every": 2})])
def test_checkpoint_resume_is_exact(digits, variant, opts):
    kw = dict(rank=8, k=3, memory=64, per_batch=8, seed=4, variant=variant, **opts)
    straight = _weights(_train(make_rule("loco", **kw), digits, 10)[0])
    # stop after 7 batches (mid-period: the next batch reuses the basis), save, load, continue
    saved = _checkpoint_after(kw, digits, 7)
    assert saved["rule"]["proj_step"] == 7 and len(saved["rule"]["bases"]) == 3  # 7: mid-period for 2 and 3
    assert all(torch.equal(p, q) for p, q in zip(straight, _resumed(saved, saved["rule"], kw, digits)))
    # negative control: the same state without the projector's (step counter, bases) does not continue exactly
    partial = {k: v for k, v in saved["rule"].items() if k not in ("proj_step", "bases")}
    assert not all(torch.equal(p, q) for p, q in zip(straight, _resumed(saved, partial, kw, digits)))


def _checkpoint_after(kw, digits, steps):
    """The checkpoint (network, optimiser, rule state through torch.save) of a run stopped after ``steps``."""
    rule = make_rule("loco", **kw)
    net, opt = _train(rule, digits, steps)
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "rule": rule.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _resumed(saved, rule_state, kw, digits, steps=3):
    """The weights after resuming ``saved`` (with ``rule_state`` as the rule's state) for ``steps`` batches."""
    net2 = SpikingNetwork("64-40-30-10")
    net2.load_state_dict(saved["net"])
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    rule2 = make_rule("loco", **kw)
    rule2.load_state_dict(rule_state)
    start = int(saved["rule"]["proj_step"])
    return _weights(_train(rule2, digits, steps, net=net2, opt=opt2, start=start)[0])


def test_per_batch_state_dict_is_unchanged():
    """The default mode adds nothing to the checkpoint (old checkpoints and new ones look alike)."""
    assert set(make_rule("loco").state_dict()) == {"generator", "proj_generator", "memories"}
    for kw in ({"projector_every": 2}, {"kmeans_every": 3}, {"projector": "fast"}):
        assert {"proj_step", "bases"} <= set(make_rule("loco", **kw).state_dict())


def test_bad_projector_settings_are_clear_errors():
    with pytest.raises(LocosnnError, match="projector"):
        make_rule("loco", projector="sometimes")
    with pytest.raises(LocosnnError, match="incremental_kmeans needs projector='fast'"):
        make_rule("loco", incremental_kmeans=True)
    for name in ("projector_every", "kmeans_every"):
        for bad in (0, -2, 2.5, True):
            with pytest.raises(LocosnnError, match=name):
                make_rule("loco", **{name: bad})
        with pytest.raises(LocosnnError, match=name):
            cast_rule_args("loco", {name: "0"})
    assert cast_rule_args("loco", {"projector": "fast", "projector_every": "20", "kmeans_every": "5"}) == {
        "projector": "fast", "projector_every": 20, "kmeans_every": 5}


# -- projector="fast" ---------------------------------------------------------------------------------

def test_fast_basis_spans_the_reference_subspace():
    g = torch.Generator().manual_seed(3)
    for d, n in ((60, 40), (40, 64), (200, 32)):  # n < d (Gram of rows) and n > d (Gram of columns)
        X = torch.cat([(torch.rand(n, d - 1, generator=g) < 0.3).float(), torch.ones(n, 1)], 1)
        near_mean = X.mean(0, keepdim=True).repeat(4, 1) + 0.02 * torch.randn(4, d, generator=g)
        for excluded in (None, near_mean, torch.rand(3, d, generator=g)):
            for r in (1, 8, 30):
                ref, fast = loco_basis(X, r, excluded), fast_loco_basis(X, r, excluded)
                assert ref.shape == fast.shape, (d, n, r)
                if not ref.shape[1]:  # r = 1 and the mean is protected: nothing left, in both
                    continue
                assert torch.allclose(fast.T @ fast, torch.eye(fast.shape[1]), atol=1e-5)
                assert _cosines(ref, fast).min() > 1 - 1e-4
                if excluded is not None:  # orthogonal to what it protects
                    assert (excluded / excluded.norm(dim=1, keepdim=True) @ fast).abs().max() < 1e-4
    # the drop rule drops the same columns as the reference loop (nearly dependent and repeated columns)
    V = torch.randn(80, 30, generator=g, dtype=torch.float64)
    V[:, 5] = V[:, 2] + 0.01 * V[:, 3]
    V[:, 9] = 2 * V[:, 0]
    C = orthonormal(torch.randn(80, 4, generator=g, dtype=torch.float64))
    for against in (None, C):
        a, b = fast_orthonormalise(V, against, 0.1), gram_schmidt_loop(V, against, 0.1)
        assert a.shape == b.shape == (80, 28)
        assert torch.allclose(a @ a.T, b @ b.T, atol=1e-8)
    # negative control: a basis of other inputs does not span the same subspace
    other = fast_loco_basis(torch.rand(40, 60, generator=g), 8, None)
    assert _cosines(loco_basis(torch.rand(40, 60, generator=g), 8, None), other).min() < 0.9


def test_fast_basis_at_locos_own_sizes_matches_the_reference():
    """n = 128 rows of d = 785 inputs, rank 110 (LOCO's defaults): the coefficient-space orthonormalisation
    (row_space_basis) gives the reference projector to rounding, with and without protected directions,
    including a protected direction close to the batch mean (the drop rule then drops a column)."""
    g = torch.Generator().manual_seed(11)
    X = torch.cat([(torch.rand(128, 784, generator=g) < 0.2).float() * torch.rand(128, 784, generator=g),
                   torch.ones(128, 1)], 1)
    for excluded in (None, torch.rand(6, 785, generator=g),
                     torch.cat([X.mean(0, keepdim=True) + 0.001 * torch.rand(1, 785, generator=g), X[:4]])):
        ref, fast = loco_basis(X, 110, excluded), fast_loco_basis(X, 110, excluded)
        assert ref.shape == fast.shape and fast.dtype == X.dtype
        assert (fast.T @ fast - torch.eye(fast.shape[1])).abs().max() < 1e-5
        assert (ref.double() @ ref.double().T - fast.double() @ fast.double().T).abs().max() < 1e-5
    # negative control: another batch's basis is a different projector
    other = fast_loco_basis(torch.rand(128, 785, generator=g), 110, None)
    assert (ref.double() @ ref.double().T - other.double() @ other.double().T).abs().max() > 0.1


def test_vectorised_kmeans_stops_at_a_fixed_point_bit_identically():
    """Stopping once the assignment repeats gives exactly the result of running every iteration."""
    import torch.nn.functional as F

    def lloyd(X, C, iters):  # no early stop
        for _ in range(iters):
            A = F.one_hot(nearest(X, C), C.shape[0]).to(X.dtype)
            counts = A.sum(0)
            C = torch.where(counts[:, None] > 0, (A.T @ X) / counts.clamp_min(1)[:, None], C)
        return C

    g = torch.Generator().manual_seed(2)
    X = torch.cat([torch.randn(100, 20, generator=g) + 3 * torch.eye(20)[i % 4] for i in range(4)])
    for iters in (1, 3, 10, 30):
        init = X[:6].clone()
        assert torch.equal(kmeans_vectorised(X, 6, iters, init=init), lloyd(X, init, iters))


def test_vectorised_kmeans_equals_the_loop():
    g = torch.Generator().manual_seed(5)
    X = torch.cat([torch.randn(60, 12, generator=g) + 4 * torch.eye(12)[i % 3] for i in range(3)])
    for init in (None, X[:5].clone()):
        a = kmeans(X, 5, 6, init=init, generator=torch.Generator().manual_seed(1))
        b = kmeans_vectorised(X, 5, 6, init=init, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(a, b, atol=1e-5)
    # an empty cluster keeps its centroid in both
    far = torch.cat([X[:4], 100 + torch.zeros(1, 12)])
    assert torch.allclose(kmeans(X, 5, 3, init=far), kmeans_vectorised(X, 5, 3, init=far), atol=1e-5)


FAST_CASES = [("64-40-30-10", {}), ("64-40-30-10", {"variant": "faithful"}), ("64-40-30-10", {"drop_mean": True}),
              ("1x8x8-c6k3-10", {}), ("64-40-10", {"whiten": 0.1}), ("64-40-10", {"online": True}),
              ("64-40-10", {"temporal": "frozen", "antithetic": True, "eligibility": "activity"})]


@pytest.mark.parametrize("arch,kw", FAST_CASES, ids=[f"{a}-{k}" for a, k in FAST_CASES])
def test_fast_projector_step_equals_the_reference_step(digits, arch, kw):
    """Same network, batches and seeds (the noise comes from the rule's own generator): the same update
    up to rounding, from a fresh rule and while the cluster memory fills over a few batches."""
    torch.manual_seed(0)
    net = SpikingNetwork(arch)
    base = dict(rank=12, k=3, memory=40, per_batch=8, seed=7, **kw)
    ref, fast = make_rule("loco", **base), make_rule("loco", projector="fast", **base)
    batches = list(_stream(digits, 4, conv=arch.startswith("1x")))
    for xs, y in batches:
        a = rule_update(ref, net, xs, y, restore=False)
        b = rule_update(fast, net, xs, y, restore=False)
        for u, v in zip(a, b):
            assert torch.allclose(u, v, rtol=1e-3, atol=1e-4 * float(u.abs().max())), float((u - v).abs().max())
    # negative control: another noise seed is not close
    a = rule_update(make_rule("loco", **base), net, *batches[0])
    c = rule_update(make_rule("loco", projector="fast", **{**base, "seed": 8}), net, *batches[0])
    assert not torch.allclose(a[0], c[0], rtol=1e-2, atol=1e-3 * float(a[0].abs().max()))


def test_fused_projection_equals_the_projected_product():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    layer = SpikingNetwork("50-30-10").layers[0]
    e, x = torch.randn(64, 30, generator=g), (torch.rand(64, 50, generator=g) < 0.3).float()
    Q = torch.linalg.qr(torch.randn(51, 6, generator=g))[0]  # r = 6 << d = 50: the fused branch is taken
    gw, gb = layer.outer(e, x)
    G = project(torch.cat([gw, gb[:, None]], 1), Q)
    fw, fb = make_rule("loco").projected_outer(layer, e, x, Q)
    assert torch.allclose(torch.cat([fw, fb[:, None]], 1), G, atol=1e-5)


def test_kmeans_every_reclusters_on_schedule(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-10")
    rule = make_rule("loco", rank=8, k=3, memory=64, per_batch=8, seed=1, kmeans_every=3)
    reclustered = []
    for step, (xs, y) in enumerate(_stream(digits, 7)):
        before = [m.centroids.clone() for m in rule.memories]
        rule.step(net, xs, y)
        reclustered.append(step == 0 or any(not torch.equal(b, m.centroids) for b, m in zip(before, rule.memories)))
        assert all(m.batches == step + 1 for m in rule.memories)  # the memory sees every batch
    assert reclustered == [s % 3 == 0 for s in range(7)]


# -- incremental k-means ------------------------------------------------------------------------------

def _memory_stream(per_batch, size, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 30, generator=g) * 3
    for _ in range(steps):
        yield centres[torch.randint(0, 6, (per_batch,), generator=g)] + torch.randn(per_batch, 30, generator=g)


@pytest.mark.parametrize("per_batch", [1, 16])
def test_incremental_kmeans_follows_the_full_kmeans(per_batch):
    """The same memory stream (filling, then a ring) through the warm-started k-means of projector="fast" and
    through IncrementalKMeans: the same centroids at every batch up to rounding, while they keep moving."""
    full = ClusterMemory(120, 10, 5, vectorised=True)
    inc = ClusterMemory(120, 10, 5, incremental=True)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    moved = 0
    for t, v in enumerate(_memory_stream(per_batch, 120, 300)):
        before = None if full.centroids is None else full.centroids.clone()
        full.add(v, ga)
        inc.add(v, gb)
        assert full.centroids.shape == inc.centroids.shape
        assert torch.allclose(full.centroids, inc.centroids, atol=1e-5), (t, float((full.centroids - inc.centroids).abs().max()))
        moved += int(before is not None and before.shape == full.centroids.shape and not torch.equal(before, full.centroids))
    assert moved > 250  # liveness: the centroids follow the stream
    assert inc.cache is not None and inc.items.shape[0] == 120  # the incremental path ran on a full ring


def test_incremental_kmeans_needs_its_dirty_rows():
    """Negative control: a cache that is not told which rows were overwritten drifts from the full k-means."""
    full = ClusterMemory(60, 10, 5, vectorised=True)
    inc = ClusterMemory(60, 10, 5, incremental=True)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    worst = 0.0
    for t, v in enumerate(_memory_stream(1, 60, 200, seed=3)):
        full.add(v, ga)
        inc.push(v)
        if inc.cache is not None and t > 80:
            inc.cache.dirty.zero_()  # forget the overwritten row
        inc.recluster(gb)
        worst = max(worst, float((full.centroids - inc.centroids).abs().max()))
    assert worst > 1e-2


def test_incremental_kmeans_step_equals_the_fast_step(digits):
    """LOCO with incremental_kmeans: the same updates as projector="fast" up to rounding, through a full memory."""
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-30-10")
    base = dict(rank=12, k=3, memory=6, seed=7, variant="faithful", projector="fast")
    a_rule, b_rule = make_rule("loco", **base), make_rule("loco", incremental_kmeans=True, **base)
    for xs, y in _stream(digits, 10):
        a = rule_update(a_rule, net, xs, y, restore=False)
        b = rule_update(b_rule, net, xs, y, restore=False)
        for u, v in zip(a, b):
            assert torch.allclose(u, v, rtol=1e-3, atol=1e-4 * float(u.abs().max()))
    assert all(m.cache is not None for m in b_rule.memories)


# -- projector="tracked" -------------------------------------------------------------------------------

def _lowrank_source(g, d=40, q=5, n=64):
    A = torch.linalg.qr(torch.randn(d, q, generator=g))[0]  # q orthonormal directions (columns)
    scales = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.5])[:q]
    return A, lambda: (torch.randn(n, q, generator=g) * scales) @ A.T + 0.05 * torch.randn(n, d, generator=g)


def test_tracked_subspace_converges_to_the_streams_top_eigenspace():
    """Batches from a fixed distribution whose second moment has a clear top-5 eigenspace span(A): started
    from a random orthonormal basis, subspace iteration reaches span(A) with orthonormal columns sorted by
    eigenvalue, the eigenvalues those of the second moment (25, 16, 9, 4, 2.25 up to sampling); the random
    start is far from it (negative control). When the stream moves to other directions the track follows."""
    g = torch.Generator().manual_seed(0)
    A, draw = _lowrank_source(g)
    Q0 = torch.linalg.qr(torch.randn(40, 5, generator=g))[0]
    assert _cosines(Q0, A).min() < 0.5  # negative control: the start is not the answer
    track = SubspaceTrack(Q0, torch.ones(5))
    for _ in range(60):
        track.update(draw(), decay=0.8)
    Q = track.basis()
    assert torch.allclose(Q.T @ Q, torch.eye(5), atol=1e-5)
    assert _cosines(Q, A).min() > 0.999
    assert bool((track.lam[:-1] >= track.lam[1:]).all())
    assert torch.allclose(track.lam, torch.tensor([25.0, 16.0, 9.0, 4.0, 2.25]), rtol=0.35)
    B, draw2 = _lowrank_source(g)
    for _ in range(60):
        track.update(draw2(), decay=0.8)
    assert _cosines(track.basis(), B).min() > 0.999 and _cosines(track.basis(), A).min() < 0.5


def test_tracked_start_is_the_first_batchs_principal_directions():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 50, generator=g) @ torch.randn(50, 50, generator=g)
    track = SubspaceTrack.start(X, 8)
    V = torch.linalg.svd(X.double(), full_matrices=False)[2][:8].T  # top right singular vectors (uncentred)
    assert _cosines(track.basis(), V).min() > 0.9999
    assert torch.allclose(track.lam.double(), torch.linalg.svdvals(X.double())[:8] ** 2 / 30, rtol=1e-4)
    # fewer rows than the rank: the batch's directions first, then orthonormal padding of eigenvalue 0
    small = SubspaceTrack.start(X[:4], 8, torch.Generator().manual_seed(0))
    assert small.Q.shape == (50, 8) and torch.allclose(small.Q.T @ small.Q, torch.eye(8), atol=1e-5)
    assert small.basis().shape[1] == 4 and bool((small.lam[4:] == 0).all())


@pytest.mark.parametrize("m", [1, 4])
def test_protect_basis_is_the_reference_gram_schmidt(m):
    """Orthonormal Q (sorted) against orthonormal protected directions C: the same kept columns and span as
    the reference loop, also where the drop rule drops (C built to contain two of Q's columns nearly)."""
    g = torch.Generator().manual_seed(m)
    d, r = 60, 12
    Q = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    raw = torch.randn(d, m, generator=g, dtype=torch.float64)
    raw[:, 0] = Q[:, 2] + 0.002 * raw[:, 0]  # column 2 of Q is almost protected: dropped
    if m > 1:
        raw[:, 1] = Q[:, 7] + 0.002 * raw[:, 1]
    C = orthonormal(raw)
    fast = protect_basis(Q, C, 0.1)
    ref = gram_schmidt_loop(Q, C, 0.1)
    assert fast.shape == ref.shape == (d, r - (1 if m == 1 else 2))
    assert torch.allclose(fast @ fast.T, ref @ ref.T, atol=1e-10)
    assert float((C.T @ fast).abs().max()) < 1e-10
    # negative control: without the protection the span differs
    assert not torch.allclose(Q[:, :fast.shape[1]] @ Q[:, :fast.shape[1]].T, ref @ ref.T, atol=1e-3)


def test_tracked_step_is_the_np_estimate_on_the_tracked_basis(digits):
    """One step of projector="tracked" (fused into the estimate) equals NP's update with the same seed projected
    by P = Q Q^T, Q the rule's tracked basis made orthogonal to the protected centroids, recomputed here by the
    reference Gram-Schmidt loop from the track and the protected set. The track is started at batch 0 and
    updated at batches N, 2N only (and changes there); the protection acts (Q is orthogonal to the centroids
    and spans less than the track); the tracked Q is not this batch's own basis (negative control)."""
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-30-10")
    kw = dict(rank=12, k=3, memory=40, per_batch=8, seed=7, variant="faithful", kmeans_every=2)
    rule = make_rule("loco", projector="tracked", projector_every=3, **kw)
    plain = make_rule("np", seed=7)
    protected_steps, prev = 0, None
    for i, (xs, y) in enumerate(_stream(digits, 7)):
        shadow = copy.deepcopy(rule)
        upd = rule_update(rule, net, xs, y, restore=False)
        assert [t.updates for t in rule.tracks] == [1 + i // 3] * 3  # started at 0, updated at 3 and 6
        tracks = [t.Q.clone() for t in rule.tracks]
        if prev is not None:  # the track moves at an update and only there
            assert all(torch.equal(a, b) for a, b in zip(prev, tracks)) == (i % 3 != 0)
        prev = tracks
        ref = rule_update(plain, net, xs, y, restore=False)
        clean = net.run(xs, record=True)
        for li, layer in enumerate(net.layers):
            Q = shadow.tracked_basis(net, clean, li).double()  # the layers in the step's order
            T, excluded = shadow.tracks[li].basis().double(), shadow.tracked_cache[li][1]
            if excluded is None:
                Q_ref = T
            else:
                C = orthonormal(excluded.T.double())
                Q_ref = gram_schmidt_loop(T, C, shadow.tol)
                assert float((C.T @ Q).abs().max()) < 1e-4
                protected_steps += 1
            assert torch.allclose(Q @ Q.T, Q_ref @ Q_ref.T, atol=1e-4)
            X = shadow.layer_inputs(net, clean, li).double()
            own = fast_loco_basis(X, shadow.rank, excluded.double() if excluded is not None else None, shadow.tol)
            assert float((Q @ Q.T - own @ own.T).norm()) > 0.1  # not this batch's own basis
            n_out = layer.weight.shape[0]
            G_np = torch.cat([ref[li][:-n_out].reshape(n_out, -1), ref[li][-n_out:, None]], 1)
            u = torch.cat([upd[li][:-n_out].reshape(n_out, -1), upd[li][-n_out:, None]], 1)
            G = project(G_np, Q)
            assert torch.allclose(u, G, rtol=1e-3, atol=1e-4 * float(G.abs().max()))
            assert not torch.allclose(u, G_np, atol=1e-2 * float(G.abs().max()))  # the projection acts
    assert protected_steps >= 10  # the faithful variant protects centroids from its second batch on


@pytest.mark.parametrize("arch,kw", [("1x8x8-c6k3-10", {"max_rows": 200}), ("64-40-10", {"whiten": 0.1}),
                                     ("64-40-10", {"online": True})])
def test_tracked_projector_runs_with_conv_whiten_and_online(digits, arch, kw):
    """The tracked basis on conv patches, with the whitening projector and on the online path: finite updates,
    not NP's (the projection acts; negative control: projection=False is NP bit for bit)."""
    torch.manual_seed(0)
    net = SpikingNetwork(arch)
    base = dict(rank=6, k=3, memory=40, per_batch=8, seed=7, variant="faithful", projector_every=2, **kw)
    rule, off = make_rule("loco", projector="tracked", **base), make_rule("loco", projector="tracked",
                                                                          projection=False, **base)
    plain = make_rule("np", seed=7, **{k: v for k, v in kw.items() if k == "online"})
    for xs, y in _stream(digits, 3, conv=arch.startswith("1x")):
        u = rule_update(rule, net, xs, y, restore=False)
        v = rule_update(off, net, xs, y, restore=False)
        w = rule_update(plain, net, xs, y, restore=False)
        assert all(bool(torch.isfinite(a).all()) for a in u)
        assert all(torch.equal(a, b) for a, b in zip(v, w))
        assert not torch.allclose(u[0], w[0], atol=1e-3 * float(w[0].abs().max()))


def test_tracked_checkpoint_resume_is_exact(digits):
    # the faithful variant protects centroids from its second batch on: the cache and the protection are resumed too
    kw = dict(rank=8, k=3, memory=64, per_batch=8, seed=4, variant="faithful", projector="tracked", projector_every=2,
              kmeans_every=3)
    straight = _weights(_train(make_rule("loco", **kw), digits, 10)[0])
    saved = _checkpoint_after(kw, digits, 7)
    assert saved["rule"]["proj_step"] == 7 and len(saved["rule"]["tracks"]) == 3
    assert all(torch.equal(p, q) for p, q in zip(straight, _resumed(saved, saved["rule"], kw, digits)))
    partial = {k: v for k, v in saved["rule"].items() if k != "tracks"}  # negative control: without the tracks
    assert not all(torch.equal(p, q) for p, q in zip(straight, _resumed(saved, partial, kw, digits)))


def test_bad_track_decay_is_a_clear_error():
    for bad in (-0.1, 1.0, 2, True, "x"):
        with pytest.raises(LocosnnError, match="track_decay"):
            make_rule("loco", projector="tracked", track_decay=bad)
    with pytest.raises(LocosnnError, match="track_decay"):
        cast_rule_args("loco", {"track_decay": "1.5"})
