import pytest
import torch

from locosnn.errors import LocosnnError
from locosnn.neurons import NeuronConfig, lif_step, rate_proxy, surrogate_derivative


def run_neuron(cfg, currents):
    v = torch.zeros(1)
    s = torch.zeros(1)
    vs, ss = [], []
    for i in currents:
        v, s = lif_step(v, s, torch.tensor([i]), cfg)
        vs.append(round(float(v), 6))
        ss.append(int(s))
    return vs, ss


def test_lif_soft_reset_against_hand_computed_values():
    # v[t] = 0.5 v[t-1] + 0.6 - 1 * s[t-1]
    vs, ss = run_neuron(NeuronConfig("lif", beta=0.5, theta=1.0), [0.6] * 5)
    assert vs == [0.6, 0.9, 1.05, 0.125, 0.6625]
    assert ss == [0, 0, 1, 0, 0]


def test_if_integrates_without_leak():
    vs, ss = run_neuron(NeuronConfig("if", beta=0.3, theta=1.0), [0.4] * 5)  # beta ignored for IF
    assert vs == [0.4, 0.8, 1.2, 0.6, 1.0]
    assert ss == [0, 0, 1, 0, 1]


def test_threshold_scales_dynamics():
    vs, ss = run_neuron(NeuronConfig("if", theta=2.0), [1.5] * 3)
    assert vs == [1.5, 3.0, 2.5] and ss == [0, 1, 1]


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_rate_proxy_equals_if_steady_state_rate(theta):
    cfg = NeuronConfig("if", theta=theta)
    currents = torch.tensor([-0.3, 0.0, 0.05, 0.25, 0.33, 0.5, 0.77, 0.99, 1.0, 1.7]) * theta
    v = torch.zeros_like(currents)
    s = torch.zeros_like(currents)
    T = 4000
    count = torch.zeros_like(currents)
    for _ in range(T):
        v, s = lif_step(v, s, currents, cfg)
        count += s
    assert torch.allclose(count / T, rate_proxy(currents, theta), atol=2e-3)


def test_surrogate_is_peaked_at_threshold():
    v = torch.linspace(-1, 3, 41)
    for kind in ("fast_sigmoid", "atan"):
        d = surrogate_derivative(v, 1.0, kind, 5.0)
        assert float(d.max()) == pytest.approx(1.0)
        assert int(d.argmax()) == 20  # v == theta
        assert float(d[0]) < 0.05


def test_spike_surrogate_gradient_flows_only_with_autograd():
    cfg = NeuronConfig("lif")
    v0 = torch.zeros(3, requires_grad=True)
    v, s = lif_step(v0, torch.zeros(3), torch.tensor([0.5, 1.0, 2.0]), cfg)
    s.sum().backward()
    expected = surrogate_derivative(torch.tensor([0.5, 1.0, 2.0]), 1.0, "fast_sigmoid", 5.0) * cfg.beta
    assert torch.allclose(v0.grad, expected)


def test_bad_neuron_settings_raise():
    with pytest.raises(LocosnnError, match="unknown neuron model"):
        NeuronConfig("hh")
    with pytest.raises(LocosnnError, match="surrogate"):
        NeuronConfig(surrogate="erf")
