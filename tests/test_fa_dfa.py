"""FA and DFA: exact against autograd where they should be exact, aligned otherwise, flat in T."""
import pytest
import torch

from locosnn.config import TrainConfig
from locosnn.data import load_dataset
from locosnn.diagnostics import alignment, reference_gradient, rule_update
from locosnn.encoding import encode
from locosnn.errors import LocosnnError
from locosnn.network import SpikingNetwork
from locosnn.neurons import NeuronConfig
from locosnn.rules import make_rule
from locosnn.testing import assert_spiking
from locosnn.train import Trainer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _batch(ds, n, T):
    return encode(ds.train.x[:n].float(), T, "direct"), ds.train.y[:n]


@pytest.mark.parametrize("arch", ["64-40-30-10", "1x8x8-c6k3-c4k3s2-10"])
@pytest.mark.parametrize("model", ["lif", "rate"])
def test_fa_with_transposed_weights_is_exact_spatial_backprop_at_one_step(digits, arch, model):
    torch.manual_seed(0)
    net = SpikingNetwork(arch, neuron=NeuronConfig(model=model))
    xs, y = _batch(digits, 32, T=1)
    assert_spiking(net.run(xs, record=True), min_rate=0.01)
    ref = reference_gradient(net, xs, y)
    upd = rule_update(make_rule("fa", feedback="transpose"), net, xs, y)
    for li, (u, r) in enumerate(zip(upd, ref)):
        assert torch.allclose(u, r, rtol=1e-4, atol=1e-7 * float(r.abs().max()) + 1e-12), f"layer {li}"
    # negative control: random feedback is not the gradient
    rnd = rule_update(make_rule("fa"), net, xs, y)
    assert not torch.allclose(rnd[0], ref[0], rtol=1e-2)
    assert torch.allclose(rnd[-1], ref[-1], rtol=1e-4, atol=1e-9)  # the output layer is exact anyway


