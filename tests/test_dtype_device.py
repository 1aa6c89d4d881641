"""Every learning rule is dtype- and device-agnostic (issue 13, "run where researchers run").

What this checks, for every rule in ``locosnn.rules.RULES`` (and NP/LOCO's deep-network options,
LOCO's whitening, OPZO's clean reference, SFDFA's online mode, ...), on a small network:

* float64: a network converted with ``net.to(torch.float64)`` trains end to end (two steps with an
  optimiser, then ``end_epoch``: SAL's phase, OWM's trace); every ``.grad`` is float64 and finite,
  the readout's is not all zero; every floating-point tensor in ``rule.state_dict()`` (searched
  through dicts, lists and tuples; generator states and integer tensors skipped) is float64 on
  the network's device;
* the deterministic rules (BPTT, FA, DFA) give float64 updates close to the float32 ones on the
  same seed, and not bit-equal to them (float64 is really computed in float64);
* rule state made in one dtype follows the network when it is moved afterwards;
* the encoders keep the input's dtype;
* ``TestCUDA`` (skipped without a GPU): every rule takes a step on ``cuda`` with its state there.
"""
from __future__ import annotations

import copy

import pytest
import torch

from locosnn.encoding import encode
from locosnn.network import SpikingNetwork
from locosnn.rules import RULES, make_rule

ARCH = "20-16-12-4"
T, BATCH = 5, 8

#: small settings per rule (the defaults are sized for MNIST-scale networks)
SMALL = {"loco": {"rank": 4, "k": 3, "memory": 40, "per_batch": 4},
         "sal": {"sal_steps": 40, "sal_batch": 4}}
DEEP = {"temporal": "frozen", "antithetic": True, "eligibility": "activity", "local_loss": 1,
        "readout_rule": "delta", "average": 0.9, "homeostasis": 0.01}
#: (rule, settings) cases: every registered rule with its defaults, then the options with their own code paths
CASES = [(name, SMALL.get(name, {})) for name in sorted(RULES)] + [
    ("np", DEEP),
    ("np", {"online": True}),
    ("np", {"site": "output", "dist": "rademacher"}),
    ("np", {"dist": "uniform", "concat": False}),
    ("np", {"draws": 2, "layer_sample": True, "dl_norm": True, "dl_clip": 3.0}),
    ("loco", {**SMALL["loco"], **DEEP}),
    ("loco", {**SMALL["loco"], "whiten": 0.1}),
    ("loco", {**SMALL["loco"], "variant": "faithful", "drop_mean": True}),
    ("loco", {**SMALL["loco"], "projector_every": 2}),
    ("loco", {**SMALL["loco"], "projector": "fast", "kmeans_every": 2}),
    ("loco", {**SMALL["loco"], "projector": "fast", "incremental_kmeans": True}),
    ("loco", {**SMALL["loco"], "projector": "tracked", "projector_every": 2, "kmeans_every": 2}),
    ("opzo", {"clean_reference": True}),
    ("sfdfa", {"online": True, "b_init": "random"}),
    ("owm", {"update": "task"}),
]
IDS = [name + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw and kw is not SMALL.get(name) else "")
       for name, kw in CASES]


def _data(seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, BATCH, 20, generator=g)
    y = torch.randint(0, 4, (BATCH,), generator=g)
    return x.to(device), y.to(device)


def _net(seed: int = 0) -> SpikingNetwork:
    torch.manual_seed(seed)
    return SpikingNetwork(ARCH)


