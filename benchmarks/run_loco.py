"""NP and LOCO (and FA, DFA, OPZO) beside BPTT on Fashion-MNIST: accuracy / learning-rate sweep, depth sweep.

Regenerate (each grid resumable: a finished cell is never rerun):
    .venv/bin/python benchmarks/run_loco.py accuracy --workers 2
    .venv/bin/python benchmarks/run_loco.py tuning --workers 2
    .venv/bin/python benchmarks/run_loco.py depth --workers 2
    .venv/bin/python benchmarks/run_loco.py depth_extra --workers 2
    .venv/bin/python benchmarks/run_loco.py full --workers 2    # the BPTT reference's budget
    .venv/bin/python benchmarks/run_loco.py plot

Budget (identical for every rule, sized for a 2-core CPU; see GRIDS below):
Fashion-MNIST with --limit 20000 (the first 20,000 training images after the
5,000-image validation hold-out, the full 10,000-image test set, validation
5,000), LIF, T = 8, direct encoding, membrane readout, batch 128, Adam, seed 0.
accuracy: 784-500-500-10, 6 epochs, lr in {1e-4, 3e-4, 1e-3, 3e-3} for every rule.
tuning: NP and LOCO at lr 3e-4 with sigma 0.05 / 0.5 and the output noise site; then
faithful LOCO at sigma 0.5, LOCO with drop_mean, NP at sigma 0.5 and lr 1e-3.
depth: width 256, hidden layers {2, 4, 6, 8, 10, 12}, 3 epochs, each rule at
its best-validation (final epoch) lr and settings from the accuracy and tuning grids.
Each cell runs in its own process with one torch thread (two cells at a time on
two cores), so wall times are comparable across rules, not with 2-thread runs.

Writes benchmarks/loco/<grid>/<cell>/{metrics.jsonl,config.json},
benchmarks/loco/<grid>/results.csv (one row per cell and epoch) and meta.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "loco"
RUNS = Path("runs/bench-loco")
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
RULES = {  # name -> (rule, rule_args)
    "bptt": ("bptt", {}),
    "np": ("np", {}),
    "loco": ("loco", {"variant": "sample"}),
    "loco-faithful": ("loco", {"variant": "faithful"}),
    "fa": ("fa", {}),
    "dfa": ("dfa", {}),
    "opzo": ("opzo", {}),
    "opzo-clean": ("opzo", {"clean_reference": True}),
    "sfdfa": ("sfdfa", {}),
}
BASE = dict(dataset="fashion-mnist", limit=20000, T=8, batch_size=128, seed=0)


def accuracy_cells() -> dict[str, dict]:
    cells = {}
    for name, (rule, args) in RULES.items():
        for lr in LRS:
            cells[f"{name}_lr{lr:g}"] = dict(BASE, rule=rule, rule_args=dict(args), lr=lr, epochs=6,
                                            arch="784-500-500-10", align_every=20)
    return cells


def best_config(name: str) -> tuple[float, dict]:
    """(lr, rule_args) of the rule's cell with the best final validation accuracy in the
    accuracy and tuning grids (validation only: the test set never chooses)."""
    import pandas as pd
    best, best_val = (1e-3, dict(RULES[name][1])), -1.0
    for grid in ("accuracy", "tuning"):
        res = HERE / grid / "results.csv"
        if not res.exists():
            continue
        df = pd.read_csv(res)
        df = df[df.cell.str.startswith(name + "_")]
        for cell, g in df.groupby("cell"):
            val = float(g.sort_values("epoch").val_acc.iloc[-1])
            if val > best_val:
                cfg = json.loads((HERE / grid / cell / "config.json").read_text())["config"]
                best, best_val = (cfg["lr"], cfg["rule_args"]), val
    return best


def depth_cells() -> dict[str, dict]:
    cells = {}
    for name, (rule, _) in RULES.items():
        lr, args = best_config(name)
        for depth in (2, 4, 6, 8, 10, 12):
            cells[f"{name}_d{depth}"] = dict(BASE, rule=rule, rule_args=dict(args), lr=lr, epochs=3,
                                             arch=f"784-256x{depth}-10", align_every=40)
    return cells


def tuning_cells() -> dict[str, dict]:
    """What else we tried for the perturbation rules (784-500-500-10, lr 3e-4, same budget)."""
    cells = {}
    for name in ("np", "loco"):
        rule, args = RULES[name]
        for tag, extra in (("sigma0.05", {"sigma": 0.05}), ("sigma0.5", {"sigma": 0.5}),
                           ("siteoutput", {"site": "output"})):
            cells[f"{name}_{tag}"] = dict(BASE, rule=rule, rule_args=dict(args, **extra), lr=3e-4, epochs=6,
                                          arch="784-500-500-10", align_every=20)
    # second round, after the first showed sigma 0.5 > 0.2 and the faithful variant ahead on shuffled data
    for cell, rule_args, lr in (("loco-faithful_sigma0.5", {"variant": "faithful", "sigma": 0.5}, 1e-3),
                                ("loco_dropmean_lr0.001", {"variant": "sample", "sigma": 0.5, "drop_mean": True}, 1e-3),
                                ("loco_dropmean_lr0.0003", {"variant": "sample", "sigma": 0.5, "drop_mean": True}, 3e-4),
                                ("np_sigma0.5_lr0.001", {"sigma": 0.5}, 1e-3)):
        cells[cell] = dict(BASE, rule=rules_name(rule_args), rule_args=rule_args, lr=lr, epochs=6,
                           arch="784-500-500-10", align_every=20)
    return cells


def rules_name(rule_args: dict) -> str:
    return "loco" if "variant" in rule_args else "np"


def depth_extra_cells() -> dict[str, dict]:
    """The best shallow LOCO settings of the second tuning round, at 10 hidden layers."""
    cells = {}
    for cell, rule_args, lr in (("loco-faithful-sigma0.5_d10", {"variant": "faithful", "sigma": 0.5}, 1e-3),
                                ("loco-dropmean_d10", {"variant": "sample", "sigma": 0.5, "drop_mean": True}, 1e-3)):
        cells[cell] = dict(BASE, rule="loco", rule_args=rule_args, lr=lr, epochs=3, arch="784-256x10-10", align_every=40)
    return cells


def full_cells() -> dict[str, dict]:
    """Full training set, 10 epochs, 784-500-500-10: the BPTT reference budget (benchmarks/bptt)."""
    cells = {}
    for name in ("fa", "dfa", "opzo", "loco-faithful", "sfdfa"):
        lr, args = best_config(name)
        cells[f"{name}_full"] = dict(BASE, limit=None, rule=RULES[name][0], rule_args=dict(args), lr=lr, epochs=10,
                                     arch="784-500-500-10", align_every=50)
    cells["sal_full"] = dict(BASE, limit=None, rule="sal", rule_args={}, lr=sweep_best_lr("sal"), epochs=10,
                             arch="784-500-500-10", align_every=50)
    # on this budget the first feedback layer drifts from 19 to 35 degrees with the default phase:
    # twice the SAL steps per phase
    cells["sal-steps12k_full"] = dict(cells["sal_full"], rule_args={"sal_steps": 12000})
    return cells


def sweep_best_lr(rule: str) -> float:
    """lr of the rule's 784-500-500-10 train cell with the best final validation accuracy in the
    evidence sweep (benchmarks/sweep: SAL was tuned there, not in the accuracy grid here)."""
    import pandas as pd
    df = pd.read_csv(HERE.parent / "sweep" / "results.csv")
    df = df[(df.kind == "train") & (df.rule_name == rule) & (df.arch == "784-500-500-10") & (df.seed == 0)]
    last = df.sort_values("epoch").groupby("cell").tail(1)
    return float(last.sort_values("val_acc").lr.iloc[-1])


def recheck_cells() -> dict[str, dict]:
    """FA/DFA/OPZO at their best accuracy-grid settings, rerun after the bias-trace and
    dL/dI_out fixes (the accuracy/depth/full grids for these rules ran before them)."""
    cells = {}
    for name in ("fa", "dfa", "opzo"):
        lr, args = best_config(name)
        cells[f"{name}_lr{lr:g}"] = dict(BASE, rule=RULES[name][0], rule_args=dict(args), lr=lr, epochs=6,
                                         arch="784-500-500-10", align_every=20)
    return cells


def sfdfa_tuning_cells() -> dict[str, dict]:
    """SFDFA variants at its best accuracy-grid lr (3e-4): feedback rate, random start, no reset path."""
    cells = {}
    for tag, extra in (("etab0.001", {"eta_b": 0.001}), ("etab0.1", {"eta_b": 0.1}),
                       ("binitrandom", {"b_init": "random"}), ("ottt", {"eligibility": "ottt"})):
        cells[f"sfdfa_{tag}"] = dict(BASE, rule="sfdfa", rule_args=extra, lr=3e-4, epochs=6,
                                     arch="784-500-500-10", align_every=20)
    return cells


GRIDS = {"sfdfa_tuning": sfdfa_tuning_cells, "recheck": recheck_cells, "full": full_cells, "accuracy": accuracy_cells, "depth": depth_cells, "tuning": tuning_cells, "depth_extra": depth_extra_cells}


def run_cell(args: tuple[str, str, dict]) -> str:
    grid, cell, over = args
    import torch
    torch.set_num_threads(1)
    from locosnn.config import TrainConfig
    from locosnn.train import Trainer
    dest = HERE / grid / cell
    if (dest / "done.json").exists():
        return f"{cell}: done already"
    cfg = TrainConfig(**over)
    run_dir = RUNS / grid / cell
    t0 = time.time()
    try:
        hist = Trainer(cfg, out=run_dir, resume=True, progress=False).fit()
        status = "ok"
    except Exception as e:  # a diverged cell is a result, not a crash of the grid
        hist, status = [], f"{type(e).__name__}: {e}"
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("metrics.jsonl", "config.json"):
        if (run_dir / f).exists():
            shutil.copy(run_dir / f, dest / f)
    (dest / "done.json").write_text(json.dumps({"status": status, "wall_s": time.time() - t0, "epochs": len(hist)}))
    return f"{cell}: {status}, {hist[-1]['test_acc'] if hist else 'n/a'} in {time.time() - t0:.0f}s"


def collect(grid: str) -> None:
    import pandas as pd
    from locosnn.network import parse_arch
    rows = []
    for d in sorted((HERE / grid).glob("*/done.json")):
        cell = d.parent.name
        status = json.loads(d.read_text())["status"]
        cfgp = d.parent / "config.json"
        cfg = json.loads(cfgp.read_text())["config"] if cfgp.exists() else {}
        mp_ = d.parent / "metrics.jsonl"
        hist = pd.read_json(mp_, lines=True).to_dict("records") if mp_.exists() and mp_.stat().st_size else []
        if not hist:
            rows.append({"cell": cell, "status": status, "rule_name": cell.split("_")[0], "lr": cfg.get("lr"),
                         "arch": cfg.get("arch")})
        for h in hist:
            row = {"cell": cell, "status": status, "rule_name": cell.split("_")[0], "lr": cfg.get("lr"),
                   "arch": cfg.get("arch"), "hidden_layers": len(parse_arch(cfg["arch"])[1]) - 1}
            row.update({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in h.items()})
            rows.append(row)
    df = pd.DataFrame(rows)
    df.to_csv(HERE / grid / "results.csv", index=False)


def write_meta(grid: str, cells: dict) -> None:
    from locosnn.provenance import git_sha, machine, versions
    path = HERE / grid / "meta.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    run = {"command": "python benchmarks/run_loco.py " + " ".join(sys.argv[1:]), "git_sha": git_sha(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    meta = {**run, "versions": versions(), "machine": machine(), "torch_threads_per_cell": 1,
            "runs": old.get("runs", []) + [run], "cells": {**old.get("cells", {}), **cells}}
    path.write_text(json.dumps(meta, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", choices=[*GRIDS, "plot"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only cells whose name starts with this")
    args = ap.parse_args()
    if args.grid == "plot":
        plot()
        return
    cells = GRIDS[args.grid]()
    if args.only:
        cells = {k: v for k, v in cells.items() if k.startswith(args.only)}
    (HERE / args.grid).mkdir(parents=True, exist_ok=True)
    write_meta(args.grid, cells)
    jobs = [(args.grid, k, v) for k, v in cells.items()]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for msg in pool.imap_unordered(run_cell, jobs):
            print(msg, flush=True)
            collect(args.grid)
    collect(args.grid)
    plot()


def plot() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    colors = {"bptt": "k", "np": "tab:orange", "loco": "tab:blue", "loco-faithful": "tab:green",
              "fa": "tab:purple", "dfa": "tab:brown", "opzo": "tab:pink", "opzo-clean": "tab:olive"}
    res = HERE / "accuracy" / "results.csv"
    if res.exists():
        df = pd.read_csv(res)
        meta = json.loads((HERE / "accuracy" / "meta.json").read_text())
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, g in df.groupby("rule_name"):
            best = g.loc[g.val_acc.idxmax(), "lr"]
            for lr, gl in g.groupby("lr"):
                axes[0].plot(gl.epoch, 100 * gl.test_acc, color=colors.get(name), alpha=1.0 if lr == best else 0.25,
                             marker="o" if lr == best else None, label=f"{name} (lr {lr:g}, best val)" if lr == best else None)
            fin = g[g.epoch == g.epoch.max()]
            axes[1].plot(fin.lr, 100 * fin.test_acc, color=colors.get(name), marker="o", label=name)
        axes[0].set_xlabel("epoch"); axes[0].set_ylabel("test accuracy (%)"); axes[0].legend(fontsize=8)
        axes[0].set_title("784-500-500-10, best-val lr solid, other lrs faint", fontsize=9)
        axes[1].set_xscale("log"); axes[1].set_xlabel("learning rate (Adam)"); axes[1].set_ylabel("final test accuracy (%)")
        axes[1].legend(fontsize=8); axes[1].set_title("learning-rate sweep", fontsize=9)
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(f"Fashion-MNIST (20k train), LIF T=8 — {meta['command']} @ {meta['git_sha'][:10]}", fontsize=9)
        fig.tight_layout(); fig.savefig(HERE / "accuracy" / "accuracy.png", dpi=110)
        plt.close(fig)
        # alignment to BPTT over training, per layer, best-val lr of every rule
        names = [n for n in colors if n in set(df.rule_name)]
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), sharey=True, squeeze=False)
        for ax, name in zip(axes[0], names):
            g = df[df.rule_name == name]
            best = g.loc[g.val_acc.idxmax(), "cell"]
            gb = g[g.cell == best].sort_values("epoch")
            cos = [json.loads(c) for c in gb.align_cos]
            for li in range(len(cos[0])):
                ax.plot(gb.epoch, [c[li] for c in cos], marker=".", label=f"layer {li + 1}")
            ax.set_title(best, fontsize=8); ax.set_xlabel("epoch"); ax.grid(alpha=0.3)
            ax.axhline(0, color="grey", lw=0.6)
        axes[0][0].set_ylabel("cosine(update, BPTT gradient)"); axes[0][0].legend(fontsize=7)
        fig.suptitle("per-layer alignment of each rule's update with BPTT on the same batch (mean per epoch)", fontsize=9)
        fig.tight_layout(); fig.savefig(HERE / "accuracy" / "alignment.png", dpi=110)
        plt.close(fig)
    res = HERE / "depth" / "results.csv"
    if res.exists():
        df = pd.read_csv(res)
        meta = json.loads((HERE / "depth" / "meta.json").read_text())
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, g in df.groupby("rule_name"):
            fin = g.sort_values("epoch").groupby("hidden_layers").last().reset_index()
            ax.plot(fin.hidden_layers, 100 * fin.test_acc, color=colors.get(name), marker="o", label=name)
        ax.set_xlabel("hidden layers (width 256)"); ax.set_ylabel("test accuracy after 3 epochs (%)")
        ax.grid(alpha=0.3); ax.legend(fontsize=8)
        ax.set_title(f"depth sweep — {meta['command']} @ {meta['git_sha'][:10]}", fontsize=8)
        fig.tight_layout(); fig.savefig(HERE / "depth" / "depth.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
