"""The report: figures, tables, self-contained HTML and its Markdown twin (locosnn.report)."""
import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types

import pytest

import locosnn.cost
from locosnn.cli import main
from locosnn.errors import LocosnnError
from locosnn.report import build_report, cl_metrics
from locosnn.sweep import run_sweep

SWEEP = textwrap.dedent("""
    [base]
    dataset = "synthetic"
    arch_template = "64-{width}x{depth}-10"
    T = 2
    batch_size = 100
    val_size = 100
    limit = 200
    epochs = 2
    align_every = 2
    [rules.bptt]
    lr = 3e-3
    [rules.fa]
    lr = 1e-3

    [[grid]]
    name = "depth"
    rule = ["bptt", "fa"]
    depth = [1, 2]
    width = 16

    [[grid]]
    name = "cl"
    kind = "continual"
    rule = ["bptt", "fa"]
    depth = 1
    width = 16
    stream = "split"
    n_tasks = 3

    [[grid]]
    name = "cost"
    kind = "cost"
    rule = ["bptt", "fa"]
    depth = [1, 2]
    width = 16
    T = [2, 4]
""")

FIGURES = ["accuracy_vs_epoch.png", "accuracy_vs_depth_depth.png", "continual_cl.png", "alignment.png",
           "feedback_angle.png", "cost_vs_depth.png", "cost_vs_t.png"]


def fake_run_continual(settings, out, resume=False, progress=True):
    n, fa = settings["n_tasks"], settings["rule"] == "fa"
    R = {m: [[(0.95 - (0.2 if fa else 0.1) * (i - j) - (0.1 if m == "task-agnostic" else 0)) if j <= i else 0.1
              for j in range(n)] for i in range(n)] for m in ("task-aware", "task-agnostic")}
    with open(out / "results.csv", "w") as f:
        f.write("after_task,eval_task,mode,acc\n")
        for m, M in R.items():
            for i, row in enumerate(M):
                for j, a in enumerate(row):
                    f.write(f"{i},{j},{m},{a}\n")
    (out / "matrix.json").write_text(json.dumps(R))
    return {"R": R}


