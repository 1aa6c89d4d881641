"""SFDFA: exact eligibility (reset path included), exact forward-mode tangents, B learns the
averaged Jacobian, and with B := that Jacobian the update is DFA with the true Jacobian."""
import pytest
import torch

from locosnn.config import TrainConfig
from locosnn.data import load_dataset
from locosnn.encoding import encode
from locosnn.errors import LocosnnError
from locosnn.network import Noise, SpikingNetwork
from locosnn.neurons import NeuronConfig, lif_step
from locosnn.rules import make_rule
from locosnn.testing import assert_spiking, cosine
from locosnn.train import Trainer


def _spikes(T, n, d, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, n, d, generator=g) < p).double()


def _net(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return SpikingNetwork(arch, **kw).double()


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("model", ["lif", "if"])
def test_eligibility_equals_autograd_through_time_reset_included(model, online):
    """One spiking layer (rate readout): sum_b delta_b (x) E_b == d/dW sum_b delta_b . rate_b (BPTT,
    same surrogate, reset path through the neuron's own earlier spikes included)."""
    net = _net("30-12", readout="rate", neuron=NeuronConfig(model=model, beta=0.8))
    xs = _spikes(12, 16, 30, p=0.4)
    tr = net.run(xs, record=True)
    rates = torch.stack(tr.outputs[0]).mean(0)
    assert 0.05 < float(rates.mean()) < 0.9  # liveness: neurons fire, several spikes each
    assert float((torch.stack(tr.outputs[0]).sum(0) >= 2).double().mean()) > 0.3  # resets happen
    delta = torch.randn(16, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net.zero_grad()
    (delta * net.run(xs, grad=True).out).sum().backward()
    ref_w, ref_b = net.layers[0].weight.grad.clone(), net.layers[0].bias.grad.clone()
    exact = make_rule("sfdfa", online=online)
    gw, gb = exact.contract(exact.forward_pass(net, xs), 0, delta)
    assert torch.allclose(gw, ref_w, rtol=1e-9, atol=1e-12)
    assert torch.allclose(gb, ref_b, rtol=1e-9, atol=1e-12)
    # negative control: dropping the reset path (OTTT trace) is not the exact derivative
    ottt = make_rule("sfdfa", eligibility="ottt", online=online)
    gw2, _ = ottt.contract(ottt.forward_pass(net, xs), 0, delta)
    assert float((gw2 - ref_w).norm() / ref_w.norm()) > 0.05


class _Shift(Noise):
    """A constant (in time) perturbation eps_l added to hidden layer outputs, for autograd Jacobians."""

    def __init__(self, eps):
        super().__init__(sigma=1.0, site="output", layers=list(range(len(eps))))
        self.eps = eps

    def applies_to(self, layer):
        self._li = layer
        return layer < len(self.eps)

    def draw(self, like):
        return self.eps[self._li]


def _jacobians(net, xs):
    """Per sample J_l[b] = d out_b / d (uniform shift of layer l's spikes), (B, n_out, n_l)."""
    n = xs.shape[1]
    eps = [torch.zeros(n, net.layers[li].weight.shape[0], dtype=xs.dtype, requires_grad=True)
           for li in range(net.depth - 1)]
    out = net.run(xs, noise=_Shift(eps), grad=True).out
    Js = [torch.zeros(n, net.n_out, e.shape[1], dtype=xs.dtype) for e in eps]
    for o in range(net.n_out):
        gs = torch.autograd.grad(out[:, o].sum(), eps, retain_graph=True)
        for J, g in zip(Js, gs):
            J[:, o] = g
    return Js


@pytest.mark.parametrize("readout,model", [("membrane", "lif"), ("rate", "lif"), ("membrane", "rate")])
def test_forward_tangent_equals_the_autograd_directional_derivative(readout, model):
    net = _net("20-16-14-5", readout=readout, neuron=NeuronConfig(model=model))
    xs = _spikes(6, 8, 20, p=0.5)
    assert_spiking(net.run(xs, record=True), min_rate=0.02)
    rule = make_rule("sfdfa")
    st = rule.forward_pass(net, xs)
    Js = _jacobians(net, xs)
    d_ref = sum(torch.einsum("boi,bi->bo", J, v) for J, v in zip(Js, st["tangents"]))
    assert float(d_ref.abs().max()) > 1e-3  # the derivative is not trivially zero
    assert torch.allclose(st["d"], d_ref, rtol=1e-8, atol=1e-12)


def test_feedback_converges_to_the_averaged_jacobian_and_cosine_rises_with_samples():
    net = _net("20-16-16-5")
    xs = _spikes(6, 64, 20, p=0.5)
    assert_spiking(net.run(xs, record=True), min_rate=0.02)
    J_mean = [J.mean(0).T for J in _jacobians(net, xs)]  # (n_l, n_out): what B_l should become
    rule = make_rule("sfdfa", eta_b=0.002, seed=3)
    rule.init_feedback(net)
    cos = []
    for k in range(1, 201):
        st = rule.forward_pass(net, xs)
        rule.update_feedback(st["tangents"], st["d"])
        if k in (2, 20, 200):
            cos.append([cosine(b, j) for b, j in zip(rule.B, J_mean)])
    for li in range(2):
        assert cos[0][li] < cos[1][li] < cos[2][li], cos
        assert cos[2][li] > 0.9, cos
    # negative control: the estimate of a shuffled network is not this network's Jacobian
    assert abs(cosine(rule.B[0], J_mean[0][torch.randperm(16)])) < 0.5


def _layer_rate_grad(net, li, xs_in, delta):
    """DFA reference: d/dW_l sum_b delta_b . rate_l,b with layer l's input fixed (autograd, BPTT
    through the neuron's own state only)."""
    layer, cfg = net.layers[li], net.neuron
    W = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)
    last = li == net.depth - 1
    v = s = torch.zeros(xs_in[0].shape[0], W.shape[0], dtype=W.dtype)
    acc = 0
    for x in xs_in:
        cur = x @ W.T + b
        if last and net.readout == "membrane":
            v = net.out_beta * v + cur
            acc = acc + v
        else:
            v, s = lif_step(v, s, cur, cfg)
            acc = acc + s
    gw, gb = torch.autograd.grad((delta * acc / len(xs_in)).sum(), (W, b))
    return gw, gb


def test_with_feedback_set_to_the_true_jacobian_the_update_is_dfa_with_the_true_jacobian():
    digits = load_dataset("digits")
    net = _net("64-24-20-10")
    xs = encode(digits.train.x[:32].double(), 6, "direct")
    y = digits.train.y[:32]
    tr = net.run(xs, record=True)
    assert_spiking(tr, min_rate=0.02)
    J_mean = [J.mean(0).T.clone() for J in _jacobians(net, xs)]
    rule = make_rule("sfdfa")
    rule.init_feedback(net)
    rule.B = [j.clone() for j in J_mean]
    torch.manual_seed(0)
    for p in net.parameters():
        p.grad = None
    rule.step(net, xs, y)
    out = tr.out
    e = (torch.softmax(out, 1) - torch.nn.functional.one_hot(y, 10).double()) / 32
    deltas = [e @ J_mean[0].T, e @ J_mean[1].T, e]
    for li in range(3):
        gw, gb = _layer_rate_grad(net, li, tr.inputs[li], deltas[li])
        assert torch.allclose(net.layers[li].weight.grad, gw, rtol=1e-8, atol=1e-12), li
        assert torch.allclose(net.layers[li].bias.grad, gb, rtol=1e-8, atol=1e-12), li
    # the feedback moved towards the Jacobian it already was (a moving average of v d^T)
    assert all(cosine(b, j) > 0.5 for b, j in zip(rule.B, J_mean))
    # negative control: a shuffled feedback gives another hidden update
    rule.B = [J_mean[0][torch.randperm(24)], J_mean[1]]
    rule.step(net, xs, y)
    gw, _ = _layer_rate_grad(net, 0, tr.inputs[0], deltas[0])
    assert cosine(net.layers[0].weight.grad, gw) < 0.9


@pytest.mark.parametrize("eligibility", ["exact", "ottt"])
def test_online_per_synapse_eligibility_equals_the_stored_reverse_sweep(eligibility):
    digits = load_dataset("digits")
    net = _net("64-24-20-10")
    xs, y = encode(digits.train.x[:16].double(), 6, "direct"), digits.train.y[:16]
    assert_spiking(net.run(xs, record=True), min_rate=0.02)
    grads = []
    for online in (True, False):
        for p in net.parameters():
            p.grad = None
        make_rule("sfdfa", online=online, eligibility=eligibility, b_init="random").step(net, xs, y)
        grads.append([p.grad.clone() for p in net.parameters()])
    for g1, g2 in zip(*grads):
        assert float(g1.abs().max()) > 0
        assert torch.allclose(g1, g2, rtol=1e-9, atol=1e-13)


def test_sfdfa_uses_no_backward_pass(monkeypatch):
    net = _net("20-16-5")
    xs = _spikes(4, 8, 20, p=0.5)

    def boom(*a, **k):
        raise AssertionError("SFDFA called autograd backward")

    monkeypatch.setattr(torch.Tensor, "backward", boom)
    monkeypatch.setattr(torch.autograd, "grad", boom)
    make_rule("sfdfa").step(net, xs, torch.zeros(8, dtype=torch.long))
    assert net.layers[0].weight.grad is not None


SMALL = dict(dataset="synthetic", arch="64-32-10", T=4, batch_size=32, lr=3e-3, val_size=200, limit=1200)


@pytest.mark.parametrize("args", [{}, {"eligibility": "ottt"}])
def test_sfdfa_learns_synthetic_data(args):
    hist = Trainer(TrainConfig(rule="sfdfa", epochs=3, rule_args=args, **SMALL), progress=False).fit()
    assert hist[-1]["val_acc"] > 0.7 and hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_count_loss_learns_and_checks_its_settings():
    cfg = TrainConfig(rule="sfdfa", epochs=3, readout="rate", rule_args={"count_loss": True},
                      **{**SMALL, "T": 16})
    hist = Trainer(cfg, progress=False).fit()
    assert hist[-1]["val_acc"] > 0.5
    with pytest.raises(LocosnnError, match="--T"):
        Trainer(TrainConfig(**{**cfg.to_dict(), "T": 8}), progress=False).fit()
    with pytest.raises(LocosnnError, match="readout rate"):
        Trainer(TrainConfig(**{**cfg.to_dict(), "readout": "membrane"}), progress=False).fit()
    with pytest.raises(LocosnnError, match="fully connected"):
        make_rule("sfdfa").step(SpikingNetwork("1x8x8-c4k3-10"), torch.zeros(2, 3, 1, 8, 8),
                                torch.zeros(3, dtype=torch.long))
    with pytest.raises(LocosnnError, match="eligibility"):
        make_rule("sfdfa", eligibility="bogus")


def test_sfdfa_refuses_the_hard_reset_it_does_not_model():
    import pytest as _pytest
    import torch as _torch

    from locosnn.errors import LocosnnError as _Err
    from locosnn.network import SpikingNetwork as _Net
    from locosnn.neurons import NeuronConfig as _NC
    from locosnn.rules import make_rule as _make
    net = _Net("10-8-3", neuron=_NC(reset="zero"))
    with _pytest.raises(_Err, match="soft reset"):
        _make("sfdfa").step(net, _torch.rand(4, 2, 10), _torch.tensor([0, 1]))
