"""``locosnn report RESULTS...``: figures and tables from sweep output directories.

Reads ``results.csv`` and ``meta.json`` of one or more ``locosnn bench`` output directories and
writes, into ``--out`` (default ``RESULTS/report`` of the first directory):

* ``report.html``: self-contained (figures embedded as base64 PNG, inline CSS, nothing external);
* ``report.md``: the same content in Markdown, its figures linked as ``figures/*.png``;
* ``figures/*.png``.

Sections, each only when its data exists (otherwise a one-line note says why it is omitted):

* accuracy vs epoch per rule (train cells at the default arch: ``784-500-500-10`` when present,
  else the most common one; for each rule label its best setting by final validation
  accuracy, mean over seeds with a min-max band);
* final test accuracy vs depth per rule (one figure per grid whose cells vary in depth; at each
  depth the rule's best setting by validation accuracy, mean and std over seeds);
* continual learning: the accuracy matrix R[after task, eval task] as a heat map per rule and
  setting (the task-agnostic mode by default: ``--cl-mode``), and a table of ACC, BWT and
  forgetting computed from the matrices with :func:`locosnn.continual.continual_metrics`
  (ACC = mean final-row accuracy; BWT = mean over tasks but the last of R[T-1, j] - R[j, j];
  forgetting = mean over the same tasks of max_{i < T-1} R[i, j] - R[T-1, j], Chaudhry et al.
  2018), and the accuracy on the last task;
* per-layer cosine of each rule's update with the BPTT gradient over training (``align_cos``);
* cost vs depth and vs T from cost cells (step time, update stages, state bytes, ... whatever
  numbers ``measure_cell`` returned), and a cost table;
* feedback angle per layer over epochs (``rule_angle_deg``, e.g. FA's angle(B, W^T));
* a table of the best test accuracy per rule (chosen by validation accuracy, never by test).

Every figure is captioned with the command(s) and git SHA(s) that produced its data.

Two optional outputs keep a repository's results pages generated, never typed by hand:

* ``--results-md PATH`` (:func:`write_results_md`): ``report.md`` copied to PATH (e.g. the
  repository's ``RESULTS.md``) with its figure links rewritten relative to PATH and a header
  naming the command that regenerates it, the sweep config and the git SHA that produced the data;
* ``--readme-table FILE`` (:func:`update_readme_table`): the summary table (test accuracy per rule
  at the default architecture, mean ± std over seeds, :func:`summary_table`) written between the
  markers ``<!-- results-table:begin -->`` and ``<!-- results-table:end -->`` of FILE.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import LocosnnError

DEFAULT_ARCH = "784-500-500-10"
#: columns that describe a cell rather than measure it
SETTING_COLUMNS = {
    "grid", "cell", "kind", "rule_name", "status", "rule", "arch", "depth", "width", "T", "seed", "lr", "epochs",
    "dataset", "batch_size", "optimizer", "bias_step", "weight_decay", "encoder", "neuron", "beta", "theta", "surrogate", "slope",
    "readout", "init", "init_gain", "loss", "data_dir", "val_size", "limit", "align_every", "rule_args", "config_id",
    "params", "git_sha", "wall_s", "source", "stream", "n_tasks", "replay", "eval", "epoch", "after_task",
    "eval_task", "mode", "acc",
}
# the cost metrics shown first (names of locosnn.cost.measure_cell, then older / other names)
PREFERRED_COST = ("step_s", "step_peak_mb", "update_stages", "rule_state_bytes", "forward_passes",
                  "synops_per_sample", "step_time_s", "state_bytes", "peak_rss_mb", "flops")
COST_TITLES = {"step_s": "wall time of a step (s)", "step_time_s": "wall time of a step (s)",
               "step_peak_mb": "peak memory a step adds (MB)", "peak_rss_mb": "peak RSS (MB)",
               "update_stages": "sequential update stages", "rule_state_bytes": "rule state (bytes)",
               "state_bytes": "rule state (bytes)", "forward_passes": "forward passes per update",
               "synops_per_sample": "synaptic ops per sample", "dense_macs_per_sample": "dense MACs per sample"}
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}h2{font-size:1.25em;margin-top:2em;
border-bottom:1px solid #eee}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0}th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.note{color:#777;font-style:italic}code{background:#f6f6f6;padding:0 .2em}
.sources{font-size:.85em;color:#444}
"""


# -- data --------------------------------------------------------------------------------------------
@dataclass
class Source:
    path: Path
    meta: dict[str, Any]

    @property
    def command(self) -> str:
        return str(self.meta.get("command") or "unknown command")

    @property
    def commands(self) -> list[str]:
        """Every recorded sweep command that ran cells into this directory, oldest first."""
        runs = [str(r["command"]) for r in self.meta.get("runs") or [] if r.get("command") and
                (r.get("ran") or r.get("to_run"))]
        return list(dict.fromkeys(runs)) or [self.command]

    @property
    def sha(self) -> str:
        return str(self.meta.get("git_sha") or "unknown")


@dataclass
class Section:
    title: str
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    tables: list[tuple[list[str], list[list[str]], str]] = field(default_factory=list)  # header, rows, caption
    notes: list[str] = field(default_factory=list)


def _pd():
    try:
        import pandas as pd
        import matplotlib  # noqa: F401
    except ImportError:
        raise LocosnnError("locosnn report needs pandas and matplotlib: pip install 'locosnn[plot]'") from None
    return pd


