"""Hard reset (reset="zero") and NIR export / import (locosnn.export).

The exported graph is simulated by another library that reads NIR: snnTorch's
``import_from_nir`` (snnTorch 1.0 discretises NIR's LIF by forward Euler with dt = 1e-4, hard
reset to zero). snnTorch 1.0 has no mapping for NIR's ``LI`` node (the membrane readout), so the
test adds one that follows snnTorch's own LIF import (beta = 1 - dt/tau, input gain r dt/tau)
and runs it on snnTorch's ``snn.Leaky`` with ``reset_mechanism="none"``; every other node (Affine,
Conv2d, Flatten, LIF) is mapped by snnTorch itself.
"""
import math
import warnings

import numpy as np
import pytest
import torch

from locosnn.errors import LocosnnError
from locosnn.network import SpikingNetwork
from locosnn.neurons import NeuronConfig, lif_step

DT = 1e-4  # snnTorch's NIR import fixes its time step at 1e-4 s


# -- the hard reset --------------------------------------------------------------------------------
def _trajectory(cfg, currents):
    v, s = torch.zeros(1), torch.zeros(1)
    vs, ss = [], []
    for i in currents:
        v, s = lif_step(v, s, torch.tensor([i]), cfg)
        vs.append(round(float(v), 6))
        ss.append(int(s))
    return vs, ss


def test_zero_reset_against_hand_computed_values():
    # v[t] = 0.5 (1 - s[t-1]) v[t-1] + 0.6: after the spike at 1.05 the membrane restarts from 0
    assert _trajectory(NeuronConfig("lif", beta=0.5, reset="zero"), [0.6] * 6) == (
        [0.6, 0.9, 1.05, 0.6, 0.9, 1.05], [0, 0, 1, 0, 0, 1])
    assert _trajectory(NeuronConfig("if", reset="zero"), [0.4] * 5) == ([0.4, 0.8, 1.2, 0.4, 0.8], [0, 0, 1, 0, 0])
    # the soft reset (the default) keeps the overshoot: 1.05 - 1 decays into the next step
    assert NeuronConfig().reset == "subtract"
    assert _trajectory(NeuronConfig("lif", beta=0.5), [0.6] * 4)[0] == [0.6, 0.9, 1.05, 0.125]


def test_bad_reset_raises():
    from locosnn.config import TrainConfig

    with pytest.raises(LocosnnError, match="unknown reset"):
        NeuronConfig(reset="hard")
    with pytest.raises(LocosnnError, match="reset"):
        TrainConfig(reset="hard").validate()
    assert TrainConfig(reset="zero").validate().reset == "zero"


