"""Node perturbation and LOCO: oracles, projector algebra, equivalences, negative controls."""
import gc
import warnings

import pytest
import torch

from locosnn.data import load_dataset
from locosnn.diagnostics import alignment, estimate_variance, reference_gradient, rule_update
from locosnn.encoding import encode
from locosnn.errors import LocosnnError
from locosnn.network import SpikingNetwork
from locosnn.neurons import NeuronConfig
from locosnn.rules import make_rule
from locosnn.rules.np import NodePerturbation
from locosnn.rules.projector import ClusterMemory, loco_basis, project
from locosnn.testing import assert_spiking


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _batch(ds, n, T=8):
    x, y = ds.train.x[:n].float(), ds.train.y[:n]
    return encode(x, T, "direct"), y


class ShuffledNP(NodePerturbation):
    """Negative control: the loss differences are permuted across samples."""

    def perturbed_passes(self, network, x_seq, y):
        clean, noisy, dl, lc = super().perturbed_passes(network, x_seq, y)
        perm = torch.randperm(dl.shape[0], generator=torch.Generator().manual_seed(1))
        return clean, noisy, dl[perm], lc


# -- projector algebra ---------------------------------------------------------------

def test_projector_is_a_projector_and_annihilates_excluded_centroids():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 60, generator=g) @ torch.randn(60, 60, generator=g) + 0.5
    C = torch.randn(3, 60, generator=g)
    Q = loco_basis(X, 20, C, tol=0.1).double()
    P = Q @ Q.T
    assert Q.shape[1] <= 20
    assert torch.allclose(P @ P, P, atol=1e-6)
    assert torch.allclose(P, P.T, atol=1e-10)
    assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-6)
    assert (C.double() @ P).norm(dim=1).max() < 1e-5
    G = torch.randn(7, 60, generator=g)
    assert torch.allclose(project(G, Q.float()), (G.double() @ P).float(), atol=1e-5)
    # negative control: without exclusion the same centroids are not annihilated
    P0 = loco_basis(X, 20, None).double()
    assert (C.double() @ P0 @ P0.T).norm(dim=1).max() > 0.1


def test_projector_rank_never_exceeds_r_and_tol_drops_dependent_directions():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 3, generator=g) @ torch.randn(3, 40, generator=g)  # rank-3 inputs
    for r in (1, 2, 5, 30):
        assert loco_basis(X, r, None).shape[1] <= min(r, 4)  # mean + 3 principal directions at most
    # tolerance: a centroid equal to the batch mean direction removes the mean, not more
    m = X.mean(0, keepdim=True)
    Q = loco_basis(X, 30, m)
    assert (m / m.norm() @ Q).abs().max() < 1e-5


@pytest.mark.parametrize("arch,shape", [("64-40-30-10", None), ("1x8x8-c6k3-10", (1, 8, 8))])
def test_loco_updates_live_in_projector_range(digits, arch, shape):
    torch.manual_seed(0)
    net = SpikingNetwork(arch)
    xs, y = _batch(digits, 64)
    rule = make_rule("loco", rank=12, seed=0)
    rule.step(net, xs, y)
    clean = net.run(xs, record=True)
    assert_spiking(clean)
    assert max(rule.last_ranks) <= 12 and min(rule.last_ranks) >= 1
    for li, layer in enumerate(net.layers):
        G = torch.cat([layer.weight.grad.reshape(layer.weight.shape[0], -1), layer.bias.grad[:, None]], 1)
        Q = rule.projector_basis(net, clean, li)
        # the update has no component outside span(Q): G (I - QQ^T) = 0
        assert (G - project(G, Q)).norm() <= 1e-4 * G.norm() + 1e-8, f"layer {li}"