def load_results(dirs: list[str | Path]):
    """(DataFrame of every row of every results.csv, [Source]); a ``source`` column indexes the list."""
    pd = _pd()
    frames, sources = [], []
    for i, d in enumerate(dirs):
        d = Path(d)
        res = d / "results.csv"
        if not d.is_dir():
            raise LocosnnError(f"{d} is not a directory (pass the output directory of `locosnn bench`)")
        if not res.exists():
            raise LocosnnError(f"{d} holds no results.csv (is it the output directory of `locosnn bench`?)")
        meta: dict[str, Any] = {}
        if (d / "meta.json").exists():
            try:
                meta = json.loads((d / "meta.json").read_text())
            except json.JSONDecodeError:
                meta = {}
        sources.append(Source(d, meta))
        try:
            df = pd.read_csv(res)
        except pd.errors.EmptyDataError:
            continue
        df["source"] = i
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(df):
        # hand-written or older tables: fill the bookkeeping columns the sections rely on
        if "kind" not in df:
            df["kind"] = "train"
        if "rule_name" not in df:
            df["rule_name"] = df["rule"] if "rule" in df else "?"
        if "cell" not in df:
            df["cell"] = [f"row{i}" for i in range(len(df))]
        if "config_id" not in df:
            df["config_id"] = df["cell"]
        for col in ("grid", "params", "arch"):
            if col not in df:
                df[col] = ""
        if "depth" not in df:
            from .network import arch_depth_width
            df["depth"] = [arch_depth_width(str(a))[0] for a in df["arch"]]
    for col in ("kind", "rule_name", "grid", "cell", "arch", "config_id", "params", "git_sha", "mode", "rule_args"):
        if col in df:
            df[col] = df[col].astype("string").fillna("")
    return df, sources


def _lists(series) -> list[Optional[list[float]]]:
    out = []
    for v in series:
        if isinstance(v, str) and v.strip().startswith("["):
            try:
                out.append([float(x) if x is not None else math.nan for x in json.loads(v)])
                continue
            except (json.JSONDecodeError, TypeError, ValueError):
                pass
        out.append(None)
    return out


def _short_sha(sha: str) -> str:
    sha = str(sha)
    return sha[:10] + ("-dirty" if sha.endswith("-dirty") else "") if sha and sha != "nan" else "unknown"


def _run_for_grid(source: Source, grid: str) -> Optional[str]:
    """The last recorded sweep command that selected ``grid`` and ran cells (tables written before
    cells recorded their own command)."""
    for run in reversed(source.meta.get("runs") or []):
        only = run.get("only")
        if (only is None or grid in only) and (run.get("ran") or run.get("to_run")):
            return str(run.get("command"))
    return None


def _commands(df, sources: list[Source]) -> list[str]:
    """The commands that produced the rows of ``df``: each cell's own ``command`` column, else the
    source's recorded run that selected the cell's grid, else the source's last command."""
    if not len(df) or "source" not in df:
        return []
    out: list[str] = []
    cols = [c for c in ("source", "grid", "command") if c in df]
    for _, r in df[cols].drop_duplicates().iterrows():
        cmd = r.get("command")
        if not isinstance(cmd, str) or not cmd:
            src = sources[int(r["source"])]
            cmd = (_run_for_grid(src, str(r["grid"])) if "grid" in r and isinstance(r["grid"], str) else None) \
                or src.command
        out.append(cmd)
    return list(dict.fromkeys(out))


def caption(df, sources: list[Source], what: str) -> str:
    """``what`` + the commands and git SHAs that produced the rows of ``df``."""
    idx = sorted({int(s) for s in df["source"].dropna()}) if "source" in df and len(df) else range(len(sources))
    cmds = _commands(df, sources) or [sources[i].command for i in idx]
    shas = sorted({_short_sha(s) for s in df["git_sha"].dropna() if str(s)}) if "git_sha" in df else []
    if not shas:
        shas = sorted({_short_sha(sources[i].sha) for i in idx})
    return f"{what} Data: {'; '.join(dict.fromkeys(cmds))} @ {', '.join(shas) or 'unknown'}."


# -- selection helpers -------------------------------------------------------------------------------
def _final(train):
    """Last epoch of each train cell."""
    return train.sort_values("epoch").groupby("cell", sort=False).tail(1)


def _score_col(final) -> str:
    for c in ("val_acc", "train_acc", "test_acc"):
        if c in final and final[c].notna().any():
            return c
    return "test_acc"


def _best_config(final) -> tuple[str, str]:
    """(config_id, score column) of the setting with the best mean final validation accuracy."""
    col = _score_col(final)
    key = "config_id" if "config_id" in final else "cell"
    means = final.groupby(key)[col].mean()
    return str(means.idxmax()) if len(means.dropna()) else str(final[key].iloc[0]), col


def _default_arch(train, prefer: Optional[str] = None) -> str:
    """The architecture of the per-rule figures and tables: ``prefer`` (``--arch``) when it has cells,
    else 784-500-500-10 when present, else the one with the most cells."""
    counts = train.groupby("arch")["cell"].nunique()
    if prefer and prefer in counts.index:
        return prefer
    if DEFAULT_ARCH in counts.index:
        return DEFAULT_ARCH
    return str(min(counts.index, key=lambda a: (-counts[a], str(a))))


