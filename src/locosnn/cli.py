"""The `locosnn` command line: train, eval.

Every user error prints one line `error: ...` and exits non-zero (2 for bad
input, 3 for a diverged run) without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import LocosnnError

#: modules that add a subcommand: each has ``add_parser(sub)``, which calls
#: ``p.set_defaults(func=f)`` with ``f(args) -> int`` (one module per line)
COMMAND_MODULES: list[str] = [
    "locosnn.continual",
    "locosnn.sweep",
    "locosnn.report",
    "locosnn.sal",
]

EPILOG = """examples:
  locosnn train --rule bptt --dataset fashion-mnist --arch 784-500-500-10 --epochs 10 --out runs/bptt
  locosnn train --config run.toml --out runs/from-file
  locosnn train --out runs/bptt --resume          # continue an interrupted run exactly
  locosnn eval runs/bptt
"""


def _train_parser(sub: Any) -> None:
    from .config import TrainConfig
    from .data import DATASETS
    from .rules import RULES

    d = TrainConfig()
    p = sub.add_parser("train", help="train a spiking network with a learning rule",
                       description="Train a feed-forward SNN on a registered dataset with one learning rule. "
                                   "Writes config.json, metrics.jsonl and checkpoint.pt into --out.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML or YAML file of settings; command-line flags override it")
    p.add_argument("--rule", help=f"learning rule: {', '.join(sorted(RULES))} (default {d.rule})")
    p.add_argument("--dataset", help=f"dataset: {', '.join(DATASETS)} (default {d.dataset})")
    p.add_argument("--data-dir", dest="data_dir", help="directory of IDX files (mnist, kmnist, or another fashion-mnist copy)")
    p.add_argument("--arch", help=f"architecture spec, e.g. 784-500x10-10 or 1x28x28-c16k5s2-10 (default {d.arch})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"mini-batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=["adam", "sgd"], help=f"optimiser (default {d.optimizer})")
    p.add_argument("--T", "-T", dest="T", type=int, help=f"time steps per sample (default {d.T})")
    p.add_argument("--encoder", choices=["direct", "rate", "latency"], help=f"input encoder (default {d.encoder})")
    p.add_argument("--neuron", choices=["lif", "if", "rate"], help=f"neuron model (default {d.neuron})")
    p.add_argument("--beta", type=float, help=f"LIF membrane decay (default {d.beta})")
    p.add_argument("--theta", type=float, help=f"firing threshold (default {d.theta})")
    p.add_argument("--surrogate", choices=["fast_sigmoid", "atan"], help=f"surrogate derivative (default {d.surrogate})")
    p.add_argument("--readout", choices=["membrane", "rate"], help=f"output readout (default {d.readout})")
    p.add_argument("--init", choices=["scaled", "pytorch"],
                   help=f"weight init: scaled = N(0, gain^2/fan_in), keeps deep LIF stacks firing (default {d.init})")
    p.add_argument("--init-gain", dest="init_gain", type=float, help=f"gain of the scaled init (default {d.init_gain})")
    p.add_argument("--loss", choices=["ce", "mse"], help=f"loss (default {d.loss})")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--val-size", dest="val_size", type=_count_or_fraction,
                   help="validation samples held out of training: a count, or a fraction < 1 "
                        "(default 5000 for the 60k-image sets, else 0.1)")
    p.add_argument("--limit", type=int, help="use only the first N train/val/test samples (quick runs)")
    p.add_argument("--align-every", dest="align_every", type=int,
                   help="every N steps, log the per-layer cosine and norm ratio of the rule's update to the BPTT "
                        "gradient on the same batch (align_cos, align_norm_ratio in metrics.jsonl; 0 = off)")
    p.add_argument("--rule-arg", dest="rule_arg", action="append", default=[], metavar="KEY=VALUE",
                   help="rule-specific setting, repeatable (value parsed as JSON when possible)")
    p.add_argument("--out", default=None, help="run directory (default runs/<rule>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _count_or_fraction(v: str) -> int | float:
    f = float(v)
    return f if f < 1 else int(f)


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def cmd_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig, load_config_file
    from .train import Trainer

    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    saved = Path(args.out or "") / "config.json"
    if args.resume and args.out and not args.config and saved.exists():
        # --resume continues the run as it was configured; flags given now still override
        settings = dict(json.loads(saved.read_text())["config"])
    for k in [f for f in TrainConfig.__dataclass_fields__ if f != "rule_args"]:
        v = getattr(args, k, None)
        if v is not None:
            settings[k] = v
    rule_args = dict(settings.get("rule_args", {}))
    for item in args.rule_arg:
        if "=" not in item:
            raise LocosnnError(f"--rule-arg {item!r} must be KEY=VALUE")
        k, v = item.split("=", 1)
        rule_args[k] = _parse_value(v)
    settings["rule_args"] = rule_args
    cfg = TrainConfig.from_dict(settings)
    out = args.out or f"runs/{cfg.rule}-{cfg.dataset}"
    trainer = Trainer(cfg, out=out, resume=args.resume, progress=args.progress)
    hist = trainer.fit()
    if hist:
        last = hist[-1]
        print(f"done: {out}  test_acc {last['test_acc']:.4f}  val_acc {last['val_acc']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .config import TrainConfig
    from .data import load_dataset
    from .train import build_network, evaluate

    run = Path(args.run_dir)
    ck = run / "checkpoint.pt"
    if not ck.exists():
        raise LocosnnError(f"{run} holds no checkpoint.pt (is it a run directory written by `locosnn train`?)")
    st = load_checkpoint(ck)
    cfg = TrainConfig.from_dict(st["config"])
    net = build_network(cfg)
    net.load_state_dict(st["model"])
    data = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
    split = getattr(data, args.split)
    res = evaluate(net, split, cfg)
    print(json.dumps({"run": str(run), "epoch": st["epoch"], "split": args.split, **res}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="locosnn", description="Train spiking neural networks without backpropagation "
                                "(LOCO, node perturbation, ...) beside a BPTT reference.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    e = sub.add_parser("eval", help="evaluate a run's last checkpoint", description="Evaluate the checkpoint of a run directory.")
    e.add_argument("run_dir", help="run directory written by `locosnn train`")
    e.add_argument("--split", choices=["train", "val", "test"], default="test", help="which split (default test)")
    e.add_argument("--data-dir", dest="data_dir", help="override the dataset directory")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_parser(sub)
    return p




def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command in ("train", "eval"):
            return {"train": cmd_train, "eval": cmd_eval}[args.command](args)
        return int(args.func(args))
    except LocosnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is in checkpoint.pt; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