def test_dfa_with_the_true_one_hop_feedback_equals_the_gradient(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-10")
    xs, y = _batch(digits, 32, T=1)
    assert_spiking(net.run(xs, record=True))
    ref = reference_gradient(net, xs, y)
    rule = make_rule("dfa")
    rule.init_feedback(net)
    rule.B = [net.layers[1].weight.detach().T.clone()]
    upd = rule_update(rule, net, xs, y)
    for u, r in zip(upd, ref):
        assert torch.allclose(u, r, rtol=1e-4, atol=1e-9)
    rule.B = [torch.randn_like(rule.B[0])]  # negative control
    assert not torch.allclose(rule_update(rule, net, xs, y)[0], ref[0], rtol=1e-2)


def test_fa_on_lif_over_time_aligns_with_bptt_and_random_feedback_does_not(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-64-64-10")
    xs, y = _batch(digits, 128, T=8)
    assert_spiking(net.run(xs, record=True))
    rows = alignment(make_rule("fa", feedback="transpose"), net, xs, y)
    assert all(r["cos"] > 0.8 for r in rows), rows  # OTTT traces vs BPTT: close, not exact
    # negative control: random feedback (an untrained FA network) is not aligned in the hidden layers
    bad = alignment(make_rule("fa", seed=0), net, xs, y)
    assert max(abs(r["cos"]) for r in bad[:-1]) < 0.5, bad


def test_feedback_matrices_are_rule_state_not_parameters(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-30-10")
    n_params = len(list(net.parameters()))
    rule = make_rule("dfa", seed=1)
    xs, y = _batch(digits, 16, T=4)
    rule.step(net, xs, y)
    assert len(list(net.parameters())) == n_params
    assert all(not b.requires_grad for b in rule.B)
    st = rule.state_dict()
    other = make_rule("dfa", seed=2)
    other.load_state_dict(st)
    assert all(torch.equal(a, b) for a, b in zip(other.B, rule.B))


@pytest.mark.parametrize("name", ["fa", "dfa", "opzo"])
def test_no_per_step_state_is_kept(digits, name, monkeypatch):
    """Memory flat in T: the rule never records the trace, and what it holds after a step
    does not depend on T."""
    from locosnn.network import SpikingNetwork as SN
    calls = []
    orig = SN.run

    def spy(self, *a, **k):
        calls.append(k.get("record", False))
        return orig(self, *a, **k)
    monkeypatch.setattr(SN, "run", spy)
    torch.manual_seed(0)
    net = SpikingNetwork("64-40-30-10")
    sizes = []
    for T in (4, 16):
        rule = make_rule(name)
        xs, y = _batch(digits, 16, T)
        rule.step(net, xs, y)
        from locosnn.cost import state_bytes
        sizes.append(state_bytes(rule.state_dict()))
    assert not any(calls)
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("name", ["fa", "dfa", "opzo"])
def test_feedback_rules_learn_digits(name):
    cfg = TrainConfig(rule=name, dataset="digits", arch="64-64-10", T=4, epochs=3, batch_size=64, lr=1e-2)
    hist = Trainer(cfg, progress=False).fit()
    assert hist[-1]["val_acc"] > 0.6, hist[-1]


def test_bad_feedback_option():
    with pytest.raises(LocosnnError, match="feedback"):
        make_rule("fa", feedback="mirror")


# -- OPZO ---------------------------------------------------------------------------------

def _jacobian_T(net, xs, li):
    """Data-averaged transposed Jacobian of the output current w.r.t. layer li's current (T = 1)."""
    x = xs[0].reshape(xs.shape[1], -1)
    h = x
    with torch.enable_grad():
        for k, layer in enumerate(net.layers):
            cur = layer.current(h)
            if k == li:
                cur = cur.detach().requires_grad_(True)
                start = cur
            if k == net.depth - 1:
                out_cur = cur
                break
            h = torch.clamp(cur / net.neuron.theta, 0, 1)
        J = torch.stack([torch.autograd.grad(out_cur[:, j].sum(), start, retain_graph=True)[0].mean(0)
                         for j in range(out_cur.shape[1])], 1)  # (n_l, n_out)
    return J


def test_opzo_feedback_converges_to_the_averaged_jacobian(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-32-32-10", neuron=NeuronConfig(model="rate"))
    xs, y = _batch(digits, 64, T=1)
    assert_spiking(net.run(xs, record=True))
    J = [_jacobian_T(net, xs, li) for li in range(2)]

    def run(rule, steps):
        cos = {}
        for step in range(1, steps[-1] + 1):
            rule.step(net, xs, y)
            if step in steps:
                cos[step] = [float((rule.B[li] * J[li]).sum() / (rule.B[li].norm() * J[li].norm())) for li in range(2)]
        return cos

    better = run(make_rule("opzo", alpha=0.01, lam=0.97, clean_reference=True), (1, 200))
    assert all(c > 0.9 for c in better[200]) and all(c < 0.6 for c in better[1]), better
    faithful = run(make_rule("opzo", alpha=0.01, lam=0.98, seed=1), (3, 300))
    assert all(c300 > c3 + 0.05 for c300, c3 in zip(faithful[300], faithful[3])), faithful  # rises, slowly


def test_opzo_without_noise_updates_no_hidden_layer(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-32-32-10")
    xs, y = _batch(digits, 32, T=4)
    upd = rule_update(make_rule("opzo", alpha=0.0), net, xs, y)
    assert all(float(u.abs().max()) == 0.0 for u in upd[:-1])
    assert float(upd[-1].abs().max()) > 0  # the output layer's local update is still there


def test_opzo_aligns_with_bptt_on_lif_after_warm_up(digits):
    torch.manual_seed(0)
    net = SpikingNetwork("64-64-64-10")
    xs, y = _batch(digits, 128, T=4)
    assert_spiking(net.run(xs, record=True))
    rule = make_rule("opzo", alpha=0.1, lam=0.95, clean_reference=True)
    for _ in range(60):
        rule.step(net, xs, y)  # warm M up on fixed weights
    rows = alignment(rule, net, xs, y)
    assert all(r["cos"] > 0.2 for r in rows), rows
    rule.B = [b[torch.randperm(b.shape[0], generator=torch.Generator().manual_seed(0))] for b in rule.B]
    bad = alignment(rule, net, xs, y)  # negative control: feedback rows shuffled across neurons
    assert all(abs(r["cos"]) < 0.15 for r in bad[:-1]), bad


def test_output_layer_update_is_exact_over_time_and_hidden_scale_matches(digits):
    """T > 1: the leaky readout's weight and bias updates equal BPTT's exactly (input and bias
    traces), and FA with W^T sends down dL/dI_out[t] (norm ratio near 1, not ~0.5)."""
    torch.manual_seed(0)
    net = SpikingNetwork("64-64-64-10")
    xs, y = _batch(digits, 128, T=8)
    assert_spiking(net.run(xs, record=True))
    ref = reference_gradient(net, xs, y)
    for name, kw in (("fa", {"feedback": "transpose"}), ("dfa", {}), ("opzo", {"alpha": 0.0})):  # OPZO: clean forward
        upd = rule_update(make_rule(name, **kw), net, xs, y)
        assert torch.allclose(upd[-1], ref[-1], rtol=1e-4, atol=1e-7), name
    rows = alignment(make_rule("fa", feedback="transpose"), net, xs, y)
    assert all(0.75 < r["norm_ratio"] < 1.35 for r in rows), rows
