import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from locosnn.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from locosnn.config import TrainConfig
from locosnn.errors import NonFiniteError
from locosnn.rules import LearningRule
from locosnn.train import Trainer

SMALL = dict(dataset="synthetic", arch="64-32-10", T=4, batch_size=64, epochs=2, val_size=200, lr=3e-3)


class DummyRule(LearningRule):
    """Writes a fixed, data-independent descent direction into .grad (no autograd)."""

    name = "dummy"

    def __init__(self, nan_at=None, **kw):
        super().__init__(**kw)
        self.calls = 0
        self.nan_at = nan_at

    def step(self, network, x_seq, y):
        self.calls += 1
        tr = network.run(x_seq)
        for layer in network.layers:
            layer.weight.grad = torch.ones_like(layer.weight)
            layer.bias.grad = torch.ones_like(layer.bias)
        if self.nan_at is not None and self.calls == self.nan_at:
            network.layers[-1].weight.grad[0, 0] = float("nan")
        return {"loss": float(self.loss_fn(tr.out, y).mean()), "out": tr.out}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, s):
        self.calls = s["calls"]


def test_trainer_drives_a_rule_that_writes_grad(tmp_path):
    cfg = TrainConfig(rule="dummy", optimizer="sgd", **{**SMALL, "epochs": 1})
    tr = Trainer(cfg, out=tmp_path / "run", progress=False, rule=DummyRule())
    before = [p.detach().clone() for p in tr.net.parameters()]
    hist = tr.fit()
    assert tr.rule.calls == 22  # ceil((1600 - 200) / 64)
    for b, p in zip(before, tr.net.parameters()):
        assert (p.detach() < b).all()  # every parameter moved against the written .grad
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == hist and {"train_loss", "val_acc", "test_acc", "epoch_time_s", "peak_rss_mb"} <= set(rows[0])
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["seed"] == 0 and meta["versions"]["torch"].startswith("2.13")
    assert meta["dataset"]["checksum"] and "git_sha" in meta


def test_bptt_learns_synthetic_data():
    cfg = TrainConfig(rule="bptt", **{**SMALL, "epochs": 3})
    hist = Trainer(cfg, progress=False).fit()
    assert hist[-1]["val_acc"] > 0.8 and hist[-1]["train_loss"] < hist[0]["train_loss"]


@pytest.mark.parametrize("rule,args", [("bptt", {}), ("np", {}), ("loco", {"rank": 8, "memory": 40}),
                                       ("loco", {"rank": 8, "variant": "faithful"}), ("sfdfa", {}),
                                       ("opzo", {})])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, rule, args):
    """Rule state (noise generator, LOCO cluster memory) travels with the checkpoint."""
    cfg = TrainConfig(rule=rule, encoder="rate", **{**SMALL, "epochs": 3, "rule_args": args})
    full = Trainer(cfg, out=tmp_path / "full", progress=False)
    full.fit()
    part = Trainer(TrainConfig(**{**cfg.to_dict(), "epochs": 1}), out=tmp_path / "part", progress=False)
    part.fit()
    resumed = Trainer(cfg, out=tmp_path / "part", resume=True, progress=False)
    assert resumed.epoch == 1
    resumed.fit()
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values()):
        assert torch.equal(a, b)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_refuses_to_overwrite_or_resume_with_another_config(tmp_path):
    cfg = TrainConfig(rule="bptt", **{**SMALL, "epochs": 1})
    Trainer(cfg, out=tmp_path / "r", progress=False).fit()
    with pytest.raises(Exception, match="already holds a run"):
        Trainer(cfg, out=tmp_path / "r", progress=False)
    with pytest.raises(Exception, match="config differs in lr"):
        Trainer(TrainConfig(**{**cfg.to_dict(), "lr": 0.1}), out=tmp_path / "r", resume=True, progress=False)


def test_non_finite_update_stops_naming_layer_and_step_and_keeps_checkpoint(tmp_path):
    cfg = TrainConfig(rule="dummy", optimizer="sgd", **SMALL)
    tr = Trainer(cfg, out=tmp_path / "r", progress=False, rule=DummyRule(nan_at=25))
    with pytest.raises(NonFiniteError, match=r"layer 1 \(weight\) at epoch 2, step 2"):
        tr.fit()
    st = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert st["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in st["model"].values())


def test_atomic_checkpoint_survives_a_kill_mid_write(tmp_path):
    path = tmp_path / "ck.pt"
    good = {"w": torch.arange(5.0)}
    save_checkpoint(path, good)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from locosnn.checkpoint import atomic_write_bytes
        def writer(f):
            f.write(b"partial garbage" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_bytes({str(path)!r}, writer)
    """)
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert torch.equal(load_checkpoint(path)["w"], good["w"])
    leftovers = [p for p in os.listdir(tmp_path) if p != "ck.pt"]
    assert all(p.endswith(".tmp") for p in leftovers)  # a stray temp file at most, never a torn ck.pt


def test_atomic_write_cleans_up_on_error(tmp_path):
    def boom(f):
        f.write(b"x")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write_bytes(tmp_path / "a.json", boom)
    assert os.listdir(tmp_path) == []


def test_alignment_logging_does_not_change_training(tmp_path):
    """--align-every records per-layer cosine to BPTT but leaves the run bit-identical."""
    cfg = TrainConfig(**{**SMALL, "rule": "loco", "epochs": 1, "rule_args": {"rank": 8}})
    plain = Trainer(cfg, out=tmp_path / "a", progress=False)
    plain.fit()
    logged = Trainer(TrainConfig(**{**cfg.to_dict(), "align_every": 3}), out=tmp_path / "b", progress=False)
    hist = logged.fit()
    assert len(hist[-1]["align_cos"]) == logged.net.depth
    assert all(-1 <= c <= 1 for c in hist[-1]["align_cos"]) and all(r > 0 for r in hist[-1]["align_norm_ratio"])
    assert "rule_projector_s" in hist[-1] and hist[-1]["step_time_s"] > 0
    for p, q in zip(plain.net.parameters(), logged.net.parameters()):
        assert torch.equal(p, q)


def test_atomic_writes_get_a_normal_file_mode(tmp_path):
    """mkstemp creates 0600 files; results and reports must be readable like any other file."""
    import os
    import stat

    from locosnn.checkpoint import atomic_write_json

    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_git_sha_marks_changed_code_dirty_but_not_benchmark_outputs(tmp_path):
    """A benchmark writes into benchmarks/<name>/ while it runs: those files must not make the code
    look uncommitted; any other tracked change must (negative control)."""
    import shutil
    import subprocess

    from locosnn.provenance import git_sha
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    (tmp_path / "benchmarks" / "sweep").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "sweep.toml").write_text("out = 'benchmarks/sweep'\n")
    (tmp_path / "benchmarks" / "sweep" / "results.csv").write_text("a\n1\n")
    run("init", "-q")
    run("-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    run("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init")
    sha = git_sha(tmp_path)
    assert len(sha) == 40 and not sha.endswith("-dirty")
    (tmp_path / "benchmarks" / "sweep" / "results.csv").write_text("a\n2\n")  # an output: still clean
    assert git_sha(tmp_path) == sha
    (tmp_path / "benchmarks" / "sweep.toml").write_text("out = 'elsewhere'\n")  # a config: dirty
    assert git_sha(tmp_path) == sha + "-dirty"
    (tmp_path / "benchmarks" / "sweep.toml").write_text("out = 'benchmarks/sweep'\n")
    (tmp_path / "code.py").write_text("x = 2\n")  # code: dirty
    assert git_sha(tmp_path) == sha + "-dirty"
