"""The rule-agnostic training loop: epochs, evaluation, logging, checkpoints, resume.

Data flows one way: data -> encoding -> rule.step (which runs the network and
writes .grad) -> optimiser -> metrics. :func:`train_epoch` is the one loop that calls
``rule.step``: the :class:`Trainer`, ``locosnn continual`` (per task) and the sweep's cells all
run it. Nothing here asks which rule it runs: rules speak through the hooks declared on
:class:`~locosnn.rules.base.LearningRule` (``setup``, ``end_epoch``, ``end_task``).

Data-parallel (``locosnn.distributed``): every process runs this loop on its rows of each global
batch; the rules' .grad is averaged after ``rule.step``; rank 0 alone prints and writes.

Run directory:
  config.json     every hyperparameter, seed, git SHA, versions, machine, data checksum
  metrics.jsonl   one JSON object per epoch (pandas.read_json(path, lines=True))
  checkpoint.pt   the last good state, written atomically at the end of every epoch
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from . import seeds
from . import distributed as dp
from .checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, save_checkpoint
from .config import TrainConfig, resolve_device
from .data import Dataset, Split, batches, load_dataset
from .diagnostics import alignment
from .encoding import encode
from .errors import LocosnnError, NonFiniteError
from .losses import per_sample_loss
from .network import SpikingNetwork
from .factory import build_network, build_optimizer, load_run, to_net  # noqa: F401  (re-exported)
from .provenance import git_sha, machine, peak_rss_mb, versions
from .rules import LearningRule, make_rule


@torch.no_grad()
def evaluate(net: SpikingNetwork, split: Split, cfg: TrainConfig, batch_size: int = 1000,
             group: Optional[dp.Group] = None) -> dict[str, float]:
    """Accuracy and mean loss on a split (encoder noise from a fixed generator, so eval is repeatable).

    ``group``: data-parallel; each process evaluates its rows of every batch (encoded whole, so the
    encoder noise is that of one process) and the sums are all-reduced: every process returns the
    numbers of the whole split."""
    g = torch.Generator().manual_seed(seeds.eval_encoder_seed(cfg.seed))
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in batches(split, batch_size, shuffle=False):
        x, y = to_net(net, x, y)
        x_seq = encode(x, cfg.T, cfg.encoder, g)
        if group is not None:
            shard = group.shard(len(y))
            if shard.size == 0:
                continue
            x_seq, y = shard.take(x_seq, 1), shard.take(y)
        out = net.run(x_seq).out
        loss_sum += float(per_sample_loss(out, y, cfg.loss).sum())
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    if group is not None:
        (s,) = dp.all_reduce_sum([torch.tensor([float(correct), float(total), loss_sum], dtype=torch.float64)], group)
        correct, total, loss_sum = int(round(float(s[0]))), int(round(float(s[1]))), float(s[2])
    return {"acc": correct / max(total, 1), "loss": loss_sum / max(total, 1)}


def check_compatible(net: SpikingNetwork, data: Dataset, arch: str) -> None:
    """Clear errors when the dataset's samples or classes do not fit the network."""
    want = tuple(data.shape)
    if math.prod(want) != math.prod(net.in_shape) or (len(net.in_shape) == 3 and want != net.in_shape):
        raise LocosnnError(f"input shape mismatch: dataset {data.name!r} has samples of shape "
                           f"{'x'.join(map(str, want))} but --arch {arch!r} expects "
                           f"{'x'.join(map(str, net.in_shape))}")
    if net.n_out < data.n_classes:
        raise LocosnnError(f"--arch {arch!r} has {net.n_out} outputs but {data.name!r} has {data.n_classes} classes")


def check_finite(net: SpikingNetwork, report: dict[str, Any], epoch: int, step: int) -> None:
    loss = report.get("loss", 0.0)
    if not math.isfinite(loss):
        raise NonFiniteError(f"non-finite loss ({loss}) at epoch {epoch}, step {step}; "
                             "the last good checkpoint is kept (lower --lr?)")
    for li, layer in enumerate(net.layers):
        for pname, p in layer.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(f"non-finite update in layer {li} ({pname}) at epoch {epoch}, step {step}; "
                                     "the last good checkpoint is kept (lower --lr?)")


def check_weights_finite(net: SpikingNetwork, epoch: int, step: int) -> None:
    """After an optimiser step: stop on an overflowed weight before it is evaluated or checkpointed."""
    for li, layer in enumerate(net.layers):
        for pname, p in layer.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"non-finite weights in layer {li} ({pname}) after the update at epoch {epoch}, "
                                     f"step {step}; the last good checkpoint is kept (lower --lr?)")


