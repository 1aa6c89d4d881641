"""The `locosnn` command line: train, eval (and, from their modules, continual, bench, report, sal-demo).

Every user error prints one line `error: ...` and exits 2 (3 for a diverged run) without a
traceback; Ctrl-C or SIGTERM prints one `interrupted: ...` line and exits 130 / 143. See
docs/errors.md for what each bad input gives.
"""
from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__
from .errors import Interrupted, LocosnnError, interrupt_exit_code

#: modules that add a subcommand: each has ``add_parser(sub)``, which calls
#: ``p.set_defaults(func=f)`` with ``f(args) -> int`` (one module per line)
COMMAND_MODULES: list[str] = [
    "locosnn.continual",
    "locosnn.sweep",
    "locosnn.report",
    "locosnn.sal",
    "locosnn.export",
    "locosnn.depth",
]

EPILOG = """examples:
  locosnn train --rule bptt --dataset fashion-mnist --arch 784-500-500-10 --epochs 10 --out runs/bptt
  locosnn train --config run.toml --out runs/from-file
  locosnn train --out runs/bptt --resume          # continue an interrupted run exactly
  locosnn eval runs/bptt
"""

TRAIN_EPILOG = """Settings come from, lowest precedence first: the defaults above, --config FILE (or, with
--resume, the run's own checkpoint), then the flags given. Every value is checked before any data
is read: a wrong type or an out-of-range value is one `error:` line (exit 2).

Values: booleans read true/false, yes/no, on/off or 1/0; numbers may be written 1e-3.
--rule-arg values are cast to the type of the rule's setting, e.g. --rule-arg projection=false.

examples:
  locosnn train --rule bptt --dataset fashion-mnist --arch 784-500-500-10 --epochs 10 --out runs/bptt
  locosnn train --rule loco --lr 1e-3 --rule-arg sigma=0.5 --rule-arg variant=faithful --out runs/loco

  # loco-deep: LOCO on ten hidden layers (the recipe of docs/deep.md)
  locosnn train --rule loco --arch 784-256x10-10 --init identity --optimizer nmom --lr 2e-4 \\
      --readout-lr 1e-2 --lr-schedule cosine --epochs 8 --limit 20000 --rule-arg variant=faithful \\
      --rule-arg temporal=frozen --rule-arg antithetic=true --rule-arg eligibility=activity \\
      --rule-arg sigma=0.1 --rule-arg average=0.99 --rule-arg homeostasis=0.05 \\
      --rule-arg target_rate=0.2 --rule-arg readout_rule=delta --out runs/loco-deep

  locosnn train --config run.toml --out runs/from-file      # run.toml: lr = 1e-3, epochs = 5, ...
  locosnn train --out runs/bptt --resume --epochs 20        # continue a run, here to 20 epochs
  locosnn eval runs/bptt --split val

  # data-parallel (docs/distributed.md): 2 processes, each on half of every batch of 100
  locosnn train --rule dfa --batch-size 100 --nproc 2 --out runs/dfa-dp
  torchrun --standalone --nproc-per-node 2 -m locosnn train --rule dfa --batch-size 100 --out runs/dfa-dp
"""


def _d(text: str, default: Any) -> str:
    """Help text with its default, written once."""
    return f"{text} (default: {default})"


