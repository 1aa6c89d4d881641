"""Continual-learning settings: :class:`ContinualConfig` (stream, tasks, replay, evaluation) on top of
:class:`~locosnn.config.TrainConfig`, and :func:`split_settings`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..config import TrainConfig
from ..errors import LocosnnError

STREAMS = ("class", "permuted", "label_sorted")
STREAM_ALIASES = {"split": "class", "class-incremental": "class", "class_incremental": "class",
                  "label-sorted": "label_sorted", "labelsorted": "label_sorted", "domain": "permuted"}
AWARE, AGNOSTIC = "task-aware", "task-agnostic"
EVAL_CHOICES = {"both": (AWARE, AGNOSTIC), "aware": (AWARE,), "agnostic": (AGNOSTIC,),
                AWARE: (AWARE,), AGNOSTIC: (AGNOSTIC,)}


# -- settings -----------------------------------------------------------------------------------------
@dataclass
class ContinualConfig:
    """The continual-learning settings on top of :class:`~locosnn.config.TrainConfig`
    (whose ``epochs`` are epochs *per task*)."""

    stream: str = "class"
    n_tasks: int = 5
    classes_per_task: Optional[int] = None  # class stream: default n_classes // n_tasks
    class_order: Any = None  # class stream: None (0..C-1), "seeded" (permuted by the seed) or a list of classes
    replay: int = 0  # replay buffer size in samples (0 = off)
    replay_batch: Optional[int] = None  # replayed samples mixed into each batch (default: batch_size)
    eval: str = "both"  # "agnostic" | "aware" | "both"

    def validate(self) -> "ContinualConfig":
        s = str(self.stream).strip().lower()
        s = STREAM_ALIASES.get(s, s)
        if s not in STREAMS:
            raise LocosnnError(f"unknown stream {self.stream!r}; choose one of {', '.join(STREAMS)} "
                               "(or 'split' = class)")
        self.stream = s
        if isinstance(self.n_tasks, bool) or not isinstance(self.n_tasks, int) or self.n_tasks < 1:
            raise LocosnnError(f"n_tasks must be an integer >= 1, got {self.n_tasks!r}")
        cpt = self.classes_per_task
        if cpt is not None and (isinstance(cpt, bool) or not isinstance(cpt, int) or cpt < 1):
            raise LocosnnError(f"classes_per_task must be an integer >= 1, got {self.classes_per_task!r}")
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or self.replay < 0:
            raise LocosnnError(f"replay (buffer size in samples) must be an integer >= 0, got {self.replay!r}")
        if self.replay_batch is not None and (not isinstance(self.replay_batch, int) or self.replay_batch < 1):
            raise LocosnnError(f"replay_batch must be an integer >= 1, got {self.replay_batch!r}")
        if str(self.eval) not in EVAL_CHOICES:
            raise LocosnnError(f"unknown eval mode {self.eval!r}; choose agnostic, aware or both")
        if isinstance(self.class_order, str) and self.class_order not in ("seeded", "random"):
            raise LocosnnError(f"class_order must be a list of classes or 'seeded', got {self.class_order!r}")
        if self.class_order is not None and not isinstance(self.class_order, str):
            try:
                self.class_order = [int(c) for c in self.class_order]
            except (TypeError, ValueError):
                raise LocosnnError(f"class_order must be a list of classes or 'seeded', got {self.class_order!r}") from None
        if self.class_order is not None and self.stream != "class":
            raise LocosnnError(f"class_order only applies to the class stream, not {self.stream!r}")
        return self

    @property
    def modes(self) -> tuple[str, ...]:
        return EVAL_CHOICES[str(self.eval)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONTINUAL_KEYS = tuple(f.name for f in dataclasses.fields(ContinualConfig))
DEFAULT_EPOCHS_PER_TASK = 1


def split_settings(settings: dict[str, Any]) -> tuple[TrainConfig, ContinualConfig]:
    """Settings dict (TrainConfig fields + continual fields; dashes read as underscores) ->
    validated (TrainConfig, ContinualConfig). ``epochs`` (per task) defaults to 1 here."""
    s = {str(k).replace("-", "_"): v for k, v in dict(settings).items()}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(s) - train_keys - set(CONTINUAL_KEYS))
    if unknown:
        raise LocosnnError(f"unknown continual setting(s): {', '.join(unknown)}; continual settings: "
                           f"{', '.join(CONTINUAL_KEYS)} plus the train settings {', '.join(sorted(train_keys))}")
    tr = {k: v for k, v in s.items() if k in train_keys}
    tr.setdefault("epochs", DEFAULT_EPOCHS_PER_TASK)
    ccfg = ContinualConfig(**{k: v for k, v in s.items() if k in CONTINUAL_KEYS}).validate()
    return TrainConfig.from_dict(tr).validate(), ccfg
