"""Sweeps: grid expansion, ids, resumability, engines, results.csv (locosnn.sweep)."""
import csv
import json
import sys
import textwrap
import types

import pytest

import locosnn.cost
from locosnn.cli import main
from locosnn.errors import LocosnnError
from locosnn.sweep import build_sweep, load_sweep, run_sweep

TINY = textwrap.dedent("""
    [base]
    dataset = "synthetic"
    arch_template = "64-{width}x{depth}-10"
    T = 2
    batch_size = 100
    epochs = 1
    val_size = 100
    limit = 200
    [rules.bptt]
    lr = 3e-3
    [rules.fa]
    lr = 1e-3
""")


def write(tmp_path, text, name="sweep.toml", out=True):
    p = tmp_path / name
    p.write_text((f'out = "{tmp_path / "out"}"\n' if out else "") + text)
    return p


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quiet(*a, **k):
    pass


# -- expansion ---------------------------------------------------------------------------------------
def test_grid_expansion_product_rule_overrides_shorthand_and_stable_ids(tmp_path):
    cfg = {
        "base": {"dataset": "fashion-mnist", "epochs": 6, "lr": 0.5, "rule_args": {}},
        "rules": {"bptt": {"lr": 1e-3}, "loco": {"lr": 3e-4, "rule_args": {"variant": "sample"}},
                  "loco-faithful": {"rule": "loco", "lr": 1e-3, "rule_args": {"variant": "faithful"}}},
        "grid": [
            {"name": "acc", "rule": ["bptt", "loco", "loco-faithful"], "seed": [0, 1], "T": [4, 8]},
            {"name": "depth", "rule": ["bptt", "loco"], "depth": [2, 4], "width": 256, "epochs": 3,
             "rules": {"loco": {"lr": 1e-2}}},
            {"name": "tune", "rule": "loco", "rule_args": [{"sigma": 0.05}, {"sigma": 0.5}], "lr": [1e-4, 1e-3]},
        ],
    }
    sw = build_sweep(cfg, out=tmp_path)
    by = {g: [c for c in sw.cells if c.grid == g] for g in sw.grids}
    assert len(by["acc"]) == 3 * 2 * 2 and len(by["depth"]) == 2 * 2 and len(by["tune"]) == 2 * 2
    acc = {(c.rule_name, c.settings["seed"], c.settings["T"]): c for c in by["acc"]}
    # per-rule lr beats base; a label can run another rule with its own rule_args
    assert acc[("bptt", 0, 4)].settings["lr"] == 1e-3 and acc[("loco", 1, 8)].settings["lr"] == 3e-4
    lf = acc[("loco-faithful", 0, 4)]
    assert lf.settings["rule"] == "loco" and lf.settings["rule_args"] == {"variant": "faithful"}
    # depth/width shorthand and grid-level per-rule overrides
    d = {(c.rule_name, c.depth): c for c in by["depth"]}
    assert d[("bptt", 4)].settings["arch"] == "784-256x4-10" and d[("bptt", 4)].width == 256
    assert d[("loco", 2)].settings["lr"] == 1e-2 and d[("bptt", 2)].settings["epochs"] == 3
    # axis values beat per-rule settings; rule_args merge key by key
    t = {(c.settings["rule_args"]["sigma"], c.settings["lr"]) for c in by["tune"]}
    assert t == {(0.05, 1e-4), (0.05, 1e-3), (0.5, 1e-4), (0.5, 1e-3)}
    assert all(c.settings["rule_args"]["variant"] == "sample" for c in by["tune"])
    # ids: readable, unique, stable across loads, sensitive to settings
    ids = [c.id for c in sw.cells]
    assert len(set(ids)) == len(ids)
    assert d[("loco", 4)].id.startswith("depth_loco_d4-")
    assert ids == [c.id for c in build_sweep(json.loads(json.dumps(cfg)), out=tmp_path).cells]
    cfg["rules"]["loco"]["lr"] = 2e-4
    changed = {c.id for c in build_sweep(cfg, out=tmp_path).cells}
    assert acc[("bptt", 0, 4)].id in changed and acc[("loco", 0, 4)].id not in changed
    # seeds of one setting share a config_id
    assert acc[("bptt", 0, 4)].config_id == acc[("bptt", 1, 4)].config_id != acc[("bptt", 0, 8)].config_id
    # ... also across grids, and whatever the alignment-logging interval (it changes no update)
    cfg["grid"].append({"name": "acc_logged", "rule": "bptt", "seed": 2, "T": 4, "align_every": 20})
    logged = next(c for c in build_sweep(cfg, out=tmp_path).cells if c.grid == "acc_logged")
    assert logged.config_id == acc[("bptt", 0, 4)].config_id and logged.id != acc[("bptt", 0, 4)].id


