"""Data-parallel training (locosnn.distributed): two gloo processes on the CPU give the weights of one
process trained on the concatenated batches, to float64 rounding; rank 0 alone writes; resume works.

One spawn of two processes runs every case (process start-up dominates the cost); the references are
trained here, in one process. The data (99 samples, batches of 32) end in a batch of 3, split 2 | 1:
uneven shards are covered too.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locosnn import distributed as dp
from locosnn.config import TrainConfig
from locosnn.encoding import encode
from locosnn.network import Noise
from locosnn.testing import assert_spiking
from locosnn.train import Trainer

#: SGD, not Adam: Adam's step hardly depends on the gradient's scale, so it would hide a wrong averaging
BASE = dict(dataset="synthetic", arch="64-16-16-10", T=4, batch_size=32, epochs=1, val_size=64, limit=99,
            lr=0.05, optimizer="sgd", dtype="float64", seed=3)
#: name -> settings over BASE; bptt, dfa and loco (its default projector and noise) are the brief's cases,
#: the others cover the synchronised state of every rule with per-sample noise or batch statistics
CASES: dict[str, dict] = {
    "bptt": {"rule": "bptt"},
    "dfa": {"rule": "dfa"},
    "loco": {"rule": "loco"},
    "loco-faithful": {"rule": "loco", "rule_args": {"variant": "faithful", "rank": 8, "drop_mean": True}},
    "loco-cheap": {"rule": "loco", "rule_args": {"variant": "faithful", "rank": 8, "projector": "fast",
                                                 "kmeans_every": 2, "projector_every": 2}},
    "loco-tracked": {"rule": "loco", "rule_args": {"variant": "faithful", "rank": 8, "projector": "tracked",
                                                   "kmeans_every": 2, "projector_every": 2}},
    "np-deep": {"rule": "np", "arch": "64-16-16-16-10",
                "rule_args": {"temporal": "frozen", "antithetic": True, "draws": 2, "layer_sample": True,
                              "dl_norm": True, "average": 0.5, "homeostasis": 0.01, "local_loss": 1}},
    "np-online": {"rule": "np", "rule_args": {"online": True}},
    "fa": {"rule": "fa"},
    "opzo": {"rule": "opzo"},
    "sfdfa": {"rule": "sfdfa", "rule_args": {"b_init": "random"}},
    "owm": {"rule": "owm", "optimizer": "sgd"},
}
#: the cases whose weights are compared; the others' too, listed to make the brief's three explicit
REQUIRED = ("bptt", "dfa", "loco")


def cfg_of(name: str, **over) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **CASES[name], **over})


def _flat_state(obj, prefix=""):
    """Every tensor (and number) of a nested state dict, by path."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_state(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat_state(v, f"{prefix}/{i}"))
    elif isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu().clone()
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = torch.tensor(float(obj), dtype=torch.float64)
    return out


def _no_grad_sync(orig):
    """Shard.reduce_step that reduces the loss and accuracy but leaves each process its own .grad."""
    def reduce_step(self, params, loss, correct):
        params = list(params)
        own = [None if p.grad is None else p.grad.clone() for p in params]
        res = orig(self, params, loss, correct)
        for p, g in zip(params, own):
            p.grad = g
        return res
    return reduce_step


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(dp.worker_env(rank, world, port, threads=1))
    dp.init_from_env("cpu")
    import locosnn.train as train

    res: dict = {}
    try:
        for name in CASES:
            tr = Trainer(cfg_of(name), progress=False)
            tr.fit()
            res[name] = {"model": tr.net.state_dict(), "rule": _flat_state(tr.rule.state_dict()),
                         "history": tr.history}
        # negative control: without the .grad all-reduce the processes drift apart and off the reference
        orig = dp.Shard.reduce_step
        dp.Shard.reduce_step = _no_grad_sync(orig)
        try:
            tr = Trainer(cfg_of("dfa"), progress=False)
            tr.fit()
            res["dfa-unsynced"] = {"model": tr.net.state_dict()}
        finally:
            dp.Shard.reduce_step = orig
        # only rank 0 writes; a 2-process run resumed by 2 processes equals 2 epochs in one process
        writes = []
        for fn in ("save_checkpoint", "atomic_write_bytes", "atomic_write_json"):
            def spy(*a, _f=getattr(train, fn), **k):
                writes.append(str(a[0]))
                return _f(*a, **k)
            setattr(train, fn, spy)
        run = Path(out) / "run"
        Trainer(cfg_of("loco", epochs=1), out=run, progress=False).fit()
        tr = Trainer(cfg_of("loco", epochs=2), out=run, resume=True, progress=False)
        assert tr.epoch == 1
        tr.fit()
        res["resume"] = {"model": tr.net.state_dict(), "writes": writes}
    finally:
        torch.save(res, Path(out) / f"rank{rank}.pt")
        dp.shutdown()


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(2, dp.free_port(), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _reference(cfg: TrainConfig):
    tr = Trainer(cfg, progress=False)
    tr.fit()
    return tr


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a), default=0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process_on_the_concatenated_batch(two_procs, name):
    _, ranks = two_procs
    r0, r1 = ranks[0][name], ranks[1][name]
    # the processes agree exactly: weights and every tensor of the rule's state (feedback matrices, LOCO
    # memories, OPZO/SFDFA feedback, NP heads and averages, OWM projectors, the generators)
    assert _max_diff(r0["model"], r1["model"]) == 0.0
    assert _max_diff(r0["rule"], r1["rule"]) == 0.0
    fresh = Trainer(cfg_of(name), progress=False)
    x_seq = encode(fresh.data.train.x[:32].to(torch.float64), fresh.cfg.T)
    assert_spiking(fresh.net.run(x_seq, record=True))  # every hidden layer fires: its updates are not trivially 0
    init = {k: v.clone() for k, v in fresh.net.state_dict().items()}
    ref = _reference(cfg_of(name))
    ref_model = ref.net.state_dict()
    for k in ref_model:  # every layer's weights moved: the comparison is not between initial states
        if k.endswith("weight"):
            assert float((ref_model[k] - init[k]).abs().max()) > 1e-3, k
    assert _max_diff(r0["model"], ref_model) < 1e-10
    ref_rule = _flat_state(ref.rule.state_dict())
    assert ref_rule.keys() == r0["rule"].keys()
    assert _max_diff(r0["rule"], ref_rule) < 1e-8
    # the logged train loss and accuracy are those of the global batches, eval those of the whole splits
    h0, h = r0["history"][-1], ref.history[-1]
    for k in ("train_loss", "train_acc", "val_acc", "val_loss", "test_acc", "test_loss"):
        assert h0[k] == pytest.approx(h[k], rel=1e-9, abs=1e-12), k


