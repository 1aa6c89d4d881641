import csv
import json
import math

import numpy as np
import pytest
import torch

from locosnn.cli import main
from locosnn.continual import (AGNOSTIC, AWARE, PermutedFeatures, ReplayBuffer, average_accuracy, backward_transfer,
                               class_incremental, continual_metrics, forgetting, label_sorted, last_task_accuracy,
                               per_task_forgetting, permuted, predictions, run_continual, split_settings,
                               task_aware_predictions)
from locosnn.data import Dataset, Split, load_dataset
from locosnn.errors import LocosnnError, NonFiniteError
from locosnn.network import SpikingNetwork
from locosnn.rules import OWM, make_rule
from locosnn.testing import assert_spiking

# the 8x8 digits, split into 5 tasks of 2 classes: a few hundred samples per task, < 1 s a run
TINY = dict(dataset="digits", arch="64-64-10", T=4, batch_size=32, epochs=2, lr=0.05, optimizer="sgd",
            stream="class", n_tasks=5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def toy(n=200, n_classes=10, shape=(1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda m: Split(torch.rand((m, *shape), generator=g), torch.arange(m) % n_classes)  # noqa: E731
    return Dataset("toy", mk(n), mk(n // 4), mk(n // 2), n_classes, shape)


# -- metrics -------------------------------------------------------------------------------------------
def test_metrics_of_a_known_matrix():
    R = [[0.9, 0.1, 0.1],
         [0.7, 0.8, 0.1],
         [0.5, 0.6, 0.9]]
    assert average_accuracy(R) == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert per_task_forgetting(R) == pytest.approx([0.9 - 0.5, 0.8 - 0.6])
    assert forgetting(R) == pytest.approx(0.3)
    assert last_task_accuracy(R) == pytest.approx(0.9)
    m = continual_metrics(np.array(R))  # numpy works as well as lists
    assert m["LA"] == pytest.approx((0.9 + 0.8 + 0.9) / 3) and m["tasks"] == 3 and m["BWT"] == pytest.approx(-0.3)


def test_forgetting_takes_the_max_over_every_earlier_row_as_chaudhry():
    # task 1 was better *before* it was trained (0.95) than right after (0.8): f_1 = 0.95 - 0.6
    R = [[0.9, 0.95, 0.1], [0.7, 0.8, 0.1], [0.5, 0.6, 0.9]]
    assert per_task_forgetting(R) == pytest.approx([0.4, 0.35])
    assert backward_transfer(R) == pytest.approx(-0.3)  # BWT compares with the diagonal only


def test_no_forgetting_and_total_forgetting():
    keep = [[0.9, 0.0, 0.0], [0.9, 0.8, 0.0], [0.9, 0.8, 0.7]]
    assert backward_transfer(keep) == 0 and forgetting(keep) == 0
    assert average_accuracy(keep) == pytest.approx(0.8)
    lose = np.eye(4)  # each task perfect right after it is learned, zero once the next one is
    assert average_accuracy(lose) == 0.25 and backward_transfer(lose) == -1 and forgetting(lose) == 1
    assert per_task_forgetting(lose) == [1.0, 1.0, 1.0] and last_task_accuracy(lose) == 1
    one = continual_metrics([[0.7]])
    assert one["ACC"] == 0.7 and math.isnan(one["BWT"]) and math.isnan(one["forgetting"])
    # a partial run (rows < columns): only the leading square block counts
    assert average_accuracy([[0.9, 0.1, 0.0], [0.5, 0.8, 0.0]]) == pytest.approx(0.65)
    with pytest.raises(LocosnnError, match="T x N"):
        average_accuracy([[0.9], [0.5]])


# -- streams -------------------------------------------------------------------------------------------
def test_class_stream_is_disjoint_complete_and_pure(digits):
    tasks = class_incremental(digits, n_tasks=5)
    assert [t.classes for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    seen = [c for t in tasks for c in t.classes]
    assert sorted(seen) == list(range(10)) and len(set(seen)) == len(seen)
    for t in tasks:
        for s in (t.train, t.val, t.test):
            assert len(s) and set(s.y.tolist()) == set(t.classes)
    assert sum(len(t.train) for t in tasks) == len(digits.train)
    assert sum(len(t.test) for t in tasks) == len(digits.test)
    a, b, c = (class_incremental(digits, 5, seed=s) for s in (1, 1, 2))
    assert [t.classes for t in a] == [t.classes for t in b] != [t.classes for t in c]
    assert [t.classes for t in class_incremental(digits, 2, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])] == \
        [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    with pytest.raises(LocosnnError, match="3 tasks do not divide the 10 classes"):
        class_incremental(digits, n_tasks=3)
    with pytest.raises(LocosnnError, match="cover every class"):
        class_incremental(digits, n_tasks=3, classes_per_task=2)


def test_permutations_are_fixed_by_seed_and_applied_to_every_split():
    data = toy()
    tasks = permuted(data, n_tasks=3, seed=0)
    assert tasks[0].permutation is None and tasks[0].train.x is data.train.x  # task 0 is the identity
    p1, p2 = tasks[1].permutation, tasks[2].permutation
    assert sorted(p1.tolist()) == list(range(16)) and not torch.equal(p1, p2)
    assert torch.equal(p1, permuted(data, 3, seed=0)[1].permutation)
    assert not torch.equal(p1, permuted(data, 3, seed=1)[1].permutation)
    for t in tasks[1:]:
        for name in ("train", "val", "test"):
            base, s = getattr(data, name), getattr(t, name)
            want = base.x.reshape(len(base), -1)[:, t.permutation].reshape(base.x.shape)
            assert torch.equal(s.x[torch.arange(len(s))], want) and torch.equal(s.y, base.y)
            assert torch.equal(s.x[3], want[3]) and s.x.shape == base.x.shape
        assert t.classes == list(range(10))
    assert isinstance(tasks[1].train.x, PermutedFeatures) and torch.equal(tasks[1].train.x.tensor()[:5],
                                                                          tasks[1].train.x[:5])
    assert tasks[1].train.x[torch.tensor([], dtype=torch.long)].shape == (0, 1, 4, 4)


def test_label_sorted_stream_is_the_sorted_training_set_in_chunks(digits):
    tasks = label_sorted(digits, n_tasks=4)
    ys = torch.cat([t.train.y for t in tasks])
    assert torch.equal(ys, digits.train.y.sort(stable=True).values)
    sizes = [len(t.train) for t in tasks]
    assert sum(sizes) == len(digits.train) and max(sizes) - min(sizes) <= 1
    assert all(not t.shuffle for t in tasks)
    for t in tasks:
        assert t.classes == sorted(set(t.train.y.tolist())) and set(t.test.y.tolist()) <= set(t.classes)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(LocosnnError, match="unknown stream 'nope'"):
        split_settings({"stream": "nope"})
    with pytest.raises(LocosnnError, match="unknown continual setting"):
        split_settings({"strem": "class"})
    with pytest.raises(LocosnnError, match="eval"):
        split_settings({"eval": "sometimes"})
    with pytest.raises(LocosnnError, match="n_tasks"):
        split_settings({"n_tasks": 0})
    cfg, ccfg = split_settings({"stream": "split", "replay": 10})
    assert ccfg.stream == "class" and cfg.epochs == 1 and ccfg.modes == (AWARE, AGNOSTIC)


# -- evaluation -------------------------------------------------------------------------------------------
def test_task_aware_masking_on_constructed_logits():
    logits = torch.tensor([[-5.0, -3.0, -9.0, 7.0],   # overall argmax 3; among {0, 1}: 1
                           [-1.0, -2.0, 0.5, 0.0],    # among {0, 1}: 0 (negative logits: masking, not zeroing)
                           [2.0, 1.0, 3.0, 4.0]])
    assert task_aware_predictions(logits, [0, 1]).tolist() == [1, 0, 0]
    assert task_aware_predictions(logits, [2]).tolist() == [2, 2, 2]
    assert predictions(logits, [0, 1], AGNOSTIC).tolist() == [3, 2, 3]
    assert predictions(logits, [0, 1, 2, 3], AWARE).tolist() == predictions(logits, [0, 1, 2, 3], AGNOSTIC).tolist()


# -- runs ---------------------------------------------------------------------------------------------------
def test_bptt_learns_each_task_then_forgets_it(digits, tmp_path):
    res = run_continual(dict(TINY, rule="bptt"), out=tmp_path / "run", progress=False, dataset=digits)
    R = np.array(res["R"][AGNOSTIC])
    assert R.shape == (5, 5)
    assert np.diag(R).min() > 0.7  # liveness: every task is learned ...
    assert R[0, 0] > 0.85 and R[-1, 0] < 0.3  # ... and the first one is forgotten (task-agnostic)
    assert res["forgetting"] > 0.5 and res["metrics"][AGNOSTIC]["forgetting"] == res["forgetting"]
    Raware = np.array(res["R"][AWARE])
    assert (Raware >= R - 1e-12).all()  # masking to the task's classes can only help
    assert all(h[f"val_acc_{AGNOSTIC}"] > 0.7 for h in res["history"])  # validation on the task just learned
    # the trained network still spikes (the forgetting is not a dead network)
    from locosnn.continual import ContinualRun
    run = ContinualRun(dict(TINY, rule="bptt"), out=tmp_path / "run", resume=True, progress=False, dataset=digits)
    assert run.done == 5
    x = digits.test.x[:64]
    assert_spiking(run.net.run(x.unsqueeze(0).expand(4, *x.shape), record=True))


def test_owm_forgets_far_less_than_bptt_on_split_digits(digits):
    res = {r: run_continual(dict(TINY, rule=r), progress=False, dataset=digits)["metrics"][AGNOSTIC]
           for r in ("bptt", "owm")}
    # measured over seeds 0-4: bptt forgetting 0.93-0.98, ACC 0.10-0.20; owm forgetting 0.01-0.09, ACC 0.68-0.77
    assert res["owm"]["forgetting"] < 0.25 < 0.7 < res["bptt"]["forgetting"]
    assert res["owm"]["ACC"] > res["bptt"]["ACC"] + 0.3
    assert res["owm"]["LA"] > 0.4  # it still learns the new tasks


def test_owm_projector_protects_stored_inputs():
    torch.manual_seed(0)
    rule = OWM(alpha=1e-4)
    net = SpikingNetwork("16-8-3")
    rule._check(net)
    xs = [torch.rand(16) for _ in range(3)]
    for x in xs:
        rule.absorb(0, x)
    P = rule.projector(0)
    assert P.shape == (17, 17) and torch.allclose(P, P.T)
    G = torch.randn(8, 17, dtype=torch.float64)
    for x in xs:
        v = torch.cat([x.double(), torch.ones(1, dtype=torch.float64)])
        assert (P @ v).norm() < 1e-3 * v.norm()  # P x ~ 0 for every stored input
        assert ((G @ P) @ v).norm() < 1e-3 * (G @ v).norm()  # the update leaves their current unchanged
    u = torch.randn(17, dtype=torch.float64)
    V = torch.stack([torch.cat([x.double(), torch.ones(1, dtype=torch.float64)]) for x in xs], 1)
    u_perp = u - V @ torch.linalg.lstsq(V, u[:, None]).solution[:, 0]
    assert torch.allclose(P @ u_perp, u_perp, atol=1e-6)  # directions orthogonal to them pass unchanged
    # state round-trip, and the step writes projected gradients
    other = OWM(alpha=1e-4)
    other.load_state_dict(rule.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.P, rule.P))
    x_seq = torch.rand(4, 5, 16)
    rep = rule.step(net, x_seq, torch.tensor([0, 1, 2, 0, 1]))
    assert math.isfinite(rep["loss"]) and rule.n_updates == 1
    Gw = torch.cat([net.layers[0].weight.grad, net.layers[0].bias.grad[:, None]], 1).double()
    for x in xs:
        v = torch.cat([x.double(), torch.ones(1, dtype=torch.float64)])
        assert (Gw @ v).norm() < 1e-3 * Gw.norm() * v.norm()
    assert isinstance(make_rule("owm", alpha=0.5), OWM)
    with pytest.raises(LocosnnError, match="fully connected"):
        OWM().step(SpikingNetwork("1x8x8-c4k3-3"), torch.rand(2, 3, 1, 8, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(LocosnnError, match="update"):
        OWM(update="sometimes")


class Recorder(OWM):
    """OWM that records the labels of every batch it is given."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def step(self, network, x_seq, y):
        self.seen.append(y.clone())
        return super().step(network, x_seq, y)


def test_replay_mixes_old_samples_into_later_batches(digits):
    rule = Recorder(seed=0)
    res = run_continual(dict(TINY, rule="owm", n_tasks=2, epochs=1, replay=60, replay_batch=8, eval="agnostic"),
                        progress=False, dataset=digits, rule=rule)
    assert list(res["R"]) == [AGNOSTIC]
    n0 = math.ceil(sum(int((digits.train.y == c).sum()) for c in range(5)) / 32)
    first, later = rule.seen[:n0], rule.seen[n0:]
    assert all(int(y.max()) <= 4 for y in first)  # task 1: its own classes, nothing replayed yet
    assert later and all(1 <= len(y) - 8 <= 32 for y in later)  # the new batch, then 8 replayed samples
    assert all(set(y[-8:].tolist()) <= set(range(5)) and int(y[:-8].min()) >= 5 for y in later)
    assert res["history"][1]["replayed"] == 8 * len(later) and res["history"][1]["replay_size"] == 60
    buf = ReplayBuffer(60)
    g = torch.Generator().manual_seed(0)
    tasks = class_incremental(digits, 2)
    buf.add_task(tasks[0], g)
    assert len(buf) == 60 and set(buf.counts().values()) == {12}
    buf.add_task(tasks[1], g)
    assert len(buf) == 60 and set(buf.counts().values()) == {6}  # re-balanced over 10 (task, class) groups


class Crash(Exception):
    pass


class CrashingOWM(OWM):
    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at, self.calls = at, 0

    def step(self, network, x_seq, y):
        self.calls += 1
        if self.calls == self.at:
            raise Crash
        return super().step(network, x_seq, y)


def test_resume_after_an_interruption_is_bit_identical(digits, tmp_path):
    """Rule state (OWM projectors), replay buffer, optimiser and encoder noise all travel with the checkpoint."""
    s = dict(TINY, rule="owm", arch="64-32-10", n_tasks=2, epochs=1, encoder="rate", replay=40, class_order="seeded")
    n0 = math.ceil(len(class_incremental(digits, 2, seed=0)[0].train) / 32)
    full = run_continual(s, out=tmp_path / "full", progress=False, dataset=digits)
    with pytest.raises(Crash):  # dies in the middle of task 2
        run_continual(s, out=tmp_path / "part", progress=False, dataset=digits, rule=CrashingOWM(at=n0 + 3, seed=0))
    st = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert st["tasks_done"] == 1 and len(json.loads((tmp_path / "part" / "matrix.json").read_text())["R"][AWARE]) == 1
    with pytest.raises(LocosnnError, match="already holds"):
        run_continual(s, out=tmp_path / "part", progress=False, dataset=digits)
    with pytest.raises(LocosnnError, match="settings differ in lr"):
        run_continual({**s, "lr": 0.1}, out=tmp_path / "part", resume=True, progress=False, dataset=digits)
    resumed = run_continual(s, out=tmp_path / "part", resume=True, progress=False, dataset=digits)
    assert resumed["R"] == full["R"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert all(torch.equal(p, q) for p, q in zip(a["rule"]["P"], b["rule"]["P"]))
    assert (tmp_path / "full" / "results.csv").read_text() == (tmp_path / "part" / "results.csv").read_text()


class NaNAt(OWM):
    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at, self.calls = at, 0

    def step(self, network, x_seq, y):
        self.calls += 1
        rep = super().step(network, x_seq, y)
        if self.calls == self.at:
            rep["loss"] = float("nan")
        return rep


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(digits, tmp_path):
    s = dict(TINY, rule="owm", n_tasks=2, epochs=1)
    with pytest.raises(NonFiniteError, match="task 2/2"):
        run_continual(s, out=tmp_path / "r", progress=False, dataset=digits, rule=NaNAt(at=25, seed=0))
    st = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert st["tasks_done"] == 1


def test_permuted_and_label_sorted_runs(digits, capsys):
    res = run_continual(dict(TINY, rule="bptt", stream="permuted", n_tasks=3, replay=30), progress=True, dataset=digits)
    assert res["R"][AWARE] == res["R"][AGNOSTIC]  # every task has every class: both modes coincide
    R = np.array(res["R"][AGNOSTIC])
    assert np.diag(R).min() > 0.7 and R[0, 1] < 0.5  # each permutation is learned; an unseen one is not solved
    assert "task 3/3" in capsys.readouterr().out
    res = run_continual(dict(TINY, rule="bptt", stream="label_sorted", n_tasks=2, epochs=1), progress=False,
                        dataset=digits)
    c0, c1 = (t["classes"] for t in res["tasks"])
    assert c0[0] == 0 and c1[-1] == 9 and c0[-1] <= c1[0]  # consecutive label ranges (cut at a sample count)
    assert res["tasks_done"] == 2 and not res["tasks"][0]["shuffle"]


# -- command line ----------------------------------------------------------------------------------------
def test_cli_runs_and_writes_every_file(tmp_path, capsys):
    out = tmp_path / "cl"
    argv = ["continual", "--rule", "owm", "--optimizer", "sgd", "--rule-arg", "alpha=0.5", "--dataset", "digits",
            "--arch", "64-32-10", "--stream", "class", "--n-tasks", "2", "--epochs", "1", "--T", "2", "--lr", "0.05",
            "--batch-size", "64", "--seed", "1", "--limit", "600", "--replay", "20", "--eval", "both",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "task-agnostic" in text and "ACC" in text and "forgetting" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["settings"]["stream"] == "class" and cfg["settings"]["seed"] == 1 and cfg["settings"]["replay"] == 20
    assert cfg["settings"]["rule_args"] == {"alpha": 0.5} and cfg["settings"]["epochs"] == 1
    assert "git_sha" in cfg and cfg["versions"]["torch"] and cfg["machine"]["cpus"]
    m = json.loads((out / "matrix.json").read_text())
    assert set(m["R"]) == {AWARE, AGNOSTIC} and len(m["R"][AGNOSTIC]) == 2 and "ACC" in m["metrics"][AGNOSTIC]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {"after_task", "eval_task", "mode", "acc"} <= set(rows[0])
    assert float(rows[0]["acc"]) == m["R"][rows[0]["mode"]][0][0]
    assert (out / "checkpoint.pt").exists()
    assert main(["continual", "--out", str(out), "--resume", "--no-progress"]) == 0  # finished: nothing to do


def test_cli_bad_input_exits_2(tmp_path, capsys):
    base = ["continual", "--dataset", "digits", "--arch", "64-10", "--no-progress", "--out", str(tmp_path / "x")]
    assert main(base + ["--stream", "bogus"]) == 2
    assert "unknown stream 'bogus'" in capsys.readouterr().err
    assert main(base + ["--n-tasks", "3"]) == 2
    assert "do not divide the 10 classes" in capsys.readouterr().err
    assert main(base + ["--class-order", "a,b"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["continual", "--help"])
    assert e.value.code == 0 and "accuracy matrix" in capsys.readouterr().out


# -- one loop, rule hooks, one flag set ------------------------------------------------------------------
def test_owm_adam_warning_is_the_rules_hook_in_every_entry_point(tmp_path, capsys):
    base = ["--rule", "owm", "--dataset", "digits", "--arch", "64-10", "--T", "2", "--limit", "200", "--epochs", "1",
            "--batch-size", "64", "--no-progress"]
    for cmd, extra in (("train", []), ("continual", ["--n-tasks", "2"])):
        assert main([cmd, *base, *extra, "--optimizer", "adam", "--out", str(tmp_path / cmd)]) == 0
        warns = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning:")]
        assert len(warns) == 1 and "'owm'" in warns[0] and "--optimizer sgd" in warns[0], (cmd, warns)
        assert main([cmd, *base, *extra, "--optimizer", "sgd", "--out", str(tmp_path / f"{cmd}-sgd")]) == 0
        assert "warning:" not in capsys.readouterr().err
    assert make_rule("bptt").setup(SpikingNetwork("64-10"), None) == []  # declared on LearningRule, empty by default
    assert make_rule("bptt").end_task(SpikingNetwork("64-10")) == {}


def test_continual_takes_every_train_setting(tmp_path):
    import argparse

    from locosnn.cli import build_parser
    from locosnn.config import FIELDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in ("train", "continual"):
        dests = {a.dest for a in sub.choices[cmd]._actions}
        assert set(FIELDS) - {"rule_args"} <= dests and "rule_arg" in dests, cmd
    out = tmp_path / "cl"
    assert main(["continual", "--dataset", "digits", "--arch", "64-16-10", "--T", "2", "--limit", "200", "--n-tasks", "2",
                 "--epochs", "2", "--neuron", "if", "--weight-decay", "1e-4", "--lr-schedule", "cosine",
                 "--readout-lr", "0.01", "--init", "pytorch", "--align-every", "2", "--no-progress",
                 "--out", str(out)]) == 0
    s = json.loads((out / "config.json").read_text())["settings"]
    assert (s["neuron"], s["weight_decay"], s["lr_schedule"], s["readout_lr"], s["init"]) == \
        ("if", 1e-4, "cosine", 0.01, "pytorch")
    hist = json.loads((out / "matrix.json").read_text())["history"]
    assert all(len(h["align_cos"]) == 2 for h in hist)  # --align-every runs in the shared loop


def test_one_training_loop_calls_rule_step():
    """Only locosnn.train.train_epoch calls rule.step in a loop (diagnostics, cost and depth take one step)."""
    import pathlib
    import re

    import locosnn

    root = pathlib.Path(locosnn.__file__).parent
    callers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if "rules" not in p.parts and re.search(r"\brule\.step\(", p.read_text()))
    assert callers == ["cost.py", "depth.py", "diagnostics.py", "train.py"]
    assert len(re.findall(r"\brule\.step\(", (root / "train.py").read_text())) == 1
    assert not re.search(r"rule\.name\s*==|hasattr\(self\.rule|getattr\(self\.rule", (root / "continual" / "runner.py")
                         .read_text() + (root / "train.py").read_text())
