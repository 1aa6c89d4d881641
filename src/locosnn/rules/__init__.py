"""Learning rules behind one interface, chosen by name."""
from __future__ import annotations

from typing import Any

from ..errors import LocosnnError
from .base import FeedbackRule, LearningRule, PerturbationRule, StepReport
from .bptt import BPTT
from .fa_dfa import DFA, FA, OPZO
from .loco import LOCO
from .np import NodePerturbation
from .owm import OWM
from .sal import SAL
from .sfdfa import SFDFA

RULES: dict[str, type[LearningRule]] = {"bptt": BPTT, "np": NodePerturbation, "loco": LOCO, "fa": FA, "dfa": DFA, "opzo": OPZO,
                                   "sfdfa": SFDFA, "owm": OWM, "sal": SAL}


def register_rule(name: str, cls: type[LearningRule], replace: bool = False) -> type[LearningRule]:
    """Add ``cls`` to ``RULES`` as ``name`` (then ``make_rule(name)``, the trainer and the cost metrics
    use it). A rule subclasses :class:`LearningRule`, or one of the families :class:`FeedbackRule` /
    :class:`PerturbationRule` whose interface the cost model measures. ``replace`` allows re-registering."""
    if not (isinstance(cls, type) and issubclass(cls, LearningRule)):
        raise LocosnnError(f"rule {name!r} must be a LearningRule subclass, got {cls!r}")
    if name in RULES and RULES[name] is not cls and not replace:
        raise LocosnnError(f"rule {name!r} is already registered ({RULES[name].__name__})")
    RULES[name] = cls
    return cls


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


__all__ = ["LearningRule", "FeedbackRule", "PerturbationRule", "StepReport", "BPTT", "DFA", "FA", "LOCO",
           "NodePerturbation", "OPZO", "OWM", "RULES", "SAL", "SFDFA", "make_rule", "register_rule"]