def _train_parser(sub: Any) -> None:
    from .config import DTYPES, ENCODERS, INITS, LOSSES, NEURONS, OPTIMIZERS, READOUTS, SURROGATES, TrainConfig
    from .data import DATASETS
    from .rules import RULES

    d = TrainConfig()
    p = sub.add_parser("train", help="train a spiking network with a learning rule",
                       description="Train a feed-forward spiking network on a registered dataset with one learning "
                                   "rule. Writes config.json (every setting, git SHA, versions, machine, data "
                                   "checksum), metrics.jsonl (one line per epoch) and checkpoint.pt (the last "
                                   "finished epoch) into --out.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (keys as the flags, e.g. "
                                                    "batch_size = 64); flags given here override it")
    g.add_argument("--rule", help=_d(f"learning rule: {', '.join(sorted(RULES))}", d.rule))
    g.add_argument("--rule-arg", dest="rule_arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the rule, repeatable, e.g. sigma=0.5 (np, loco) or feedback=transpose (fa)")
    g.add_argument("--dataset", help=_d(f"dataset: {', '.join(DATASETS)}", d.dataset))
    g.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                   help="directory of IDX files (mnist, kmnist, or another fashion-mnist copy)")
    g.add_argument("--val-size", dest="val_size", metavar="N",
                   help="validation samples held out of the training set: a count, or a fraction < 1 "
                        "(default: 5000 for the 60k-image sets, else 0.1)")
    g.add_argument("--limit", metavar="N", help="use only the first N train, validation and test samples "
                                                "(default: all)")

    g = p.add_argument_group("network")
    g.add_argument("--arch", help=_d("architecture: input, layers and output joined by '-', e.g. 784-500x10-10 "
                                     "or 1x28x28-c16k5s2-10", d.arch))
    g.add_argument("--T", "-T", dest="T", metavar="T", help=_d("time steps per sample", d.T))
    g.add_argument("--encoder", choices=ENCODERS, help=_d("input encoder", d.encoder))
    g.add_argument("--neuron", choices=NEURONS, help=_d("neuron model", d.neuron))
    g.add_argument("--beta", metavar="B", help=_d("LIF membrane decay per step, in [0, 1]", d.beta))
    g.add_argument("--theta", metavar="V", help=_d("firing threshold, > 0", d.theta))
    g.add_argument("--surrogate", choices=SURROGATES, help=_d("surrogate derivative of the spike", d.surrogate))
    g.add_argument("--slope", metavar="K", help=_d("slope of the surrogate derivative, > 0", d.slope))
    g.add_argument("--reset", choices=("subtract", "zero"),
                   help=_d("LIF/IF reset after a spike: subtract theta (soft) or set the membrane to 0 (hard; "
                           "exports exactly to NIR, see `locosnn export`)", d.reset))
    g.add_argument("--readout", choices=READOUTS, help=_d("output readout", d.readout))
    g.add_argument("--init", choices=INITS,
                   help=_d("weight init: scaled = N(0, gain^2/fan_in), keeps deep LIF stacks firing; identity = "
                           "scaled, but square hidden-to-hidden layers start at 2 I + 0.5 N(0, 1/n) (deep stacks); "
                           "pytorch = the nn.Linear / nn.Conv2d defaults", d.init))
    g.add_argument("--init-gain", dest="init_gain", metavar="G", help=_d("gain of the scaled init, > 0", d.init_gain))
    g.add_argument("--device", metavar="DEV",
                   help=_d("where to compute: auto (cuda when available, else cpu), cpu, cuda or cuda:N; a run "
                           "trained on one device resumes or evaluates on another", d.device))
    g.add_argument("--dtype", choices=DTYPES, help=_d("floating-point type of the weights, state and inputs",
                                                      d.dtype))

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", metavar="N", help=_d("training epochs", d.epochs))
    g.add_argument("--batch-size", dest="batch_size", metavar="N", help=_d("mini-batch size", d.batch_size))
    g.add_argument("--lr", metavar="LR", help=_d("learning rate, > 0", d.lr))
    g.add_argument("--readout-lr", dest="readout_lr", metavar="LR",
                   help="learning rate of the output layer only (default: --lr): e.g. a fast exact readout "
                        "beside slowly perturbation-trained hidden layers")
    g.add_argument("--lr-schedule", dest="lr_schedule", choices=["constant", "cosine"],
                   help=_d("learning-rate schedule per epoch: constant, or cosine decay to 0 over --epochs",
                           d.lr_schedule))
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=_d("optimiser: adam, sgd (momentum 0.9) or nmom (per-layer normalised momentum with "
                           "per-neuron weight-norm projection, for NP/LOCO on deep nets)", d.optimizer))
    g.add_argument("--weight-decay", dest="weight_decay", metavar="WD", help=_d("weight decay, >= 0", d.weight_decay))
    g.add_argument("--loss", choices=LOSSES, help=_d("loss on the readout", d.loss))
    g.add_argument("--seed", metavar="S", help=_d("random seed (weights, data order, noise), >= 0", d.seed))

    g = p.add_argument_group("run directory and output")
    g.add_argument("--out", metavar="DIR", help="run directory (default: runs/<rule>-<dataset>); a new or empty "
                                                "directory, or a train run to --resume")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its settings (flags given override "
                        "them; only --epochs may differ)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar: one summary line per epoch only")
    g.add_argument("--align-every", dest="align_every", metavar="N",
                   help="every N steps, log the per-layer cosine and norm ratio of the rule's update to the BPTT "
                        "gradient on the same batch (align_cos, align_norm_ratio in metrics.jsonl) (default: 0 = off)")

    g = p.add_argument_group("data-parallel (docs/distributed.md)")
    g.add_argument("--nproc", type=int, metavar="N",
                   help="train in N local processes (torch.distributed: gloo on CPU, NCCL on GPU, one GPU per "
                        "process), each on --batch-size / N rows of every batch; the same weights as one process "
                        "up to rounding (default: 1 process; under torchrun, its WORLD_SIZE)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per process (default: 1 with --nproc or torchrun; in a single process, "
                        "as many as torch chooses)")


