"""Deep-network options of NP/LOCO (rules/perturb.py), the normalised optimiser, the identity
init and the depth diagnostics: oracles against exact gradients, negative controls,
reproducibility and locality."""
import pytest
import torch

from locosnn.data import load_dataset
from locosnn.depth import probe_layers, split_half_consistency
from locosnn.encoding import encode
from locosnn.errors import LocosnnError
from locosnn.network import SpikingNetwork
from locosnn.neurons import NeuronConfig
from locosnn.optim import NormalizedMomentum
from locosnn.rules import make_rule
from locosnn.rules.bptt import bptt_gradients
from locosnn.testing import assert_spiking, cosine

FROZEN = dict(temporal="frozen", antithetic=True)


def rate_net(seed=0):
    """A small rate-proxy net with currents inside the proxy's linear range (smooth loss)."""
    torch.manual_seed(seed)
    net = SpikingNetwork("8-7-6-4", neuron=NeuronConfig(model="rate"), init="pytorch")
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.mul_(1.5)
            layer.bias.fill_(0.4)
    return net


def rate_batch(seed=0, B=3, T=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 8, generator=g)
    return encode(x, T, "direct"), torch.randint(0, 4, (B,), generator=g)


def grads_of(net):
    return [torch.cat([p.grad.flatten() for p in layer.parameters()]) for layer in net.layers]


def estimate(net, x, y, **kw):
    rule = make_rule("np", seed=kw.pop("seed", 0), **kw)
    net.zero_grad(set_to_none=True)
    rule.step(net, x, y)
    return grads_of(net)


def exact(net, x, y):
    return [torch.cat([g.flatten() for g in gs]) for gs in
            zip(*[iter(bptt_gradients(net, x, y))] * 2)]


class ShuffledDL:
    """Negative control: the noisy rows' losses are permuted across draws (the same permutation
    for the +xi and -xi halves), so each dL belongs to another draw's noise."""

    def __init__(self, rule):
        self.rule, self.orig = rule, rule.loss_fn

    def __call__(self, out, y):
        loss = self.orig(out, y)
        B = 3
        if out.shape[0] > B:
            P = (out.shape[0] - B) // 2
            perm = torch.randperm(P, generator=torch.Generator().manual_seed(7))
            loss = torch.cat([loss[:B], loss[B:B + P][perm], loss[B + P:][perm]])
        return loss


@pytest.mark.parametrize("opts", [dict(FROZEN), dict(FROZEN, layer_sample=True), dict(temporal="step", antithetic=True)])
def test_frozen_antithetic_and_layer_sampled_estimates_are_unbiased(opts):
    """Mean over many stacked draws against the exact gradient of a rate-proxy net (direct input:
    the inputs are constant in time, so frozen noise loses nothing). Negative control: dL shuffled."""
    net = rate_net()
    x, y = rate_batch()
    ref = exact(net, x, y)
    est = estimate(net, x, y, sigma=0.02, draws=6000, **opts)
    for li, (e, r) in enumerate(zip(est, ref)):
        assert cosine(e, r) > 0.95, (li, cosine(e, r))
        assert 0.85 < float(e.norm() / r.norm()) < 1.15, (li, float(e.norm() / r.norm()))
    rule = make_rule("np", sigma=0.02, draws=6000, **opts)
    rule.loss_fn = ShuffledDL(rule)
    net.zero_grad(set_to_none=True)
    rule.step(net, x, y)
    for e, r in zip(grads_of(net), ref):  # the mean of uncorrelated dL xi collapses towards 0
        assert float(e.norm() / r.norm()) < 0.2


def test_activity_eligibility_points_downhill_and_equals_np_where_no_noise_arrives_from_below():
    """ANP is biased (a PSD-rotated gradient) but a descent direction; at the first layer with a
    block-local loss of its own, da = xi exactly, so it matches the noise estimator's direction."""
    net = rate_net()
    x, y = rate_batch()
    ref = exact(net, x, y)
    anp = estimate(net, x, y, sigma=0.02, draws=6000, eligibility="activity", **FROZEN)
    for li, (e, r) in enumerate(zip(anp, ref)):
        assert cosine(e, r) > 0.5, (li, cosine(e, r))
    a = estimate(net, x, y, sigma=0.02, draws=50, eligibility="activity", local_loss=1, **FROZEN)
    n = estimate(net, x, y, sigma=0.02, draws=50, eligibility="noise", local_loss=1, **FROZEN)
    assert cosine(a[0], n[0]) > 0.99
    assert cosine(a[1], n[1]) < 0.99  # layer 1 sees layer 0's noise: ANP differs there


