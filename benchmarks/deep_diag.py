"""Depth diagnostics at initialisation, 784-256x10-10 LIF on Fashion-MNIST (docs/deep.md).

1. Per-layer linear-probe accuracy and firing rate of the hidden layers for the scaled
   (Gaussian) and the identity initialisation (``locosnn.depth.probe_run``: ridge classifier
   on time-averaged spikes, fit on 5,000 training images, scored on 2,000 validation images).
2. Per-layer split-half consistency of each perturbation estimator on one batch of 128
   (``locosnn.depth.split_half_consistency``, 8 draws: the cosine between the means of two
   halves of 4 draws); 0 = the layer's estimate is noise, 1 = consistent.

    .venv/bin/python benchmarks/deep_diag.py            # -> benchmarks/deep/diag.json, diag.md
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from locosnn.data import load_dataset
from locosnn.depth import probe_run, split_half_consistency
from locosnn.encoding import encode
from locosnn.network import SpikingNetwork
from locosnn.provenance import git_sha, machine, versions
from locosnn.rules import make_rule

FROZEN = dict(temporal="frozen", antithetic=True, readout_rule="delta")
ESTIMATORS = {
    "NP, fresh noise every step (sigma 0.5)": dict(sigma=0.5),
    "frozen + antithetic, noise eligibility (sigma 0.1)": dict(FROZEN, sigma=0.1),
    "frozen + antithetic, noise eligibility (sigma 0.3)": dict(FROZEN, sigma=0.3),
    "frozen + antithetic, activity (ANP) eligibility (sigma 0.1)": dict(FROZEN, sigma=0.1, eligibility="activity"),
    "layer-sampled, frozen + antithetic (sigma 0.3)": dict(FROZEN, sigma=0.3, layer_sample=True),
    "local loss per layer, noise eligibility (sigma 0.1)": dict(FROZEN, sigma=0.1, local_loss=1),
    "local loss per layer, ANP (sigma 0.1)": dict(FROZEN, sigma=0.1, local_loss=1, eligibility="activity"),
    "local loss per 2 layers, ANP (sigma 0.1)": dict(FROZEN, sigma=0.1, local_loss=2, eligibility="activity"),
    "local loss per layer, noise eligibility, K = 4 draws (sigma 0.3)": dict(FROZEN, sigma=0.3, local_loss=1, draws=4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/deep")
    ap.add_argument("--arch", default="784-256x10-10")
    ap.add_argument("--draws", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    data = load_dataset("fashion-mnist", None, None, 0, None)
    probes = {}
    for init in ("scaled", "identity"):
        torch.manual_seed(0)
        net = SpikingNetwork(args.arch, init=init)
        probes[init] = probe_run(net, data, 8, "direct", 5000, 2000)
    torch.manual_seed(0)
    net = SpikingNetwork(args.arch, init="identity")
    x = encode(data.train.x[:128].float(), 8, "direct")
    y = data.train.y[:128]
    consistency = {name: split_half_consistency(make_rule("np", **kw), net, x, y, draws=args.draws)
                   for name, kw in ESTIMATORS.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"arch": args.arch, "probes": probes, "consistency": consistency, "draws": args.draws,
           "git_sha": git_sha(), "versions": versions(), "machine": machine(),
           "command": "python benchmarks/deep_diag.py", "seconds": round(time.time() - t0, 1)}
    (out / "diag.json").write_text(json.dumps(res, indent=1))
    L = len(probes["identity"]["probe_acc"])
    lines = ["# Depth diagnostics at initialisation", "",
             f"`{res['command']}` at {res['git_sha']}; {args.arch}, Fashion-MNIST, T = 8.", "",
             "## Linear probe of each hidden layer (validation accuracy) and its firing rate", "",
             "| init | input | " + " | ".join(f"L{i + 1}" for i in range(L)) + " |",
             "|---|---|" + "---|" * L]
    for init, p in probes.items():
        lines.append(f"| {init} probe | {p['input_probe_acc']:.3f} | " + " | ".join(f"{a:.3f}" for a in p["probe_acc"]) + " |")
        lines.append(f"| {init} rate | | " + " | ".join(f"{a:.2f}" for a in p["rate"]) + " |")
    lines += ["", f"## Split-half consistency per layer (identity init, one batch of 128, {args.draws} draws)", "",
              "| estimator | " + " | ".join(f"L{i + 1}" for i in range(L)) + " | readout |",
              "|---|" + "---|" * (L + 1)]
    for name, c in consistency.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in c) + " |")
    lines.append("")
    lines.append("The readout of the rows with `readout_rule=delta` is its exact gradient (consistency 1).")
    (out / "diag.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
