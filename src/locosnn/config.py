"""Run configuration: every hyperparameter of a training run, loadable from TOML/YAML.

Every value goes through one strict caster per field, whatever its source: a
command-line flag (a string), a TOML/YAML file (typed, though PyYAML reads
``1e-3`` as a string) or a ``--rule-arg KEY=VALUE`` (a string, cast to the type
annotated on the rule's ``__init__``). Booleans read true/false, yes/no, on/off
and 1/0; integers refuse 2.5; floats refuse nan and inf. A value of the wrong
type or out of range is a :class:`~locosnn.errors.LocosnnError` naming the
setting.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import yaml

from .encoding import ENCODERS
from .errors import LocosnnError
from .losses import LOSSES
from .network import INITS, READOUTS
from .neurons import NEURON_MODELS as NEURONS
from .neurons import RESETS, SURROGATES
from .optim import BIAS_STEPS  # how nmom steps a bias (the --bias-step choices)

if TYPE_CHECKING:
    import torch

#: optimiser names ``train.build_optimizer`` understands (the CLI's --optimizer choices)
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "nmom")
#: floating-point types a run may compute in (the --dtype choices)
DTYPES: tuple[str, ...] = ("float32", "float64")

TRUE_WORDS = ("true", "yes", "on", "1", "y", "t")
FALSE_WORDS = ("false", "no", "off", "0", "n", "f")


# -- casting -------------------------------------------------------------------------------------------
class _CastError(ValueError):
    """A value that cannot be read as the wanted type; the message says what was wanted."""


def parse_bool(v: Any) -> bool:
    """True/False from a bool, 0/1, or true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in TRUE_WORDS:
            return True
        if s in FALSE_WORDS:
            return False
    raise _CastError("a boolean (true/false, yes/no, on/off, 1/0)")