def test_toml_and_yaml_give_the_same_cells(tmp_path):
    toml = write(tmp_path, TINY + '[[grid]]\nname = "g"\nrule = ["bptt", "fa"]\ndepth = [1, 2]\nwidth = 16\n')
    yml = tmp_path / "sweep.yaml"
    yml.write_text(textwrap.dedent(f"""
        out: {tmp_path / "out"}
        base: {{dataset: synthetic, arch_template: "64-{{width}}x{{depth}}-10", T: 2, batch_size: 100, epochs: 1,
               val_size: 100, limit: 200}}
        rules: {{bptt: {{lr: 3.0e-3}}, fa: {{lr: 1e-3}}}}
        grid:
          - {{name: g, rule: [bptt, fa], depth: [1, 2], width: 16}}
    """))
    a, b = load_sweep(toml), load_sweep(yml)
    assert [c.id for c in a.cells] == [c.id for c in b.cells] and len(a.cells) == 4


@pytest.mark.parametrize("text,msg", [
    ('[base]\nrule = "bptt"\n', "no grid"),
    ('learning_rate = 1\n[[grid]]\nname = "a"\n', "unknown top-level key(s) learning_rate"),
    ('[[grid]]\nname = "a"\nlearning_rate = [1, 2]\n', "unknown config key(s): learning_rate"),
    ('[[grid]]\nname = "a"\nrule = ["bptt", "nope"]\n', "unknown rule 'nope'"),
    ('[[grid]]\nname = "a"\nrule = "loco"\nrule_args = [{ sigmaa = 1 }]\n', "has no setting sigmaa"),
    ('[[grid]]\nname = "a"\nkind = "nope"\n', "unknown kind 'nope'"),
    ('[[grid]]\nname = "a"\ndepth = [2, 3]\n', "depth and width go together"),
    ('[[grid]]\nname = "a"\ndepth = 2\nwidth = 8\narch = "784-10"\n', "sets both arch and depth"),
    ('[[grid]]\nname = "a"\nseed = []\n', "axis 'seed' is an empty list"),
    ('[[grid]]\nname = "a"\n[[grid]]\nname = "a"\n', "two grids are named 'a'"),
    ('[[grid]]\nname = "a"\nseed = [1, 1]\n', "duplicate cells"),
    ('[[grid]]\nrule = "bptt"\n', "needs a name"),
    ('[[grid]]\nname = "a"\narch = "64-x-10"\n', "bad architecture spec"),
    ('[[grid]\nname = "a"\n', "cannot be parsed"),
])
def test_bad_config_raises_a_clear_error(tmp_path, text, msg):
    with pytest.raises(LocosnnError) as e:
        load_sweep(write(tmp_path, text))
    assert msg in str(e.value)


def test_bad_config_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    code = main(["bench", str(write(tmp_path, '[[grid]]\nname = "a"\nrule = "nope"\n'))])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "unknown rule 'nope'" in err and err.count("\n") == 1
    code = main(["bench", str(tmp_path / "missing.toml")])
    assert code == 2 and "not found" in capsys.readouterr().err


