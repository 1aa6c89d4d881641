"""Bad inputs and hostile conditions: each gives one clear line and a documented exit code (docs/errors.md).

Every test here failed on the code before issue 14's user-surface work."""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from locosnn.checkpoint import DirLock, load_checkpoint
from locosnn.cli import main
from locosnn.config import TrainConfig
from locosnn.errors import LocosnnError, NonFiniteError
from locosnn.rules import LearningRule
from locosnn.train import Trainer

CLI = [sys.executable, "-m", "locosnn.cli"]
TINY = ["--dataset", "synthetic", "--arch", "64-16-10", "-T", "2", "--val-size", "100", "--limit", "200",
        "--batch-size", "100"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, msg, exit_code=2):
    assert code == exit_code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert msg in err, err


def wait_for(pred, timeout=120.0, what="condition"):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def children(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_all(pids):
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def spawn(args, tmp_path, name):
    return subprocess.Popen(CLI + [str(a) for a in args], stdout=open(tmp_path / f"{name}.out", "w"),
                            stderr=open(tmp_path / f"{name}.err", "w"), start_new_session=True)


# -- bench: signals and the output-directory lock --------------------------------------------------------
LONG_SWEEP = """
out = "{out}"
[base]
dataset = "synthetic"
arch = "64-32-10"
T = 2
val_size = 100
epochs = 100000
[rules.bptt]
epochs = 1
limit = 200
[[grid]]
name = "g"
rule = {rules}
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["sigterm", "sigint", "ctrl-c"])
def test_interrupted_bench_stops_its_workers_promptly_and_keeps_finished_cells(tmp_path, sig, group):
    """Two workers, four cells: bptt finishes at once, fa and np train, dfa waits for a worker."""
    out = tmp_path / "out"
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(LONG_SWEEP.format(out=out, rules='["bptt", "fa", "np", "dfa"]'))
    p = spawn(["bench", cfg, "--workers", "2"], tmp_path, "bench")
    kids = []
    try:
        cells = lambda: sorted((out / "cells").iterdir()) if (out / "cells").is_dir() else []  # noqa: E731
        # the quick bptt cell finished and both long cells are training
        wait_for(lambda: sum((c / "result.json").exists() for c in cells()) == 1
                 and sum((c / "metrics.jsonl").exists() for c in cells()) == 3, what="cells to run")
        kids = children(p.pid)
        assert len(kids) >= 2
        t0 = time.monotonic()
        if group:  # Ctrl-C in a terminal: SIGINT to the whole foreground process group
            os.killpg(p.pid, sig)
        else:  # kill PID
            p.send_signal(sig)
        rc = p.wait(timeout=30)
        took = time.monotonic() - t0
        err = (tmp_path / "bench.err").read_text()
        assert rc == 128 + sig and "interrupted" in err and "Traceback" not in err, err
        assert took < 5.0, f"bench took {took:.1f}s to stop"
        wait_for(lambda: not any(alive(k) for k in kids), timeout=3.0, what="the workers to exit")
    finally:
        if p.poll() is None:
            p.kill()
        kill_all(kids)
    finished = [c for c in cells() if (c / "result.json").exists()]
    assert len(finished) == 1 and "bptt" in finished[0].name  # finished cells stay finished
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["status"] for e in log] == ["ok"]


def test_second_bench_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(LONG_SWEEP.format(out=out, rules='"fa"'))
    p = spawn(["bench", cfg, "--workers", "0"], tmp_path, "first")
    try:
        wait_for(lambda: any((out / "cells").glob("*/metrics.jsonl")), what="the first bench to train")
        second = subprocess.run(CLI + ["bench", str(cfg), "--workers", "0"], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr == f"error: {out} is in use by another locosnn bench (pid {p.pid}); wait for it to " \
                                "finish or choose another --out\n"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
    finally:
        if p.poll() is None:
            p.kill()
    assert not (out / ".lock").exists()
    DirLock(out, "bench").acquire().release()  # free again


def test_concurrent_train_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    p = spawn(["train", *TINY, "--epochs", "100000", "--out", out, "--no-progress"], tmp_path, "first")
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists(), what="the first train to finish an epoch")
        code, _, err = run(["train", *TINY, "--epochs", "2", "--out", out, "--resume"], capsys)
        one_error_line(code, err, f"{out} is in use by another locosnn train (pid {p.pid})")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
    finally:
        if p.poll() is None:
            p.kill()
    err = (tmp_path / "first.err").read_text()
    assert err.startswith("interrupted: the last completed epoch is in checkpoint.pt") and "Traceback" not in err
    assert not (out / ".lock").exists() and not list(out.glob("*.tmp"))
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] >= 1


# -- run directories ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_does_not_overwrite_a_continual_run_or_other_files(tmp_path, capsys):
    cl = tmp_path / "cl"
    code, _, err = run(["continual", "--dataset", "digits", "--arch", "64-16-10", "--n-tasks", "2", "-T", "2",
                        "--limit", "300", "--out", cl, "--no-progress"], capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in cl.iterdir()}
    for extra in ([], ["--resume"]):
        code, _, err = run(["train", *TINY, "--epochs", "1", "--out", cl, *extra], capsys)
        one_error_line(code, err, f"--out {cl} holds a locosnn continual run")
    assert {p.name: p.read_bytes() for p in cl.iterdir()} == before
    # and the other way round: continual refuses a train run
    tr = tmp_path / "tr"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tr), "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = run(["continual", "--dataset", "digits", "--arch", "64-16-10", "--out", tr, "--resume"], capsys)
    one_error_line(code, err, f"--out {tr} holds a locosnn train run")
    # a directory of other files
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run(["train", *TINY, "--epochs", "1", "--out", other], capsys)
    one_error_line(code, err, "is not empty and holds no locosnn train run (notes.txt)")
    assert os.listdir(other) == ["notes.txt"]


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        code, _, err = run(["train", *TINY, "--epochs", "1", "--out", out, "--resume"], capsys)
        one_error_line(code, err, f"--resume: {out} holds no checkpoint.pt to continue from")
        assert not (out / "config.json").exists()
    assert not (tmp_path / "missing").exists()
    code, _, err = run(["continual", "--dataset", "digits", "--arch", "64-10", "--out", tmp_path / "c", "--resume"],
                       capsys)
    one_error_line(code, err, "holds no checkpoint.pt")


def test_out_that_is_a_file_is_one_error_line(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for argv in (["train", *TINY, "--out", f], ["continual", "--dataset", "digits", "--arch", "64-10", "--out", f]):
        code, _, err = run(argv, capsys)
        one_error_line(code, err, f"--out {f} is an existing file, not a directory")
    cfg = tmp_path / "s.toml"
    cfg.write_text(LONG_SWEEP.format(out=f, rules='"fa"'))
    code, _, err = run(["bench", cfg], capsys)
    one_error_line(code, err, "is an existing file, not a directory")
    assert f.read_text() == "x"


# -- non-finite weights and unbounded losses ---------------------------------------------------------------
class OverflowRule(LearningRule):
    """Zero updates, except a finite but huge one at step ``at``: with lr 10 the weight overflows to -inf
    while the loss and the gradient it saw were finite."""

    name = "overflow"

    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at, self.calls = at, 0

    def step(self, network, x_seq, y):
        self.calls += 1
        tr = network.run(x_seq)
        for p in network.parameters():
            p.grad = torch.zeros_like(p)
        if self.calls == self.at:
            network.layers[1].weight.grad[0, 0] = 3e38
        return {"loss": float(self.loss_fn(tr.out, y).mean()), "out": tr.out}


def test_overflowing_weights_stop_before_they_are_evaluated_or_checkpointed(tmp_path):
    cfg = TrainConfig(rule="overflow", dataset="synthetic", arch="64-32-10", T=2, batch_size=100, epochs=2,
                      val_size=200, lr=10.0, optimizer="sgd")
    tr = Trainer(cfg, out=tmp_path / "r", progress=False, rule=OverflowRule(at=28))  # 14 steps an epoch: the last
    with pytest.raises(NonFiniteError, match=r"non-finite weights in layer 1 \(weight\) after the update at "
                                             r"epoch 2, step 13"):
        tr.fit()
    st = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert st["epoch"] == 1 and all(torch.isfinite(v).all() for v in st["model"].values())
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_unbounded_loss_gets_a_warning_line(tmp_path, capsys):
    code, out, err = run(["train", *TINY, "--epochs", "2", "--lr", "1e6", "--out", tmp_path / "r",
                          "--no-progress"], capsys)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and "train loss" in warnings[0] and "lower --lr" in warnings[0], err
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2  # not stopped


# -- corrupt files: one error line, exit 2 ------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not-a-dict"])
def test_a_corrupt_checkpoint_is_one_error_line_for_eval_and_resume(finished_run, tmp_path, capsys, damage):
    import shutil
    run_dir = tmp_path / "r"
    shutil.copytree(finished_run, run_dir)
    ck = run_dir / "checkpoint.pt"
    data = ck.read_bytes()
    if damage == "garbage":
        ck.write_bytes(b"\x80\x04this is not a checkpoint" * 10)
    elif damage == "truncated":
        ck.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ck.write_bytes(b"")
    else:
        torch.save([1, 2, 3], ck)
    capsys.readouterr()
    code, _, err = run(["eval", run_dir], capsys)
    one_error_line(code, err, f"checkpoint {ck}")
    code, _, err = run(["train", "--out", run_dir, "--resume", "--epochs", "2", "--no-progress"], capsys)
    one_error_line(code, err, f"checkpoint {ck}")
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.parametrize("name,content,msg", [
    ("bin.toml", b"\xff\xfe\x00garbage\x00", "is not a text file"),
    ("empty.toml", b"", "is empty"),
    ("comments.yaml", b"# nothing\n", "is empty"),
    ("list.yaml", b"- a\n- b\n", "must hold a table of settings"),
    ("bad.toml", b"epochs = [\n", "cannot be parsed"),
    ("ten.toml", b'epochs = "ten"\n', "epochs must be an integer, got 'ten'"),
    ("half.toml", b"epochs = 2.5\n", "epochs must be an integer, got 2.5"),
    ("lr.yaml", b"lr: fast\n", "lr must be a number, got 'fast'"),
    ("ruleargs.toml", b"rule_args = 3\n", "rule_args must be a table"),
    ("arch.toml", b"arch = 784\n", "arch must be a string, got 784"),
])
def test_a_bad_config_file_is_one_error_line(tmp_path, capsys, name, content, msg):
    f = tmp_path / name
    f.write_bytes(content)
    for cmd in ("train", "continual"):
        code, _, err = run([cmd, "--config", f, "--out", tmp_path / "o"], capsys)
        one_error_line(code, err, msg)
    assert not (tmp_path / "o").exists()


def test_a_bad_sweep_config_file_is_one_error_line(tmp_path, capsys):
    for name, content, msg in [("bin.toml", b"\xff\xfe\x00", "is not a text file"), ("e.toml", b"", "is empty")]:
        (tmp_path / name).write_bytes(content)
        code, _, err = run(["bench", tmp_path / name], capsys)
        one_error_line(code, err, f"sweep config {tmp_path / name} {msg}")


def _idx_dir(tmp_path, damage):
    d = tmp_path / "idx"
    d.mkdir()
    imgs = bytes([0, 0, 8, 3]) + struct.pack(">III", 20, 8, 8) + bytes(20 * 64)
    labs = bytes([0, 0, 8, 1]) + struct.pack(">I", 20) + bytes(range(10)) * 2
    for split in ("train", "t10k"):
        (d / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(imgs))
        (d / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labs))
    target = d / "train-images-idx3-ubyte.gz"
    if damage == "not-gzip":
        target.write_bytes(b"this is not gzip data at all")
    elif damage == "truncated-gzip":
        target.write_bytes(gzip.compress(imgs)[:15])
    elif damage == "bad-ndim":
        target.write_bytes(gzip.compress(bytes([0, 0, 8, 200]) + bytes(12)))
    elif damage == "ragged":
        target.write_bytes(gzip.compress(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + bytes(7)))
    return d


@pytest.mark.parametrize("damage,msg", [("not-gzip", "corrupt or truncated gzip file"),
                                        ("truncated-gzip", "corrupt or truncated gzip file"),
                                        ("bad-ndim", "bad header"), ("ragged", "truncated or corrupt")])
def test_a_corrupt_data_file_is_one_error_line(tmp_path, capsys, damage, msg):
    d = _idx_dir(tmp_path, damage)
    code, _, err = run(["train", "--dataset", "mnist", "--data-dir", d, "--arch", "64-10", "--out", tmp_path / "o"],
                       capsys)
    one_error_line(code, err, msg)
    assert "train-images-idx3-ubyte.gz" in err


def test_eval_of_a_continual_run_is_one_error_line(tmp_path, capsys):
    cl = tmp_path / "cl"
    assert main(["continual", "--dataset", "digits", "--arch", "64-16-10", "--n-tasks", "2", "-T", "2",
                 "--limit", "300", "--out", str(cl), "--no-progress"]) == 0
    capsys.readouterr()
    code, _, err = run(["eval", cl], capsys)
    one_error_line(code, err, "holds a continual run")


# -- values: cast and checked the same way from every source -----------------------------------------------
@pytest.mark.parametrize("flags,msg", [
    (["--lr", "nan"], "lr must be a finite number, got 'nan'"),
    (["--lr", "inf"], "lr must be a finite number, got 'inf'"),
    (["--lr", "0"], "lr must be > 0, got 0.0"),
    (["--lr=-1e-3"], "lr must be > 0"),
    (["--seed", "-1"], "seed must be in [0, 2^32), got -1"),
    (["--init-gain", "0"], "init_gain must be > 0"),
    (["--theta", "-1"], "theta must be > 0"),
    (["--limit", "0"], "limit must be >= 1"),
    (["--limit", "-5"], "limit must be >= 1"),
    (["--epochs", "2.5"], "epochs must be an integer, got '2.5'"),
    (["--batch-size", "many"], "batch_size must be an integer, got 'many'"),
    (["--beta", "1.5"], "beta must be in [0, 1]"),
    (["--val-size", "-3"], "val_size must be >= 0"),
    (["--arch", "64--10"], "bad architecture spec '64--10': an empty layer"),
    (["--arch", "64-10-"], "bad architecture spec '64-10-': an empty layer"),
    (["--rule", "loco", "--rule-arg", "k=-1"], "rule 'loco' setting k must be >= 0, got -1"),
    (["--rule", "loco", "--rule-arg", "rank=abc"], "rule 'loco' setting rank must be an integer, got 'abc'"),
    (["--rule", "np", "--rule-arg", "sigma=-1"], "rule 'np' setting sigma must be > 0, got -1.0"),
    (["--rule", "np", "--rule-arg", "online=maybe"], "rule 'np' setting online must be a boolean"),
])
def test_bad_values_are_one_error_line(tmp_path, capsys, flags, msg):
    code, _, err = run(["train", "--dataset", "synthetic", "--arch", "64-16-10", *flags, "--out", tmp_path / "o"],
                       capsys)
    one_error_line(code, err, msg)
    assert not (tmp_path / "o").exists()


def test_false_rule_args_are_false_and_yaml_numbers_are_numbers(tmp_path, capsys):
    cfgf = tmp_path / "run.yaml"
    cfgf.write_text("lr: 1e-3\nepochs: 1\nrule_args:\n  online: 'no'\n")
    out = tmp_path / "r"
    code, _, err = run(["train", "--config", cfgf, *TINY, "--rule", "loco", "--rule-arg", "projection=False",
                        "--rule-arg", "drop_mean=on", "--rule-arg", "rank=8", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    c = json.loads((out / "config.json").read_text())["config"]
    assert c["lr"] == 0.001 and c["rule_args"] == {"online": False, "projection": False, "drop_mean": True, "rank": 8}
    st = load_checkpoint(out / "checkpoint.pt")
    assert st["config"]["rule_args"]["projection"] is False
    cfg = TrainConfig(rule="np", rule_args={"online": "False", "concat": "0", "sigma": "0.5"}).validate()
    assert cfg.rule_args == {"online": False, "concat": False, "sigma": 0.5}
    for word, want in [("yes", True), ("off", False), ("TRUE", True), ("1", True), (0, False)]:
        assert TrainConfig(rule="np", rule_args={"online": word}).validate().rule_args["online"] is want
    with pytest.raises(LocosnnError, match="epochs must be an integer"):
        TrainConfig(epochs=True).validate()


# -- help and progress ---------------------------------------------------------------------------------------
def test_train_help_shows_each_default_once():
    h = subprocess.run(CLI + ["train", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert h.returncode == 0
    assert "(default: None)" not in h.stdout and "default: ==SUPPRESS==" not in h.stdout
    options = [line for line in h.stdout.splitlines() if line.lstrip().startswith("-")]
    assert len(options) > 20
    for line in options:
        assert line.count("default") <= 1, line
    assert "(default: 0.001)" in h.stdout and "(default: bptt)" in h.stdout


@pytest.mark.slow
def test_no_progress_prints_one_line_per_epoch(tmp_path):
    r = subprocess.run(CLI + ["train", *TINY, "--epochs", "3", "--out", str(tmp_path / "r"), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [x.split(":")[0] for x in lines] == ["epoch 1", "epoch 2", "epoch 3", "done"]
    assert "it/s" not in r.stderr and "\r" not in r.stdout + r.stderr


def test_version_flag():
    import locosnn
    v = subprocess.run(CLI + ["--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.strip() == f"locosnn {locosnn.__version__}"
    assert (Path(locosnn.__file__).parent / "py.typed").exists()