def test_frozen_and_antithetic_noise_are_what_they_claim_and_reproducible_from_the_seed():
    torch.manual_seed(0)
    net = SpikingNetwork("20-16-16-4")
    x = encode(torch.rand(5, 20) * 2, 6, "direct")
    y = torch.randint(0, 4, (5,))
    from locosnn.rules.perturb import DeepOptions, PlannedNoise
    opts = DeepOptions(**FROZEN, draws=2)
    noise = PlannedNoise(0.3, 5, opts, [0, 1, 2], 3, torch.Generator().manual_seed(1), torch.device("cpu"), torch.float32)
    tr = net.run(torch.cat([x] * 5, 1), noise=noise, record=True)
    assert_spiking(tr)
    for li in range(3):
        xi = tr.noise[li]
        assert torch.equal(xi[0], xi[-1])  # frozen in time
        assert float(xi[0][:5].abs().sum()) == 0  # clean rows
        assert torch.equal(xi[0][5:15], -xi[0][15:25])  # antithetic pairs
        assert float(xi[0][5:15].std()) > 0.1
    g1 = estimate(net, x, y, sigma=0.3, draws=2, seed=4, **FROZEN)
    g2 = estimate(net, x, y, sigma=0.3, draws=2, seed=4, **FROZEN)
    g3 = estimate(net, x, y, sigma=0.3, draws=2, seed=5, **FROZEN)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not all(torch.equal(a, b) for a, b in zip(g1, g3))


def test_block_local_losses_never_read_another_blocks_loss():
    """Same seed, same noise: changing the readout (the global loss) or block 1's head leaves
    block 0's estimate bit-identical; changing block 0's head changes it."""
    torch.manual_seed(0)
    net = SpikingNetwork("20-16-16-16-16-4", init="identity")
    x = encode(torch.rand(6, 20) * 2, 5, "direct")
    y = torch.randint(0, 4, (6,))
    kw = dict(sigma=0.3, local_loss=2, local_heads="fixed", **FROZEN)

    def run(mutate=None):
        rule = make_rule("np", seed=0, **kw)
        rule.deep_estimator.init_heads(net, torch.Generator().manual_seed(3))
        if mutate:
            mutate(rule)
        n2 = SpikingNetwork("20-16-16-16-16-4")
        n2.load_state_dict(net.state_dict())
        if mutate and getattr(mutate, "readout", False):
            with torch.no_grad():
                n2.layers[-1].weight.mul_(-3)
        rule.step(n2, x, y)
        return grads_of(n2)

    assert [len(b) for b in make_rule("np", **kw).deep_estimator.blocks(net)] == [2, 3]
    base = run()

    def new_readout(rule):
        pass
    new_readout.readout = True
    after_readout = run(new_readout)
    assert all(torch.equal(base[li], after_readout[li]) for li in (0, 1))
    assert not torch.equal(base[3], after_readout[3])

    def new_head0(rule):
        rule.deep_estimator.heads[0] = torch.randn_like(rule.deep_estimator.heads[0])
    after_head0 = run(new_head0)
    assert not torch.equal(base[0], after_head0[0])
    assert all(torch.equal(base[li], after_head0[li]) for li in (2, 3, 4))


def test_delta_readout_is_the_exact_readout_gradient_and_train_hidden_false_freezes_the_rest():
    torch.manual_seed(0)
    net = SpikingNetwork("20-16-16-4")
    x = encode(torch.rand(5, 20) * 2, 6, "direct")
    y = torch.randint(0, 4, (5,))
    ref = bptt_gradients(net, x, y)
    g = estimate(net, x, y, sigma=0.2, readout_rule="delta", train_hidden=False)
    assert torch.allclose(g[-1][:-4], ref[-2].flatten(), atol=1e-6)
    assert torch.allclose(g[-1][-4:], ref[-1], atol=1e-6)
    assert float(g[0].abs().sum()) == 0 and float(g[1].abs().sum()) == 0


def test_homeostasis_moves_rates_towards_the_target():
    torch.manual_seed(0)
    net = SpikingNetwork("20-16-16-4")
    x = encode(torch.rand(8, 20) * 2, 6, "direct")
    y = torch.randint(0, 4, (8,))
    rate0 = float(torch.stack(net.run(x, record=True).outputs[0]).mean())
    target = 0.05 if rate0 > 0.1 else 0.4
    rule = make_rule("np", sigma=0.1, homeostasis=0.2, target_rate=target, **FROZEN)
    for _ in range(30):
        rule.step(net, x, y)
    rate1 = float(torch.stack(net.run(x, record=True).outputs[0]).mean())
    assert abs(rate1 - target) < 0.5 * abs(rate0 - target)


