"""Compare learning rules on the same data, the same initial weights and the same budget.

    .venv/bin/python examples/compare_rules.py                            # bptt, dfa, np, loco on digits
    .venv/bin/python examples/compare_rules.py --rules dfa,sfdfa,opzo --epochs 10
    .venv/bin/python examples/compare_rules.py --dataset fashion-mnist --limit 10000 --epochs 2 --lr 1e-3

Every rule trains a network built from the same seed (so every run starts from identical
weights, checked below) on the same loaded dataset, with one learning rate and each rule's
default settings (docs/rules.md), and the script prints one table row per rule. For a tuned
comparison with seeds, use `locosnn bench` (benchmarks/sweep.toml) and RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from locosnn import RULES, TrainConfig, Trainer, load_dataset

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rules", default="bptt,dfa,np,loco", help="comma-separated rule names")
    ap.add_argument("--dataset", default="digits", help="registered dataset")
    ap.add_argument("--arch", help="architecture (default: INPUTS-128-CLASSES)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per rule")
    ap.add_argument("--limit", type=int, help="use only the first N train / val / test samples")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate (Adam), the same for every rule")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and noise")
    args = ap.parse_args(argv)

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        ap.error(f"unknown rule(s) {', '.join(unknown)}; choose from {', '.join(sorted(RULES))}")
    data = load_dataset(args.dataset, seed=args.seed, limit=args.limit)
    arch = args.arch or f"{math.prod(data.shape)}-128-{data.n_classes}"
    print(f"{args.dataset}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test samples; "
          f"{arch}; {args.epochs} epochs; lr {args.lr:g}; seed {args.seed}")

    rows, first_weights = [], None
    for rule in rules:
        cfg = TrainConfig(rule=rule, dataset=args.dataset, arch=arch,
                          epochs=args.epochs, limit=args.limit, lr=args.lr, seed=args.seed)
        trainer = Trainer(cfg, progress=False, dataset=data)
        weights = [p.detach().clone() for p in trainer.net.parameters()]
        if first_weights is None:
            first_weights = weights
        same = all(torch.equal(a, b) for a, b in zip(first_weights, weights))
        t0 = time.perf_counter()
        history = trainer.fit()
        best = max(history, key=lambda r: r["val_acc"])
        rows.append((rule, same, history[-1]["test_acc"], best["epoch"], best["val_acc"], time.perf_counter() - t0))

    print()
    print(f"{'rule':<6} {'same init':>9} {'final test acc':>15} {'best val acc (epoch)':>21} {'time':>7}")
    for rule, same, test, ep, val, secs in rows:
        print(f"{rule:<6} {'yes' if same else 'NO':>9} {test:>15.3f} {val:>15.3f} ({ep:>2}) {secs:>6.1f}s")


if __name__ == "__main__":
    main()
