"""BPTT reference on Fashion-MNIST: 784-500-500-10 and ten hidden layers of 500.

Regenerate: `make bench-bptt` (or `.venv/bin/python benchmarks/run_bptt.py [--epochs N] [--only NAME]`).
Writes benchmarks/bptt/<name>/{metrics.csv,metrics.jsonl,config.json}, benchmarks/bptt/summary.json
and benchmarks/bptt/bptt_fmnist.png. Checkpoints go to runs/bench-bptt/ (not committed).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from locosnn.config import TrainConfig
from locosnn.provenance import git_sha, machine, versions
from locosnn.train import Trainer

HERE = Path(__file__).resolve().parent / "bptt"
RUNS = {
    "shallow": dict(arch="784-500-500-10"),
    "deep10": dict(arch="784-500x10-10"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=list(RUNS), default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    HERE.mkdir(parents=True, exist_ok=True)
    summary_path = HERE / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name, over in RUNS.items():
        if args.only and name != args.only:
            continue
        cfg = TrainConfig(rule="bptt", dataset="fashion-mnist", epochs=args.epochs, seed=args.seed, **over)
        run_dir = Path("runs/bench-bptt") / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.time()
        hist = Trainer(cfg, out=run_dir, progress=sys.stderr.isatty()).fit()
        dest = HERE / name
        dest.mkdir(exist_ok=True)
        for f in ("metrics.jsonl", "config.json"):
            shutil.copy(run_dir / f, dest / f)
        import pandas as pd
        pd.read_json(dest / "metrics.jsonl", lines=True).to_csv(dest / "metrics.csv", index=False)
        summary[name] = {
            "command": "python benchmarks/run_bptt.py " + " ".join(sys.argv[1:]), "config": cfg.to_dict(),
            "final_test_acc": hist[-1]["test_acc"], "best_val_acc": max(h["val_acc"] for h in hist),
            "test_acc_at_best_val": max(hist, key=lambda h: h["val_acc"])["test_acc"],
            "mean_epoch_time_s": sum(h["epoch_time_s"] for h in hist) / len(hist),
            "peak_rss_mb": max(h["peak_rss_mb"] for h in hist), "wall_s": time.time() - t0,
            "git_sha": git_sha(), "versions": versions(), "machine": machine(),
        }
        summary_path.write_text(json.dumps(summary, indent=2))
        print(name, json.dumps({k: summary[name][k] for k in ("final_test_acc", "mean_epoch_time_s", "peak_rss_mb")}), flush=True)
    plot(summary)


def plot(summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in summary:
        df = pd.read_json(HERE / name / "metrics.jsonl", lines=True)
        ax.plot(df.epoch, 100 * df.test_acc, marker="o", label=f"{name} ({summary[name]['config']['arch']})")
    ax.axhline(88, color="grey", ls="--", lw=0.8, label="88% goal")
    ax.set_xlabel("epoch"); ax.set_ylabel("test accuracy (%)")
    sha = next(iter(summary.values()))["git_sha"][:10] if summary else ""
    ax.set_title(f"BPTT, LIF SNN, Fashion-MNIST (T=8)\nbenchmarks/run_bptt.py @ {sha}", fontsize=9)
    ax.legend(); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(HERE / "bptt_fmnist.png", dpi=120)


if __name__ == "__main__":
    main()