def _colors(names) -> dict[str, Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    fixed = {"bptt": "k"}
    out, i = {}, 0
    for n in sorted(names):
        if n in fixed:
            out[n] = fixed[n]
        else:
            out[n] = cmap(i % 10)
            i += 1
    return out


def _label_params(params: str, drop=("rule", "seed")) -> str:
    try:
        p = json.loads(params) if params else {}
    except json.JSONDecodeError:
        return params
    return ", ".join(f"{k}={v}" for k, v in p.items() if k not in drop)


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if pct:
            return f"{100 * v:.2f}"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def _setting(row, k: str) -> str:
    v = row.get(k) if hasattr(row, "get") else None
    try:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
    except TypeError:
        pass
    if isinstance(v, float) and v.is_integer() and k not in ("lr",):
        return str(int(v))
    return _fmt(v)


class Figures:
    def __init__(self, fig_dir: Path) -> None:
        self.dir = fig_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    def new(self, n: int = 1, width: float = 4.2, height: float = 3.4, sharey: bool = False, ncols: int | None = None):
        from matplotlib.figure import Figure
        ncols = ncols or min(n, 4)
        nrows = math.ceil(n / ncols)
        fig = Figure(figsize=(width * ncols, height * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey).ravel()
        for ax in axes[n:]:
            ax.set_visible(False)
        return fig, list(axes[:n])

    @staticmethod
    def integer_x(ax) -> None:
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    def save(self, fig, name: str) -> str:
        fig.tight_layout()
        fig.savefig(self.dir / name, dpi=100)
        return name


# -- sections ------------------------------------------------------------------------------------------
def section_accuracy(df, sources, figs: Figures, arch: Optional[str] = None) -> Section:
    sec = Section("Accuracy vs epoch")
    train = df[df["kind"] == "train"] if "kind" in df else df.iloc[0:0]
    if not len(train) or "test_acc" not in train or "epoch" not in train:
        sec.notes.append("No train cells with per-epoch test accuracy: section omitted.")
        return sec
    train = train[train["test_acc"].notna()]
    arch = _default_arch(train, arch)
    sub = train[train["arch"] == arch]
    final = _final(sub)
    colors = _colors(sub["rule_name"].unique())
    fig, (ax,) = figs.new(1, width=7, height=4.5)
    used = []
    for name in sorted(sub["rule_name"].unique()):
        fin = final[final["rule_name"] == name]
        cfg, col = _best_config(fin)
        rows = sub[(sub["rule_name"] == name) & (sub["config_id"] == cfg)]
        used.append(rows)
        g = rows.groupby("epoch")["test_acc"]
        m, lo, hi = g.mean(), g.min(), g.max()
        n_seeds = rows["cell"].nunique()
        r0 = rows.iloc[0]
        ax.plot(m.index, 100 * m.values, marker="o", color=colors[name],
                label=f"{name} (lr {_setting(r0, 'lr')}, {n_seeds} seed{'s' if n_seeds > 1 else ''})")
        if n_seeds > 1:
            ax.fill_between(m.index, 100 * lo.values, 100 * hi.values, color=colors[name], alpha=0.15)
    ax.set_xlabel("epoch")
    figs.integer_x(ax)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{arch}: each rule at its best setting by validation accuracy", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    name = figs.save(fig, "accuracy_vs_epoch.png")
    pd = _pd()
    sec.figures.append((name, caption(pd.concat(used), sources,
                                      f"Test accuracy per epoch at {arch}, mean over seeds (band: min-max); "
                                      "each rule label at its best setting by final validation accuracy.")))
    return sec


def _depth_families(final) -> list[Any]:
    """Final-epoch train cells that form a depth sweep: the same width, epochs, T and data size at more
    than one depth (from any grids: a depth grid and a headline grid at one depth join)."""
    if "depth" not in final or not len(final):
        return []
    fin = final[final["depth"].notna() & final["width"].notna()] if "width" in final else final.iloc[0:0]
    keys = [k for k in ("width", "epochs", "T", "limit") if k in fin]
    fams = []
    for _, g in fin.groupby(keys, dropna=False, sort=True):
        # a family must vary depth inside some grid (one-depth grids only join a real sweep)
        if g["depth"].nunique() > 1 and any(x["depth"].nunique() > 1 for _, x in g.groupby("grid")):
            fams.append(g)
    return fams


def section_depth(df, sources, figs: Figures) -> Section:
    sec = Section("Accuracy vs depth")
    train = df[df["kind"] == "train"] if "kind" in df else df.iloc[0:0]
    if not len(train) or "depth" not in train or "test_acc" not in train:
        sec.notes.append("No train cells with a depth: section omitted.")
        return sec
    fams = _depth_families(_final(train[train["depth"].notna()]))
    if not fams:
        sec.notes.append("No grid of train cells varies the depth: section omitted.")
        return sec
    for fin in fams:
        grids = list(dict.fromkeys(str(g) for g in fin["grid"]))
        sweeps = [g for g, x in fin.groupby("grid", sort=True) if x["depth"].nunique() > 1]
        tag = _safe("_".join(sweeps))[:80]  # named after the grid(s) that sweep the depth
        colors = _colors(fin["rule_name"].unique())
        fig, (ax,) = figs.new(1, width=7, height=4.5)
        depths = sorted(int(d) for d in fin["depth"].unique())
        rows = []
        for name in sorted(fin["rule_name"].unique()):
            xs, ms, ss = [], [], []
            cells = {}
            for depth, fd in fin[fin["rule_name"] == name].groupby("depth"):
                cfg, _ = _best_config(fd)
                acc = fd[fd["config_id"] == cfg]["test_acc"]
                xs.append(int(depth))
                ms.append(100 * acc.mean())
                ss.append(100 * acc.std() if len(acc) > 1 else 0.0)
                cells[int(depth)] = f"{ms[-1]:.2f}" + (f" ± {ss[-1]:.2f}" if len(acc) > 1 else "") + f" ({len(acc)})"
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, color=colors[name], label=name)
            rows.append([name] + [cells.get(d, "") for d in depths])
        widths = sorted({int(w) for w in fin["width"].dropna()})
        ax.set_xlabel("hidden layers" + (f" (width {', '.join(map(str, widths))})" if widths else ""))
        ax.set_ylabel("final test accuracy (%)")
        figs.integer_x(ax)
        epochs = sorted({int(e) for e in fin["epoch"].dropna()})
        data = _data_size(fin)
        ax.set_title(f"{', '.join(grids)}: after {', '.join(map(str, epochs))} epoch(s){data}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fname = figs.save(fig, f"accuracy_vs_depth_{tag}.png")
        sec.figures.append((fname, caption(fin, sources, f"Final test accuracy vs number of hidden layers, grids "
                                           f"{', '.join(grids)}{data}; per depth each rule's best setting by "
                                           "validation accuracy, mean ± std over seeds.")))
        sec.tables.append((["rule"] + [f"D = {d}" for d in depths], rows,
                           caption(fin, sources, f"Final test accuracy (%) per number of hidden layers D{data}, mean "
                                   "± std over seeds (seeds in brackets); per depth each rule's best setting by "
                                   "validation accuracy.")))
    return sec


def _data_size(fin) -> str:
    """', limit N training images' / ', every training image' for a family of cells with one ``limit``, '' for
    several (a limit at or above the training set's size keeps all of it: named as the number, which says so)."""
    if "limit" not in fin:
        return ""
    lims = {str(v) for v in fin["limit"]}
    if len(lims) != 1:
        return ""
    lim = lims.pop()
    if lim in ("", "nan", "None"):
        return ", every training image"
    return f", limit {int(float(lim)):,} training images"


def _safe(s: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(s))


def _matrix(rows):
    """Accuracy matrix (list of lists, NaN where missing) from tidy continual rows of one cell/setting."""
    after = sorted(rows["after_task"].unique())
    ev = sorted(rows["eval_task"].unique())
    n = max(len(after), len(ev))
    tasks = sorted(set(after) | set(ev))
    pos = {t: i for i, t in enumerate(tasks)}
    M = [[math.nan] * n for _ in range(n)]
    for (a, e), acc in rows.groupby(["after_task", "eval_task"])["acc"].mean().items():
        M[pos[a]][pos[e]] = float(acc)
    return M


def cl_metrics(M: list[list[float]]) -> dict[str, float]:
    """ACC, BWT, forgetting (and the last task's accuracy) of an accuracy matrix M[after task][eval
    task], with the definitions of :mod:`locosnn.continual` (one definition for harness and report)."""
    from .continual import continual_metrics
    T = len(M)
    if T < 2:
        return {"ACC": _nanmean(M[T - 1]) if T else math.nan, "BWT": math.nan, "forgetting": math.nan,
                "last_task_acc": math.nan}
    m = continual_metrics(M)
    return {k: float(m[k]) for k in ("ACC", "BWT", "forgetting", "last_task_acc")}


def _nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _pick_mode(modes, want: Optional[str]) -> Optional[str]:
    modes = sorted(str(m) for m in modes)
    if want:
        return want if want in modes else None
    for m in modes:
        if "agnostic" in m:
            return m
    return modes[0] if modes else None


def section_continual(df, sources, figs: Figures, mode: Optional[str] = None, max_panels: int = 16) -> Section:
    sec = Section("Continual learning")
    cl = df[df["kind"] == "continual"] if "kind" in df else df.iloc[0:0]
    need = {"after_task", "eval_task", "acc"}
    if not len(cl) or not need <= set(cl.columns):
        sec.notes.append("No continual-learning cells: section omitted.")
        return sec
    cl = cl[cl["acc"].notna()].copy()
    if "mode" not in cl:
        cl["mode"] = "default"
    cl["mode"] = cl["mode"].astype("string").fillna("default")
    table = []
    for grid, g in cl.groupby("grid"):
        chosen = _pick_mode(g["mode"].unique(), mode)
        if chosen is None:
            sec.notes.append(f"Grid {grid}: no mode {mode!r} (modes: {', '.join(sorted(g['mode'].unique()))}).")
            continue
        keys = list(g.groupby(["rule_name", "config_id"]).groups)
        keys.sort()
        shown = keys[:max_panels]
        if len(keys) > max_panels:
            sec.notes.append(f"Grid {grid}: {len(keys)} settings, the first {max_panels} are shown as heat maps.")
        fig, axes = figs.new(len(shown), width=3.6, height=3.4)
        for ax, (name, cfg) in zip(axes, shown):
            rows = g[(g["rule_name"] == name) & (g["config_id"] == cfg) & (g["mode"] == chosen)]
            if not len(rows):
                ax.set_visible(False)
                continue
            M = _matrix(rows)
            n = len(M)
            ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
            for i in range(n):
                for j in range(n):
                    if not math.isnan(M[i][j]):
                        ax.text(j, i, f"{100 * M[i][j]:.0f}", ha="center", va="center", fontsize=7,
                                color="w" if M[i][j] < 0.6 else "k")
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xticklabels([str(i + 1) for i in range(n)], fontsize=7)
            ax.set_yticklabels([str(i + 1) for i in range(n)], fontsize=7)
            ax.set_xlabel("evaluated on task", fontsize=8)
            ax.set_ylabel("after training task", fontsize=8)
            extra = _label_params(rows["params"].iloc[0]) if "params" in rows else ""
            ax.set_title(f"{name}" + (f" ({extra})" if extra else ""), fontsize=8)
        fname = figs.save(fig, f"continual_{_safe(grid)}.png")
        sec.figures.append((fname, caption(g, sources, f"Accuracy matrix (%) of grid {grid}, mode {chosen}: row i = "
                                           "after training on task i, column j = accuracy on task j; mean over "
                                           "seeds.")))
    # one table row per setting (rule, config_id: every setting but the seed) and mode, merging
    # the grids that ran it (e.g. extra seeds in their own grid): mean ± std over seeds
    keyed = cl.assign(_order=cl["grid"].map({g: i for i, g in enumerate(dict.fromkeys(cl["grid"]))}))
    groups = sorted(keyed.groupby(["rule_name", "config_id", "mode"]), key=lambda kv: (kv[1]["_order"].min(), kv[0]))
    for (name, cfg, m), rows in groups:
        per_cell = [cl_metrics(_matrix(c)) for _, c in rows.groupby("cell")]
        stats = {}
        for k in ("ACC", "BWT", "forgetting", "last_task_acc"):
            vals = [p[k] for p in per_cell if p[k] is not None and not math.isnan(p[k])]
            stats[k] = _fmt(_nanmean(vals), True) if vals else "n/a"
            if len(vals) > 1:
                sd = (sum((v - sum(vals) / len(vals)) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                stats[k] += f" ± {100 * sd:.1f}"
        grids = ", ".join(dict.fromkeys(rows.sort_values("_order")["grid"].astype(str)))
        first = rows.sort_values("_order")
        extra = _label_params(first["params"].iloc[0]) if "params" in first else ""
        table.append([grids, str(name), extra, str(m), str(len(_matrix(rows[rows["cell"] == rows["cell"].iloc[0]]))),
                      str(len(per_cell)), stats["ACC"], stats["BWT"], stats["forgetting"], stats["last_task_acc"]])
    if table:
        sec.tables.append((["grid", "rule", "setting", "mode", "tasks", "seeds", "ACC (%)", "BWT (%)",
                            "forgetting (%)", "last task (%)"], table,
                           caption(cl, sources, "Continual-learning metrics from the accuracy matrices, "
                                   "mean ± std over seeds (cells that differ only in seed, from any grid).")))
    return sec


def _per_layer_section(df, sources, figs: Figures, col: str, title: str, ylabel: str, fname: str, what: str,
                       layer_label: Callable[[int], str], hline: Optional[float] = None,
                       arch: Optional[str] = None) -> Section:
    sec = Section(title)
    train = df[df["kind"] == "train"] if "kind" in df else df.iloc[0:0]
    if col not in train or not train[col].notna().any():
        sec.notes.append(f"No train cells logged {col}: section omitted.")
        return sec
    train = train.copy()
    train["_vals"] = _lists(train[col])
    train = train[[v is not None for v in train["_vals"]]]
    if not len(train):
        sec.notes.append(f"No readable {col} values: section omitted.")
        return sec
    arch = _default_arch(train, arch)
    sub = train[train["arch"] == arch]
    names = sorted(sub["rule_name"].unique())
    fig, axes = figs.new(len(names), width=3.6, height=3.2, sharey=True)
    used = []
    for ax, name in zip(axes, names):
        rows = sub[sub["rule_name"] == name]
        cfg, _ = _best_config(_final(rows))
        rows = rows[rows["config_id"] == cfg]
        cell = sorted(rows["cell"].unique())[0]
        rows = rows[rows["cell"] == cell].sort_values("epoch")
        used.append(rows)
        vals = list(rows["_vals"])
        for li in range(max(len(v) for v in vals)):
            ax.plot(rows["epoch"], [v[li] if li < len(v) else math.nan for v in vals], marker=".",
                    label=layer_label(li))
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.6)
        ax.set_title(f"{name} (lr {_setting(rows.iloc[0], 'lr')})", fontsize=8)
        ax.set_xlabel("epoch")
        figs.integer_x(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    figs.save(fig, fname)
    pd = _pd()
    sec.figures.append((fname, caption(pd.concat(used), sources, f"{what} At {arch}, each rule's best setting by "
                                                                 "validation accuracy, first seed.")))
    return sec


def section_alignment(df, sources, figs: Figures, arch: Optional[str] = None) -> Section:
    return _per_layer_section(df, sources, figs, "align_cos", "Alignment with BPTT",
                              "cosine(update, BPTT gradient)", "alignment.png",
                              "Per-layer cosine between each rule's update and the BPTT gradient on the same batch, "
                              "mean per epoch (align_cos).", lambda li: f"layer {li + 1}", hline=0.0, arch=arch)


def section_angle(df, sources, figs: Figures, arch: Optional[str] = None) -> Section:
    return _per_layer_section(df, sources, figs, "rule_angle_deg", "Feedback angle", "angle (degrees)",
                              "feedback_angle.png",
                              "Angle between each feedback matrix and the forward weights it stands in for, at the "
                              "end of each epoch (rule_angle_deg, entries in logged order; 90 = unrelated).",
                              lambda li: f"feedback {li + 1}", hline=90.0, arch=arch)


def _cost_metrics(cost) -> list[str]:
    import pandas.api.types as pt
    cols = [c for c in cost.columns if c not in SETTING_COLUMNS and not c.startswith("_")
            and pt.is_numeric_dtype(cost[c]) and cost[c].notna().any()]
    pref = [c for c in PREFERRED_COST if c in cols]
    return pref + [c for c in cols if c not in pref]


def section_cost(df, sources, figs: Figures) -> Section:
    sec = Section("Cost")
    cost = df[df["kind"] == "cost"] if "kind" in df else df.iloc[0:0]
    if not len(cost):
        sec.notes.append("No cost cells: section omitted.")
        return sec
    metrics = _cost_metrics(cost)
    if not metrics:
        sec.notes.append("Cost cells hold no numeric measurements: section omitted.")
        return sec
    shown = metrics[:6]
    colors = _colors(cost["rule_name"].unique())

    def mode_of(frame, col):
        vals = frame[col].dropna()
        return vals.mode().iloc[0] if len(vals) else None

    for x, fixed in (("depth", ("T", "width")), ("T", ("depth", "width"))):
        if x not in cost or cost[x].nunique() < 2:
            sec.notes.append(f"Cost cells do not vary {x}: no cost-vs-{x} figure.")
            continue
        sub = cost[cost[x].notna()]
        held = []
        for k in fixed:
            if k in sub and sub[k].notna().any():
                v = mode_of(sub, k)
                sub = sub[sub[k] == v]
                held.append(f"{k} = {int(v) if float(v).is_integer() else v}")
        fig, axes = figs.new(len(shown), width=3.8, height=3.2, ncols=min(len(shown), 3))
        for ax, m in zip(axes, shown):
            for name in sorted(sub["rule_name"].unique()):
                g = sub[sub["rule_name"] == name].groupby(x)[m].mean()
                ax.plot(g.index, g.values, marker="o", color=colors[name], label=name)
            ax.set_xlabel(x if x == "T" else "hidden layers")
            figs.integer_x(ax)
            ax.set_title(COST_TITLES.get(m, m), fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fname = figs.save(fig, f"cost_vs_{x.lower()}.png")
        sec.figures.append((fname, caption(sub, sources, f"Measured cost vs {x}" + (f" ({', '.join(held)})" if held
                                                                                     else "") +
                                           ", mean over seeds.")))
    keys = [k for k in ("rule_name", "arch", "depth", "width", "T") if k in cost]
    rows = []
    for _, g in cost.groupby(keys + ["config_id"], dropna=False, sort=True):
        r0 = g.iloc[0]
        rows.append([_setting(r0, k) for k in keys] + [str(g["cell"].nunique())] +
                    [_fmt(float(g[m].mean())) for m in metrics])
    sec.tables.append(([("rule" if k == "rule_name" else k) for k in keys] + ["seeds"] + metrics, rows,
                       caption(cost, sources, "Cost measurements, mean over seeds.")))
    return sec


def _best_row(name: str, fin) -> list[str]:
    """One row of the best-accuracy table: ``name``'s best setting among the final epochs ``fin``."""
    cfg, _ = _best_config(fin)
    g = fin[fin["config_id"] == cfg]
    r0 = g.iloc[0]
    test = g["test_acc"]
    val = g["val_acc"] if "val_acc" in g else test * math.nan
    std = f" ± {100 * test.std():.2f}" if len(test) > 1 else ""
    return [name, _setting(r0, "rule"), _setting(r0, "arch"), _setting(r0, "lr"), _setting(r0, "epochs"),
            _setting(r0, "rule_args") if _setting(r0, "rule_args") not in ("{}",) else "",
            str(len(g)), _fmt(float(val.mean()), True), f"{100 * test.mean():.2f}{std}",
            ", ".join(dict.fromkeys(str(x) for x in g["grid"]))]


def section_best(df, sources, arch: Optional[str] = None) -> Section:
    sec = Section("Best test accuracy per rule")
    train = df[df["kind"] == "train"] if "kind" in df else df.iloc[0:0]
    if not len(train) or "test_acc" not in train:
        sec.notes.append("No train cells: table omitted.")
        return sec
    final = _final(train[train["test_acc"].notna()])
    rows = []
    # one row per rule label and budget (architecture, epochs): settings are chosen within a budget,
    # never across (a 2-layer cell must not stand for a 10-layer label, nor 20 epochs for 8). The other
    # depths of a depth sweep have their own table (Accuracy vs depth).
    from .network import arch_depth_width
    default = _default_arch(final, arch)
    swept = {a for fam in _depth_families(final) for a in fam["arch"].astype(str)}
    # the data budget (``limit``: the first N training images) is part of a budget too
    unset = ("", "nan", "None")  # no limit: every training image
    keyed = final.assign(_limit=final["limit"].astype(str) if "limit" in final else "")
    budgets = [b for b in keyed[["arch", "epochs", "_limit"]].drop_duplicates().astype(str).values.tolist()
               if b[0] == default or b[0] not in swept]
    budgets.sort(key=lambda b: (b[0] != default, arch_depth_width(b[0])[0] or 0, b[0], float(b[1] or 0),
                                float(b[2]) if b[2] not in unset else float("inf")))
    several = len({b[2] for b in budgets}) > 1
    for arch, epochs, limit in budgets:
        for name in sorted(final["rule_name"].unique()):
            sel = ((keyed["rule_name"] == name) & (keyed["arch"].astype(str) == arch)
                   & (keyed["epochs"].astype(str) == epochs) & (keyed["_limit"] == limit))
            fin = final[sel]
            if len(fin):
                row = _best_row(name, fin)
                if several:
                    row.insert(5, "all" if limit in unset else f"{int(float(limit)):,}")
                rows.append(row)
    header = ["label", "rule", "arch", "lr", "epochs", "rule_args", "seeds", "val acc (%)", "test acc (%)", "grid"]
    if several:
        header.insert(5, "limit")
    if "dataset" in final and final["dataset"].nunique() > 1:  # several tasks: say which row is which
        ds = {(str(a), str(e)): str(d) for a, e, d in final[["arch", "epochs", "dataset"]].values}
        header.insert(1, "dataset")
        rows = [r[:1] + [ds.get((r[2], r[4]), "")] + r[1:] for r in rows]
    sec.tables.append((header, rows,
                       caption(final, sources, "Final-epoch accuracy of each rule label's best setting per architecture and "
                                               "epoch budget, chosen by validation accuracy (the test set never "
                                               "chooses); mean ± std over seeds.")))
    return sec


# -- rendering -----------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def render(sections: list[Section], sources: list[Source], out: Path, title: str) -> tuple[Path, Path]:
    gen = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = [f"# {title}", "", f"Generated {gen} by `locosnn report` from:", ""]
    hp = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
          f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
          f"<p class='sources'>Generated {gen} by <code>locosnn report</code> from:</p><ul class='sources'>"]
    for s in sources:
        vers = s.meta.get("versions") or {}
        mach = s.meta.get("machine") or {}
        runs = s.meta.get("runs") or [s.meta]
        when = f"{runs[0].get('started', '?')} – {runs[-1].get('finished') or '?'}"
        extra = ", ".join(f"{k} {v}" for k, v in vers.items())
        m = f"{mach.get('platform', '')}, {mach.get('cpus', '?')} CPUs" if mach else ""
        cmds = "; ".join(s.commands)
        md.append(f"- `{s.path}`: `{cmds}` @ `{_short_sha(s.sha)}` ({when}; {extra}; {m})")
        hp.append(f"<li><code>{html.escape(str(s.path))}</code>: <code>{html.escape(cmds)}</code> @ "
                  f"<code>{html.escape(_short_sha(s.sha))}</code> ({html.escape(when)}; {html.escape(extra)}; "
                  f"{html.escape(m)})</li>")
    hp.append("</ul>")
    md.append("")
    for sec in sections:
        md += [f"## {sec.title}", ""]
        hp.append(f"<h2>{html.escape(sec.title)}</h2>")
        for note in sec.notes:
            md += [f"*{note}*", ""]
            hp.append(f"<p class='note'>{html.escape(note)}</p>")
        for name, cap in sec.figures:
            data = base64.b64encode((out / "figures" / name).read_bytes()).decode()
            md += [f"![{sec.title}](figures/{name})", "", f"*{cap}*", ""]
            hp.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(name)}' "
                      f"data-file='figures/{html.escape(name)}'><figcaption>{html.escape(cap)}</figcaption></figure>")
        for header, rows, cap in sec.tables:
            md += [_md_table(header, rows), "", f"*{cap}*", ""]
            hp.append(_html_table(header, rows) + f"<p class='note'>{html.escape(cap)}</p>")
    hp.append("</body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    from .checkpoint import atomic_write_bytes
    h, m = "\n".join(hp).encode(), "\n".join(md).encode()
    atomic_write_bytes(html_path, lambda f: f.write(h))
    atomic_write_bytes(md_path, lambda f: f.write(m))
    return html_path, md_path


def build_report(results: list[str | Path], out: str | Path | None = None, cl_mode: Optional[str] = None,
                 title: str = "locosnn results", results_md: str | Path | None = None,
                 readme_table: str | Path | None = None, command: Optional[str] = None,
                 grids: Optional[list[str]] = None, arch: Optional[str] = None) -> dict[str, Any]:
    """Write report.html, report.md and figures/*.png; returns their paths and the sections' notes.

    ``grids``: only the cells of these grids (e.g. a headline comparison without its ablation).
    ``arch``: the architecture of the per-rule figures (default: 784-500-500-10 when present, else the
    most common one).

    ``results_md``: also write that file (:func:`write_results_md`); ``readme_table``: refresh the
    summary table in that file (:func:`update_readme_table`); ``command``: the command line named in
    their headers as the one that regenerates them (default: this call as ``locosnn report``)."""
    if not results:
        raise LocosnnError("give at least one sweep output directory")
    df, sources = load_results(list(results))
    if grids:  # grids that have not run yet simply contribute nothing
        df = df[df["grid"].isin(grids)] if "grid" in df else df.iloc[0:0]
        if not len(df):
            raise LocosnnError(f"--grids {', '.join(grids)}: no cells of these grids in {', '.join(map(str, results))}")
    out = Path(out) if out else Path(results[0]) / "report"
    figs = Figures(out / "figures")
    for old in figs.dir.glob("*.png"):  # a figure whose data is gone must not linger
        old.unlink()
    builders: list[tuple[str, Callable[[], Section]]] = [
        ("Best test accuracy per rule", lambda: section_best(df, sources, arch)),
        ("Accuracy vs epoch", lambda: section_accuracy(df, sources, figs, arch)),
        ("Accuracy vs depth", lambda: section_depth(df, sources, figs)),
        ("Continual learning", lambda: section_continual(df, sources, figs, cl_mode)),
        ("Alignment with BPTT", lambda: section_alignment(df, sources, figs, arch)),
        ("Feedback angle", lambda: section_angle(df, sources, figs, arch)),
        ("Cost", lambda: section_cost(df, sources, figs)),
    ]
    sections = []
    for title_, fn in builders:
        if not len(df):
            sections.append(Section(title_, notes=["No finished cells yet: section omitted."]))
            continue
        try:
            sections.append(fn())
        except Exception as e:  # a malformed column must not lose the rest of the report
            print(f"warning: report section {title_!r} failed: {type(e).__name__}: {e}", file=sys.stderr)
            sections.append(Section(title_, notes=[f"Section failed ({type(e).__name__}: {e}): omitted."]))
    html_path, md_path = render(sections, sources, out, title)
    res: dict[str, Any] = {"html": html_path, "md": md_path,
                           "figures": [out / "figures" / f for s in sections for f, _ in s.figures],
                           "notes": [n for s in sections for n in s.notes], "sections": sections}
    if command is None:
        command = report_command(results, out, cl_mode, title, results_md, readme_table, grids, arch)
    if results_md is not None:
        res["results_md"] = write_results_md(md_path, results_md, sources, command)
    if readme_table is not None:
        res["readme_table"] = update_readme_table(readme_table, df, sources, command)
    return res


# -- generated pages outside the report directory (RESULTS.md, the README's table) ---------------------
TABLE_BEGIN = "<!-- results-table:begin -->"
TABLE_END = "<!-- results-table:end -->"


def report_command(results: list[str | Path], out: str | Path | None, cl_mode: Optional[str] = None,
                   title: str = "locosnn results", results_md: str | Path | None = None,
                   readme_table: str | Path | None = None, grids: Optional[list[str]] = None,
                   arch: Optional[str] = None) -> str:
    """The ``locosnn report`` command line that makes this report (named in generated files)."""
    words = ["locosnn", "report", *map(str, results)]
    if grids:
        words += ["--grids", ",".join(grids)]
    if arch:
        words += ["--arch", arch]
    if out is not None:
        words += ["--out", str(out)]
    if cl_mode:
        words += ["--cl-mode", cl_mode]
    if title != "locosnn results":
        words += ["--title", title]
    if results_md is not None:
        words += ["--results-md", str(results_md)]
    if readme_table is not None:
        words += ["--readme-table", str(readme_table)]
    return shlex.join(words)


def make_target(command: str, makefile: str | Path = "Makefile") -> Optional[str]:
    """The target of ``makefile`` (in the current directory) whose recipe is ``command``, if any."""
    try:
        lines = Path(makefile).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    target = None
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.-]+):", line)
        if m:
            target = m.group(1)
        elif line.startswith("\t") and target and re.sub(r"^\S*/(?=locosnn )", "", line.strip()) == command:
            return target
    return None


def _regenerate(command: str) -> str:
    target = make_target(command)
    return f"`make {target}` (= `{command}`)" if target else f"`{command}`"


def _provenance(sources: list[Source]) -> str:
    """One sentence per source: its config file and the git SHA(s) of its recorded runs."""
    parts = []
    for s in sources:
        cfg = s.meta.get("config_path")
        shas = list(dict.fromkeys(_short_sha(r["git_sha"]) for r in s.meta.get("runs") or [] if r.get("git_sha")))
        shas = shas or [_short_sha(s.sha)]
        parts.append(f"`{s.path}`" + (f" (config `{cfg}`)" if cfg else "") +
                     f", last sweep run at commit `{shas[-1]}`")
    return "; ".join(parts)


def write_results_md(report_md: str | Path, dest: str | Path, sources: list[Source], command: str) -> Path:
    """Copy ``report_md`` to ``dest`` with figure links relative to ``dest`` and a generated-file header."""
    report_md, dest = Path(report_md), Path(dest)
    rel = Path(os.path.relpath(report_md.parent.resolve(), dest.parent.resolve())).as_posix()
    body = report_md.read_text(encoding="utf-8")
    body = re.sub(r"\]\(figures/", lambda m: f"]({rel}/figures/", body)
    lines = body.splitlines()
    title = lines[0] if lines and lines[0].startswith("# ") else "# Results"
    rest = lines[1:] if lines and lines[0].startswith("# ") else lines
    head = [title, "",
            "<!-- generated file: do not edit by hand; regenerate it with the command below -->",
            f"This file is generated. Regenerate it with {_regenerate(command)}. The numbers come from "
            f"{_provenance(sources)}; each table and figure caption below names the commands and git SHAs of the "
            f"cells it shows. The same content with embedded figures: "
            f"[`{rel}/report.html`]({rel}/report.html)."]
    text = "\n".join(head + rest).rstrip("\n") + "\n"
    from .checkpoint import atomic_write_bytes
    data = text.encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, lambda f: f.write(data))
    return dest