def test_zero_reset_is_detached_and_bptt_trains():
    cfg = NeuronConfig("lif", beta=0.5, reset="zero")
    v0 = torch.tensor([1.5, 0.5], requires_grad=True)
    s0 = torch.tensor([1.0, 0.0], requires_grad=True)
    v, _ = lif_step(v0, s0, torch.zeros(2), cfg)
    v.sum().backward()
    assert v0.grad.tolist() == [0.0, 0.5]  # through v[t-1] only where there was no spike
    assert s0.grad is None or float(s0.grad.abs().sum()) == 0.0  # no gradient through the reset gate
    from locosnn.rules import make_rule

    torch.manual_seed(0)
    net = SpikingNetwork("20-16-12-4", neuron=NeuronConfig(reset="zero"))
    x = torch.rand(6, 32, 20)
    y = torch.randint(0, 4, (32,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    rule = make_rule("bptt")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        losses.append(rule.step(net, x, y)["loss"])
        for layer in net.layers:
            assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
        opt.step()
    assert losses[-1] < 0.8 * losses[0]


# -- export: the graph -------------------------------------------------------------------------------
def _net(arch="20-16-12-4", seed=0, **kw):
    torch.manual_seed(seed)
    neuron = kw.pop("neuron", None) or NeuronConfig(reset="zero")
    return SpikingNetwork(arch, neuron=neuron, **kw)


def test_graph_nodes_and_parameters():
    pytest.importorskip("nir")
    from locosnn.export import to_nir

    net = _net(neuron=NeuronConfig(beta=0.8, theta=1.5, reset="zero"), out_beta=0.9)
    g = to_nir(net, dt=0.5)
    assert [type(g.nodes[k]).__name__ for k in ("input", "fc0", "lif0", "fc1", "lif1", "fc2", "li2", "output")] == \
        ["Input", "Affine", "LIF", "Affine", "LIF", "Affine", "LI", "Output"]
    assert len(g.edges) == 7 and g.metadata["dt"] == 0.5
    lif = g.nodes["lif0"]
    np.testing.assert_allclose(lif.tau, 0.5 / 0.2)
    np.testing.assert_allclose(lif.r, 1 / 0.2)
    assert lif.tau.shape == (16,) and np.all(lif.v_threshold == 1.5) and np.all(lif.v_reset == 0)
    assert np.all(lif.v_leak == 0)
    np.testing.assert_allclose(g.nodes["li2"].tau, 0.5 / 0.1)
    # forward Euler with step dt: 1 - dt/tau = beta and r dt / tau = 1
    np.testing.assert_allclose(1 - 0.5 / lif.tau, 0.8)
    np.testing.assert_allclose(lif.r * 0.5 / lif.tau, 1.0)
    assert np.array_equal(g.nodes["fc1"].weight, net.layers[1].weight.detach().numpy())
    assert np.array_equal(g.nodes["fc1"].bias, net.layers[1].bias.detach().numpy())
    # IF hidden layers, an integrator readout (out_beta = 1), a rate readout, conv layers
    g = to_nir(_net(neuron=NeuronConfig("if", reset="zero"), out_beta=1.0), dt=0.25)
    assert type(g.nodes["if0"]).__name__ == "IF" and np.all(g.nodes["if0"].r == 4.0)
    assert type(g.nodes["i2"]).__name__ == "I"
    g = to_nir(_net(readout="rate"))
    assert type(g.nodes["lif2"]).__name__ == "LIF"
    g = to_nir(_net("1x8x8-c4k3s2p1-c3k3-10"))
    assert [type(n).__name__ for n in g.nodes.values()] == ["Input", "Conv2d", "LIF", "Conv2d", "LIF", "Flatten",
                                                            "Affine", "LI", "Output"]
    assert tuple(g.nodes["lif1"].tau.shape) == (3, 2, 2)


def test_soft_reset_and_rate_neurons_export_with_a_warning():
    pytest.importorskip("nir")
    from locosnn.export import to_nir

    with pytest.warns(UserWarning, match="soft reset.*spikes and outputs will differ"):
        to_nir(_net(neuron=NeuronConfig(reset="subtract")))
    with pytest.warns(UserWarning, match="rate-proxy neurons"):
        g = to_nir(_net(neuron=NeuronConfig("rate")))
    assert type(g.nodes["if0"]).__name__ == "IF"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_nir(_net())  # hard reset: exact, no warning
    with pytest.raises(LocosnnError, match="dt must be"):
        to_nir(_net(), dt=0.0)


# -- export: simulated by snnTorch ---------------------------------------------------------------------
def _snntorch_run(graph, x_seq, monkeypatch, spike_nodes=()):
    """Run ``graph`` in snnTorch for len(x_seq) steps: (outputs per step, {node: spikes per step})."""
    nir = pytest.importorskip("nir")
    nirtorch = pytest.importorskip("nirtorch")
    snn = pytest.importorskip("snntorch")
    from snntorch.import_nir import import_from_nir

    class LIMembrane(torch.nn.Module):
        """NIR LI on snnTorch's Leaky without reset, mapped like snnTorch maps NIR's LIF."""

        def __init__(self, node):
            super().__init__()
            self.gain = float(np.unique(node.r * DT / node.tau)[0])
            self.leaky = snn.Leaky(beta=float(np.unique(1 - DT / node.tau)[0]), threshold=math.inf,
                                   reset_mechanism="none", init_hidden=True, output=True)

        def forward(self, x):
            return self.leaky(self.gain * x)[1]

    orig = nirtorch.nir_to_torch
    monkeypatch.setattr(nirtorch, "nir_to_torch",
                        lambda g, node_map, *a, **k: orig(g, {**node_map, nir.LI: LIMembrane}, *a, **k))
    module = import_from_nir(graph)
    spikes = {name: [] for name in spike_nodes}
    for name in spike_nodes:
        module.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: spikes[name].append(o.detach().clone()))
    outs, state = [], None
    with torch.no_grad():
        for t in range(x_seq.shape[0]):
            o, state = module(x_seq[t], state)
            outs.append(o.detach().clone())
    return torch.stack(outs), {k: torch.stack(v) for k, v in spikes.items()}


@pytest.mark.parametrize("beta,readout", [(0.5, "membrane"), (0.8, "membrane"), (0.5, "rate")])
def test_snntorch_simulation_of_the_exported_graph_matches(beta, readout, monkeypatch):
    pytest.importorskip("snntorch")
    from locosnn.export import to_nir

    net = _net(neuron=NeuronConfig(beta=beta, reset="zero"), readout=readout)
    with torch.no_grad():
        net.layers[1].weight.mul_(1.5)  # the second hidden layer spikes at a moderate rate too
    x_seq = torch.rand(12, 8, 20)
    tr = net.run(x_seq, record=True)
    rates = [float(torch.stack(tr.outputs[li]).mean()) for li in range(2)]
    assert all(0.05 < r < 0.6 for r in rates), rates
    out, spikes = _snntorch_run(to_nir(net, dt=DT), x_seq, monkeypatch, ("lif0", "lif1"))
    for li in range(2):
        assert torch.equal(spikes[f"lif{li}"], torch.stack(tr.outputs[li])), li  # identical hidden spikes
    torch.testing.assert_close(out, torch.stack(tr.outputs[-1]), rtol=1e-5, atol=1e-6)  # per-step readout
    torch.testing.assert_close(out.mean(0), tr.out, rtol=1e-5, atol=1e-6)


def test_snntorch_simulation_of_an_exported_conv_network_matches(monkeypatch):
    pytest.importorskip("snntorch")
    from locosnn.export import to_nir

    net = _net("1x8x8-c4k3s2p1-c3k3-10", seed=1)
    x_seq = torch.rand(6, 3, 1, 8, 8)
    tr = net.run(x_seq, record=True)
    assert 0.02 < float(torch.stack(tr.outputs[0]).mean()) < 0.8
    graph = to_nir(net, dt=DT)
    for b in range(3):  # NIR shapes carry no batch axis (Flatten(start_dim=0)): one sample at a time
        out, spikes = _snntorch_run(graph, x_seq[:, b], monkeypatch, ("lif0", "lif1"))
        for li in range(2):
            assert torch.equal(spikes[f"lif{li}"], torch.stack([o[b] for o in tr.outputs[li]]))
        torch.testing.assert_close(out.mean(0), tr.out[b], rtol=1e-5, atol=1e-6)


def test_negative_controls_soft_reset_and_a_perturbed_weight_differ(monkeypatch):
    pytest.importorskip("snntorch")
    from locosnn.export import to_nir

    x_seq = torch.rand(12, 8, 20)
    soft = _net(neuron=NeuronConfig(reset="subtract"))
    tr = soft.run(x_seq, record=True)
    with pytest.warns(UserWarning, match="soft reset"):
        graph = to_nir(soft, dt=DT)
    out, spikes = _snntorch_run(graph, x_seq, monkeypatch, ("lif0",))
    assert not torch.equal(spikes["lif0"], torch.stack(tr.outputs[0]))
    assert (out.mean(0) - tr.out).abs().max() > 1e-3

    net = _net()
    tr = net.run(x_seq, record=True)
    graph = to_nir(net, dt=DT)
    graph.nodes["fc2"].weight[0, 0] += 0.5
    out, _ = _snntorch_run(graph, x_seq, monkeypatch)
    assert (out.mean(0) - tr.out).abs().max() > 1e-3


# -- import and round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,kw", [
    ("20-16-12-4", {}),
    ("20-16-12-4", {"neuron": NeuronConfig(beta=0.9, theta=0.7, reset="zero"), "out_beta": 0.3}),
    ("20-16-4", {"neuron": NeuronConfig("if", reset="zero"), "out_beta": 1.0}),
    ("20-16-4", {"readout": "rate"}),
    ("1x8x8-c4k3s2p1-c3k3-16-10", {}),
    ("1x6x6-12-4", {}),
])
def test_round_trip_through_a_nir_file_is_identical(arch, kw, tmp_path):
    nir = pytest.importorskip("nir")
    from locosnn.export import from_nir, to_nir

    net = _net(arch, **kw)
    nir.write(tmp_path / "net.nir", to_nir(net, dt=1e-3))
    back = from_nir(nir.read(tmp_path / "net.nir"))
    assert back.arch == net.arch and back.readout == net.readout
    assert back.neuron == net.neuron and back.out_beta == net.out_beta
    for a, b in zip(net.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    x_seq = torch.rand(7, 5, *net.in_shape)
    ta, tb = net.run(x_seq, record=True), back.run(x_seq, record=True)
    assert torch.equal(ta.out, tb.out)
    assert all(torch.equal(a, b) for la, lb in zip(ta.outputs, tb.outputs) for a, b in zip(la, lb))


def test_import_infers_dt_and_folds_an_input_gain():
    nir = pytest.importorskip("nir")
    from locosnn.export import from_nir

    w = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    b = np.zeros(3, dtype=np.float32)
    w2 = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    graph = nir.NIRGraph.from_list(
        nir.Affine(weight=w, bias=b),
        nir.LIF(tau=np.full(3, 0.02), r=np.full(3, 10.0), v_leak=np.zeros(3), v_threshold=np.ones(3)),
        nir.Affine(weight=w2, bias=np.zeros(2, dtype=np.float32)),
        nir.LI(tau=np.full(2, 0.02), r=np.full(2, 10.0), v_leak=np.zeros(2)))
    net = from_nir(graph)  # dt = tau / r = 2 ms: beta = 0.9, gain 1
    assert net.arch == "5-3-2" and math.isclose(net.neuron.beta, 0.9) and net.neuron.reset == "zero"
    assert torch.equal(net.layers[0].weight, torch.from_numpy(w))
    net = from_nir(graph, dt=1e-3)  # beta = 0.95 and the input gain r dt / tau = 0.5 goes into the weights
    assert math.isclose(net.neuron.beta, 0.95)
    torch.testing.assert_close(net.layers[0].weight, torch.from_numpy(w) * 0.5)


def test_import_rejects_graphs_locosnn_cannot_express():
    nir = pytest.importorskip("nir")
    from locosnn.export import from_nir, to_nir

    g = to_nir(_net())
    g.nodes["lif0"].v_leak = np.full(16, 0.1)
    with pytest.raises(LocosnnError, match="v_leak"):
        from_nir(g)
    g = to_nir(_net())
    g.edges.append(("lif0", "output"))
    with pytest.raises(LocosnnError, match="chain"):
        from_nir(g)
    g = nir.NIRGraph.from_list(nir.Affine(weight=np.ones((2, 3), dtype=np.float32), bias=np.zeros(2)),
                               nir.CubaLIF(tau_syn=np.ones(2), tau_mem=np.ones(2), r=np.ones(2), v_leak=np.zeros(2),
                                           v_threshold=np.ones(2)))
    with pytest.raises(LocosnnError, match="CubaLIF"):
        from_nir(g)


# -- the command line ------------------------------------------------------------------------------------
def test_cli_train_with_hard_reset_then_export(tmp_path, capsys):
    nir = pytest.importorskip("nir")
    pytest.importorskip("sklearn")
    from locosnn.checkpoint import load_checkpoint
    from locosnn.cli import main
    from locosnn.export import from_nir

    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--arch", "64-32-10", "--epochs", "1", "--limit", "200",
                 "--reset", "zero", "--T", "4", "--no-progress", "--out", str(run)]) == 0
    st = load_checkpoint(run / "checkpoint.pt")
    assert st["config"]["reset"] == "zero"
    capsys.readouterr()
    assert main(["export", str(run), "--to", "nir"]) == 0
    io = capsys.readouterr()
    assert "wrote" in io.out and "warning" not in io.err
    graph = nir.read(run / "model.nir")
    assert sorted(type(n).__name__ for n in graph.nodes.values()) == ["Affine", "Affine", "Input", "LI", "LIF",
                                                                       "Output"]
    assert graph.metadata["T"] == 4 and graph.metadata["encoder"] == "direct"
    net = from_nir(graph)
    for k, v in st["model"].items():
        assert torch.equal(net.state_dict()[k], v)
    x = torch.rand(4, 3, 64)
    from locosnn.config import TrainConfig
    from locosnn.train import build_network

    ref = build_network(TrainConfig.from_dict(st["config"]).validate())
    ref.load_state_dict(st["model"])
    assert torch.equal(net.run(x).out, ref.run(x).out)

    # --out, a soft-reset run (one warning line) and a directory without a checkpoint (one error line)
    from locosnn.checkpoint import save_checkpoint

    soft = tmp_path / "soft"
    cfg = dict(st["config"], reset="subtract")
    save_checkpoint(soft / "checkpoint.pt", {"config": cfg, "model": st["model"], "epoch": 1})
    assert main(["export", str(soft), "--out", str(tmp_path / "x" / "soft.nir"), "--dt", "1e-4"]) == 0
    io = capsys.readouterr()
    assert io.err.startswith("warning: soft reset") and io.err.count("\n") == 1
    assert nir.read(tmp_path / "x" / "soft.nir").metadata["dt"] == pytest.approx(1e-4)
    assert main(["export", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no checkpoint.pt" in err and err.count("\n") == 1
