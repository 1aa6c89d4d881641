"""The ``device`` and ``dtype`` settings of a run (``locosnn train --device/--dtype``, ``locosnn eval --device``).

* a float64 run on the CPU trains end to end through ``Trainer(...).fit()`` for several rules, with
  float64 weights, and ``locosnn eval`` evaluates it;
* ``auto`` resolves to cuda when a CUDA device is available, else cpu; the saved config keeps what
  was asked for (``auto``) and config.json's ``device_resolved`` says where the run computed;
* asking for cuda where there is none is one ``error:`` line and exit 2, before any directory is made;
* resume does not compare the device (a run trained on cuda resumes on cpu); the dtype it does;
* the continual runner follows the same settings;
* ``TestCUDA`` (skipped without a GPU): train on cuda, then evaluate and resume on cpu.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from locosnn.cli import main
from locosnn.config import TrainConfig, resolve_device, resolve_dtype
from locosnn.errors import LocosnnError
from locosnn.train import Trainer

SMALL = dict(dataset="digits", arch="64-32-10", T=4, batch_size=64, epochs=1, lr=3e-3, limit=300)
#: small settings per rule (the defaults are sized for MNIST-scale networks)
RULE_ARGS = {"bptt": {}, "dfa": {}, "np": {"sigma": 0.1},
             "loco": {"rank": 4, "k": 3, "memory": 40, "per_batch": 4}}
TRAIN_ARGS = ["train", "--dataset", "digits", "--arch", "64-32-10", "-T", "4", "--epochs", "1", "--limit", "200",
              "--no-progress"]
HAS_CUDA = torch.cuda.is_available()


def _float_params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in net.parameters() if p.is_floating_point()]


@pytest.mark.parametrize("rule", sorted(RULE_ARGS))
def test_float64_on_cpu_trains_end_to_end(rule, tmp_path):
    cfg = TrainConfig(**SMALL, rule=rule, rule_args=RULE_ARGS[rule], dtype="float64", device="cpu")
    trainer = Trainer(cfg, out=tmp_path / rule, progress=False)
    history = trainer.fit()
    params = _float_params(trainer.net)
    assert params and all(p.dtype == torch.float64 and p.device.type == "cpu" for p in params)
    acc = history[-1]["test_acc"]
    assert isinstance(acc, float) and math.isfinite(acc) and 0.0 <= acc <= 1.0
    assert math.isfinite(history[-1]["train_loss"])
    meta = json.loads((tmp_path / rule / "config.json").read_text())
    assert meta["config"]["dtype"] == "float64" and meta["device_resolved"] == "cpu"


def test_settings_are_checked():
    assert TrainConfig(device="cuda:1", dtype="float64").validate().device == "cuda:1"
    for bad in ({"device": "gpu"}, {"device": "cuda:x"}, {"dtype": "float16"}, {"dtype": "double"}):
        with pytest.raises(LocosnnError, match=next(iter(bad))):
            TrainConfig(**bad).validate()
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype("float64") is torch.float64


def test_auto_resolves_to_cpu_without_cuda(tmp_path, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    cfg = TrainConfig(**SMALL, rule="dfa")
    assert cfg.device == "auto" and cfg.dtype == "float32"
    trainer = Trainer(cfg, out=tmp_path / "run", progress=False)
    trainer.fit()
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in _float_params(trainer.net))
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["device"] == "auto"  # what was asked for
    assert meta["device_resolved"] == "cpu"  # where it ran


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_error_line(device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main([*TRAIN_ARGS, "--device", device, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --device {device}: no CUDA device is available"]
    assert not out.exists()  # nothing written, not even the directory the lock made
    with pytest.raises(LocosnnError, match="no CUDA device is available"):
        Trainer(TrainConfig(**SMALL, device=device), progress=False)


def test_bad_flags_are_one_error_line(tmp_path, capsys):
    assert main([*TRAIN_ARGS, "--device", "gpu", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: device must be auto, cpu, cuda or cuda:N")
    with pytest.raises(SystemExit) as e:  # a bad choice is argparse's usage error: one line, exit 2
        main([*TRAIN_ARGS, "--dtype", "float16", "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "float16" in err[0]


def test_float64_run_evaluates_with_locosnn_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN_ARGS, "--rule", "dfa", "--dtype", "float64", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["dtype"] == "float64" and meta["config"]["device"] == "cpu"
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["epoch"] == 1 and 0.0 <= res["acc"] <= 1.0 and math.isfinite(res["loss"])
    # evaluates exactly what training measured on the test split
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert res["acc"] == pytest.approx(last["test_acc"])


def test_resume_ignores_the_device_but_not_the_dtype(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN_ARGS, "--rule", "dfa", "--device", "cpu", "--out", str(out)]) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--device", "auto", "--no-progress"]) == 0
    capsys.readouterr()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--dtype", "float64"]) == 2
    assert "config differs in dtype" in capsys.readouterr().err


def test_continual_follows_device_and_dtype(tmp_path):
    from locosnn.continual import ContinualRun

    settings = dict(dataset="digits", arch="64-32-10", T=4, batch_size=32, epochs=1, lr=0.05, optimizer="sgd",
                    stream="class", n_tasks=2, limit=300, replay=20, rule="dfa", device="cpu", dtype="float64")
    run = ContinualRun(settings, out=tmp_path / "cl", progress=False)
    res = run.run()
    assert all(p.dtype == torch.float64 for p in _float_params(run.net))
    assert all(math.isfinite(a) for R in res["R"].values() for row in R for a in row)
    meta = json.loads((tmp_path / "cl" / "config.json").read_text())
    assert meta["settings"]["dtype"] == "float64" and meta["device_resolved"] == "cpu"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
class TestCUDA:
    def test_train_on_cuda_evaluate_and_resume_on_cpu(self, tmp_path, capsys):
        out = tmp_path / "run"
        cfg = TrainConfig(**SMALL, rule="dfa", device="cuda")
        trainer = Trainer(cfg, out=out, progress=False)
        history = trainer.fit()
        assert all(p.device.type == "cuda" for p in _float_params(trainer.net))
        assert math.isfinite(history[-1]["test_acc"])
        assert json.loads((out / "config.json").read_text())["device_resolved"] == "cuda"
        assert main(["eval", str(out), "--device", "cpu"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["acc"] == pytest.approx(history[-1]["test_acc"], abs=0.02)
        resumed = Trainer(TrainConfig(**{**SMALL, "epochs": 2}, rule="dfa", device="cpu"), out=out, resume=True,
                          progress=False)
        assert resumed.epoch == 1
        assert len(resumed.fit()) == 2
        assert all(p.device.type == "cpu" for p in _float_params(resumed.net))