def fake_measure_cell(settings):
    L = int(settings["arch"].split("x")[1].split("-")[0])
    fa = settings["rule"] == "fa"
    return {"step_time_s": 0.001 * settings["T"] * (L + 1), "update_stages": L + 1 if not fa else L + 1,
            "state_bytes": 4096 * (L + 1) * (2 if fa else 1), "forward_passes": 1}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A real sweep output directory: train cells (run), continual and cost cells (faked callees)."""
    tmp = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "locosnn.continual", types.SimpleNamespace(run_continual=fake_run_continual))
    mp.setattr(locosnn.cost, "measure_cell", fake_measure_cell, raising=False)
    try:
        cfg = tmp / "sweep.toml"
        cfg.write_text(f'out = "{tmp / "sweep"}"\n' + SWEEP)
        s = run_sweep(cfg, workers=0, echo=lambda *a: None, command=f"locosnn bench {cfg}")
        assert len(s["ran"]) == 4 + 2 + 8 and not s["errors"]
    finally:
        mp.undo()
    return tmp / "sweep"


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report"
    return build_report([results], out=out), out


def test_every_figure_is_written_and_referenced_in_html_and_md(report, results):
    res, out = report
    names = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert names == sorted(FIGURES)
    assert not [n for n in res["notes"] if "failed" in n.lower()]
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert "![" in md and f"(figures/{name})" in md
        assert f"data-file='figures/{name}'" in html
        png = (out / "figures" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and base64.b64encode(png).decode() in html  # embedded, not linked
    # self-contained: no external resources
    assert not re.search(r"""(src|href)=['"](?!data:)""", html) and "<link" not in html and "<script" not in html
    # captions carry the command and the git SHA of the data
    meta = json.loads((results / "meta.json").read_text())
    sha = meta["git_sha"][:10]
    assert html.count("locosnn bench") >= len(FIGURES) and html.count(sha) >= len(FIGURES)
    assert md.count(sha) >= len(FIGURES)
    # tables
    for title in ("Best test accuracy per rule", "Continual learning", "Cost"):
        assert f"## {title}" in md and f"<h2>{title}</h2>" in html
    assert "ACC (%)" in md and "BWT (%)" in md and "forgetting (%)" in md and "step_time_s" in md
    assert md.count("| bptt |") >= 3 and md.count("| fa |") >= 3


def test_continual_metrics_from_the_matrix():
    M = [[0.9, 0.1, 0.1], [0.7, 0.8, 0.1], [0.5, 0.6, 0.9]]
    m = cl_metrics(M)
    assert m["ACC"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert m["BWT"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    assert cl_metrics([[0.7]])["ACC"] == 0.7


def test_continual_table_values(report):
    res, out = report
    md = (out / "report.md").read_text()
    # bptt (decay 0.1 per task), task-agnostic: final row 0.65 0.75 0.85 -> ACC 75.00, BWT -15.00
    row = next(line for line in md.splitlines() if line.startswith("| cl | bptt |") and "task-agnostic" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6:9] == ["75.00", "-15.00", "15.00"]


def test_empty_and_partial_results_never_crash(tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "results.csv").write_text("")
    res = build_report([d], out=tmp_path / "r1")
    assert res["figures"] == [] and (tmp_path / "r1" / "report.html").exists()
    assert "omitted" in (tmp_path / "r1" / "report.md").read_text()
    # only cost rows, no meta.json: the other sections say why they are missing
    d2 = tmp_path / "cost"
    d2.mkdir()
    (d2 / "results.csv").write_text("grid,cell,kind,rule_name,rule,arch,depth,T,config_id,step_time_s\n"
                                    "c,a,cost,bptt,bptt,784-8x1-10,1,4,x,0.1\nc,b,cost,bptt,bptt,784-8x2-10,2,4,y,0.2\n")
    res = build_report([d2], out=tmp_path / "r2")
    assert [p.name for p in res["figures"]] == ["cost_vs_depth.png"]
    text = (tmp_path / "r2" / "report.md").read_text()
    assert "No train cells" in text and "No continual-learning cells" in text and "unknown command" in text
    with pytest.raises(LocosnnError, match="holds no results.csv"):
        build_report([tmp_path])
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_cli_report_default_out(results, capsys):
    assert main(["report", str(results)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (results / "report" / "report.html").exists() and (results / "report" / "report.md").exists()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary found (apt-get install chromium)")
def test_html_renders_in_headless_chromium(report, tmp_path):
    res, out = report
    exe = _chromium()
    url = (out / "report.html").resolve().as_uri()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=60, env=env).stdout
    imgs = re.findall(r"<img\b[^>]*>", dom)
    assert len(imgs) == len(FIGURES)
    assert all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', i) for i in imgs)
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=60, env=env)
    assert shot.exists() and shot.stat().st_size > 10_000
    import matplotlib.image as mpimg
    px = mpimg.imread(str(shot))
    assert px.shape[0] >= 2000 and px.shape[1] >= 1000
    assert float(px[..., :3].std()) > 0.05  # not blank: text and figures on the page
    # the figures are drawn: pixels far from white across the upper page
    assert float((px[:2000, :, :3].mean(axis=2) < 0.5).mean()) > 0.01


def test_continual_seeds_from_two_grids_merge_and_captions_name_each_grids_command(tmp_path):
    """Cells that differ only in seed, from different grids and invocations, are one table row
    (mean ± std over seeds); each caption names the invocation(s) that ran its rows, also for
    tables written before cells recorded their command (the per-grid fallback from meta.json)."""
    def run_continual(settings, out, resume=False, progress=True):
        s = settings.get("seed", 0)
        R = {"task-agnostic": [[0.9, 0.0], [0.9 - 0.2 * s, 0.8]]}
        (out / "matrix.json").write_text(json.dumps(R))
        return {"R": R}

    base = ('[base]\ndataset = "synthetic"\narch = "64-16-10"\nT = 2\nn_tasks = 2\nstream = "split"\n'
            '[rules.bptt]\nlr = 1e-3\n')
    text = base + ('[[grid]]\nname = "cl"\nkind = "continual"\nrule = "bptt"\n'
                   '[[grid]]\nname = "cl_seeds"\nkind = "continual"\nrule = "bptt"\nseed = [1, 2]\n')
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'out = "{tmp_path / "sw"}"\n' + text)
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "locosnn.continual", types.SimpleNamespace(run_continual=run_continual))
    try:
        run_sweep(cfg, workers=0, only=["cl"], echo=lambda *a: None, command="first-invocation")
        run_sweep(cfg, workers=0, only=["cl_seeds"], echo=lambda *a: None, command="second-invocation")
    finally:
        mp.undo()
    out = tmp_path / "rep"
    build_report([tmp_path / "sw"], out=out)
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| cl, cl_seeds | bptt |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # forgetting of seeds 0, 1, 2: 0, 20, 40 -> mean 20, std 20
    assert cells[5] == "3" and cells[8] == "20.00 ± 20.0"
    assert "first-invocation" in md and "second-invocation" in md
    # a table from before cells recorded their command: the grid's recorded run is named instead
    csv_path = tmp_path / "sw" / "results.csv"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "command": ""} for r in rows])
    build_report([tmp_path / "sw"], out=out)
    md = (out / "report.md").read_text()
    heat = [line for line in md.splitlines() if line.startswith("*Accuracy matrix (%) of grid")]
    assert len(heat) == 2
    assert "first-invocation" in heat[0] and "second-invocation" not in heat[0]
    assert "second-invocation" in heat[1] and "first-invocation" not in heat[1]


