"""Learn a class-incremental task stream and print the accuracy matrix, ACC, BWT and forgetting.

    .venv/bin/python examples/continual_stream.py                     # BPTT fine-tuning vs OWM on digits
    .venv/bin/python examples/continual_stream.py --rules bptt,loco --replay 100
    .venv/bin/python examples/continual_stream.py --dataset fashion-mnist --limit 10000 --lr 1e-3 --epochs 1

The digits (or any registered dataset) are cut into --n-tasks tasks of disjoint classes
({0,1}, {2,3}, ...), learned one after the other by one network, one rule and one optimiser
(rule state such as LOCO's cluster memory carries over task boundaries). After each task the
network is tested on every task with the argmax over all outputs (task-agnostic), which fills
one row of R[i][j] = accuracy on task j after training task i. This uses the library's
continual API (:func:`locosnn.run_continual`); the command-line equivalent is

    locosnn continual --rule loco --rule-arg variant=faithful --rule-arg sigma=0.5 --dataset digits \\
        --arch 64-128-10 --stream class --n-tasks 5 --epochs 2 --batch-size 32 --lr 1e-2 --out runs/cl-loco

which also writes matrix.json and a tidy results.csv and resumes after the last finished task.
OWM needs plain SGD (set here automatically, lr 0.05). LOCO runs as the authors' variant at
sigma 0.5 here (`--rules loco`); its continual results on Fashion-MNIST are in RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import time

from locosnn import RULES, load_dataset, run_continual

#: rule settings used here (LOCO: the authors' variant, the noise level of docs/rules.md)
DEFAULT_ARGS = {"np": {"sigma": 0.5}, "loco": {"sigma": 0.5, "variant": "faithful"}}


def format_matrix(R: list[list[float]]) -> str:
    lines = ["  after \\ on " + " ".join(f"{'T' + str(j + 1):>6}" for j in range(len(R[0])))]
    for i, row in enumerate(R):
        lines.append(f"{'T' + str(i + 1):>13} " + " ".join(f"{100 * a:6.1f}" for a in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rules", default="bptt,owm", help="comma-separated rule names, each run on the same stream")
    ap.add_argument("--dataset", default="digits", help="registered dataset")
    ap.add_argument("--arch", help="architecture (default: INPUTS-128-CLASSES)")
    ap.add_argument("--n-tasks", type=int, default=5, help="tasks in the stream")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per task")
    ap.add_argument("--limit", type=int, help="use only the first N train / val / test samples")
    ap.add_argument("--batch-size", type=int, default=32, help="mini-batch size")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate (Adam; OWM: SGD at 0.05)")
    ap.add_argument("--replay", type=int, default=0, help="class-balanced replay buffer size in samples (0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    args = ap.parse_args(argv)

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        ap.error(f"unknown rule(s) {', '.join(unknown)}; choose from {', '.join(sorted(RULES))}")
    data = load_dataset(args.dataset, seed=args.seed, limit=args.limit)
    arch = args.arch or f"{math.prod(data.shape)}-128-{data.n_classes}"
    summary = []
    for rule in rules:
        settings = dict(rule=rule, rule_args=dict(DEFAULT_ARGS.get(rule, {})), dataset=args.dataset, arch=arch,
                        epochs=args.epochs, limit=args.limit, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, stream="class", n_tasks=args.n_tasks, replay=args.replay, eval="agnostic")
        if rule == "owm":
            settings.update(optimizer="sgd", lr=0.05)
        t0 = time.perf_counter()
        res = run_continual(settings, progress=False, dataset=data)
        secs = time.perf_counter() - t0
        print(f"\n{rule}: task-agnostic accuracy (%) after training task i (rows) on task j (columns)")
        print(format_matrix(res["R"]["task-agnostic"]))
        summary.append((rule, res["ACC"], res["BWT"], res["forgetting"], res["last_task_acc"], secs))

    print(f"\n{args.dataset}, {args.n_tasks} tasks, {args.epochs} epoch(s) per task, replay {args.replay}")
    print(f"{'rule':<6} {'ACC':>6} {'BWT':>7} {'forgetting':>11} {'last task':>10} {'time':>7}")
    for rule, acc, bwt, fgt, last, secs in summary:
        print(f"{rule:<6} {100 * acc:6.1f} {100 * bwt:7.1f} {100 * fgt:11.1f} {100 * last:10.1f} {secs:6.1f}s")


if __name__ == "__main__":
    main()