def test_the_three_required_rules_are_covered():
    assert set(REQUIRED) <= set(CASES)


def test_negative_control_without_grad_all_reduce(two_procs):
    _, ranks = two_procs
    ref = _reference(cfg_of("dfa")).net.state_dict()
    a, b = ranks[0]["dfa-unsynced"]["model"], ranks[1]["dfa-unsynced"]["model"]
    assert _max_diff(a, ref) > 1e-4 and _max_diff(a, b) > 1e-4


def test_only_rank0_writes_and_resume_equals_one_uninterrupted_process(two_procs):
    out, ranks = two_procs
    assert ranks[1]["resume"]["writes"] == []
    assert any(w.endswith("checkpoint.pt") for w in ranks[0]["resume"]["writes"])
    ref = _reference(cfg_of("loco", epochs=2))
    assert _max_diff(ranks[0]["resume"]["model"], ref.net.state_dict()) < 1e-10
    st = torch.load(out / "run" / "checkpoint.pt", weights_only=False)
    assert st["epoch"] == 2 and _max_diff(st["model"], ref.net.state_dict()) < 1e-10
    assert [r["epoch"] for r in st["history"]] == [1, 2]


def test_shard_draw_gives_each_sample_the_noise_of_one_process():
    """A stacked (clean | noisy) batch of 2 x 5 rows, split 3 | 2: each process's noise rows are the
    single process's rows of its samples (and the generators end in the same state)."""
    g1 = torch.Generator().manual_seed(7)
    full = Noise(0.5, generator=g1, clean_rows=5).draw(torch.zeros(10, 4))
    parts = []
    for rank in range(2):
        group = dp.Group(rank=rank, world_size=2, local_rank=rank, backend="gloo", device=torch.device("cpu"))
        sh = group.shard(5)
        assert (sh.lo, sh.size, sh.sizes) == ((0, 3, (3, 2)) if rank == 0 else (3, 2, (3, 2)))
        g = torch.Generator().manual_seed(7)
        parts.append(Noise(0.5, generator=g, clean_rows=sh.size, shard=sh).draw(torch.zeros(2 * sh.size, 4)))
        assert torch.equal(g.get_state(), g1.get_state())
    assert torch.equal(full[:5], torch.zeros(5, 4))
    assert torch.equal(torch.cat([parts[0][3:], parts[1][2:]]), full[5:])
    assert torch.equal(parts[0][:3], torch.zeros(3, 4)) and torch.equal(parts[1][:2], torch.zeros(2, 4))


def test_cli_nproc_errors_are_one_line(capsys):
    from locosnn.cli import main

    assert main(["train", "--nproc", "0", "--dataset", "synthetic"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --nproc must be >= 1, got 0"]
    assert main(["train", "--nproc", "3", "--batch-size", "32", "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --batch-size 32 is not divisible by the 3 data-parallel")


def test_cli_nproc_launches_a_group_that_trains_like_one_process(tmp_path):
    """`python -m locosnn train --nproc 2`: two processes, rank 0's files only, one process's weights."""
    args = ["train", "--rule", "dfa", "--dataset", "synthetic", "--arch", "64-16-16-10", "--T", "4", "--batch-size",
            "32", "--limit", "99", "--val-size", "64", "--lr", "0.05", "--optimizer", "sgd", "--dtype", "float64", "--seed", "3",
            "--epochs", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-m", "locosnn", *args, "--nproc", "2", "--out", str(tmp_path / "dp")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("epoch 1:") == 1 and p.stdout.count("done:") == 1  # printed by rank 0 only
    assert sorted(q.name for q in (tmp_path / "dp").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    st = torch.load(tmp_path / "dp" / "checkpoint.pt", weights_only=False)
    ref = _reference(cfg_of("dfa")).net.state_dict()
    assert _max_diff(st["model"], ref) < 1e-10