def _tensors(obj, path="state"):
    """(path, tensor) for every tensor in a nested dict/list/tuple."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def _check_state(rule, dtype: torch.dtype | None, device: torch.device) -> None:
    for path, t in _tensors(rule.state_dict()):
        if t.dtype == torch.uint8 or not t.is_floating_point():  # generator states, stamps, counters
            continue
        assert t.device == device, f"{rule.name}: {path} on {t.device}, network on {device}"
        if dtype is not None:
            assert t.dtype == dtype, f"{rule.name}: {path} is {t.dtype}, network is {dtype}"


def _train(name: str, kw: dict, net: SpikingNetwork, x: torch.Tensor, y: torch.Tensor, steps: int = 2):
    rule = make_rule(name, seed=0, **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(steps):
        rep = rule.step(net, x, y)
        assert torch.isfinite(torch.tensor(rep["loss"]))
        assert rep["out"].dtype == x.dtype and rep["out"].device == x.device
        opt.step()
    return rule


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_float64_trains_end_to_end(name, kw):
    net = _net().to(torch.float64)
    x, y = _data()
    rule = _train(name, kw, net, x.double(), y)
    for pname, p in net.named_parameters():
        assert p.dtype == torch.float64
        assert p.grad is not None and p.grad.dtype == torch.float64, pname
        assert torch.isfinite(p.grad).all(), pname
    assert net.layers[-1].weight.grad.abs().sum() > 0, "the readout got no update"
    _check_state(rule, torch.float64, torch.device("cpu"))
    rule.end_epoch(net)  # SAL's phase, OWM's trace, FA's angles: in float64 as well
    _check_state(rule, torch.float64, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("name", ["bptt", "fa", "dfa"])
def test_float64_matches_float32(name):
    """Deterministic rules: the float64 update is the float32 one up to rounding, and not bit-equal
    to it (so float64 is not silently computed in float32 and cast back)."""
    net32 = _net()
    net64 = copy.deepcopy(net32).to(torch.float64)
    x, y = _data()
    make_rule(name, seed=0).step(net32, x, y)
    make_rule(name, seed=0).step(net64, x.double(), y)
    bit_equal = True
    for p32, p64 in zip(net32.parameters(), net64.parameters()):
        g32, g64 = p32.grad.double(), p64.grad
        scale = float(g64.abs().max()) + 1e-12
        torch.testing.assert_close(g64, g32, rtol=1e-3, atol=1e-4 * scale)
        bit_equal = bit_equal and torch.equal(g64, g32)
    assert not bit_equal


@pytest.mark.parametrize("name,kw", [("fa", {}), ("dfa", {}), ("opzo", {}), ("sfdfa", {"b_init": "random"}),
                                     ("np", DEEP), ("loco", SMALL["loco"]),
                                     ("loco", {**SMALL["loco"], "projector_every": 3}),
                                     ("loco", {**SMALL["loco"], "projector": "fast", "incremental_kmeans": True,
                                               "memory": 4}),
                                     ("loco", {**SMALL["loco"], "projector": "tracked", "projector_every": 2,
                                               "variant": "faithful"}),
                                     ("owm", {})])
def test_state_follows_a_moved_network(name, kw):
    """State made in float32 (feedback matrices, heads, LOCO's memory) follows net.to(float64)."""
    net = _net()
    x, y = _data()
    rule = make_rule(name, seed=0, **kw)
    rule.step(net, x, y)
    net.to(torch.float64)
    rule.step(net, x.double(), y)
    assert net.layers[-1].weight.grad.dtype == torch.float64
    if name != "owm":  # OWM keeps its projectors in float64 whatever the network's dtype
        _check_state(rule, torch.float64, torch.device("cpu"))


def test_float32_unchanged_by_the_state_sync():
    """On a network that is not moved, the rules' float32 results do not depend on the sync."""
    x, y = _data()
    for name in ("fa", "dfa", "sfdfa"):
        a, b = _net(), _net()
        ra, rb = make_rule(name, seed=3), make_rule(name, seed=3)
        for _ in range(2):
            ra.step(a, x, y)
            rb.step(b, x, y)
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa.grad, pb.grad)
            assert pa.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["direct", "rate", "latency"])
def test_encoders_keep_dtype(kind):
    x = torch.rand(3, 20, dtype=torch.float64)
    out = encode(x, 4, kind, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and out.shape == (4, 3, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCUDA:
    """Every rule takes a step on cuda (float32 and float64), its grads and state there."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("name,kw", CASES, ids=IDS)
    def test_step_on_cuda(self, name, kw, dtype):
        dev = torch.device("cuda")
        net = _net().to(device=dev, dtype=dtype)
        x, y = _data(device="cuda")
        rule = _train(name, kw, net, x.to(dtype), y, steps=2)
        for p in net.parameters():
            assert p.grad is not None and p.grad.device.type == "cuda" and p.grad.dtype == dtype
            assert torch.isfinite(p.grad).all()
        _check_state(rule, None if name == "owm" else dtype, net.layers[0].weight.device)
        rule.end_epoch(net)
        _check_state(rule, None if name == "owm" else dtype, net.layers[0].weight.device)

    def test_cpu_and_cuda_agree_for_deterministic_rules(self):
        x, y = _data()
        for name in ("bptt", "fa", "dfa"):
            cpu = _net().double()
            gpu = copy.deepcopy(cpu).cuda()
            make_rule(name, seed=0).step(cpu, x.double(), y)
            make_rule(name, seed=0).step(gpu, x.double().cuda(), y.cuda())
            for pc, pg in zip(cpu.parameters(), gpu.parameters()):
                torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-6, atol=1e-9)

    def test_encoders_on_cuda(self):
        x = torch.rand(3, 20, device="cuda")
        for kind in ("direct", "rate", "latency"):
            out = encode(x, 4, kind, generator=torch.Generator().manual_seed(0))
            assert out.device.type == "cuda"