def summary_table(df, arch: str = DEFAULT_ARCH) -> tuple[list[str], list[list[str]], str]:
    """(header, rows, budget) of final test accuracy per rule label at ``arch``: each label's best
    setting by mean final validation accuracy (never test), mean ± std over seeds, best first. The
    first column is the ``--rule`` value, the second the setting (lr, rule_args) of that label."""
    train = df[(df["kind"] == "train") & (df["arch"] == arch)] if "kind" in df and len(df) else df.iloc[0:0]
    if not len(train) or "test_acc" not in train:
        return [], [], ""
    final = _final(train[train["test_acc"].notna()])
    entries = []
    for name in sorted(final["rule_name"].unique()):
        fin = final[final["rule_name"] == name]
        cfg, _ = _best_config(fin)
        g = fin[fin["config_id"] == cfg]
        r0 = g.iloc[0]
        args = _setting(r0, "rule_args")
        try:  # as --rule-arg would spell them: sigma=0.5, drop_mean=true
            args = ", ".join(f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                             for k, v in json.loads(args).items()) if args else ""
        except (json.JSONDecodeError, AttributeError):
            pass
        setting = f"lr {_sci(r0.get('lr'))}" + (f", {_setting(r0, 'optimizer')}" if _setting(r0, "optimizer")
                                                  not in ("", "adam") else "") + (f", {args}" if args else "")
        test, val = 100 * g["test_acc"], 100 * g["val_acc"] if "val_acc" in g else None
        pm = lambda x: f"{x.mean():.1f}" + (f" ± {x.std():.1f}" if len(x) > 1 else "")  # noqa: E731
        rule = _setting(r0, "rule") or name  # the --rule value (a sweep label such as loco-faithful names a setting)
        entries.append((float(test.mean()), [f"`{rule}`", setting, str(len(g)),
                                             pm(val) if val is not None else "–", pm(test)]))
    rows = [r for _, r in sorted(entries, key=lambda e: -e[0])]
    r0 = final.iloc[0]
    facts = [f"{_setting(r0, k)}" for k in ("dataset",)]
    limit, epochs, T = _setting(r0, "limit"), _setting(r0, "epochs"), _setting(r0, "T")
    budget = (f"{arch}, {facts[0]}" + (f", the first {int(limit):,} training images" if limit else "") +
              (f", {epochs} epochs" if epochs else "") + (f", T = {T}" if T else ""))
    return ["rule", "setting", "seeds", "val acc (%)", "test acc (%)"], rows, budget


