import json
import subprocess
import sys

import pytest

from locosnn.cli import main


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv,msg", [
    (["train", "--rule", "nope", "--dataset", "synthetic"], "unknown rule 'nope'"),
    (["train", "--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["train", "--dataset", "synthetic", "--arch", "64-x-10"], "bad architecture spec"),
    (["train", "--dataset", "synthetic", "--arch", "784-10"], "input shape mismatch"),
    (["train", "--dataset", "synthetic", "--arch", "64-5"], "has 5 outputs"),
    (["train", "--dataset", "mnist"], "--data-dir"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
    (["train", "--dataset", "synthetic", "--epochs", "0"], "epochs must be >= 1"),
    (["train", "--config", "/nonexistent.toml"], "not found"),
    (["train", "--dataset", "synthetic", "--rule-arg", "oops"], "KEY=VALUE"),
    (["eval", "/nonexistent"], "no checkpoint.pt"),
])
def test_user_errors_give_one_line_and_exit_2(argv, msg, capsys, tmp_path):
    code, err = run(argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else []), capsys)
    assert code == 2
    assert msg in err and err.startswith("error: ") and err.count("\n") == 1


def test_config_file_unknown_key_and_values(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('rule = "bptt"\nlearning_rate = 0.1\n')
    code, err = run(["train", "--config", str(bad)], capsys)
    assert code == 2 and "unknown config key(s): learning_rate" in err


def test_train_from_yaml_config_then_eval(tmp_path, capsys):
    cfgf = tmp_path / "run.yaml"
    cfgf.write_text("dataset: synthetic\narch: 64-32-10\nepochs: 1\nT: 3\nval_size: 100\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfgf), "--lr", "0.003", "--out", str(out), "--no-progress"]) == 0
    assert "done:" in capsys.readouterr().out
    import json
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["lr"] == 0.003 and meta["config"]["T"] == 3  # flag overrides file
    assert main(["eval", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["epoch"] == 1 and 0 <= res["acc"] <= 1


def test_console_script_help_and_no_traceback():
    exe = [sys.executable, "-m", "locosnn.cli"]
    h = subprocess.run(exe + ["train", "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--rule" in h.stdout and "--resume" in h.stdout
    e = subprocess.run(exe + ["train", "--rule", "nope", "--dataset", "synthetic"], capture_output=True, text=True)
    assert e.returncode == 2 and "Traceback" not in e.stderr and "unknown rule" in e.stderr


def test_unknown_rule_argument_is_named(capsys, tmp_path):
    code, err = run(["train", "--dataset", "synthetic", "--rule-arg", "sigma=0.1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "rule 'bptt' has no setting sigma" in err


def test_resume_needs_only_the_run_directory(tmp_path):
    out = tmp_path / "r"
    args = ["train", "--rule", "np", "--dataset", "synthetic", "--arch", "64-16-10", "-T", "2", "--epochs", "1",
            "--val-size", "200", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["rule"] == "np"


def test_rule_arg_that_clashes_with_a_run_setting_is_a_clear_error(capsys):
    from locosnn.cli import main
    assert main(["train", "--rule", "dfa", "--dataset", "synthetic", "--rule-arg", "loss=mse", "--out", "/tmp/x-nope"]) == 2
    assert "--loss" in capsys.readouterr().err