def test_faithful_variant_protects_all_but_the_nearest_centroid(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-10")
    rule = make_rule("loco", variant="faithful", k=3, rank=10)
    x, y = digits.train.x.float(), digits.train.y
    for c in (0, 1, 2, 0):  # label-sorted batches, as in the authors' code
        xb = x[y == c][:32]
        rule.step(net, encode(xb, 4), y[y == c][:32])
    mem = rule.memories[0]
    assert mem.centroids.shape[0] == 3
    clean = net.run(encode(x[y == 0][:32], 4), record=True)
    X = rule.layer_inputs(net, clean, 0)
    excluded = rule.excluded_centroids(mem, X)
    assert excluded.shape[0] == 2  # k - 1 protected
    Q = loco_basis(X, 10, excluded)
    assert (excluded / excluded.norm(dim=1, keepdim=True) @ Q).abs().max() < 1e-4


def test_sample_variant_protects_old_modes_only_after_the_stream_moves_on():
    g = torch.Generator().manual_seed(0)
    protos = torch.eye(20)[:4] * 3 + 0.1
    rule = make_rule("loco", variant="sample", k=4, rank=5, window=3, per_batch=16, memory=200)

    def batch(classes):
        idx = torch.tensor(classes)[torch.randint(len(classes), (64,), generator=g)]
        return torch.cat([protos[idx] + 0.05 * torch.randn(64, 20, generator=g), torch.ones(64, 1)], 1)

    mem = ClusterMemory(200, 4, 5)
    for _ in range(6):  # i.i.d. over all four modes: nothing is protected
        assert rule.excluded_centroids(mem, batch([0, 1, 2, 3])).shape[0] == 0
    mem = ClusterMemory(200, 4, 5)
    for _ in range(6):
        rule.excluded_centroids(mem, batch([0, 1]))
    for _ in range(6):  # a new task: modes 2, 3
        ex = rule.excluded_centroids(mem, batch([2, 3]))
    assert ex.shape[0] >= 1
    # the protected centroids are the old task's modes
    old = torch.cat([protos[:2], torch.ones(2, 1)], 1)
    old = old / old.norm(dim=1, keepdim=True)
    assert (ex / ex.norm(dim=1, keepdim=True) @ old.T).max(1).values.min() > 0.95


# -- equivalence with NP ----------------------------------------------------------------

def _train_steps(rule, steps, digits, seed=0):
    torch.manual_seed(seed)
    net = SpikingNetwork("64-40-30-10")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = digits.train.x.float(), digits.train.y
    for i in range(steps):
        opt.zero_grad()
        rule.step(net, encode(x[i * 32:(i + 1) * 32], 4), y[i * 32:(i + 1) * 32])
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_loco_with_projection_off_is_bit_identical_to_np(digits):
    a = _train_steps(make_rule("np", seed=3), 3, digits)
    b = _train_steps(make_rule("loco", projection=False, seed=3), 3, digits)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # negative controls: the projection, or another seed, changes the weights
    c = _train_steps(make_rule("loco", projection=True, rank=8, seed=3), 3, digits)
    d = _train_steps(make_rule("np", seed=4), 3, digits)
    assert not all(torch.equal(p, q) for p, q in zip(a, c))
    assert not all(torch.equal(p, q) for p, q in zip(a, d))


def test_concatenated_and_separate_passes_are_one_estimator(digits):
    """concat=True runs clean+noisy as one batch of 2B rows, concat=False as two passes. They draw
    noise of different shapes, so compare the estimators, not the draws: on a rate network both
    means (many draws) point along the exact gradient, they point along each other, and the
    spread of single draws around the mean is the same (relative variance within 40%)."""
    torch.manual_seed(0)
    net = SpikingNetwork("64-20-10", neuron=NeuronConfig(model="rate"))
    xs, y = _batch(digits, 16, T=1)
    ua = rule_update(make_rule("np", seed=5, concat=True), net, xs, y)
    assert all(torch.isfinite(u).all() for u in ua)
    xr, yr = xs.repeat(1, 64, 1, 1, 1), y.repeat(64)
    ref = reference_gradient(net, xr, yr)
    ra = estimate_variance(make_rule("np", seed=5, concat=True, sigma=0.05), net, xr, yr, draws=16, reference=ref)
    rb = estimate_variance(make_rule("np", seed=6, concat=False, sigma=0.05), net, xr, yr, draws=16, reference=ref)
    assert all(a["cos_mean"] > 0.9 and b["cos_mean"] > 0.9 for a, b in zip(ra, rb)), (ra, rb)
    ratios = [a["rel_var"] / b["rel_var"] for a, b in zip(ra, rb)]
    assert all(0.7 < q < 1.4 for q in ratios), ratios
    # negative control: forty times the noise scale is a different estimator (its O(sigma^2) bias and
    # its variance change), and the check above must be able to see it
    rc = estimate_variance(make_rule("np", seed=6, concat=False, sigma=2.0), net, xr, yr, draws=16, reference=ref)
    assert any(not (0.7 < a["rel_var"] / c["rel_var"] < 1.4) or c["cos_mean"] < 0.9 for a, c in zip(ra, rc))


# -- oracles ----------------------------------------------------------------------------

def _np_means(digits, model, T, sigma, rule_cls=None, draws=8):
    torch.manual_seed(0)
    net = SpikingNetwork("64-32-32-10", neuron=NeuronConfig(model=model))
    xs, y = _batch(digits, 32, T)
    assert_spiking(net.run(xs, record=True))
    ref = reference_gradient(net, xs, y)
    rule = (rule_cls or NodePerturbation)(sigma=sigma, seed=0)
    # 64 copies of the batch in one pass = the mean of 64 independent estimates per draw
    return estimate_variance(rule, net, xs.repeat(1, 64, 1, 1, 1), y.repeat(64), draws=draws, reference=ref)


def test_np_mean_estimate_matches_exact_gradient_on_rate_network(digits):
    rows = _np_means(digits, "rate", 4, 0.05)
    assert all(r["cos_mean"] >= 0.9 for r in rows), [r["cos_mean"] for r in rows]
    shuffled = _np_means(digits, "rate", 4, 0.05, ShuffledNP)
    assert all(abs(r["cos_mean"]) < 0.3 for r in shuffled), [r["cos_mean"] for r in shuffled]


def test_np_mean_estimate_aligns_with_bptt_on_lif_network(digits):
    rows = _np_means(digits, "lif", 8, 0.2)
    assert all(r["cos_mean"] >= 0.5 for r in rows), [r["cos_mean"] for r in rows]
    shuffled = _np_means(digits, "lif", 8, 0.2, ShuffledNP)
    assert all(abs(r["cos_mean"]) < 0.2 for r in shuffled), [r["cos_mean"] for r in shuffled]


def test_np_on_a_silent_network_fails_the_liveness_guard(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-32-32-10", init="scaled", init_gain=0.1)
    xs, y = _batch(digits, 32)
    with pytest.raises(AssertionError, match="liveness guard"):
        assert_spiking(net.run(xs, record=True))


def test_loco_has_higher_cosine_than_np_in_deep_layers(digits):
    """Same noise draws (paired: LOCO's projector has its own generator), 6 hidden layers."""
    torch.manual_seed(0)
    net = SpikingNetwork("64-128x6-10")
    xs, y = _batch(digits, 256)
    assert_spiking(net.run(xs, record=True))
    ref = reference_gradient(net, xs, y)
    np_rows = estimate_variance(make_rule("np", seed=0), net, xs, y, draws=16, reference=ref)
    loco_rows = estimate_variance(make_rule("loco", rank=16, seed=0), net, xs, y, draws=16, reference=ref)
    deep = range(2, 7)
    gains = [loco_rows[i]["cos_mean"] - np_rows[i]["cos_mean"] for i in deep]
    assert all(gn > 0 for gn in gains), gains
    assert all(np_rows[i]["cos_mean"] > 0 for i in deep)  # NP itself is informative: not a trivial win
    # negative control: a rank that spans the whole input space changes nothing
    full = estimate_variance(make_rule("loco", rank=129, k=0, seed=0), net, xs, y, draws=4, reference=ref)
    np4 = estimate_variance(make_rule("np", seed=0), net, xs, y, draws=4, reference=ref)
    assert all(abs(f["cos_mean"] - n["cos_mean"]) < 1e-3 for f, n in zip(full, np4))


# -- hygiene ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["np", "loco"])
def test_rules_build_no_autograd_graph_and_leak_nothing(digits, name, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("backward called")
    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-30-10")
    rule = make_rule(name, seed=0, memory=64) if name == "loco" else make_rule(name, seed=0)
    x, y = digits.train.x.float(), digits.train.y
    counts = []
    for i in range(8):
        rep = rule.step(net, encode(x[i * 32:(i + 1) * 32], 4), y[i * 32:(i + 1) * 32])
        assert rep["out"].grad_fn is None and not rep["out"].requires_grad
        for p in net.parameters():
            assert p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
        del rep
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    assert counts[-1] == counts[3], counts  # flat once LOCO's memory is full


def test_bad_rule_arguments_give_clear_errors():
    with pytest.raises(LocosnnError, match="sigma"):
        make_rule("np", sigma=0)
    with pytest.raises(LocosnnError, match="noise site"):
        make_rule("np", site="dendrite")
    with pytest.raises(LocosnnError, match="variant"):
        make_rule("loco", variant="magic")
    with pytest.raises(LocosnnError):
        make_rule("loco", rnak=3)


# -- diagnostics ----------------------------------------------------------------------------

def test_alignment_of_bptt_with_itself_is_perfect_and_state_is_restored(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-32-10")
    xs, y = _batch(digits, 32)
    rows = alignment(make_rule("bptt"), net, xs, y)
    assert all(abs(r["cos"] - 1) < 1e-6 and abs(r["norm_ratio"] - 1) < 1e-5 for r in rows)
    rule = make_rule("np", seed=0)
    before = rule.generator.get_state().clone()
    alignment(rule, net, xs, y)
    assert torch.equal(rule.generator.get_state(), before)
    assert all(p.grad is None for p in net.parameters())
    # negative control: a different batch's gradient is not the same direction
    other = alignment(make_rule("bptt"), net, *_batch_slice(digits, 32, 64))
    assert other[0]["cos"] > 0.99  # alignment with itself holds on any batch
    ref_a = reference_gradient(net, xs, y)
    ref_b = reference_gradient(net, *_batch_slice(digits, 32, 64))
    assert float(ref_a[0] @ ref_b[0] / (ref_a[0].norm() * ref_b[0].norm())) < 0.99


def _batch_slice(ds, a, b, T=8):
    return encode(ds.train.x[a:b].float(), T, "direct"), ds.train.y[a:b]


@pytest.mark.parametrize("name,arch", [("np", "64-40-30-10"), ("loco", "64-40-30-10"), ("np", "1x8x8-c6k3-10"),
                                       ("loco", "1x8x8-c6k3-10")])
def test_online_mode_equals_recorded_mode(digits, name, arch):
    """online=True keeps no trace (memory flat in T) and replays the noise: same update."""
    torch.manual_seed(0)
    net = SpikingNetwork(arch)
    xs, y = _batch(digits, 32)
    a = rule_update(make_rule(name, seed=2, online=False), net, xs, y)
    b = rule_update(make_rule(name, seed=2, online=True), net, xs, y)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-4, atol=1e-6 * float(u.abs().max()))
    c = rule_update(make_rule(name, seed=3, online=True), net, xs, y)  # negative control: other noise
    assert not torch.allclose(a[0], c[0], rtol=1e-2)


def test_fast_gram_schmidt_spans_what_the_reference_loop_spans():
    from locosnn.rules.projector import gram_schmidt, gram_schmidt_loop, orthonormal
    g = torch.Generator().manual_seed(4)
    V = torch.randn(80, 30, generator=g, dtype=torch.float64)
    V[:, 5] = V[:, 2] + 0.01 * V[:, 3]  # nearly dependent: must be dropped by tol
    V[:, 9] = 2 * V[:, 0]
    C = orthonormal(torch.randn(80, 4, generator=g, dtype=torch.float64))
    for against in (None, C):
        a = gram_schmidt(V, against, 0.1)
        b = gram_schmidt_loop(V, against, 0.1)
        assert a.shape == b.shape and a.shape[1] == 28
        assert torch.allclose(a @ a.T, b @ b.T, atol=1e-8)


def test_drop_mean_removes_the_batch_mean_direction(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-10")
    xs, y = _batch(digits, 64)
    clean = net.run(xs, record=True)
    for drop in (True, False):
        rule = make_rule("loco", rank=12, drop_mean=drop)
        X = rule.layer_inputs(net, clean, 1)
        Q = rule.projector_basis(net, clean, 1)
        m = X.mean(0)
        resid = float((m @ Q).norm() / m.norm())
        assert (resid < 1e-4) if drop else (resid > 0.9)  # without the flag the mean is the first basis vector


@pytest.mark.parametrize("name,kw", [
    ("np", {}), ("np", {"site": "output"}), ("np", {"online": True}),
    ("np", {"temporal": "frozen", "antithetic": True, "eligibility": "activity", "draws": 2}),
    ("loco", {"variant": "faithful", "projector": "fast"}), ("loco", {"variant": "faithful"}),
    ("dfa", {}), ("fa", {}), ("opzo", {}), ("sal", {}), ("sfdfa", {}), ("owm", {})])
def test_time_constant_input_gives_the_same_update(digits, name, kw):
    """Direct encoding's stride-0 time axis (the first layer's current and, for the perturbation rules, its
    update computed once from the time-summed eligibility) gives the update of the materialised input."""
    x, y = _batch(digits, 32)
    grads = []
    for xs in (x, x.contiguous()):
        torch.manual_seed(0)
        net = SpikingNetwork("64-40-30-10")
        for layer in net.layers:
            layer.weight.data *= 3.0
        make_rule(name, seed=3, **kw).step(net, xs, y)
        grads.append([p.grad.clone() for p in net.parameters()])
    assert any(float(g.abs().sum()) > 0 for g in grads[0])  # it learns
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,expected", [("np", [16, 16 * 5]), ("dfa", [16] + [16] * 5), ("fa", [16] + [16] * 5)])
def test_first_layer_update_is_one_product_for_a_time_constant_input(digits, monkeypatch, name, expected):
    """Liveness of the shortcut: with a time-constant input the first layer's update is one product over B
    rows (NP: the time-summed eligibility; FA/DFA: the trace-weighted deltas); a materialised input takes
    the per-step path (NP: T B stacked rows; FA/DFA: one product per step)."""
    x, y = _batch(digits, 16, T=5)
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-10")
    rows = []
    orig = type(net.layers[0]).outer
    monkeypatch.setattr(type(net.layers[0]), "outer",
                        lambda self, e, xx: rows.append((self is net.layers[0], e.shape[0])) or orig(self, e, xx))
    for xs in (x, x.contiguous()):
        make_rule(name, seed=0).step(net, xs, y)
    assert [r for first, r in rows if first] == expected
