"""Measured cost of learning: sequential update stages and rule-state bytes."""
import pytest
import torch

from locosnn.cost import autograd_stages, state_bytes, update_stages
from locosnn.encoding import encode
from locosnn.network import SpikingNetwork
from locosnn.rules import make_rule
from locosnn.rules.np import NodePerturbation


def _net_batch(arch):
    torch.manual_seed(0)
    net = SpikingNetwork(arch)
    x = torch.rand(8, *net.in_shape)
    return net, encode(x, 4), torch.randint(0, 4, (8,))


def test_stages_bptt_and_fa_one_per_layer_perturbation_and_direct_feedback_one():
    for arch, L in (("20-16x3-4", 4), ("20-16x6-4", 7), ("1x8x8-c4k3-16-4", 3)):
        net, x, y = _net_batch(arch)
        assert autograd_stages(net, x, y) == list(range(L, 0, -1))
        assert update_stages(make_rule("bptt"), net, x, y) == L
        assert update_stages(make_rule("np"), net, x, y) == 1
        assert update_stages(make_rule("loco", rank=4), net, x, y) == 1
        assert update_stages(make_rule("fa"), net, x, y) == L
        assert update_stages(make_rule("fa", feedback="transpose"), net, x, y) == L
        assert update_stages(make_rule("dfa"), net, x, y) == 1
        assert update_stages(make_rule("opzo"), net, x, y) == 1


class NonLocal(NodePerturbation):
    """Negative control: every layer's update reads the first layer's records."""

    def layer_transform(self, network, clean, li, gw, gb):
        return gw + 0 * clean.inputs[0][0].sum(), gb


def test_stage_measurement_detects_a_non_local_rule():
    net, x, y = _net_batch("20-16x3-4")
    assert update_stages(NonLocal(), net, x, y) == 4


def test_state_bytes_counts_nested_tensors():
    assert state_bytes({"a": torch.zeros(3, 4), "b": [torch.zeros(2, dtype=torch.float64), 5], "c": "x"}) == 48 + 16
    rule = make_rule("loco", rank=4, memory=50, per_batch=16)
    net, x, y = _net_batch("20-16x3-4")
    before = state_bytes(rule.state_dict())
    for _ in range(6):
        rule.step(net, x, y)
    after = state_bytes(rule.state_dict())
    assert after > before  # the cluster memory fills ...
    for _ in range(6):
        rule.step(net, x, y)
    full = state_bytes(rule.state_dict())
    for _ in range(6):
        rule.step(net, x, y)
    assert state_bytes(rule.state_dict()) == full  # ... up to its size, then stays flat


def test_step_probe_counts_passes_and_synaptic_operations_exactly():
    from locosnn.cost import DEFAULT_METRICS, StepProbe, SynapticOps

    torch.manual_seed(0)
    net = SpikingNetwork("10-4")
    xs = (torch.rand(3, 5, 10) < 0.3).float()
    y = torch.zeros(5, dtype=torch.long)
    probe = StepProbe(make_rule("bptt"), net, xs, y)
    assert probe.rows == 5 and probe.calls == 1
    assert SynapticOps()(probe, None, net, xs, y) == float(xs.count_nonzero()) * 4 / 5
    assert net.run.__func__ is SpikingNetwork.run  # instrumentation removed after the step
    # passes per update, measured: NP runs clean + noisy rows, DFA forward + replay, SFDFA one pass
    for rule, passes in (("np", 2), ("dfa", 2), ("sfdfa", 1), ("bptt", 1)):
        p = StepProbe(make_rule(rule), SpikingNetwork("10-6-4"), xs, y)
        assert p.rows / p.batch == passes, rule
    assert {m.name for m in (c() for c in DEFAULT_METRICS)} >= {"forward_passes", "update_stages",
                                                                 "synops_per_sample", "synops_ac", "synops_mac",
                                                                 "rule_state_bytes"}


def test_rule_state_bytes_are_the_feedback_matrices_and_the_generator():
    from locosnn.cost import StepProbe

    net = SpikingNetwork("10-6-5-4")
    xs = (torch.rand(3, 5, 10) < 0.3).float()
    rule = make_rule("dfa")
    probe = StepProbe(rule, net, xs, torch.zeros(5, dtype=torch.long))
    gen = rule.generator.get_state().numel()
    assert probe.state_bytes == (6 * 4 + 5 * 4) * 4 + gen


def test_measure_cell_reports_every_metric():
    from locosnn.cost import measure_cell

    row = measure_cell(dict(rule="sfdfa", dataset="synthetic", arch="64-16-16-10", T=4, batch_size=16), repeats=2)
    assert row["forward_passes"] == 1 and row["update_stages"] == 1 and row["hidden_layers"] == 2
    assert row["dense_macs_per_sample"] > row["synops_per_sample"] > 0  # spikes are sparse; tangent counted
    # direct encoding: the first layer's analog input is MACs, the spiking layers' inputs ACs
    assert row["synops_mac"] > 0 and row["synops_ac"] > 0
    assert row["synops_ac"] + row["synops_mac"] == pytest.approx(row["synops_per_sample"])
    assert row["step_s"] > 0 and row["rule_state_bytes"] > 0


