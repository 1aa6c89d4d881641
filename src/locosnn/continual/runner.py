"""The continual runner: one network, one rule, one optimiser over a task stream, resumable after each task.

It trains each task with :func:`locosnn.train.train_epoch`, the loop every entry point shares."""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import seeds
from ..checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, save_checkpoint
from ..config import TrainConfig, resolve_device
from ..data import Dataset, batches, load_dataset
from ..errors import LocosnnError
from ..provenance import git_sha, machine, peak_rss_mb, versions
from ..rules import LearningRule, make_rule
from ..train import EpochStats, build_network, build_optimizer, check_compatible, prepare_rule, set_lr, train_epoch
from .metrics import continual_metrics, evaluate_task, evaluate_tasks
from .replay import ReplayBuffer
from .settings import AGNOSTIC, split_settings
from .streams import build_stream

# -- the runner ----------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class ContinualRun:
    """The state of one continual run; :func:`run_continual` is the entry point."""

    def __init__(self, settings: dict[str, Any], out: str | Path | None = None, resume: bool = False,
                 progress: bool = True, dataset: Optional[Dataset] = None, rule: Optional[LearningRule] = None,
                 on_task: Optional[Callable[[dict], None]] = None) -> None:
        self.cfg, self.ccfg = split_settings(settings)
        cfg, ccfg = self.cfg, self.ccfg
        self.settings = {**cfg.to_dict(), **ccfg.to_dict()}
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.on_task = on_task
        ck = self.out / "checkpoint.pt" if self.out is not None else None
        if self.out is not None and not resume and (ck.exists() or (self.out / "matrix.json").exists()):
            raise LocosnnError(f"{self.out} already holds a continual run; pass --resume to continue it or choose "
                               "another --out")
        # cheap checks first: a bad rule or spec fails before any data is read
        self.net = build_network(cfg)
        self.rule = rule or make_rule(cfg.rule, loss=cfg.loss, seed=cfg.seed, **cfg.rule_args)
        self.data = dataset or load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
        check_compatible(self.net, self.data, cfg.arch)
        self.tasks = build_stream(self.data, ccfg, cfg.seed)
        self.opt = build_optimizer(cfg, self.net)
        self.enc_gen = torch.Generator().manual_seed(seeds.train_encoder_seed(cfg.seed))
        self.replay_gen = torch.Generator().manual_seed(seeds.replay_seed(cfg.seed))
        self.buffer = ReplayBuffer(ccfg.replay)
        self.modes = ccfg.modes
        self.R: dict[str, list[list[float]]] = {m: [] for m in self.modes}
        self.history: list[dict[str, Any]] = []
        self.done = 0  # tasks finished
        if ck is not None and resume and ck.exists():
            self._load(ck)

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"format": 1, "tasks_done": self.done, "settings": self.settings, "model": self.net.state_dict(),
                "optimizer": self.opt.state_dict(), "rule": self.rule.state_dict(),
                "enc_gen": self.enc_gen.get_state(), "replay_gen": self.replay_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "replay": self.buffer.state_dict(), "R": self.R,
                "history": self.history}

    def _load(self, path: Path) -> None:
        st = load_checkpoint(path)
        old = dict(st["settings"])
        defaults = TrainConfig().to_dict()  # train settings added since the run was saved have their defaults
        # the device may differ: a run trained on cuda resumes on cpu
        diff = [k for k in self.settings if k != "device" and old.get(k, defaults.get(k)) != self.settings[k]]
        if diff:
            raise LocosnnError(f"cannot resume {path.parent}: settings differ in {', '.join(diff)} "
                               f"(saved: {', '.join(f'{k}={old.get(k)!r}' for k in diff)})")
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.rule.load_state_dict(st["rule"])
        self.enc_gen.set_state(st["enc_gen"])
        self.replay_gen.set_state(st["replay_gen"])
        torch.set_rng_state(st["torch_rng"])
        self.buffer.load_state_dict(st["replay"])
        self.R = {m: [list(r) for r in st["R"][m]] for m in self.modes}
        self.history = list(st["history"])
        self.done = int(st["tasks_done"])

    def _write_config(self) -> None:
        assert self.out is not None
        meta = {"settings": self.settings, "config": self.cfg.to_dict(), "continual": self.ccfg.to_dict(),
                "git_sha": git_sha(), "versions": versions(), "machine": machine(), "dataset": self.data.info(),
                "tasks": [t.info() for t in self.tasks], "n_params": sum(p.numel() for p in self.net.parameters()),
                "device_resolved": str(resolve_device(self.cfg.device))}
        atomic_write_json(self.out / "config.json", _json_safe(meta))

    def metrics(self) -> dict[str, dict[str, Any]]:
        return {m: continual_metrics(R) for m, R in self.R.items() if R}

    def _write_results(self) -> None:
        assert self.out is not None
        matrix = {"stream": self.ccfg.stream, "n_tasks": len(self.tasks), "tasks_done": self.done,
                  "modes": list(self.modes), "tasks": [t.info() for t in self.tasks], "R": self.R,
                  "metrics": self.metrics(), "history": self.history,
                  "definitions": {"R[i][j]": "test accuracy on task j after training task i",
                                  "ACC": "mean_j R[T-1][j]", "BWT": "mean_{j<T-1} R[T-1][j] - R[j][j]",
                                  "forgetting": "mean_{j<T-1} max_{i<T-1} R[i][j] - R[T-1][j] (Chaudhry et al. 2018)",
                                  "last_task_acc": "R[T-1][T-1]", "LA": "mean_j R[j][j]"}}
        atomic_write_json(self.out / "matrix.json", _json_safe(matrix))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["after_task", "eval_task", "mode", "acc", "eval_classes", "n_test", "rule", "dataset", "stream",
                    "seed"])
        for m in self.modes:
            for i, row in enumerate(self.R[m]):
                for j, acc in enumerate(row):
                    t = self.tasks[j]
                    w.writerow([i, j, m, repr(float(acc)), " ".join(map(str, t.classes)), len(t.test), self.cfg.rule,
                                self.cfg.dataset, self.ccfg.stream, self.cfg.seed])
        text = buf.getvalue().encode()
        atomic_write_bytes(self.out / "results.csv", lambda f: f.write(text))

    # -- training ---------------------------------------------------------------------------------
    def _mix_replay(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A batch of new samples followed by ``replay_batch`` samples drawn from the buffer (when it holds any)."""
        B = len(y)
        if len(self.buffer):
            xr, yr = self.buffer.sample(self._n_replay, self.replay_gen)
            x, y = torch.cat([x, xr]), torch.cat([y, yr])
            self._replayed += len(yr)
        return x, y, B

    def train_task(self, t: int) -> dict[str, Any]:
        cfg, task = self.cfg, self.tasks[t]
        where = f"task {t + 1}/{len(self.tasks)}: "
        n_batches = math.ceil(len(task.train) / cfg.batch_size)
        self._n_replay, self._replayed = self.ccfg.replay_batch or cfg.batch_size, 0
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.epochs * n_batches, desc=f"task {t + 1}/{len(self.tasks)} [{cfg.rule}]", leave=False)
        stats = EpochStats()  # sums over every epoch of the task
        extras: dict[str, Any] = {}
        try:
            for e in range(cfg.epochs):
                set_lr(self.opt, cfg, e)  # the schedule runs over each task's epochs
                shuffle = torch.Generator().manual_seed(seeds.task_shuffle_seed(cfg.seed, t, e))
                train_epoch(self.net, self.rule, self.opt, batches(task.train, cfg.batch_size, task.shuffle, shuffle),
                            cfg, self.enc_gen, epoch=e + 1, stats=stats, mix=self._mix_replay, bar=bar, where=where)
                extras.update({f"rule_{k}": v for k, v in self.rule.end_epoch(self.net).items()})
        finally:
            if bar is not None:
                bar.close()
        extras.update({f"rule_{k}": v for k, v in (self.rule.end_task(self.net) or {}).items()})
        res = stats.summary()
        return {"train_loss": res["train_loss"], "train_acc": res["train_acc"], "replayed": self._replayed,
                "step_time_s": res["step_time_s"], **{k: v for k, v in res.items() if k.startswith("align_")},
                **extras}

    def run(self) -> dict[str, Any]:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config()
            if self.done:
                self._write_results()  # a crash between checkpoint and results must not lose a row
        prepare_rule(self.rule, self.net, self.opt)
        while self.done < len(self.tasks):
            t = self.done
            task = self.tasks[t]
            t0 = time.perf_counter()
            row: dict[str, Any] = {"task": t, "name": task.name, "classes": list(task.classes)}
            row.update(self.train_task(t))
            t_train = time.perf_counter() - t0
            if self.ccfg.replay:
                self.buffer.add_task(task, self.replay_gen)
            accs = evaluate_tasks(self.net, self.tasks, self.cfg, self.modes)
            for m in self.modes:
                self.R[m].append(accs[m])
            if len(task.val):
                val = evaluate_task(self.net, task, self.cfg, self.modes, split="val")
                row.update({f"val_acc_{m}": v for m, v in val.items()})
            row.update({"task_time_s": t_train, "replay_size": len(self.buffer), "peak_rss_mb": peak_rss_mb()})
            self.history.append(row)
            self.done += 1
            if self.out is not None:
                save_checkpoint(self.out / "checkpoint.pt", self.state())
                self._write_results()
            if self.progress:
                m0 = self.modes[-1]
                print(f"task {t + 1}/{len(self.tasks)} ({task.name}): loss {row['train_loss']:.4f} "
                      f"train {row['train_acc']:.3f} | {m0} acc per task: "
                      + " ".join(f"{a:.3f}" for a in accs[m0]) + f" ({t_train:.1f}s)", flush=True)
            if self.on_task:
                self.on_task(row)
        return self.result()

    def result(self) -> dict[str, Any]:
        metrics = self.metrics()
        primary = AGNOSTIC if AGNOSTIC in self.modes else self.modes[0]
        res: dict[str, Any] = {"R": {m: [list(r) for r in R] for m, R in self.R.items()}, "metrics": metrics,
                               "mode": primary, "tasks_done": self.done, "n_tasks": len(self.tasks),
                               "tasks": [t.info() for t in self.tasks], "history": self.history}
        for k in ("ACC", "BWT", "forgetting", "last_task_acc", "LA"):
            if primary in metrics:
                res[k] = metrics[primary][k]
        return res


def run_continual(settings: dict[str, Any], out: str | Path | None = None, resume: bool = False,
                  progress: bool = True, dataset: Optional[Dataset] = None, rule: Optional[LearningRule] = None,
                  on_task: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train one network on a task stream and fill the accuracy matrix R (see the module docstring).

    settings: TrainConfig fields (``epochs`` = epochs per task, default 1) plus stream, n_tasks,
    classes_per_task, class_order, replay, replay_batch, eval. ``dataset`` / ``rule``: use these
    instead of loading / building them (tests). ``on_task(row)``: called after each task.
    Returns {"R": {mode: R}, "metrics": {mode: metrics}, "mode", "ACC", "BWT", "forgetting",
    "last_task_acc", "LA" (of the task-agnostic mode when evaluated), "tasks", "history", ...}."""
    return ContinualRun(settings, out=out, resume=resume, progress=progress, dataset=dataset, rule=rule,
                        on_task=on_task).run()