def _sci(v: Any) -> str:
    """A learning rate as it is usually written: 1e-3, 3e-4, 0.05."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return ""
    if f == 0 or 1e-2 <= abs(f) < 1e3:
        return f"{f:g}"
    mant, exp = f"{f:.0e}".split("e")
    return f"{mant}e{int(exp)}" if float(f"{mant}e{exp}") == f else f"{f:g}"


def update_readme_table(path: str | Path, df, sources: list[Source], command: str) -> Path:
    """Replace the text between TABLE_BEGIN and TABLE_END in ``path`` with :func:`summary_table`."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_BEGIN) > text.index(TABLE_END):
        raise LocosnnError(f"{path} must hold the markers {TABLE_BEGIN} and {TABLE_END} once each, in that order")
    header, rows, budget = summary_table(df)
    if not rows:
        raise LocosnnError(f"no train cells at {DEFAULT_ARCH} with a test accuracy: no table for {path}")
    final = _final(df[(df["kind"] == "train") & (df["arch"] == DEFAULT_ARCH)])
    shas = sorted({_short_sha(s) for s in final["git_sha"].dropna() if str(s)}) if "git_sha" in final else []
    block = "\n".join([
        TABLE_BEGIN,
        "<!-- generated by `locosnn report --readme-table` from the sweep's results.csv: do not edit by hand -->",
        _md_table(header, rows), "",
        f"*{budget}; final-epoch accuracy; each rule at its setting chosen by validation accuracy (the test set "
        f"never chooses); mean ± std over seeds. Generated by {_regenerate(command)} from "
        f"{', '.join(f'`{s.path}/results.csv`' for s in sources)} (code at {', '.join(shas) or 'unknown'}).*",
        TABLE_END])
    a, b = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    new = text[:a] + block + text[b:]
    if new != text:
        from .checkpoint import atomic_write_bytes
        data = new.encode()
        atomic_write_bytes(path, lambda f: f.write(data))
    return path


