import pytest
import torch

from locosnn.encoding import encode
from locosnn.errors import LocosnnError
from locosnn.network import Noise, SpikingNetwork, parse_arch
from locosnn.neurons import NeuronConfig
from locosnn.testing import assert_spiking


def test_parse_arch_fc_repeat_and_conv():
    shape, layers = parse_arch("784-500x10-10")
    assert shape == (784,) and len(layers) == 11 and all(layer.out == 500 for layer in layers[:10])
    shape, layers = parse_arch("1x28x28-c16k5s2-c32k3s2p1-10")
    assert shape == (1, 28, 28)
    assert [(layer.kind, layer.out, layer.kernel, layer.stride, layer.padding) for layer in layers] == [
        ("conv", 16, 5, 2, 0), ("conv", 32, 3, 2, 1), ("linear", 10, 0, 1, 0)]


@pytest.mark.parametrize("spec,msg", [
    ("784", "at least"), ("abc-10", "input"), ("784-fish-10", "cannot read"),
    ("784-c8k3-10", "CxHxW"), ("1x8x8-c4k3-10-c4k3-10", "after a fc"), ("784-0-10", "positive"),
    ("1x8x8-c4k3", "output layer"), ("1x4x4-c4k9-10", "nothing")])
def test_bad_arch_specs_raise_clear_errors(spec, msg):
    with pytest.raises(LocosnnError, match=msg):
        SpikingNetwork(spec)


def small_net(model="lif", readout="membrane", arch="64-40-30-10", seed=0):
    torch.manual_seed(seed)
    net = SpikingNetwork(arch, NeuronConfig(model=model), readout=readout)
    for layer in net.layers:
        layer.weight.data *= 3.0
    return net


def test_run_records_every_layer_and_step_without_graph():
    net = small_net()
    x = encode(torch.rand(5, 64), 6)
    tr = net.run(x, record=True)
    assert tr.out.shape == (5, 10) and not tr.out.requires_grad
    for field in (tr.inputs, tr.currents, tr.membranes, tr.outputs, tr.noise):
        assert len(field) == 3 and all(len(per_t) == 6 for per_t in field)
    assert tr.inputs[1][2] is tr.outputs[0][2]  # next layer reads what the previous emitted
    assert_spiking(tr)
    assert set(torch.unique(torch.stack(tr.outputs[0])).tolist()) <= {0.0, 1.0}


def test_liveness_guard_rejects_a_silent_network():
    net = small_net()
    for layer in net.layers:
        layer.weight.data.zero_(); layer.bias.data.fill_(-1.0)
    with pytest.raises(AssertionError, match="liveness guard"):
        assert_spiking(net.run(encode(torch.rand(4, 64), 4), record=True))


def test_grad_mode_builds_a_graph_only_when_asked():
    net = small_net()
    x = encode(torch.rand(4, 64), 3)
    assert net.run(x, grad=True).out.requires_grad
    assert not net.run(x).out.requires_grad


def test_rate_readout_and_rate_proxy_network():
    net = small_net(readout="rate")
    out = net.run(encode(torch.rand(4, 64), 8)).out
    assert ((out >= 0) & (out <= 1)).all()
    proxy = small_net(model="rate")
    tr = proxy.run(encode(torch.rand(4, 64), 2), record=True)
    assert torch.allclose(tr.outputs[0][0], tr.currents[0][0].clamp(0, 1))


def test_noise_is_seeded_and_sites_differ():
    net = small_net()
    x = encode(torch.rand(4, 64), 4)
    runs = [net.run(x, noise=Noise(0.5, generator=torch.Generator().manual_seed(3)), record=True) for _ in range(2)]
    assert torch.equal(runs[0].out, runs[1].out)
    assert torch.equal(runs[0].noise[1][2], runs[1].noise[1][2])
    clean = net.run(x, record=True)
    assert not torch.equal(clean.out, runs[0].out)
    # current site: the recorded current includes the noise
    assert torch.allclose(runs[0].currents[0][0], clean.currents[0][0] + runs[0].noise[0][0])
    out_site = net.run(x, noise=Noise(0.5, site="output", generator=torch.Generator().manual_seed(3)), record=True)
    assert torch.allclose(out_site.outputs[0][0], clean.outputs[0][0] + out_site.noise[0][0])
    only_first = net.run(x, noise=Noise(0.5, layers=[0], generator=torch.Generator().manual_seed(3)), record=True)
    assert only_first.noise[2][0].abs().sum() == 0
    for dist in ("rademacher", "uniform"):
        z = Noise(2.0, dist=dist, generator=torch.Generator().manual_seed(0)).draw(torch.zeros(20000))
        assert abs(float(z.std()) - 2.0) < 0.05
    with pytest.raises(LocosnnError, match="noise site"):
        Noise(0.1, site="weights")


