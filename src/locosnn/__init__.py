"""locosnn: training spiking neural networks without backpropagation.

One spiking network, one data pipeline and one trainer for every learning rule: BPTT (the
reference), node perturbation (NP), LOCO, FA, DFA, OPZO, SFDFA, SAL and OWM. The rule is chosen
by name::

    from locosnn import TrainConfig, Trainer

    cfg = TrainConfig(rule="dfa", dataset="digits", arch="64-128-10", epochs=5, lr=1e-2)
    history = Trainer(cfg, out=None, progress=False).fit()   # one dict per epoch
    print(history[-1]["test_acc"])

Public API (``__all__``):

* running: :class:`TrainConfig` (every setting of a run), :class:`Trainer` (``fit()``,
  checkpoints, exact resume), :func:`evaluate`, :func:`run_continual` with
  :class:`ContinualConfig` and :func:`continual_metrics` (task streams, accuracy matrix, ACC /
  BWT / forgetting);
* the model: :class:`SpikingNetwork`, :class:`NeuronConfig`, :class:`Noise`, :class:`Trace`,
  :func:`encode` (direct, rate and latency input encoders);
* rules: ``RULES`` (name -> rule class), :func:`make_rule`, :class:`LearningRule` (the interface:
  ``step(network, x_seq, y)`` writes ``.grad``);
* data: ``DATASETS`` (registered names), :func:`load_dataset`;
* diagnostics and export: :func:`alignment`, :func:`estimate_variance` (a rule's update against
  the BPTT gradient), :func:`to_nir`, :func:`from_nir`, :func:`export_run` (NIR);
* errors: :class:`LocosnnError` (a user error: one message, exit code 2 on the command line),
  :class:`NonFiniteError` (a diverged run);
* ``__version__``.

Names other than the model classes and errors are imported on first use, so ``import locosnn``
costs little more than ``import torch``.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._version import __version__

from .errors import LocosnnError, NonFiniteError  # noqa: E402
from .network import Noise, SpikingNetwork, Trace  # noqa: E402
from .neurons import NeuronConfig  # noqa: E402

#: public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "TrainConfig": "locosnn.config",
    "Trainer": "locosnn.train",
    "evaluate": "locosnn.train",
    "make_rule": "locosnn.rules",
    "RULES": "locosnn.rules",
    "LearningRule": "locosnn.rules",
    "load_dataset": "locosnn.data",
    "DATASETS": "locosnn.data",
    "encode": "locosnn.encoding",
    "run_continual": "locosnn.continual",
    "ContinualConfig": "locosnn.continual",
    "continual_metrics": "locosnn.continual",
    "alignment": "locosnn.diagnostics",
    "estimate_variance": "locosnn.diagnostics",
    "to_nir": "locosnn.export",
    "from_nir": "locosnn.export",
    "export_run": "locosnn.export",
}

__all__ = [
    "TrainConfig", "Trainer", "evaluate",
    "SpikingNetwork", "NeuronConfig", "Noise", "Trace", "encode",
    "RULES", "make_rule", "LearningRule",
    "DATASETS", "load_dataset",
    "run_continual", "ContinualConfig", "continual_metrics",
    "alignment", "estimate_variance",
    "to_nir", "from_nir", "export_run",
    "LocosnnError", "NonFiniteError",
    "__version__",
]


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'locosnn' has no attribute {name!r}")
    value = getattr(_importlib.import_module(mod), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({n for n in globals() if not n.startswith("_")} | set(__all__))


if _TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .config import TrainConfig
    from .continual import ContinualConfig, continual_metrics, run_continual
    from .data import DATASETS, load_dataset
    from .diagnostics import alignment, estimate_variance
    from .encoding import encode
    from .export import export_run, from_nir, to_nir
    from .rules import RULES, LearningRule, make_rule
    from .train import Trainer, evaluate