def test_bad_deep_options_are_refused():
    for bad in (dict(temporal="slow"), dict(draws=0), dict(eligibility="x"), dict(local_loss=-1),
                dict(readout_rule="bp"), dict(temporal="frozen", online=True)):
        with pytest.raises(LocosnnError):
            make_rule("np", **bad)


def test_loco_composes_with_the_deep_options():
    """LOCO's projection is applied to the deep estimate: G P = G for every layer."""
    torch.manual_seed(0)
    net = SpikingNetwork("20-16-16-4", init="identity")
    x = encode(torch.rand(8, 20) * 2, 5, "direct")
    y = torch.randint(0, 4, (8,))
    rule = make_rule("loco", sigma=0.3, rank=4, k=0, eligibility="activity", readout_rule="delta", **FROZEN)
    rule.step(net, x, y)
    assert rule.last_ranks and max(rule.last_ranks) <= 4
    for li, layer in enumerate(net.layers):
        G = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        X = torch.cat([torch.ones(8, 1) * 0 + x[0].reshape(8, -1), torch.ones(8, 1)], 1) if li == 0 else None
        if X is not None:
            Q = rule.projector_basis(net, net.run(x, record=True), li)
            assert torch.allclose(G @ Q @ Q.T, G, atol=1e-5)
        assert float(G.norm()) > 0


# -- the optimiser -------------------------------------------------------------------------------

def test_normalised_momentum_moves_every_layer_by_the_same_relative_step():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(30, 20, generator=g) * s) for s in (0.01, 1.0, 50.0)]
    for p, scale in zip(params, (1e-6, 1.0, 1e4)):  # gradient norms 10 orders of magnitude apart
        p.grad = torch.randn(p.shape, generator=g) * scale
    before = [p.detach().clone() for p in params]
    NormalizedMomentum(params, lr=1e-2).step()
    for p, b in zip(params, before):
        assert abs(float((p.detach() - b).norm() / b.norm()) - 1e-2) < 1e-6
    # negative control: Adam's relative steps differ by orders of magnitude across these tensors
    q = [torch.nn.Parameter(b.clone()) for b in before]
    for a, p in zip(q, params):
        a.grad = p.grad.clone()
    torch.optim.Adam(q, lr=1e-2).step()
    rel = [float((a.detach() - b).norm() / b.norm()) for a, b in zip(q, before)]
    assert max(rel) / min(rel) > 100


def test_row_norm_projection_keeps_each_neurons_weight_norm():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, 5, generator=g))
    b = torch.nn.Parameter(torch.zeros(10))
    rows0 = p.detach().norm(dim=1).clone()
    opt = NormalizedMomentum([p, b], lr=0.1, row_norm=True)
    for _ in range(20):
        p.grad = torch.randn(10, 5, generator=g)
        b.grad = torch.randn(10, generator=g)
        opt.step()
    assert torch.allclose(p.detach().norm(dim=1), rows0, atol=1e-5)
    assert float(b.detach().abs().sum()) > 0  # zero-initialised biases move (the floor)


def test_bias_step_floor_is_fixed_where_relative_grows_geometrically():
    """A bias whose estimate keeps a component along itself: the relative step multiplies its norm by
    (1 + lr) per step (geometric growth: what diverged the deep recipe on a 20-epoch schedule), the
    floor step adds a fixed lr * floor * sqrt(n) (linear growth at most). Weights step relatively in both."""
    n, lr, steps = 10, 0.05, 60
    out = {}
    for mode in ("relative", "floor"):
        b = torch.nn.Parameter(torch.full((n,), 0.5))
        w = torch.nn.Parameter(torch.ones(3, 4))
        opt = NormalizedMomentum([w, b], lr=lr, momentum=0.0, bias_step=mode)
        w.grad = torch.ones(3, 4)
        b.grad = -b.detach().clone()  # descent direction = +b: outward
        w0 = w.detach().clone()
        b0 = b.detach().clone()
        opt.step()
        out[mode, "first"] = float((b.detach() - b0).norm())
        assert abs(float((w.detach() - w0).norm() / w0.norm()) - lr) < 1e-6  # weights: relative either way
        for _ in range(steps - 1):
            b.grad = -b.detach().clone()
            opt.step()
        out[mode] = float(b.detach().norm())
    b_norm0 = 0.5 * n ** 0.5
    assert abs(out["relative", "first"] - lr * b_norm0) < 1e-6
    assert abs(out["floor", "first"] - lr * 1e-2 * n ** 0.5) < 1e-7
    assert abs(out["relative"] - b_norm0 * (1 + lr) ** steps) < 1e-3 * out["relative"]
    assert abs(out["floor"] - (b_norm0 + steps * lr * 1e-2 * n ** 0.5)) < 1e-5
    with pytest.raises(ValueError, match="bias_step"):
        NormalizedMomentum([b], bias_step="own")


