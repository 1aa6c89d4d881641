"""Run configuration: every hyperparameter of a training run, loadable from TOML/YAML."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LocosnnError


@dataclass
class TrainConfig:
    rule: str = "bptt"
    dataset: str = "fashion-mnist"
    arch: str = "784-500-500-10"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    T: int = 8
    encoder: str = "direct"
    neuron: str = "lif"
    beta: float = 0.5
    theta: float = 1.0
    surrogate: str = "fast_sigmoid"
    slope: float = 5.0
    readout: str = "membrane"
    init: str = "scaled"
    init_gain: float = 3.0
    loss: str = "ce"
    seed: int = 0
    data_dir: str | None = None
    val_size: int | float | None = None  # None: 5000 for the 60k-image sets, else 10%
    limit: int | None = None
    align_every: int = 0  # >0: every N steps log per-layer cosine / norm ratio of the update to BPTT's
    rule_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LocosnnError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def validate(self) -> "TrainConfig":
        for k in ("epochs", "batch_size", "T"):
            if getattr(self, k) < 1:
                raise LocosnnError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0:
            raise LocosnnError(f"lr must be > 0, got {self.lr}")
        clash = sorted({"loss", "seed"} & set(self.rule_args))
        if clash:
            raise LocosnnError(f"rule_args may not set {', '.join(clash)}: use the run's own --{clash[0]} setting")
        if self.optimizer not in ("adam", "sgd"):
            raise LocosnnError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd")
        return self


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a flat dict of TrainConfig fields."""
    path = Path(path)
    if not path.exists():
        raise LocosnnError(f"config file {path} not found")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise LocosnnError(f"config file {path}: use .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise LocosnnError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LocosnnError(f"config file {path} must hold a table of settings")
    return {k.replace("-", "_"): v for k, v in data.items()}
