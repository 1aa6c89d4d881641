"""Per-layer linear probes of the trained networks of benchmarks/deep (does a rule improve
what its hidden layers carry, or only the readout?).

For every finished cell of the given grids that still has its checkpoint, the probe accuracy
(``locosnn.depth.probe_checkpoint``: ridge classifier on time-averaged spikes, fit on 5,000
training images, scored on 2,000 validation images) of every hidden layer, trained and at
initialisation.

    .venv/bin/python benchmarks/deep_probes.py [--dir benchmarks/deep] [--grids deep_d10,deep_d10_seeds]
    -> DIR/probes.json, DIR/probes.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from locosnn.depth import probe_checkpoint
from locosnn.provenance import git_sha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="benchmarks/deep")
    ap.add_argument("--grids", default="deep_d10,deep_d10_seeds,deep_d10_seeds_more")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(args.dir)
    grids = args.grids.split(",")
    rows = []
    cells = sorted((root / "cells").iterdir()) if (root / "cells").is_dir() else []
    for cell in cells:
        meta = json.loads((cell / "cell.json").read_text()) if (cell / "cell.json").exists() else {}
        if meta.get("grid") not in grids or not (cell / "result.json").exists() or not (cell / "checkpoint.pt").exists():
            continue
        res = probe_checkpoint(str(cell), at_init=True)
        seed = meta.get("settings", {}).get("seed", 0)
        rows.append({"cell": cell.name, "rule_name": meta.get("rule_name"), "seed": seed,
                     "init": res["init"]["probe_acc"], "trained": res["trained"]["probe_acc"],
                     "rate": res["trained"]["rate"]})
        print(cell.name, [round(a, 3) for a in res["trained"]["probe_acc"]], flush=True)
    if not rows:  # a fresh clone keeps results.csv, not the cells' checkpoints: keep the recorded probes
        print(f"no finished cell of {args.grids} has its checkpoint in {root}/cells: {root}/probes.json left as it "
              "is (the cells must run here first, e.g. make bench-deep FRESH=--fresh)")
        return
    (root / "probes.json").write_text(json.dumps({"git_sha": git_sha(), "rows": rows}, indent=1))
    L = len(rows[0]["trained"])
    lines = ["# Linear probes of the hidden layers, trained vs at initialisation", "",
             f"`python benchmarks/deep_probes.py --grids {args.grids}` at {git_sha()}: ridge probe on the "
             "time-averaged spikes of each hidden layer, fit on 5,000 training images, scored on 2,000 "
             "validation images.", "",
             "| rule | seed | | " + " | ".join(f"L{i + 1}" for i in range(L)) + " |", "|---|---|---|" + "---|" * L]
    for r in sorted(rows, key=lambda r: (r["rule_name"], r["seed"])):
        lines.append(f"| {r['rule_name']} | {r['seed']} | init | " + " | ".join(f"{a:.3f}" for a in r["init"]) + " |")
        lines.append("| | | trained | " + " | ".join(f"{a:.3f}" for a in r["trained"]) + " |")
    (root / "probes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