def parse_int(v: Any) -> int:
    """An integer from an int, an integral float (2.0) or a string such as "10" or "1e4"; never 2.5 or True."""
    if isinstance(v, bool):
        raise _CastError("an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isfinite(v) and v.is_integer():
            return int(v)
        raise _CastError("an integer")
    if isinstance(v, str):
        s = v.strip()
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            raise _CastError("an integer") from None
        if math.isfinite(f) and f.is_integer():
            return int(f)
    raise _CastError("an integer")


def parse_float(v: Any) -> float:
    """A finite float from an int, a float or a numeric string ("1e-3"); never nan, inf or True."""
    if isinstance(v, bool):
        raise _CastError("a number")
    if isinstance(v, (int, float)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            raise _CastError("a number") from None
    else:
        raise _CastError("a number")
    if not math.isfinite(f):
        raise _CastError("a finite number")
    return f


def parse_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise _CastError("a string")


def parse_count_or_fraction(v: Any) -> int | float:
    """A validation size: a fraction in (0, 1) or a count >= 0 (an integer)."""
    try:
        f = parse_float(v)
        return f if 0 < f < 1 else parse_int(v)
    except _CastError:
        raise _CastError("a count (an integer) or a fraction between 0 and 1") from None


def _parse_table(v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if isinstance(v, dict):
        return dict(v)
    raise _CastError("a table of rule settings (KEY = VALUE)")


def _optional(cast: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
            return None
        return cast(v)
    return parse


def _parse_json_like(v: Any) -> Any:
    """A value of a type we do not know how to cast: a string is read as JSON when it is JSON."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _parse_sequence(v: Any) -> Any:
    v = _parse_json_like(v)
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)):
        raise _CastError("a list")
    return v


def caster_for(annotation: Any) -> Optional[Callable[[Any], Any]]:
    """The strict caster for a type annotation (int, float, bool, str, Optional[...], tuple/list), or None."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = caster_for(args[0]) if len(args) == 1 else None
        if inner is None:
            return None
        return _optional(inner) if type(None) in typing.get_args(annotation) else inner
    base = origin or annotation
    if base is bool:
        return parse_bool
    if base is int:
        return parse_int
    if base is float:
        return parse_float
    if base is str:
        return parse_str
    if base in (tuple, list):
        return _parse_sequence
    return None


def _cast(name: str, value: Any, cast: Callable[[Any], Any], where: str = "") -> Any:
    try:
        return cast(value)
    except _CastError as e:
        raise LocosnnError(f"{where}{name} must be {e}, got {value!r}") from None


# -- the run configuration ---------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every setting of a training run; the fields are the `locosnn train` flags (dashes become
    underscores) and the keys of a TOML/YAML config. :meth:`validate` casts and checks them all.
    ``rule_args`` holds the rule's own settings (``--rule-arg KEY=VALUE``)."""

    rule: str = "bptt"
    dataset: str = "fashion-mnist"
    arch: str = "784-500-500-10"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    readout_lr: float | None = None  # the output layer's learning rate (None: lr)
    lr_schedule: str = "constant"  # "constant" or "cosine" (per epoch, from lr to 0 over the run's epochs)
    optimizer: str = "adam"
    bias_step: str = "relative"  # nmom only: how a bias steps, "relative" (to its own norm) or "floor" (fixed)
    weight_decay: float = 0.0
    T: int = 8
    encoder: str = "direct"
    neuron: str = "lif"
    beta: float = 0.5
    theta: float = 1.0
    surrogate: str = "fast_sigmoid"
    slope: float = 5.0
    reset: str = "subtract"  # LIF/IF reset after a spike: "subtract" (soft) or "zero" (hard, exports exactly to NIR)
    readout: str = "membrane"
    init: str = "scaled"
    init_gain: float = 3.0
    loss: str = "ce"
    seed: int = 0
    data_dir: str | None = None
    val_size: int | float | None = None  # None: 5000 for the 60k-image sets, else 10%
    limit: int | None = None
    align_every: int = 0  # >0: every N steps log per-layer cosine / norm ratio of the update to BPTT's
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # "float32" or "float64": of the network's weights, state and inputs
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
        """Cast every field to its type (in place) and check its range; returns self."""
        for name, (cast, check, want) in FIELDS.items():
            v = _cast(name, getattr(self, name), cast)
            if v is not None and check is not None and not check(v):
                raise LocosnnError(f"{name} must be {want}, got {v!r}")
            setattr(self, name, v)
        bad = [seg for seg in self.arch.split("-") if not _ARCH_TOKEN.fullmatch(seg.strip())]
        if bad:
            which = "an empty layer" if any(not s.strip() for s in bad) else f"layer {bad[0]!r}"
            raise LocosnnError(f"bad architecture spec {self.arch!r}: {which} (tokens joined by single dashes, "
                               "e.g. 784-500-500-10, 784-500x10-10 or 1x28x28-c16k5s2-10)")
        if self.optimizer not in OPTIMIZERS:
            raise LocosnnError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.bias_step != "relative" and self.optimizer != "nmom":
            raise LocosnnError(f"bias_step={self.bias_step!r} applies to --optimizer nmom only (got {self.optimizer})")
        clash = sorted({"loss", "seed"} & set(self.rule_args))
        if clash:
            raise LocosnnError(f"rule_args may not set {', '.join(clash)}: use the run's own --{clash[0]} setting")
        self.rule_args = cast_rule_args(self.rule, self.rule_args)
        return self


def _choice(options: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(options)


#: field -> (caster, range check or None, what the check wants)
FIELDS: dict[str, tuple[Callable[[Any], Any], Optional[Callable[[Any], bool]], str]] = {
    "rule": (parse_str, None, ""),
    "dataset": (parse_str, None, ""),
    "arch": (parse_str, None, ""),
    "epochs": (parse_int, lambda v: v >= 1, ">= 1"),
    "batch_size": (parse_int, lambda v: v >= 1, ">= 1"),
    "lr": (parse_float, lambda v: v > 0, "> 0"),
    "readout_lr": (_optional(parse_float), lambda v: v > 0, "> 0 (or unset: lr)"),
    "lr_schedule": (parse_str, *_choice(("constant", "cosine"))),
    "optimizer": (parse_str, None, ""),  # membership in OPTIMIZERS, checked in validate()
    "bias_step": (parse_str, *_choice(BIAS_STEPS)),
    "weight_decay": (parse_float, lambda v: v >= 0, ">= 0"),
    "T": (parse_int, lambda v: v >= 1, ">= 1"),
    "encoder": (parse_str, *_choice(ENCODERS)),
    "neuron": (parse_str, *_choice(NEURONS)),
    "beta": (parse_float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "theta": (parse_float, lambda v: v > 0, "> 0"),
    "surrogate": (parse_str, *_choice(SURROGATES)),
    "slope": (parse_float, lambda v: v > 0, "> 0"),
    "reset": (parse_str, *_choice(RESETS)),
    "readout": (parse_str, *_choice(READOUTS)),
    "init": (parse_str, *_choice(INITS)),
    "init_gain": (parse_float, lambda v: v > 0, "> 0"),
    "loss": (parse_str, *_choice(LOSSES)),
    "seed": (parse_int, lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
    "data_dir": (_optional(parse_str), None, ""),
    "val_size": (_optional(parse_count_or_fraction), lambda v: v >= 0, ">= 0 (a count, or a fraction < 1)"),
    "limit": (_optional(parse_int), lambda v: v >= 1, ">= 1 (or unset for all samples)"),
    "align_every": (parse_int, lambda v: v >= 0, ">= 0 (0 = off)"),
    "device": (parse_str, lambda v: _DEVICE.fullmatch(v) is not None, "auto, cpu, cuda or cuda:N"),
    "dtype": (parse_str, *_choice(DTYPES)),
    "rule_args": (_parse_table, None, ""),
}

_DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?")


# -- device and dtype ------------------------------------------------------------------------------------
def resolve_device(name: str) -> "torch.device":
    """The torch device of a ``device`` setting: ``auto`` is cuda when a CUDA device is available, else cpu.
    Asking for cuda (or cuda:N) where there is none is a :class:`LocosnnError`."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _DEVICE.fullmatch(name) is None:
        raise LocosnnError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LocosnnError(f"--device {name}: no CUDA device is available")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise LocosnnError(f"--device {name}: there {'is' if n == 1 else 'are'} only {n} CUDA device"
                               f"{'' if n == 1 else 's'} (cuda:0{'' if n == 1 else f' to cuda:{n - 1}'})")
    return dev


def resolve_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a ``dtype`` setting (float32 or float64)."""
    import torch

    if name not in DTYPES:
        raise LocosnnError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return {"float32": torch.float32, "float64": torch.float64}[name]


# one '-'-separated token of an architecture spec: 784, 1x28x28, 500, 500x10, c16k5, c32k3s2p1
_ARCH_TOKEN = re.compile(r"\d+(?:x\d+){0,2}|c\d+k\d+(?:s\d+)?(?:p\d+)?")


# -- rule settings -------------------------------------------------------------------------------------
def _at_least(n: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= n), f">= {n}"


_POSITIVE = ((lambda v: v > 0), "> 0")
_UNIT = ((lambda v: 0 <= v <= 1), "in [0, 1]")
_DECAY = ((lambda v: v is None or 0 <= v <= 1), "in [0, 1] (or none: the neuron's decay)")
_NP = {"sigma": _POSITIVE}
_FEEDBACK = {"trace_decay": _DECAY}

#: rule -> {setting: (check, what it wants)}: range checks that need to know the rule
RULE_ARG_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "np": _NP,
    "loco": {**_NP, "rank": _at_least(1), "k": _at_least(0), "memory": _at_least(1), "tol": _at_least(0),
             "min_share": _UNIT, "per_batch": _at_least(1), "max_rows": _at_least(1),
             "kmeans_iters": _at_least(1), "window": _at_least(0), "projector_every": _at_least(1),
             "kmeans_every": _at_least(1), "track_decay": ((lambda v: 0 <= v < 1), "in [0, 1)")},
    "fa": _FEEDBACK,
    "dfa": {**_FEEDBACK, "feedback_scale": _POSITIVE},
    "opzo": {**_FEEDBACK, "feedback_scale": _POSITIVE, "alpha": _at_least(0), "lam": _UNIT},
    "sfdfa": {"eta_b": _UNIT},
    "owm": {"alpha": _POSITIVE},
    "sal": {**_FEEDBACK, "sal_steps": _at_least(0), "sal_lr": _POSITIVE, "sal_every": _at_least(0),
            "sal_batch": _at_least(1), "sal_tau": ((lambda v: v is None or v > 0), "> 0"),
            "sal_tau_ref": _at_least(1), "sal_tau_syn": _POSITIVE},
}


def rule_arg_types(rule: str) -> dict[str, Any]:
    """{setting: annotation} of a registered rule's ``__init__`` along its MRO ({} for an unknown rule)."""
    import inspect

    from .rules import RULES

    cls = RULES.get(rule)
    if cls is None:
        return {}
    types: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            hints = typing.get_type_hints(klass.__init__)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: leave that setting uncast
            hints = {}
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            types.setdefault(p.name, hints.get(p.name, Any))
    return types


def cast_rule_args(rule: str, args: dict[str, Any]) -> dict[str, Any]:
    """Cast each rule setting to the type annotated on the rule's ``__init__`` and check its range.
    A setting a registered rule does not have is an error naming the rule's settings; the settings of a rule
    that is not registered (a rule object passed to the Trainer) are left as they are."""
    types = rule_arg_types(rule)
    checks = RULE_ARG_CHECKS.get(rule, {})
    own = sorted(k for k in types if k not in ("loss", "seed"))
    unknown = sorted(str(k) for k in args if types and str(k) not in types)
    if unknown:
        raise LocosnnError(f"rule {rule!r} has no setting {', '.join(unknown)}; "
                           + (f"its settings: {', '.join(own)}" if own else "it has no settings of its own"))
    out: dict[str, Any] = {}
    for k, v in args.items():
        k = str(k)
        cast = caster_for(types[k]) if k in types else None
        if cast is None:
            out[k] = _parse_json_like(v) if k in types else v
            continue
        v = _cast(k, v, cast, where=f"rule {rule!r} setting ")
        check = checks.get(k)
        if check is not None and v is not None and not check[0](v):
            raise LocosnnError(f"rule {rule!r} setting {k} must be {check[1]}, got {v!r}")
        out[k] = v
    return out


# -- files ---------------------------------------------------------------------------------------------
def read_config_text(path: str | Path, what: str = "config file") -> str:
    """The text of a settings file, with one clear error for a missing, unreadable, binary or empty file."""
    path = Path(path)
    if not path.exists():
        raise LocosnnError(f"{what} {path} not found")
    if path.is_dir():
        raise LocosnnError(f"{what} {path} is a directory, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LocosnnError(f"{what} {path} is not a text file (not UTF-8); is it corrupt?") from None
    except OSError as e:
        raise LocosnnError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if not text.strip():
        raise LocosnnError(f"{what} {path} is empty")
    return text


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a flat dict of TrainConfig fields."""
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        if not path.exists():
            raise LocosnnError(f"config file {path} not found")
        raise LocosnnError(f"config file {path}: use .toml, .yaml or .yml")
    text = read_config_text(path)
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise LocosnnError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if data is None:
        raise LocosnnError(f"config file {path} is empty (only comments)")
    if not isinstance(data, dict):
        raise LocosnnError(f"config file {path} must hold a table of settings (key: value), "
                           f"not a {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}



__all__ = ["DTYPES", "OPTIMIZERS", "TrainConfig", "FIELDS", "RULE_ARG_CHECKS", "cast_rule_args", "caster_for",
           "load_config_file", "parse_bool", "parse_float", "parse_int", "read_config_text", "resolve_device",
           "resolve_dtype", "rule_arg_types"]
