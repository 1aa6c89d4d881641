"""Learning rules behind one interface, chosen by name."""
from __future__ import annotations

from typing import Any

from ..errors import LocosnnError
from .base import LearningRule
from .bptt import BPTT
from .fa_dfa import DFA, FA, OPZO
from .loco import LOCO
from .np import NodePerturbation
from .owm import OWM
from .sal import SAL
from .sfdfa import SFDFA

RULES: dict[str, type[LearningRule]] = {"bptt": BPTT, "np": NodePerturbation, "loco": LOCO, "fa": FA, "dfa": DFA, "opzo": OPZO,
                                   "sfdfa": SFDFA, "owm": OWM, "sal": SAL}


def make_rule(name: str, **kwargs: Any) -> LearningRule:
    """The learning rule registered as ``name`` (see ``RULES``), built with its settings
    (``loss``, ``seed`` and the rule's own keyword arguments); unknown settings are an error."""
    if name not in RULES:
        raise LocosnnError(f"unknown rule {name!r}; available: {', '.join(sorted(RULES))}")
    import inspect

    cls = RULES[name]
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs")}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise LocosnnError(f"rule {name!r} has no setting {', '.join(unknown)}; it accepts: {', '.join(sorted(accepted))}")
    return cls(**kwargs)


__all__ = ["LearningRule", "BPTT", "DFA", "FA", "LOCO", "NodePerturbation", "OPZO", "OWM", "RULES", "SAL", "SFDFA", "make_rule"]
