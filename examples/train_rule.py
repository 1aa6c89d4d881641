"""Train a spiking network with one learning rule and print its test accuracy.

    .venv/bin/python examples/train_rule.py                          # DFA on digits, 5 epochs: seconds
    .venv/bin/python examples/train_rule.py --rule bptt --epochs 3
    .venv/bin/python examples/train_rule.py --rule loco --rule-arg variant=faithful --rule-arg sigma=0.5
    .venv/bin/python examples/train_rule.py --dataset fashion-mnist --limit 10000 --epochs 3 --lr 1e-3

The architecture defaults to INPUTS-128-CLASSES for the chosen dataset. The same run from the
command line (which also writes a run directory you can resume and evaluate):

    locosnn train --rule dfa --dataset digits --arch 64-128-10 --epochs 5 --lr 1e-2 --out runs/digits-dfa
"""
from __future__ import annotations

import argparse
import math
import time

from locosnn import RULES, TrainConfig, Trainer, load_dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rule", default="dfa", choices=sorted(RULES), help="learning rule")
    ap.add_argument("--rule-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of the rule, repeatable (e.g. sigma=0.5)")
    ap.add_argument("--dataset", default="digits", help="registered dataset (digits, mnist-5k, fashion-mnist, ...)")
    ap.add_argument("--arch", help="architecture (default: INPUTS-128-CLASSES)")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs")
    ap.add_argument("--limit", type=int, help="use only the first N train / val / test samples")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate (Adam)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--out", help="run directory (config.json, metrics.jsonl, checkpoint.pt); default: none")
    args = ap.parse_args(argv)

    rule_args = dict(kv.split("=", 1) for kv in args.rule_arg)  # strings: TrainConfig casts them by type
    data = load_dataset(args.dataset, seed=args.seed, limit=args.limit)
    arch = args.arch or f"{math.prod(data.shape)}-128-{data.n_classes}"
    cfg = TrainConfig(rule=args.rule, rule_args=rule_args, dataset=args.dataset, arch=arch, epochs=args.epochs,
                      limit=args.limit, lr=args.lr, seed=args.seed)
    print(f"{args.rule} on {args.dataset} ({len(data.train)} training samples), {arch}, {args.epochs} epochs")
    t0 = time.perf_counter()
    history = Trainer(cfg, out=args.out, progress=False, dataset=data).fit()
    for row in history:
        print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  val acc {row['val_acc']:.3f}  "
              f"test acc {row['test_acc']:.3f}")
    print(f"test accuracy: {history[-1]['test_acc']:.4f} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
