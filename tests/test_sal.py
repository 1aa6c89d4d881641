"""SAL: two-neuron convergence, noise as a requirement, feedback alignment in deep networks, the rule."""
import json
import math

import pytest
import torch

from locosnn.cli import main
from locosnn.config import TrainConfig
from locosnn.diagnostics import angle_deg
from locosnn.errors import LocosnnError
from locosnn.network import SpikingNetwork
from locosnn.rules import make_rule
from locosnn.sal import sal_phase, stdp_kernel, two_neuron_demo
from locosnn.train import Trainer

SEEDS = [0, 1, 2]
TAU_REF = 4  # the demo's and the phase's default refractory period: at most 1/4 spike per step


def _alive(rates, lo=0.05):
    assert all(lo < r <= 1 / TAU_REF + 1e-9 for r in rates), f"liveness guard: rates {rates}"


# -- two reciprocally connected neurons -----------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_sal_on_both_weights_makes_them_meet_at_their_mean(seed):
    r = two_neuron_demo("both", seed=seed)
    _alive(r["rates"])
    gap0, mean0 = r["initial_gap"], (r["initial"]["w12"] + r["initial"]["w21"]) / 2
    assert gap0 == pytest.approx(1.5)
    assert r["final"]["gap"] < 0.1 * gap0, r["final"]
    assert abs(r["final"]["mean"] - mean0) < 0.02 * gap0  # SAL moves the two weights by opposite amounts
    # it is a convergence, not a lucky crossing: the gap is small over the whole last third
    n = len(r["t"])
    assert max(abs(a - b) for a, b in zip(r["w12"][2 * n // 3:], r["w21"][2 * n // 3:])) < 0.2 * gap0


@pytest.mark.parametrize("seed", SEEDS)
def test_sal_on_one_weight_makes_it_converge_to_the_fixed_one(seed):
    r = two_neuron_demo("one", seed=seed)
    _alive(r["rates"])
    assert all(w == 1.5 for w in r["w21"])  # the fixed weight never moves
    assert r["final"]["gap"] < 0.1 * r["initial_gap"], r["final"]
    # towards an inhibitory weight too: the sign comes from the spike timing
    neg = two_neuron_demo("one", seed=seed, w21=-1.5)
    _alive(neg["rates"])
    assert neg["final"]["w12"] < -1.0 and neg["final"]["gap"] < 0.2 * neg["initial_gap"], neg["final"]


def test_without_noise_the_weights_do_not_converge():
    """Negative control: deterministic neurons (spike iff u > 0) fire like clocks, so the timing
    of their spikes does not reflect the weights and SAL cannot pull w12 to w21."""
    gaps, noisy = [], []
    for seed in SEEDS:
        for w21 in (1.5, -1.5):
            det = two_neuron_demo("one", seed=seed, w21=w21, deterministic=True)
            _alive(det["rates"])  # they do fire: silence would be a trivial control
            gaps.append(det["final"]["gap"] / det["initial_gap"])
        noisy.append(two_neuron_demo("one", seed=seed, steps=1500)["final"]["gap"] / 1.5)
    assert sum(gaps) / len(gaps) > 0.5, gaps
    assert sum(gaps) / len(gaps) > 5 * sum(noisy) / len(noisy), (gaps, noisy)


def test_stdp_kernels_and_bad_settings():
    lags = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert torch.allclose(stdp_kernel(lags, "triangular", 4.0), torch.tensor([0.75, 0.5, 0.0, 0.0]))
    assert torch.allclose(stdp_kernel(lags, "exp", 2.0), torch.exp(-lags / 2))
    with pytest.raises(LocosnnError):
        stdp_kernel(lags, "box", 2.0)
    with pytest.raises(LocosnnError):
        two_neuron_demo("three")
    with pytest.raises(LocosnnError):
        two_neuron_demo("one", tau_ref=0)


# -- angle diagnostic ------------------------------------------------------------------------------

def test_angle_deg_on_constructed_matrices():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 20, generator=g)
    assert angle_deg(a, a) == pytest.approx(0.0, abs=1e-5)
    assert angle_deg(a, -a) == pytest.approx(180.0, abs=1e-5)
    assert angle_deg(a, 3.7 * a) == pytest.approx(0.0, abs=1e-5)
    r = torch.randn(30, 20, generator=g)
    orth = r - (r * a).sum() / (a * a).sum() * a
    assert angle_deg(a, orth) == pytest.approx(90.0, abs=1e-5)
    assert angle_deg(torch.eye(2), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])) == pytest.approx(90.0)
    assert angle_deg(a, a + orth * (a.norm() / orth.norm())) == pytest.approx(45.0, abs=1e-4)
    with pytest.raises(ValueError):
        angle_deg(a, torch.randn(30, 21))


# -- deep networks: the SAL phase ------------------------------------------------------------------

def _net_and_random_feedback(seed, arch="20-30-30-10"):
    torch.manual_seed(seed)
    net = SpikingNetwork(arch)
    g = torch.Generator().manual_seed(seed)
    B = [torch.randn(layer.weight.shape, generator=g) / layer.weight.shape[1] ** 0.5 for layer in net.layers]
    return net, B, g


def _angles(net, B):
    return [angle_deg(B[k], net.layers[k].weight) for k in range(1, len(B))]