def test_conv_network_runs_and_patches_match_conv():
    torch.manual_seed(0)
    net = SpikingNetwork("1x12x12-c4k3s2-c6k3-20-10")
    x = encode(torch.rand(3, 1, 12, 12), 4)
    tr = net.run(x, record=True)
    assert tr.out.shape == (3, 10)
    conv = net.layers[1]
    inp = tr.inputs[1][0]
    cols = conv.patches(inp)  # (B * positions, C*k*k)
    manual = cols @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
    ref = conv.current(inp).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    assert torch.allclose(manual, ref, atol=1e-5)


def test_wrong_input_shape_raises():
    net = small_net()
    with pytest.raises(LocosnnError, match="input shape mismatch"):
        net.run(torch.zeros(2, 3, 65))


@pytest.mark.parametrize("kind", ["direct", "rate", "latency"])
def test_encoders_shape_and_values(kind):
    x = torch.rand(5, 1, 4, 4)
    seq = encode(x, 7, kind, torch.Generator().manual_seed(0))
    assert seq.shape == (7, 5, 1, 4, 4)
    if kind == "direct":
        assert torch.equal(seq[3], x)
    elif kind == "rate":
        assert set(torch.unique(seq).tolist()) <= {0.0, 1.0}
        big = encode(torch.full((2000,), 0.3), 50, "rate", torch.Generator().manual_seed(0))
        assert abs(float(big.mean()) - 0.3) < 0.01
    else:
        assert (seq.sum(0) <= 1).all()
        bright = torch.ones(1, 1, 1, 1)
        assert encode(bright, 7, "latency")[0].item() == 1.0  # brightest fires first


# -- time-constant inputs (direct encoding): the first layer's current computed once ----------------
def test_time_constant_detection_and_repeat_batch():
    from locosnn.network import repeat_batch, time_constant
    x = torch.rand(5, 64)
    xs = encode(x, 6, "direct")
    assert time_constant(xs) and not time_constant(xs.contiguous())  # a materialised copy is not detected
    assert not time_constant(encode(x, 6, "rate", torch.Generator().manual_seed(0)))  # negative control
    assert not time_constant(xs[:1])  # one step: nothing to share
    rb = repeat_batch(xs, 3)
    assert time_constant(rb) and torch.equal(rb, torch.cat([xs] * 3, 1))
    xr = encode(x, 6, "rate", torch.Generator().manual_seed(0))
    assert torch.equal(repeat_batch(xr, 2), torch.cat([xr, xr], 1))


@pytest.mark.parametrize("model", ["lif", "rate"])
def test_time_constant_input_runs_bit_identical_with_one_first_layer_product(model, monkeypatch):
    net = small_net(model)
    xs = encode(torch.rand(5, 64), 6, "direct")
    calls = []
    orig = type(net.layers[0]).current
    monkeypatch.setattr(type(net.layers[0]), "current", lambda self, x: calls.append(self) or orig(self, x))
    fast = net.run(xs, record=True)
    n_fast = sum(c is net.layers[0] for c in calls)
    calls.clear()
    ref = net.run(xs.contiguous(), record=True)
    n_ref = sum(c is net.layers[0] for c in calls)
    assert (n_fast, n_ref) == (1, 6)  # the first layer's current once instead of T times
    assert fast.static_input and not ref.static_input and fast.rows(slice(0, 2)).static_input
    assert torch.equal(fast.out, ref.out)
    for a, b in zip(fast.outputs, ref.outputs):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_time_constant_input_gives_bptt_the_same_gradient():
    net = small_net()
    xs = encode(torch.rand(5, 64), 6, "direct")
    y = torch.tensor([0, 1, 2, 3, 4])
    grads = []
    for x in (xs, xs.contiguous()):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert any(float(g.abs().sum()) > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