def test_report_grids_filter_keeps_only_those_grids(tmp_path):
    """--grids: the report shows only the named grids' cells; no cell of them is an error."""
    import pandas as pd

    from locosnn.errors import LocosnnError
    from locosnn.report import build_report
    d = tmp_path / "sweep"
    d.mkdir()
    rows = [dict(grid=g, cell=f"{g}_{r}", kind="train", rule_name=r, status="ok", rule=r, arch="784-500-500-10",
                 depth=None, width=None, T=8, seed=0, lr=1e-3, epochs=1, epoch=1, train_loss=1.0, train_acc=0.5,
                 val_acc=acc, test_acc=acc, config_id=f"{g}{r}", git_sha="abc")
            for g, r, acc in (("main", "dfa", 0.8), ("ablation", "dfa", 0.9))]
    pd.DataFrame(rows).to_csv(d / "results.csv", index=False)
    (d / "meta.json").write_text("{}")
    res = build_report([d], out=tmp_path / "r", grids=["main"])
    text = (tmp_path / "r" / "report.md").read_text()
    assert "80.00" in text and "90.00" not in text
    assert res["md"]
    with pytest.raises(LocosnnError):
        build_report([d], out=tmp_path / "r2", grids=["nothing"])


def _tidy(rows):
    pd = pytest.importorskip("pandas")
    cols = ["grid", "cell", "rule_name", "rule", "arch", "depth", "width", "epochs", "val_acc", "test_acc"]
    df = pd.DataFrame([dict(zip(cols, r)) for r in rows])
    df["kind"], df["epoch"], df["T"], df["limit"], df["lr"], df["rule_args"] = "train", df["epochs"], 8, 1000, 1e-3, "{}"
    df["config_id"] = df["rule_name"] + df["arch"] + df["epochs"].astype(str)
    df["git_sha"], df["command"] = "0" * 40, "locosnn bench x.toml"
    return df


def test_best_table_never_picks_a_setting_across_architectures_or_budgets():
    """A 2-layer cell with a higher validation score must not stand for the 10-layer label, nor a
    20-epoch cell for the 8-epoch one; the other depths of a depth sweep go to the depth table."""
    import pathlib
    import tempfile

    from locosnn.report import Figures, section_best, section_depth
    pd = pytest.importorskip("pandas")
    df = _tidy([
        ("d10", "a", "x", "np", "784-256x10-10", 10, 256, 8, 0.80, 0.79),
        ("d10", "b", "y", "bptt", "784-256x10-10", 10, 256, 8, 0.83, 0.82),
        ("long", "c", "x", "np", "784-256x10-10", 10, 256, 20, 0.82, 0.81),
        ("depth", "d", "x", "np", "784-256x2-10", 2, 256, 8, 0.86, 0.85),
        ("depth", "e", "x", "np", "784-256x6-10", 6, 256, 8, 0.84, 0.83),
        ("two", "f", "x", "np", "784-500-500-10", 2, 500, 6, 0.87, 0.86),
    ])
    sec = section_best(df, [], arch="784-256x10-10")
    (_, rows, _), = sec.tables
    got = {(r[0], r[2], r[4]): r[8] for r in rows}
    assert got == {("x", "784-256x10-10", "8"): "79.00", ("y", "784-256x10-10", "8"): "82.00",
                   ("x", "784-256x10-10", "20"): "81.00", ("x", "784-500-500-10", "6"): "86.00"}, got
    assert [r[2] for r in rows][:3] == ["784-256x10-10"] * 3  # the chosen architecture comes first
    # nor a cell trained on more images (a larger ``limit``) for the smaller data budget
    full = _tidy([("full", "g", "y", "bptt", "784-256x10-10", 10, 256, 8, 0.90, 0.89)])
    full["limit"], full["config_id"] = 60000, "y-full"
    sec = section_best(pd.concat([df, full], ignore_index=True), [], arch="784-256x10-10")
    (header2, rows2, _), = sec.tables
    assert header2[5] == "limit"
    got2 = {(r[0], r[4], r[5]): r[9] for r in rows2}
    assert got2[("y", "8", "1,000")] == "82.00" and got2[("y", "8", "60,000")] == "89.00", got2
    # the depth sweep joins the depth grid with the one-depth headline grid of the same budget
    with tempfile.TemporaryDirectory() as d:
        dep = section_depth(df, [], Figures(pathlib.Path(d)))
    (header, drows, _), = dep.tables
    assert header == ["rule", "D = 2", "D = 6", "D = 10"]
    assert drows == [["x", "85.00 (1)", "83.00 (1)", "79.00 (1)"], ["y", "", "", "82.00 (1)"]]


def test_depth_families_are_split_by_data_size_and_captioned_with_it():
    """Two depth sweeps that differ only in the data size are two families, each captioned with its size."""
    import pandas as pd

    from locosnn.report import _data_size, _depth_families

    rows = [dict(grid=g, depth=d, width=8, epochs=1, T=2, limit=lim, rule_name="bptt", test_acc=0.5)
            for g, lim in (("small", 200), ("full", 60000)) for d in (1, 2)]
    fams = _depth_families(pd.DataFrame(rows))
    assert len(fams) == 2
    assert sorted(_data_size(f) for f in fams) == [", limit 200 training images", ", limit 60,000 training images"]
    assert _data_size(pd.DataFrame([dict(limit=None)])) == ", every training image"
    assert _data_size(pd.DataFrame([dict(limit=1), dict(limit=2)])) == ""  # mixed: not claimed