def _count_or_fraction(v: str) -> int | float:
    """argparse type of --val-size (kept for callers); the config casts the same way."""
    from .config import parse_count_or_fraction
    try:
        return parse_count_or_fraction(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be {e}, got {v!r}") from None


def _parse_value(v: str) -> Any:
    """A KEY=VALUE value as JSON when it is JSON, else the string (the config casts it by type later)."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_rule_args(items: Sequence[str], into: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``--rule-arg KEY=VALUE`` items into a dict; values stay strings (cast by the rule's types)."""
    out = dict(into or {})
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise LocosnnError(f"--rule-arg {item!r} must be KEY=VALUE")
        out[k.strip().replace("-", "_")] = v
    return out


def check_out_dir(out: Path, command: str, resume: bool) -> None:
    """Refuse an --out that is a file, that holds another kind of run or other files, or, with --resume,
    that holds no checkpoint."""
    from .checkpoint import LOCK_NAME, run_dir_kind

    kind = run_dir_kind(out)
    if kind == "file":
        raise LocosnnError(f"--out {out} is an existing file, not a directory; choose another --out")
    if kind not in ("missing", "empty", command):
        if kind == "other":
            names = sorted(q.name for q in out.iterdir() if q.name != LOCK_NAME and not q.name.endswith(".tmp"))
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise LocosnnError(f"--out {out} is not empty and holds no locosnn {command} run ({shown}); "
                               "choose a new or empty directory")
        raise LocosnnError(f"--out {out} holds a locosnn {kind} run; `locosnn {command}` will not overwrite it: "
                           "choose another --out")
    if resume and not (out / "checkpoint.pt").is_file():
        raise LocosnnError(f"--resume: {out} holds no checkpoint.pt to continue from "
                           f"({'it does not exist' if kind == 'missing' else 'no epoch finished yet'}); "
                           "run without --resume to start anew")


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed as dp
    from .checkpoint import DirLock, load_checkpoint
    from .config import TrainConfig, load_config_file
    from .train import Trainer, epoch_summary

    world = dp.env_world_size()  # > 1: this is one of the processes torchrun or --nproc started
    nproc = getattr(args, "nproc", None)
    threads = getattr(args, "threads", None)
    if nproc is not None and nproc < 1:
        raise LocosnnError(f"--nproc must be >= 1, got {nproc}")
    if threads is not None and threads < 1:
        raise LocosnnError(f"--threads must be >= 1, got {threads}")
    if world > 1 and nproc not in (None, world):
        raise LocosnnError(f"--nproc {nproc} differs from WORLD_SIZE={world} of the processes torchrun started")
    n_dp = world if world > 1 else (nproc or 1)
    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    out_arg = Path(args.out) if args.out else None
    if args.resume and out_arg is not None:
        check_out_dir(out_arg, "train", resume=True)
        if not args.config:  # --resume continues the run as it was configured; flags given now still override
            st = load_checkpoint(out_arg / "checkpoint.pt", expect=("epoch", "config", "model"))
            settings = dict(st["config"])
    for k in [f for f in TrainConfig.__dataclass_fields__ if f != "rule_args"]:
        v = getattr(args, k, None)
        if v is not None:
            settings[k] = v
    rule_args = settings.get("rule_args") or {}
    if not isinstance(rule_args, dict):
        raise LocosnnError(f"rule_args must be a table of rule settings (KEY = VALUE), got {rule_args!r}")
    settings["rule_args"] = parse_rule_args(args.rule_arg, rule_args)
    cfg = TrainConfig.from_dict(settings).validate()
    out = out_arg or Path(f"runs/{cfg.rule}-{cfg.dataset}")
    if out.exists() and not out.is_dir():
        raise LocosnnError(f"--out {out} is an existing file, not a directory; choose another --out")
    if n_dp > 1 and cfg.batch_size % n_dp:
        raise LocosnnError(f"--batch-size {cfg.batch_size} is not divisible by the {n_dp} data-parallel processes "
                           f"(each takes an equal share of every batch); choose a multiple of {n_dp}")
    if world <= 1 and n_dp > 1:  # start the processes; each runs this command again as one rank of the group
        check_out_dir(out, "train", args.resume)
        code = dp.launch(n_dp, getattr(args, "argv", None) or sys.argv[1:], threads=threads or dp.DEFAULT_THREADS)
        return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell reports it
    if world > 1:
        check_out_dir(out, "train", args.resume)  # read-only and before the rendezvous: no process has written yet
        dp.init_from_env(cfg.device, threads=threads)
        try:
            lock = dp.on_main(lambda: DirLock(out, "train").acquire())
            try:
                trainer = Trainer(cfg, out=out, resume=args.resume, progress=args.progress,
                                  on_epoch=None if args.progress else (lambda row: print(epoch_summary(row), flush=True)))
                hist = trainer.fit()
            finally:
                if lock is not None:
                    lock.release()
        finally:
            dp.shutdown()
        if dp.env_rank() != 0:  # rank 0 reports
            return 0
    else:
        if threads is not None:
            import torch
            torch.set_num_threads(threads)
        with DirLock(out, "train"):
            check_out_dir(out, "train", args.resume)
            on_epoch = None if args.progress else (lambda row: print(epoch_summary(row), flush=True))
            trainer = Trainer(cfg, out=out, resume=args.resume, progress=args.progress, on_epoch=on_epoch)
            hist = trainer.fit()
    if hist:
        last = hist[-1]
        print(f"done: {out}  test_acc {last['test_acc']:.4f}  val_acc {last['val_acc']:.4f}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import run_dir_kind
    from .data import load_dataset
    from .train import evaluate, load_run

    run = Path(args.run_dir)
    if run_dir_kind(run) == "continual":
        raise LocosnnError(f"{run} holds a continual run; `locosnn eval` evaluates train runs (the continual "
                           "run's accuracies are in its matrix.json and results.csv)")
    # on --device, whatever device the run was trained on; in the run's own dtype
    net, cfg, st = load_run(run, device=args.device, dtype=None, expect=("epoch", "config", "model"))
    data = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
    split = getattr(data, args.split)
    res = evaluate(net, split, cfg)
    print(json.dumps({"run": str(run), "epoch": st["epoch"], "split": args.split, **res}))
    return 0


class Parser(argparse.ArgumentParser):
    """Usage errors (a bad choice, a missing value, an unknown flag) are one `error:` line, exit 2, like every
    other bad input; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="locosnn", description="Train spiking neural networks without backpropagation "
               "(LOCO, node perturbation, ...) beside a BPTT reference.",
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"locosnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    e = sub.add_parser("eval", help="evaluate a run's last checkpoint", description="Evaluate the checkpoint of a run "
                       "directory written by `locosnn train` and print one JSON line (acc, loss).")
    e.add_argument("run_dir", help="run directory written by `locosnn train`")
    e.add_argument("--split", choices=["train", "val", "test"], default="test", help="which split (default: test)")
    e.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="read the dataset from here instead")
    e.add_argument("--device", metavar="DEV", default="auto",
                   help=_d("where to evaluate: auto (cuda when available, else cpu), cpu, cuda or cuda:N", "auto"))
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_parser(sub)
    return p


INTERRUPTED = {"train": "interrupted: the last completed epoch is in checkpoint.pt; continue with --resume"}


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM end a command like Ctrl-C: checkpoints are kept, temporary files removed, worker
    processes stopped and the run directory's lock released."""
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # `train --nproc N` starts N processes with the same arguments
    if args.command is None:
        parser.print_help()
        return 2
    old: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: leave the handlers alone
            pass
    try:
        if args.command in ("train", "eval"):
            return {"train": cmd_train, "eval": cmd_eval}[args.command](args)
        return int(args.func(args))
    except LocosnnError as e:
        from .distributed import Reported, env_rank
        if not isinstance(e, Reported):  # Reported: rank 0 of a data-parallel run printed it
            rank = f"[rank {env_rank()}] " if env_rank() else ""
            print(f"error: {rank}{e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        import os
        from .distributed import env_rank
        if env_rank() == 0 and not os.environ.get("LOCOSNN_LAUNCHED"):  # data-parallel: one line, rank 0 or --nproc
            print(INTERRUPTED.get(args.command, "interrupted"), file=sys.stderr)
        return interrupt_exit_code(e)
    except OSError as e:  # the file system said no (permissions, disk full, ...): one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    sys.exit(main())
