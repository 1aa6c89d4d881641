"""Measured cost of learning: sequential update stages and rule-state bytes."""
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