@pytest.mark.parametrize("seed", [0, 1])
def test_sal_phase_aligns_feedback_with_noise_and_not_without(seed):
    net, B, g = _net_and_random_feedback(seed)
    before = _angles(net, B)
    assert all(70 < a < 110 for a in before), before
    B_det = [b.clone() for b in B]
    b0 = B[0].clone()
    rec = {}
    sal_phase(net, B, generator=g, record=rec)
    _alive(rec["rates"])
    after = _angles(net, B)
    assert all(a < 30 for a in after), (before, after)
    assert torch.equal(B[0], b0)  # B_0 would feed the input: never touched
    # negative control: the same phase with noise-free neurons (which do fire) does not align
    rec_det = {}
    sal_phase(net, B_det, generator=torch.Generator().manual_seed(seed), deterministic=True, record=rec_det)
    _alive(rec_det["rates"])
    after_det = _angles(net, B_det)
    assert all(a > 40 for a in after_det), (before, after_det)
    assert min(after_det) > max(after) + 15


def test_sal_phase_exp_kernel_with_all_to_all_pairing_aligns_too():
    net, B, g = _net_and_random_feedback(0)
    sal_phase(net, B, steps=1000, kernel="exp", pairing="all", generator=g)
    assert all(a < 40 for a in _angles(net, B))


def test_sal_phase_needs_fully_connected_layers_and_matching_feedback():
    conv = SpikingNetwork("1x8x8-c4k3-10")
    with pytest.raises(LocosnnError, match="fully connected"):
        sal_phase(conv, [torch.zeros_like(layer.weight) for layer in conv.layers])
    net, B, _ = _net_and_random_feedback(0)
    with pytest.raises(LocosnnError, match="shape"):
        sal_phase(net, [b.T for b in B])
    with pytest.raises(LocosnnError, match="kernel"):
        sal_phase(net, B, kernel="box")
    with pytest.raises(LocosnnError, match="fully connected"):
        make_rule("sal").init_feedback(conv)


def test_sal_phase_is_reproducible_from_its_generator():
    net, B, _ = _net_and_random_feedback(3)
    B2 = [b.clone() for b in B]
    sal_phase(net, B, steps=200, generator=torch.Generator().manual_seed(5))
    sal_phase(net, B2, steps=200, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(B, B2))


# -- the sal rule in the trainer -------------------------------------------------------------------

SMALL = dict(dataset="synthetic", arch="64-32-32-10", T=4, batch_size=64, val_size=200, lr=3e-3)


def test_sal_rule_learns_and_logs_a_falling_feedback_angle(tmp_path):
    cfg = TrainConfig(rule="sal", epochs=3, rule_args={"sal_steps": 300, "sal_lr": 0.05, "sal_batch": 32}, **SMALL)
    tr = Trainer(cfg, out=tmp_path / "sal", progress=False)
    hist = tr.fit()
    angles = [row["rule_angle_deg"] for row in hist]
    assert all(len(a) == 2 for a in angles)
    for layer in range(2):
        seq = [a[layer] for a in angles]
        assert all(x > y for x, y in zip(seq, seq[1:])), angles  # falls every epoch
        assert seq[-1] < 40, angles
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_acc"] > 0.3  # chance: 0.1
    rows = [json.loads(line) for line in (tmp_path / "sal" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rule_angle_deg"] for r in rows] == angles
    _alive(tr.rule.last_phase["rates"])
    # the rule trains like FA: its feedback starts from FA's random matrices (same seed, same B)
    fa = make_rule("fa", seed=0)
    fa.init_feedback(tr.net)
    fresh = make_rule("sal", seed=0)
    fresh.init_feedback(tr.net)
    assert all(torch.equal(a, b) for a, b in zip(fa.B, fresh.B))


def test_sal_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(rule="sal", encoder="rate", epochs=3, rule_args={"sal_steps": 60, "sal_batch": 8, "sal_lr": 0.05}, **SMALL)
    full = Trainer(cfg, out=tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(TrainConfig(**{**cfg.to_dict(), "epochs": 1}), out=tmp_path / "part", progress=False)
    part.fit()
    resumed = Trainer(cfg, out=tmp_path / "part", resume=True, progress=False)
    assert resumed.epoch == 1 and resumed.rule.epochs_seen == 1
    resumed.fit()
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(full.rule.B, resumed.rule.B))
    assert full.history[-1]["rule_angle_deg"] == resumed.history[-1]["rule_angle_deg"]


def test_sal_rule_settings_are_checked():
    with pytest.raises(LocosnnError):
        make_rule("sal", sal_kernel="box")
    with pytest.raises(LocosnnError):
        make_rule("sal", feedback="transpose")
    with pytest.raises(LocosnnError, match="no setting"):
        make_rule("sal", sal_speed=3)
    r = make_rule("sal", sal_every=0)  # FA that logs its angles: B never moves
    net, _, _ = _net_and_random_feedback(0)
    first = r.end_epoch(net)["angle_deg"]
    assert r.end_epoch(net)["angle_deg"] == first and all(70 < a < 110 for a in first)


# -- command line ----------------------------------------------------------------------------------

def test_cli_sal_demo_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["sal-demo", "--out", str(out), "--seeds", "2", "--steps", "300"]) == 0
    data = json.loads((out / "demo.json").read_text())
    runs = data["runs"]
    assert len(runs) == 2 * 2 * 2  # seeds x modes x (noisy, deterministic)
    assert {(r["mode"], r["deterministic"]) for r in runs} == {(m, d) for m in ("both", "one") for d in (False, True)}
    assert all(len(r["t"]) == len(r["w12"]) == len(r["w21"]) and math.isfinite(r["final"]["gap"]) for r in runs)
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    line = capsys.readouterr().out.strip()
    assert line.startswith("sal-demo") and "\n" not in line
    assert main(["sal-demo", "--out", str(tmp_path / "one"), "--seeds", "1", "--steps", "50", "--mode", "one"]) == 0
    assert {r["mode"] for r in json.loads((tmp_path / "one" / "demo.json").read_text())["runs"]} == {"one"}