def test_measure_cell_fresh_process_sees_the_step_memory():
    """In a long-lived process that freed a big buffer, the allocator reuses it and a step's peak
    reads ~0; the fresh measuring process must see the recorded traces (BPTT at T = 32)."""
    from locosnn.cost import measure_cell

    junk = torch.ones(64, 1024, 1024)  # 256 MB, freed: memory this process could reuse
    del junk
    settings = dict(rule="bptt", dataset="synthetic", arch="64-512-512-10", T=32, batch_size=128)
    fresh = measure_cell(settings, repeats=1)
    assert fresh["step_peak_mb"] > 1.0
    assert fresh["update_stages"] == 3 and fresh["forward_passes"] == 1


class _ViaCall(torch.nn.Module):
    """Runs a SpikingNetwork with every synapse called as a module (``layer(x)``, the same
    F.linear / conv as ``layer.current``), so that NeuroBench's forward pre-hooks see each call.
    NeuroBench batches are (B, T, ...); locosnn's are (T, B, ...)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        for layer in self.net.layers:
            layer.current = layer.__call__
        self.net.share_static_current = False  # one call per step, as NeuroBench counts them
        try:
            return self.net.run(batch.transpose(0, 1)).out
        finally:
            for layer in self.net.layers:
                del layer.current
            del self.net.share_static_current


def _zeroed(arch, neuron="lif"):
    from locosnn.neurons import NeuronConfig

    torch.manual_seed(0)
    net = SpikingNetwork(arch, neuron=NeuronConfig(model=neuron))
    with torch.no_grad():
        net.layers[1].weight.view(-1)[:5] = 0  # zero weights are not synapses for NeuroBench
    return net


def test_synaptic_operations_match_a_hand_count_of_neurobench_definition():
    """NeuroBench's definition, counted by hand: a layer call whose input is all 0/+-1 costs
    accumulates, one per (nonzero input, nonzero weight) pair; any other input costs MACs."""
    from locosnn.cost import SynapseCounter, StepProbe, SynapticACs, SynapticMACs, SynapticOps

    net = _zeroed("20-16-12-4")
    x = torch.rand(6, 20)
    x[:, :3] = 0
    xs = encode(x, 5)  # direct encoding: the analog sample every step
    with SynapseCounter(net) as c:
        tr = net.run(xs, record=True)
    nnz_w = [(layer.weight != 0).float() for layer in net.layers]
    mac = sum(float(((xt != 0).float() @ nnz_w[0].T).sum()) for xt in tr.inputs[0])
    ac = sum(float(((xt != 0).float() @ nnz_w[li].T).sum()) for li in (1, 2) for xt in tr.inputs[li])
    assert c.mac == mac == 5 * 6 * 17 * 16 and c.ac == ac > 0
    assert c.dense == 5 * 6 * (20 * 16 + 16 * 12 + 12 * 4)
    probe = StepProbe(make_rule("bptt"), net, xs, torch.zeros(6, dtype=torch.long))
    assert SynapticMACs()(probe, None, net, xs, None) == mac / 6
    assert SynapticACs()(probe, None, net, xs, None) == ac / 6
    assert SynapticOps()(probe, None, net, xs, None) == (ac + mac) / 6
    # rate-encoded (binary) input: every layer call is an accumulate
    with SynapseCounter(net) as c:
        net.run(encode(x, 5, "rate", torch.Generator().manual_seed(0)))
    assert c.mac == 0 and c.ac > 0


@pytest.mark.parametrize("arch,neuron,encoder", [
    ("20-16-12-4", "lif", "direct"),
    ("20-16-12-4", "lif", "rate"),
    ("20-16-12-4", "rate", "direct"),
    ("1x8x8-c4k3s2p1-c3k3p1-16-4", "lif", "direct"),
])
def test_synaptic_operations_equal_neurobench(arch, neuron, encoder):
    """locosnn's counts against the neurobench package's SynapticOperations on the same network
    and input (Effective_ACs, Effective_MACs and Dense, per sample)."""
    pytest.importorskip("neurobench")
    from neurobench.metrics.workload import SynapticOperations
    from neurobench.models import TorchModel

    from locosnn.cost import SynapseCounter, StepProbe, SynapticACs, SynapticMACs

    net = _zeroed(arch, neuron)
    x = torch.rand(6, *net.in_shape)
    x[..., :2] = 0
    xs = encode(x, 5, encoder, torch.Generator().manual_seed(0))
    model = TorchModel(_ViaCall(net))
    model.register_hooks()
    batch = xs.transpose(0, 1)
    nb = SynapticOperations()(model, model(batch), (batch, None))
    model.cleanup_hooks()
    with SynapseCounter(net) as c:
        net.run(xs)
    assert c.ac / 6 == pytest.approx(nb["Effective_ACs"], rel=1e-12)
    assert c.mac / 6 == pytest.approx(nb["Effective_MACs"], rel=1e-12)
    assert c.dense / 6 == pytest.approx(nb["Dense"], rel=1e-12)
    assert (nb["Effective_MACs"] > 0) == (encoder == "direct" or neuron == "rate")
    probe = StepProbe(make_rule("bptt"), net, xs, torch.zeros(6, dtype=torch.long))  # one forward pass
    assert SynapticACs()(probe, None, net, xs, None) == pytest.approx(nb["Effective_ACs"], rel=1e-12)
    assert SynapticMACs()(probe, None, net, xs, None) == pytest.approx(nb["Effective_MACs"], rel=1e-12)