def test_bias_step_is_a_run_setting_for_nmom_only():
    from locosnn import TrainConfig
    from locosnn.errors import LocosnnError
    from locosnn.factory import build_network, build_optimizer
    cfg = TrainConfig(rule="np", dataset="digits", arch="64-16-10", optimizer="nmom", bias_step="floor").validate()
    opt = build_optimizer(cfg, build_network(cfg))
    assert all(g["bias_step"] == "floor" for g in opt.param_groups)
    with pytest.raises(LocosnnError, match="nmom only"):
        TrainConfig(rule="np", optimizer="adam", bias_step="floor").validate()
    with pytest.raises(LocosnnError, match="bias_step"):
        TrainConfig(rule="np", optimizer="nmom", bias_step="own").validate()


# -- init and diagnostics ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_identity_init_passes_class_information_through_depth(digits):
    """Probe on the last of 8 hidden layers: identity init keeps what a random stack destroys."""
    xtr, ytr = digits.train.x[:1000].float(), digits.train.y[:1000]
    xte, yte = digits.test.x.float(), digits.test.y
    res = {}
    for init in ("identity", "scaled"):
        torch.manual_seed(0)
        net = SpikingNetwork("64-128x8-10", init=init, init_gain=2.0)
        res[init] = probe_layers(net, xtr, ytr, xte, yte, T=8)
    ident, rand = res["identity"], res["scaled"]
    assert min(ident["rate"]) > 0.05
    assert ident["probe_acc"][-1] > 0.85
    assert ident["probe_acc"][-1] > rand["probe_acc"][-1] + 0.05


def test_split_half_consistency_separates_signal_from_noise():
    net = rate_net()
    x, y = rate_batch()
    rule = make_rule("np", sigma=0.02, draws=400, **FROZEN)
    good = split_half_consistency(rule, net, x, y, draws=4)
    assert min(good) > 0.8
    bad_rule = make_rule("np", sigma=0.02, draws=400, **FROZEN)
    bad_rule.loss_fn = ShuffledDL(bad_rule)
    bad = split_half_consistency(bad_rule, net, x, y, draws=4)
    assert max(bad) < 0.5


def test_loco_whitening_preconditioner_stays_in_the_subspace_and_equalises_input_variance():
    """P_w keeps updates inside LOCO's subspace (G P_w Q Q^T = G P_w); on inputs with one
    high-variance direction it shrinks the step along it relative to plain LOCO."""
    torch.manual_seed(0)
    net = SpikingNetwork("12-4", neuron=NeuronConfig(model="rate"), init="pytorch")
    g = torch.Generator().manual_seed(1)
    base = torch.rand(64, 12, generator=g) * 0.2
    base[:, 0] += torch.rand(64, generator=g) * 3  # one loud input
    x = encode(base, 2, "direct")
    y = torch.randint(0, 4, (64,), generator=g)
    out = {}
    for w in (0.0, 0.1):
        rule = make_rule("loco", sigma=0.05, rank=6, k=0, whiten=w, readout_rule="delta", **FROZEN)
        net.zero_grad(set_to_none=True)
        rule.step(net, x, y)
        G = torch.cat([net.layers[0].weight.grad, net.layers[0].bias.grad[:, None]], 1)
        Q = rule.projector_basis(net, net.run(x, record=True), 0)
        assert torch.allclose(G @ Q @ Q.T, G, atol=1e-5)
        out[w] = G
    share = {w: float(G[:, 0].norm() / G.norm()) for w, G in out.items()}
    assert share[0.1] < 0.6 * share[0.0]
    with pytest.raises(LocosnnError):
        make_rule("loco", whiten=-1)


def test_probe_command_reports_every_hidden_layer(tmp_path, capsys):
    import json

    from locosnn.cli import main
    run = tmp_path / "run"
    assert main(["train", "--rule", "np", "--dataset", "digits", "--arch", "64-32x3-10", "--epochs", "1",
                 "--init", "identity", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["probe", str(run), "--n-train", "300", "--n-test", "100", "--init"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("init", "trained"):
        assert len(res[key]["probe_acc"]) == 3 and all(0.3 < a <= 1 for a in res[key]["probe_acc"])
    assert main(["probe", str(tmp_path / "nothing")]) == 2