# -- the command line ---------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="figures and tables (HTML + Markdown) from sweep results",
                       description="Build a report from one or more `locosnn bench` output directories: "
                                   "report.html (self-contained: figures embedded, no external resources), "
                                   "report.md (a Markdown twin linking figures/*.png) and figures/*.png. "
                                   "Sections: best accuracy per rule, accuracy vs epoch, accuracy vs depth, "
                                   "continual-learning accuracy matrices with ACC/BWT/forgetting, alignment with "
                                   "BPTT, feedback angles, cost vs depth and T. Sections without data are omitted "
                                   "with a note.",
                       epilog="examples:\n  locosnn report runs/sweep\n"
                              "  locosnn report runs/accuracy runs/continual --out docs/report\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="sweep output directory (holds results.csv and meta.json); several are merged")
    p.add_argument("--out", help="report directory (default: RESULTS/report of the first directory)")
    p.add_argument("--cl-mode", dest="cl_mode",
                   help="continual-learning evaluation mode shown in the heat maps (default: the task-agnostic one)")
    p.add_argument("--title", default="locosnn results", help="report title (default: %(default)s)")
    p.add_argument("--results-md", dest="results_md", metavar="PATH",
                   help="also write report.md to PATH (e.g. RESULTS.md) with figure links relative to PATH and a "
                        "header naming the command, config and git SHA behind the numbers")
    p.add_argument("--readme-table", dest="readme_table", metavar="FILE",
                   help=f"refresh the summary table (test accuracy per rule at {DEFAULT_ARCH}, mean ± std over "
                        f"seeds) between the markers {TABLE_BEGIN} and {TABLE_END} in FILE (e.g. README.md)")
    p.add_argument("--grids", metavar="G1,G2", help="only the cells of these grids (comma-separated)")
    p.add_argument("--arch", metavar="ARCH",
                   help=f"architecture of the accuracy-vs-epoch and per-layer figures and the first rows of the "
                        f"best-accuracy table (default: {DEFAULT_ARCH} when present, else the most common)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    grids = [g for g in (args.grids or "").split(",") if g] or None
    res = build_report(args.results, out=args.out, cl_mode=args.cl_mode, title=args.title,
                       results_md=getattr(args, "results_md", None), readme_table=getattr(args, "readme_table", None),
                       grids=grids, arch=args.arch)
    print(f"wrote {res['html']} and {res['md']} ({len(res['figures'])} figures)")
    for k in ("results_md", "readme_table"):
        if k in res:
            print(f"wrote {res[k]}")
    return 0
