"""Every script in examples/ runs (as a user would run it, in a fresh process) on a small budget, exits
0 and prints what it promises. A new example must be registered in RUNS with its smallest settings."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: script -> (arguments for a small budget, strings its output must contain)
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "train_rule.py": (["--epochs", "2"], ["dfa on digits", "epoch 2:", "test accuracy:"]),
    "compare_rules.py": (["--rules", "bptt,dfa", "--epochs", "1"], ["same init", "bptt ", "dfa "]),
    "continual_stream.py": (["--rules", "bptt,owm", "--n-tasks", "2", "--epochs", "1"],
                            ["after \\ on", "ACC", "forgetting", "owm "]),
    "export_nir.py": ([], ["exported", "readout identical: True"]),
}


def scripts() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_every_example_is_registered():
    assert scripts(), "examples/ holds no scripts"
    assert set(scripts()) == set(RUNS), f"register these examples in RUNS: {sorted(set(scripts()) ^ set(RUNS))}"


@pytest.mark.parametrize("name", scripts())
def test_example_has_a_docstring_and_flags(name):
    tree = ast.parse((EXAMPLES / name).read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree)
    assert doc and ".venv/bin/python examples/" + name in doc, f"{name}: the module docstring should show how to run it"
    assert "argparse" in (EXAMPLES / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", scripts())
def test_example_runs(name, tmp_path):
    args, expected = RUNS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    for s in expected:
        assert s in r.stdout, f"{name}: {s!r} not in its output:\n{r.stdout[-2000:]}"
    if name == "compare_rules.py":  # every rule started from the same weights
        rows = [l for l in r.stdout.splitlines() if l.startswith(("bptt ", "dfa "))]
        assert len(rows) == 2 and all(l.split()[1] == "yes" for l in rows), r.stdout
