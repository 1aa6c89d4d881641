"""The `locosnn` command line: train, eval, continual (and, from their modules, bench, report, sal-demo, ...).

`train` and `continual` take one flag per field of the config schema (:func:`add_settings_flags`).

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

  # loco-deep-floor: LOCO on ten hidden layers (the recipe of docs/deep.md)
  locosnn train --rule loco --arch 784-256x10-10 --init identity --optimizer nmom --bias-step floor --lr 2e-4 \\
      --readout-lr 1e-2 --lr-schedule cosine --epochs 8 --limit 20000 --rule-arg variant=faithful \\
      --rule-arg temporal=frozen --rule-arg antithetic=true --rule-arg eligibility=activity \\
      --rule-arg sigma=0.1 --rule-arg average=0.99 --rule-arg homeostasis=0.05 \\
      --rule-arg target_rate=0.2 --rule-arg readout_rule=delta --out runs/loco-deep-floor

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


WHAT, NETWORK, OPTIM, OUTPUT = "what to train", "network", "optimisation", "run directory and output"


def _flag_specs(d: Any, overrides: Optional[dict[str, str]] = None) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """field of the config schema -> (help group, flag names, add_argument keywords) for every field that has
    more to say than a generic flag; ``overrides``: field -> help text replacing the usual one."""
    from .config import BIAS_STEPS, DTYPES, ENCODERS, INITS, LOSSES, NEURONS, OPTIMIZERS, READOUTS, SURROGATES
    from .data import DATASETS
    from .rules import RULES

    o = overrides or {}

    def h(key: str, text: str, default: Any = None) -> str:
        if key in o:  # an override says its default itself
            return o[key]
        return text if default is None else _d(text, default)

    return {
        "rule": (WHAT, ["--rule"], dict(help=h("rule", f"learning rule: {', '.join(sorted(RULES))}", d.rule))),
        "rule_args": (WHAT, ["--rule-arg"], dict(dest="rule_arg", action="append", default=[], metavar="KEY=VALUE",
                      help=h("rule_args", "a setting of the rule, repeatable, e.g. sigma=0.5 (np, loco) or "
                                          "feedback=transpose (fa)"))),
        "dataset": (WHAT, ["--dataset"], dict(help=h("dataset", f"dataset: {', '.join(DATASETS)}", d.dataset))),
        "data_dir": (WHAT, ["--data-dir"], dict(metavar="DIR", help=h(
            "data_dir", "directory of IDX files (mnist, kmnist, or another fashion-mnist copy)"))),
        "val_size": (WHAT, ["--val-size"], dict(metavar="N", help=h(
            "val_size", "validation samples held out of the training set: a count, or a fraction < 1 "
                        "(default: 5000 for the 60k-image sets, else 0.1)"))),
        "limit": (WHAT, ["--limit"], dict(metavar="N", help=h(
            "limit", "use only the first N train, validation and test samples (default: all)"))),
        "arch": (NETWORK, ["--arch"], dict(help=h("arch", "architecture: input, layers and output joined by '-', e.g. "
                                                          "784-500x10-10 or 1x28x28-c16k5s2-10", d.arch))),
        "T": (NETWORK, ["--T", "-T"], dict(metavar="T", help=h("T", "time steps per sample", d.T))),
        "encoder": (NETWORK, ["--encoder"], dict(choices=ENCODERS, help=h("encoder", "input encoder", d.encoder))),
        "neuron": (NETWORK, ["--neuron"], dict(choices=NEURONS, help=h("neuron", "neuron model", d.neuron))),
        "beta": (NETWORK, ["--beta"], dict(metavar="B", help=h("beta", "LIF membrane decay per step, in [0, 1]",
                                                               d.beta))),
        "theta": (NETWORK, ["--theta"], dict(metavar="V", help=h("theta", "firing threshold, > 0", d.theta))),
        "surrogate": (NETWORK, ["--surrogate"], dict(choices=SURROGATES, help=h(
            "surrogate", "surrogate derivative of the spike", d.surrogate))),
        "slope": (NETWORK, ["--slope"], dict(metavar="K", help=h("slope", "slope of the surrogate derivative, > 0",
                                                                 d.slope))),
        "reset": (NETWORK, ["--reset"], dict(choices=("subtract", "zero"), help=h(
            "reset", "LIF/IF reset after a spike: subtract theta (soft) or set the membrane to 0 (hard; exports "
                     "exactly to NIR, see `locosnn export`)", d.reset))),
        "readout": (NETWORK, ["--readout"], dict(choices=READOUTS, help=h("readout", "output readout", d.readout))),
        "init": (NETWORK, ["--init"], dict(choices=INITS, help=h(
            "init", "weight init: scaled = N(0, gain^2/fan_in), keeps deep LIF stacks firing; identity = scaled, but "
                    "square hidden-to-hidden layers start at 2 I + 0.5 N(0, 1/n) (deep stacks); pytorch = the "
                    "nn.Linear / nn.Conv2d defaults", d.init))),
        "init_gain": (NETWORK, ["--init-gain"], dict(metavar="G", help=h("init_gain", "gain of the scaled init, > 0",
                                                                         d.init_gain))),
        "device": (NETWORK, ["--device"], dict(metavar="DEV", help=h(
            "device", "where to compute: auto (cuda when available, else cpu), cpu, cuda or cuda:N; a run trained on "
                      "one device resumes or evaluates on another", d.device))),
        "dtype": (NETWORK, ["--dtype"], dict(choices=DTYPES, help=h(
            "dtype", "floating-point type of the weights, state and inputs", d.dtype))),
        "epochs": (OPTIM, ["--epochs"], dict(metavar="N", help=h("epochs", "training epochs", d.epochs))),
        "batch_size": (OPTIM, ["--batch-size"], dict(metavar="N", help=h("batch_size", "mini-batch size",
                                                                         d.batch_size))),
        "lr": (OPTIM, ["--lr"], dict(metavar="LR", help=h("lr", "learning rate, > 0", d.lr))),
        "readout_lr": (OPTIM, ["--readout-lr"], dict(metavar="LR", help=h(
            "readout_lr", "learning rate of the output layer only (default: --lr): e.g. a fast exact readout beside "
                          "slowly perturbation-trained hidden layers"))),
        "lr_schedule": (OPTIM, ["--lr-schedule"], dict(choices=["constant", "cosine"], help=h(
            "lr_schedule", "learning-rate schedule per epoch: constant, or cosine decay to 0 over --epochs",
            d.lr_schedule))),
        "optimizer": (OPTIM, ["--optimizer"], dict(choices=OPTIMIZERS, help=h(
            "optimizer", "optimiser: adam, sgd (momentum 0.9) or nmom (per-layer normalised momentum with per-neuron "
                         "weight-norm projection, for NP/LOCO on deep nets)", d.optimizer))),
        "bias_step": (OPTIM, ["--bias-step"], dict(choices=BIAS_STEPS, help=h(
            "bias_step", "nmom only: how a bias steps; relative (lr of its own norm, like a weight) or floor (a fixed "
                         "lr x 0.01 x sqrt(n) step; a relative step has no weight-norm projection to hold it and can "
                         "grow the bias geometrically on long schedules, docs/deep.md)", d.bias_step))),
        "weight_decay": (OPTIM, ["--weight-decay"], dict(metavar="WD", help=h("weight_decay", "weight decay, >= 0",
                                                                              d.weight_decay))),
        "loss": (OPTIM, ["--loss"], dict(choices=LOSSES, help=h("loss", "loss on the readout", d.loss))),
        "seed": (OPTIM, ["--seed"], dict(metavar="S", help=h("seed", "random seed (weights, data order, noise), >= 0",
                                                             d.seed))),
        "align_every": (OUTPUT, ["--align-every"], dict(metavar="N", help=h(
            "align_every", "every N steps, log the per-layer cosine and norm ratio of the rule's update to the BPTT "
                           "gradient on the same batch (align_cos, align_norm_ratio in metrics.jsonl) "
                           "(default: 0 = off)"))),
    }


def add_settings_flags(p: argparse.ArgumentParser, config_help: str, defaults: Any = None,
                       overrides: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """One flag per field of the config schema (:data:`locosnn.config.FIELDS`): ``--config FILE`` and
    ``--field-name`` for each field (``--rule-arg KEY=VALUE`` for ``rule_args``), in help groups; a
    field without a spec in :func:`_flag_specs` still gets a plain flag. Every flag defaults to None
    (unset: the config file's value, then the default). Shared by ``train`` and ``continual``, so
    both take every setting. Returns the help groups by name (callers add their own flags to them)."""
    from .config import FIELDS, TrainConfig

    specs = _flag_specs(defaults if defaults is not None else TrainConfig(), overrides)
    groups: dict[str, Any] = {}

    def group(name: str) -> Any:
        if name not in groups:
            groups[name] = p.add_argument_group(name)
        return groups[name]

    group(WHAT).add_argument("--config", metavar="FILE", help=config_help)
    for name in list(specs) + [f for f in FIELDS if f not in specs]:
        if name not in FIELDS:
            raise AssertionError(f"flag spec for {name!r}, which is no field of the config schema")
        where, flags, kw = specs.get(name, ("other settings", ["--" + name.replace("_", "-")],
                                            dict(help=f"the {name} setting (see locosnn.config.TrainConfig)")))
        kw = {"dest": name, **kw}
        group(where).add_argument(*flags, **kw)
    return groups


def settings_from_flags(args: argparse.Namespace, settings: dict[str, Any],
                        extra_keys: Sequence[str] = ()) -> dict[str, Any]:
    """``settings`` (from --config or a checkpoint) overridden by every schema flag given (and ``extra_keys``),
    with --rule-arg items merged into ``rule_args``."""
    from .config import TrainConfig

    for k in [f for f in TrainConfig.__dataclass_fields__ if f != "rule_args"] + list(extra_keys):
        v = getattr(args, k, None)
        if v is not None:
            settings[k] = v
    rule_args = settings.get("rule_args") or {}
    if not isinstance(rule_args, dict):
        raise LocosnnError(f"rule_args must be a table of rule settings (KEY = VALUE), got {rule_args!r}")
    settings["rule_args"] = parse_rule_args(args.rule_arg, rule_args)
    return settings


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train a spiking network with a learning rule",
                       description="Train a feed-forward spiking network on a registered dataset with one learning "
                                   "rule. Writes config.json (every setting, git SHA, versions, machine, data "
                                   "checksum), metrics.jsonl (one line per epoch) and checkpoint.pt (the last "
                                   "finished epoch) into --out.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_settings_flags(p, "TOML or YAML file of settings (keys as the flags, e.g. batch_size = 64); flags "
                                   "given here override it")
    g = groups[OUTPUT]
    g.add_argument("--out", metavar="DIR", help="run directory (default: runs/<rule>-<dataset>); a new or empty "
                                                "directory, or a train run to --resume")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its settings (flags given override "
                        "them; only --epochs may differ)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar: one summary line per epoch only")

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
    settings = settings_from_flags(args, settings)
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


# -- locosnn continual -------------------------------------------------------------------------------------
CONTINUAL_EPILOG = """examples:
  locosnn continual --rule bptt --dataset fashion-mnist --arch 784-256-256-10 --stream class --n-tasks 5 --out runs/cl-bptt
  locosnn continual --rule owm --optimizer sgd --lr 0.05 --stream permuted --n-tasks 5 --out runs/cl-owm
  locosnn continual --rule loco --stream label_sorted --n-tasks 1 --rule-arg variant=faithful --out runs/cl-loco
  locosnn continual --rule bptt --replay 500 --out runs/cl-replay
  locosnn continual --out runs/cl-bptt --resume          # continue after the last finished task

Every `locosnn train` setting is a flag here too (same names, same defaults, except --epochs:
epochs PER TASK, default 1); --lr-schedule runs over each task's epochs.

writes into --out: config.json, matrix.json (R per mode + ACC/BWT/forgetting), results.csv
(one row per after_task, eval_task, mode), checkpoint.pt.
"""

#: the continual-only flags' settings (the train settings come from the config schema)
CONTINUAL_FLAG_KEYS = ("stream", "n_tasks", "classes_per_task", "class_order", "replay", "replay_batch", "eval")


def _continual_parser(sub: Any) -> None:
    from .config import TrainConfig
    from .continual import DEFAULT_EPOCHS_PER_TASK

    d = TrainConfig()
    p = sub.add_parser("continual", help="train on a stream of tasks and measure forgetting",
                       description="Continual learning: train one network with one rule on a stream of tasks "
                                   "(class-incremental, permuted or label-sorted), evaluate on every task's test "
                                   "split after each task (task-aware and task-agnostic), and report the accuracy "
                                   "matrix R[after task i][task j] with average accuracy (ACC), backward transfer "
                                   "(BWT) and forgetting (Chaudhry et al. 2018). Resumable after each task.",
                       epilog=CONTINUAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = add_settings_flags(
        p, "TOML or YAML file of settings (train and continual keys); flags override it",
        overrides={"epochs": _d("training epochs PER TASK", DEFAULT_EPOCHS_PER_TASK),
                   "seed": _d("random seed; also fixes the permutations and a seeded class order", d.seed),
                   "optimizer": _d("optimiser, one for the whole stream: adam, sgd (momentum 0.9) or nmom; use sgd "
                                   "with owm (adam undoes its projection)", d.optimizer),
                   "lr_schedule": _d("learning-rate schedule per epoch of each task: constant, or cosine decay to 0 "
                                     "over --epochs (restarting at every task)", d.lr_schedule),
                   "align_every": "every N steps, log the per-layer cosine and norm ratio of the rule's update to "
                                  "the BPTT gradient on the same batch (align_cos, align_norm_ratio per task in "
                                  "matrix.json's history) (default: 0 = off)"})
    g = p.add_argument_group("continual: task stream, replay, evaluation")
    g.add_argument("--stream", metavar="NAME", help="task stream: class (class-incremental; alias split), permuted "
                                    "(domain-incremental, task 1 unpermuted) or label_sorted (the training set "
                                    "sorted by label, cut into chunks, passed in order) (default: class)")
    g.add_argument("--n-tasks", dest="n_tasks", type=int, metavar="N", help="number of tasks (default: 5)")
    g.add_argument("--classes-per-task", dest="classes_per_task", type=int, metavar="N",
                   help="class stream: classes per task (default: n_classes / n_tasks)")
    g.add_argument("--class-order", dest="class_order", metavar="C,C,...",
                   help="class stream: comma-separated class order (e.g. 3,1,0,...) or 'seeded' (default: 0..C-1)")
    g.add_argument("--replay", type=int, metavar="N", help="replay buffer size in samples, class-balanced over the finished "
                                              "tasks, mixed into every batch of later tasks (default: 0 = off)")
    g.add_argument("--replay-batch", dest="replay_batch", type=int, metavar="N",
                   help="replayed samples per batch (default: --batch-size)")
    g.add_argument("--eval", metavar="MODE", help="evaluation: agnostic (argmax over all outputs), aware (logits masked to the "
                                  "task's classes) or both (default: both)")
    g = groups[OUTPUT]
    g.add_argument("--out", metavar="DIR", default=None, help="run directory (default: runs/continual-<rule>-<dataset>-<stream>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished task")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.set_defaults(func=cmd_continual)


def continual_settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --config (or the saved config of a run being resumed), overridden by flags."""
    from .checkpoint import load_checkpoint
    from .config import load_config_file

    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    if args.resume and args.out:
        check_out_dir(Path(args.out), "continual", resume=True)
        if not args.config:  # the run's own settings (from its checkpoint); flags given now still override
            settings = dict(load_checkpoint(Path(args.out) / "checkpoint.pt", expect=("settings",))["settings"])
    v = getattr(args, "class_order", None)
    if v is not None and v not in ("seeded", "random"):
        try:
            args.class_order = [int(c) for c in str(v).split(",") if c.strip()]
        except ValueError:
            raise LocosnnError(f"--class-order {v!r} must be comma-separated class numbers or 'seeded'") from None
    return settings_from_flags(args, settings, CONTINUAL_FLAG_KEYS)


def format_matrix(R: Sequence[Sequence[float]]) -> str:
    n = len(R[0]) if R else 0
    lines = ["after \\ on " + " ".join(f"{'T' + str(j + 1):>6}" for j in range(n))]
    for i, row in enumerate(R):
        lines.append(f"{'T' + str(i + 1):>11} " + " ".join(f"{100 * a:6.1f}" for a in row))
    return "\n".join(lines)


def cmd_continual(args: argparse.Namespace) -> int:
    import math

    from .checkpoint import DirLock
    from .continual import run_continual, split_settings

    settings = continual_settings_from_args(args)
    cfg, ccfg = split_settings(settings)
    out = Path(args.out or f"runs/continual-{cfg.rule}-{cfg.dataset}-{ccfg.stream}")
    if out.exists() and not out.is_dir():
        raise LocosnnError(f"--out {out} is an existing file, not a directory; choose another --out")
    try:
        with DirLock(out, "continual"):
            check_out_dir(out, "continual", args.resume)
            res = run_continual(settings, out=out, resume=args.resume, progress=args.progress)
    except KeyboardInterrupt as e:
        print(f"interrupted: the finished tasks are in {out}/checkpoint.pt; continue with --resume", file=sys.stderr)
        return interrupt_exit_code(e)
    for m, R in res["R"].items():
        met = res["metrics"].get(m)
        print(f"\n{m}: accuracy (%) after training task i (rows) on task j (columns)")
        print(format_matrix(R))
        if met:
            f = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"  # noqa: E731
            print(f"ACC {f(met['ACC'])}  BWT {f(met['BWT'])}  forgetting {f(met['forgetting'])}  "
                  f"last task {f(met['last_task_acc'])}  LA {f(met['LA'])}")
    print(f"\ndone: {out}")
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
    _continual_parser(sub)
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