#: an epoch's train loss above this, or above LOSS_GROWTH x the first epoch's, gets a warning
LOSS_WARN, LOSS_GROWTH = 1e6, 1e3


def loss_warning(history: list[dict]) -> Optional[str]:
    """A warning line when the last epoch's train loss is unbounded-looking (finite but huge), else None."""
    loss, first = history[-1].get("train_loss"), history[0].get("train_loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return None
    if loss > LOSS_WARN:
        why = f"above {LOSS_WARN:g}"
    elif len(history) > 1 and isinstance(first, (int, float)) and first > 0 and loss > LOSS_GROWTH * first:
        why = f"more than {LOSS_GROWTH:g}x the first epoch's ({first:.4g})"
    else:
        return None
    return (f"warning: epoch {history[-1].get('epoch')}: train loss {loss:.4g} is {why}; the run is probably "
            "diverging (lower --lr?)")


def epoch_summary(row: dict[str, Any]) -> str:
    """The one-line summary of an epoch printed by the trainer."""
    return (f"epoch {row['epoch']}: loss {row['train_loss']:.4f} train {row['train_acc']:.4f} "
            f"val {row['val_acc']:.4f} test {row['test_acc']:.4f} ({row['epoch_time_s']:.1f}s)")


class EpochStats:
    """Running sums of the training loop over one epoch (the trainer) or over every epoch of a task
    (``locosnn continual``); :meth:`summary` turns them into the logged numbers."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.seen, self.steps, self.step_time = 0.0, 0, 0, 0, 0.0
        self.extras: dict[str, list[float]] = {}
        self.aligns: list[list[dict]] = []

    def summary(self, group: Optional[dp.Group] = None) -> dict[str, Any]:
        res: dict[str, Any] = {"train_loss": self.loss_sum / max(self.seen, 1),
                               "train_acc": self.correct / max(self.seen, 1),
                               "step_time_s": self.step_time / max(self.steps, 1)}
        rule_means = {f"rule_{k}": sum(v) / len(v) for k, v in self.extras.items()}
        if group is not None:  # the rule's numbers of this process's rows: their mean over the processes
            rule_means = dp.mean_over_ranks(rule_means, group)
        res.update(rule_means)
        if self.aligns:
            a, L = self.aligns, len(self.aligns[0])
            res["align_cos"] = [sum(x[li]["cos"] for x in a) / len(a) for li in range(L)]
            res["align_norm_ratio"] = [sum(x[li]["norm_ratio"] for x in a) / len(a) for li in range(L)]
        return res


#: mix(x, y) -> (x, y, n_new): adds samples to a batch (continual replay); the first n_new rows are the new ones
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]


def train_epoch(net: SpikingNetwork, rule: LearningRule, opt: torch.optim.Optimizer,
                batch_iter: Iterable[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig, enc_gen: torch.Generator,
                epoch: int, stats: Optional[EpochStats] = None, group: Optional[dp.Group] = None,
                mix: Optional[Mixer] = None, bar: Any = None, where: str = "",
                on_small_batch: Optional[Callable[[int], None]] = None) -> EpochStats:
    """THE training loop of every entry point (``Trainer``, ``locosnn continual``, sweep cells): one
    pass over ``batch_iter``: [mix in replayed samples] -> device -> encode -> [this process's rows]
    -> ``rule.step`` (writes .grad) -> [all-reduce .grad] -> finiteness checks -> optimiser step,
    accumulating loss, accuracy (of the first ``n_new`` rows of a mixed batch), the rule's numeric
    report entries and, every ``cfg.align_every`` steps, the alignment with BPTT into ``stats``.

    ``epoch``: 1-based, for error messages (``where`` is prefixed to them, e.g. ``"task 2/5: "``).
    ``group``: data-parallel; the encoder noise is drawn for the whole global batch, as one process.
    ``bar``: a progress bar (``update(1)``, ``set_postfix``) owned by the caller."""
    st = stats if stats is not None else EpochStats()
    net.train()
    try:
        for step, (x, y) in enumerate(batch_iter):
            n_new = len(y)
            if mix is not None:
                x, y, n_new = mix(x, y)
            x, y = to_net(net, x, y)
            x_seq = encode(x, cfg.T, cfg.encoder, enc_gen)  # data-parallel: the whole global batch, as one process
            shard = None
            if group is not None:
                shard = group.shard(len(y))
                if min(shard.sizes) == 0:  # a last batch smaller than the process count: skipped everywhere
                    if on_small_batch is not None:
                        on_small_batch(len(y))
                    continue
                x_seq, y = shard.take(x_seq, 1), shard.take(y)
                n_new = len(y)
                rule.shard = shard
            if cfg.align_every and step % cfg.align_every == 0:
                st.aligns.append(alignment(rule, net, x_seq, y))
            t_step = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            report = rule.step(net, x_seq, y)
            n_correct = int((report["out"][:n_new].argmax(1) == y[:n_new]).sum()) if "out" in report else 0
            batch_loss, batch_n = report["loss"] * n_new, n_new
            if shard is not None:  # every .grad becomes the global batch mean; loss and accuracy of the global batch
                batch_loss, n_correct = shard.reduce_step(net.parameters(), report["loss"], n_correct)
                batch_n = shard.total
                report = {**report, "loss": batch_loss / batch_n}
            try:
                check_finite(net, report, epoch, step)
                opt.step()
                st.step_time += time.perf_counter() - t_step
                check_weights_finite(net, epoch, step)
            except NonFiniteError as err:
                if not where:
                    raise
                raise NonFiniteError(f"{where}{err}") from None
            st.steps += 1
            for k, v in report.items():
                if k not in ("loss", "out") and isinstance(v, (int, float)):
                    st.extras.setdefault(k, []).append(float(v))
            st.loss_sum += batch_loss
            st.seen += batch_n
            st.correct += n_correct
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{st.loss_sum / st.seen:.4f}", acc=f"{st.correct / st.seen:.3f}")
    finally:
        rule.shard = None
    return st


def prepare_rule(rule: LearningRule, net: SpikingNetwork, opt: torch.optim.Optimizer, show: bool = True) -> list[str]:
    """The rule's :meth:`~locosnn.rules.base.LearningRule.setup` hook, once per run in every entry point;
    its warnings are printed (``warning: ...`` on stderr) when ``show``, and returned."""
    warns = list(rule.setup(net, opt) or [])
    if show:
        for w in warns:
            print(f"warning: {w}", file=sys.stderr, flush=True)
    return warns


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, epoch: int, epochs: Optional[int] = None) -> float:
    """Learning rates of (0-based) ``epoch`` of ``epochs`` (default ``cfg.epochs``) from ``cfg.lr_schedule``:
    a function of the epoch only, so resume is exact. Returns the factor applied."""
    f = 1.0
    if cfg.lr_schedule == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * epoch / (epochs or cfg.epochs)))
    base = [cfg.lr, cfg.readout_lr or cfg.lr]
    for group, lr in zip(opt.param_groups, base):
        group["lr"] = lr * f
    return f


class Trainer:
    """Train ``cfg.rule`` on ``cfg.dataset``; writes into ``out``. ``resume=True`` continues a run.

    Data-parallel when this process joined a group (:func:`locosnn.distributed.init_from_env`, or
    ``group``): every process constructs the same Trainer; each trains on its rows of every global
    batch of ``cfg.batch_size``, and only rank 0 prints, writes and calls ``on_epoch``."""

    def __init__(self, cfg: TrainConfig, out: str | Path | None = None, resume: bool = False,
                 progress: bool = True, dataset: Optional[Dataset] = None, rule: Optional[LearningRule] = None,
                 on_epoch: Optional[Callable[[dict], None]] = None, group: Optional[dp.Group] = None) -> None:
        self.cfg = cfg.validate()
        self.group = group if group is not None else dp.current()
        if self.group is not None and self.group.world_size == 1:
            self.group = None
        self.is_main = self.group is None or self.group.is_main
        if self.group is not None and cfg.batch_size % self.group.world_size:
            raise LocosnnError(f"--batch-size {cfg.batch_size} is not divisible by the {self.group.world_size} "
                               "data-parallel processes (each takes an equal share of every global batch)")
        self.out = Path(out) if out else None
        self.progress = progress and self.is_main
        self.on_epoch = on_epoch if self.is_main else None
        self._warned_small = False
        # cheap checks first: a bad rule or spec fails before any data is read
        self.net = build_network(cfg)
        self.rule = rule or make_rule(cfg.rule, loss=cfg.loss, seed=cfg.seed, **cfg.rule_args)
        self.data = dataset or load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
        check_compatible(self.net, self.data, cfg.arch)
        self.opt = build_optimizer(cfg, self.net)
        self.enc_gen = torch.Generator().manual_seed(seeds.train_encoder_seed(cfg.seed))
        self.epoch = 0
        self.history: list[dict] = []
        if self.out is not None:
            ck = self.out / "checkpoint.pt"
            if resume and ck.exists():
                self._load(ck)
            elif (self.out / "metrics.jsonl").exists() and not resume:
                raise LocosnnError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")

    # -- checkpoints ---------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "config": self.cfg.to_dict(), "model": self.net.state_dict(),
                "optimizer": self.opt.state_dict(), "rule": self.rule.state_dict(),
                "enc_gen": self.enc_gen.get_state(), "history": self.history}

    def _load(self, path: Path) -> None:
        st = load_checkpoint(path)
        old = dict(st["config"])
        new = self.cfg.to_dict()
        defaults = TrainConfig().to_dict()  # settings added since the run was saved have their defaults
        # epochs may be extended; the device may differ (a run trained on cuda resumes on cpu)
        diff = [k for k in new if k not in ("epochs", "device") and old.get(k, defaults.get(k)) != new[k]]
        if diff:
            raise LocosnnError(f"cannot resume {path.parent}: config differs in {', '.join(diff)}")
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.rule.load_state_dict(st["rule"])
        self.enc_gen.set_state(st["enc_gen"])
        self.epoch = st["epoch"]
        self.history = st["history"]

    def _write_config(self) -> None:
        assert self.out is not None
        meta = {"config": self.cfg.to_dict(), "git_sha": git_sha(), "versions": versions(), "machine": machine(),
                "dataset": self.data.info(), "n_params": sum(p.numel() for p in self.net.parameters()),
                "device_resolved": str(resolve_device(self.cfg.device))}
        if self.group is not None:
            meta["data_parallel"] = {"world_size": self.group.world_size, "backend": self.group.backend,
                                     "threads_per_process": torch.get_num_threads()}
        atomic_write_json(self.out / "config.json", meta)

    # -- the loop -------------------------------------------------------------
    def set_lr(self) -> float:
        """Learning rates of this epoch from the schedule (a function of the epoch only, so resume is exact)."""
        return set_lr(self.opt, self.cfg, self.epoch)

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.set_lr()
        shuffle = torch.Generator().manual_seed(seeds.epoch_shuffle_seed(cfg.seed, self.epoch))
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=math.ceil(len(self.data.train) / cfg.batch_size),
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs} [{cfg.rule}]", leave=False)
        try:
            stats = train_epoch(self.net, self.rule, self.opt, batches(self.data.train, cfg.batch_size, True, shuffle),
                                cfg, self.enc_gen, epoch=self.epoch + 1, group=self.group, bar=bar,
                                on_small_batch=self._warn_small)
        finally:
            if bar is not None:
                bar.close()
        return stats.summary(self.group)

    def _warn_small(self, n: int) -> None:
        if not self._warned_small and self.is_main:
            print(f"warning: a batch of {n} samples is smaller than the {self.group.world_size} data-parallel "
                  "processes and is skipped (choose --batch-size / --limit so that no last batch is that small)",
                  file=sys.stderr, flush=True)
        self._warned_small = True

    def fit(self) -> list[dict]:
        try:
            return self._fit()
        finally:
            self.rule.shard = None

    def _fit(self) -> list[dict]:
        if self.out is not None and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config()
        prepare_rule(self.rule, self.net, self.opt, show=self.is_main)
        while self.epoch < self.cfg.epochs:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"epoch": self.epoch + 1}
            row.update(self.train_epoch())
            row.update({f"rule_{k}": v for k, v in self.rule.end_epoch(self.net).items()})
            t_train = time.perf_counter() - t0
            val = evaluate(self.net, self.data.val, self.cfg, group=self.group) if len(self.data.val) else \
                {"acc": float("nan"), "loss": float("nan")}
            test = evaluate(self.net, self.data.test, self.cfg, group=self.group)
            row.update({"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"],
                        "test_loss": test["loss"], "epoch_time_s": t_train,
                        "peak_rss_mb": peak_rss_mb(), "rule": self.cfg.rule, "seed": self.cfg.seed})
            self.epoch += 1
            self.history.append(row)
            if self.out is not None and self.is_main:
                save_checkpoint(self.out / "checkpoint.pt", self.state())
                lines = "".join(json.dumps(r) + "\n" for r in self.history)
                atomic_write_bytes(self.out / "metrics.jsonl", lambda f: f.write(lines.encode()))
            if self.progress:
                print(epoch_summary(row), flush=True)
            warn = loss_warning(self.history)
            if warn and self.is_main:
                print(warn, file=sys.stderr, flush=True)
            if self.on_epoch:
                self.on_epoch(row)
        if self.group is not None:
            dp.barrier()  # every process returns once rank 0's last checkpoint is written
        return self.history
