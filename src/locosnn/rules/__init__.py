"""Learning rules behind one interface, chosen by name."""
from __future__ import annotations

from typing import Any

from ..errors import LocosnnError
from .base import LearningRule
from .bptt import BPTT

RULES: dict[str, type[LearningRule]] = {"bptt": BPTT}


def make_rule(name: str, **kwargs: Any) -> LearningRule:
    if name not in RULES:
        raise LocosnnError(f"unknown rule {name!r}; available: {', '.join(sorted(RULES))}")
    return RULES[name](**kwargs)


__all__ = ["LearningRule", "BPTT", "RULES", "make_rule"]