# -- running -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_cell_sweep_two_workers_then_resume_after_interruption(tmp_path, capsys):
    cfg = write(tmp_path, TINY + '[[grid]]\nname = "acc"\nrule = ["bptt", "fa"]\ndepth = 1\nwidth = 16\n'
                               'align_every = 1\n')
    out = tmp_path / "out"
    # --dry-run before anything ran: all pending, nothing written
    assert main(["bench", str(cfg), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("pending") == 2 and "0 finished, 2 to run" in listing and not out.exists()

    assert main(["bench", str(cfg), "--workers", "2"]) == 0
    capsys.readouterr()
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert len(cells) == 2
    rows = read_csv(out / "results.csv")
    assert sorted(r["cell"] for r in rows) == cells  # one epoch each: one row per cell
    for r in rows:
        assert r["kind"] == "train" and r["grid"] == "acc" and r["depth"] == "1" and r["width"] == "16"
        assert r["arch"] == "64-16x1-10" and r["T"] == "2" and r["seed"] == "0" and float(r["test_acc"]) >= 0
        assert len(json.loads(r["align_cos"])) == 2 and r["status"] == "ok"
        assert r["command"] == f"locosnn bench {cfg} --workers 2"  # the invocation that ran the cell
    assert {r["rule_name"]: float(r["lr"]) for r in rows} == {"bptt": 3e-3, "fa": 1e-3}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"].startswith("locosnn bench ") and "[[grid]]" in meta["config_text"]
    assert meta["git_sha"] and meta["versions"]["torch"] and meta["machine"]["cpus"]
    assert meta["runs"][-1]["finished"] and meta["runs"][-1]["ran"] == 2
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert sorted(e["cell"] for e in log) == cells and len({e["pid"] for e in log}) >= 1

    # interruption: cell B lost its finished marker (killed before writing it)
    keep, redo = out / "cells" / cells[0], out / "cells" / cells[1]
    mtimes = {p.name: p.stat().st_mtime_ns for p in keep.iterdir()}
    (redo / "result.json").unlink()
    assert main(["bench", str(cfg), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "partial (1 epoch)" in listing and "1 finished, 1 to run" in listing
    summary = run_sweep(cfg, workers=0, echo=quiet)
    assert summary["ran"] == [cells[1]] and summary["finished_before"] == [cells[0]]
    assert {p.name: p.stat().st_mtime_ns for p in keep.iterdir()} == mtimes  # untouched
    assert (redo / "result.json").exists()
    assert sorted(r["cell"] for r in read_csv(out / "results.csv")) == cells  # no double counting
    # a third run has nothing to do
    summary = run_sweep(cfg, workers=0, echo=quiet)
    assert summary["ran"] == [] and len(summary["finished_before"]) == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


def test_interrupted_train_cell_resumes_from_its_checkpoint(tmp_path):
    from locosnn.config import TrainConfig
    from locosnn.train import Trainer

    cfg = write(tmp_path, TINY + '[[grid]]\nname = "g"\nrule = "bptt"\ndepth = 1\nwidth = 16\nepochs = 2\n')
    sw = load_sweep(cfg)
    (cell,) = sw.cells
    d = tmp_path / "out" / "cells" / cell.id
    # simulate a kill after epoch 1: the cell's own Trainer wrote epoch 1 and its checkpoint
    first = Trainer(TrainConfig.from_dict({**cell.settings, "epochs": 1}), out=d, progress=False).fit()
    summary = run_sweep(cfg, workers=0, echo=quiet)
    assert summary["ran"] == [cell.id]
    hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and hist[0]["train_loss"] == first[0]["train_loss"]  # continued, not restarted
    assert [r["epoch"] for r in read_csv(tmp_path / "out" / "results.csv")] == ["1", "2"]


def test_only_and_failed_cells_are_retried(tmp_path, monkeypatch):
    calls = []

    def measure_cell(settings):
        calls.append(settings["T"])
        if settings["T"] == 3 and len(calls) < 3:
            raise RuntimeError("flaky")
        return {"step_time_s": 0.01 * settings["T"], "update_stages": 1, "state_bytes": 100}

    monkeypatch.setattr(locosnn.cost, "measure_cell", measure_cell, raising=False)
    cfg = write(tmp_path, TINY + '[[grid]]\nname = "train"\nrule = "bptt"\ndepth = 1\nwidth = 8\n'
                               '[[grid]]\nname = "cost"\nkind = "cost"\nrule = "bptt"\ndepth = 1\nwidth = 8\n'
                               'T = [2, 3]\n')
    with pytest.raises(LocosnnError, match="no such grid"):
        run_sweep(cfg, only=["nope"], echo=quiet)
    s = run_sweep(cfg, workers=0, only=["cost"], echo=quiet)
    assert len(s["cells"]) == 2 and len(s["errors"]) == 1
    err_cell = tmp_path / "out" / "cells" / s["errors"][0]
    assert (err_cell / "error.json").exists() and not (err_cell / "result.json").exists()
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert [r["kind"] for r in rows] == ["cost"] and rows[0]["step_time_s"] == "0.02"
    s = run_sweep(cfg, workers=0, only=["cost"], echo=quiet)
    assert s["ran"] == [err_cell.name] and not s["errors"] and calls == [2, 3, 3]
    assert not (err_cell / "error.json").exists() and (err_cell / "cost.json").exists()
    assert sorted(r["T"] for r in read_csv(tmp_path / "out" / "results.csv")) == ["2", "3"]


def test_cells_recorded_only_in_results_csv_are_kept_and_rerun_with_fresh(tmp_path, monkeypatch):
    """A fresh clone has results.csv but no cell directories: those cells count as finished, their rows
    survive a run of other cells, and --fresh reruns them (replacing their rows)."""
    import shutil

    calls = []

    def measure_cell(settings):
        calls.append(settings["T"])
        return {"step_time_s": 0.01 * settings["T"] + 0.001 * len(calls), "update_stages": 1, "state_bytes": 100}

    monkeypatch.setattr(locosnn.cost, "measure_cell", measure_cell, raising=False)
    body = TINY + '[[grid]]\nname = "cost"\nkind = "cost"\nrule = "bptt"\ndepth = 1\nwidth = 8\nT = [2, 3]\n'
    cfg = write(tmp_path, body)
    run_sweep(cfg, workers=0, echo=quiet)
    before = read_csv(tmp_path / "out" / "results.csv")
    assert len(before) == 2 and calls == [2, 3]
    shutil.rmtree(tmp_path / "out" / "cells")  # what a clone of the repository holds
    lines = []
    s = run_sweep(cfg, workers=0, dry_run=True, echo=lines.append)
    assert sum(x.startswith("recorded") for x in lines) == 2 and "2 finished (2 recorded" in lines[-1]
    cfg = write(tmp_path, body.replace("T = [2, 3]", "T = [2, 3, 4]"))
    s = run_sweep(cfg, workers=0, echo=quiet)
    assert len(s["ran"]) == 1 and calls == [2, 3, 4]  # only the new cell ran
    after = read_csv(tmp_path / "out" / "results.csv")
    assert [r for r in after if r["T"] != "4"] == before  # the recorded rows survive, unchanged
    s = run_sweep(cfg, workers=0, fresh=True, echo=quiet)
    assert len(s["ran"]) == 2 and calls == [2, 3, 4, 2, 3]  # --fresh: the recorded cells rerun, T=4 is finished
    again = {r["T"]: r["step_time_s"] for r in read_csv(tmp_path / "out" / "results.csv")}
    assert again["2"] != before[0]["step_time_s"] and len(again) == 3  # rows replaced, not duplicated
    assert main(["bench", str(cfg), "--dry-run", "--fresh"]) == 0


def test_continual_cells_use_run_continual(tmp_path, monkeypatch):
    seen = []

    def run_continual(settings, out, resume=False, progress=True):
        seen.append((dict(settings), resume, progress))
        n = settings["n_tasks"]
        R = {m: [[0.9 - 0.1 * (i - j) if j <= i else 0.1 for j in range(n)] for i in range(n)]
             for m in ("task-aware", "task-agnostic")}
        with open(out / "results.csv", "w") as f:
            f.write("after_task,eval_task,mode,acc\n")
            for m, M in R.items():
                for i, row in enumerate(M):
                    for j, a in enumerate(row):
                        f.write(f"{i},{j},{m},{a}\n")
        (out / "matrix.json").write_text(json.dumps(R))
        return {"R": R, "ACC": 0.8}

    monkeypatch.setitem(sys.modules, "locosnn.continual", types.SimpleNamespace(run_continual=run_continual))
    cfg = write(tmp_path, TINY + '[[grid]]\nname = "cl"\nkind = "continual"\nrule = ["bptt", "fa"]\ndepth = 1\n'
                               'width = 8\nstream = "split"\nn_tasks = 3\nreplay = [0, 50]\n')
    s = run_sweep(cfg, workers=0, echo=quiet)
    assert len(s["ran"]) == 4 and not s["errors"]
    assert all(r is True and p is False for _, r, p in seen)
    assert {x[0]["replay"] for x in seen} == {0, 50} and all(x[0]["stream"] == "split" for x in seen)
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert len(rows) == 4 * 2 * 9 and {r["mode"] for r in rows} == {"task-aware", "task-agnostic"}
    assert {r["replay"] for r in rows} == {"0", "50"} and all(r["kind"] == "continual" for r in rows)
    res = json.loads((tmp_path / "out" / "cells" / s["ran"][0] / "result.json").read_text())
    assert res["summary"]["ACC"] == 0.8


@pytest.mark.slow
def test_ray_engine_runs_a_two_cell_sweep(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'locosnn[dist]')")
    cfg = write(tmp_path, TINY + '[[grid]]\nname = "r"\nrule = ["bptt", "fa"]\ndepth = 1\nwidth = 8\n')
    try:
        s = run_sweep(cfg, engine="ray", workers=2, threads=1, echo=quiet)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert len(s["ran"]) == 2 and not s["errors"]
    assert not ray.is_initialized()  # the engine shut down the instance it started
    rows = read_csv(tmp_path / "out" / "results.csv")
    assert sorted(r["rule_name"] for r in rows) == ["bptt", "fa"]
    pids = {json.loads((tmp_path / "out" / "cells" / c / "result.json").read_text())["pid"] for c in s["ran"]}
    import os
    assert os.getpid() not in pids  # ran in Ray workers, not in this process


def test_results_are_rewritten_reading_each_finished_cell_once(tmp_path, monkeypatch):
    """A sweep rewrites results.csv after every cell; with the run's cache each finished cell's directory is
    read once (not once per rewrite), and the file is the one a rebuild from scratch writes."""
    import locosnn.sweep as sweep_mod

    def measure_cell(settings):
        return {"step_time_s": 0.01 * settings["T"], "update_stages": 1, "state_bytes": 100}

    monkeypatch.setattr(locosnn.cost, "measure_cell", measure_cell, raising=False)
    body = TINY + '[[grid]]\nname = "cost"\nkind = "cost"\nrule = "bptt"\ndepth = 1\nwidth = 8\nT = [2, 3, 4, 5]\n'
    cfg = write(tmp_path, body)
    reads = []
    orig = sweep_mod.cell_rows
    def counting(out, c):
        rows = orig(out, c)
        if rows:  # a finished cell's directory read
            reads.append(c.id)
        return rows

    monkeypatch.setattr(sweep_mod, "cell_rows", counting)
    run_sweep(cfg, workers=0, echo=quiet)
    # without the cache the first cell's rows are read at each of the 4 rewrites after it and the last one
    assert len(set(reads)) == 4 and max(reads.count(c) for c in set(reads)) == 1
    cached = (tmp_path / "out" / "results.csv").read_text()
    sweep_mod.write_results(tmp_path / "out", load_sweep(cfg).cells)  # from scratch, no cache
    assert (tmp_path / "out" / "results.csv").read_text() == cached and len(read_csv(tmp_path / "out" / "results.csv")) == 4
