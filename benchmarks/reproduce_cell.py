"""Rerun one finished train cell of a `locosnn bench` directory from its config.json and check that
every epoch's losses and accuracies come out bit for bit the same.

    PYTHONPATH=<checkout of the cell's commit>/src python benchmarks/reproduce_cell.py benchmarks/deep/cells/<id>

Run it with the code of the commit the cell names (a `git worktree add --detach DIR <sha>` checkout):
a bit-identical rerun shows that the cell's numbers are those of that commit's code. This is how the
cells first labelled `<sha>-dirty` only because the tree they ran in held other cells' outputs were
checked before they were relabelled `<sha>` (docs/deep.md). Exit status 0 when identical, 1 when not.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("train_loss", "train_acc", "val_acc", "test_acc")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cell", help="a finished train cell's directory (holds config.json and metrics.jsonl)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the sweep's cells use 1)")
    args = ap.parse_args(argv)
    import torch

    from locosnn.config import TrainConfig
    from locosnn.train import Trainer

    torch.set_num_threads(args.threads)
    cell = Path(args.cell)
    try:
        cfg = json.loads((cell / "config.json").read_text())["config"]
        old = [json.loads(x) for x in (cell / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {cell} is not a finished train cell ({e})", file=sys.stderr)
        return 2
    new = Trainer(TrainConfig.from_dict(cfg), out=None, progress=False).fit()
    same = len(new) == len(old) and all(a[k] == b[k] for a, b in zip(new, old) for k in KEYS)
    print(f"{cell.name}: {'bit-identical' if same else 'DIFFERENT'} over {len(new)} epochs "
          f"(final test_acc {new[-1]['test_acc']} now, {old[-1]['test_acc']} recorded)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
