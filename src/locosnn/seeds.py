"""Named random streams: every seeded generator in the package, derived from the run's ``seed``.

Each stream is a pure function of the run seed, so streams never share a generator and a rule's
noise does not shift when another part of the run draws more numbers. The values are those the
code used before they were named here (changing one changes results: treat them as frozen).

Rule streams (``rule_generator(seed, stream)``: ``torch.Generator`` seeded ``RULE_STRIDE * seed + stream``):

=====================  =====  =============================================================
stream                 value  used by
=====================  =====  =============================================================
``NP_NOISE``           1      NP / LOCO node-perturbation noise
``LOCO_PROJECTION``    2      LOCO's random projection of the input subspace
``FEEDBACK``           3      FA / DFA / OPZO (and SAL) feedback matrices
``OPZO_NOISE``         4      OPZO's forward noise
``SAL_PHASE``          5      SAL's spike-based alignment phase
``SFDFA_FEEDBACK``     5      SFDFA's feedback matrices (shares the value with ``SAL_PHASE``:
                              no rule uses both)
=====================  =====  =============================================================

Run streams (offsets of the run seed, used by the trainer, the continual runner and the cost
probe): ``TRAIN_ENCODER`` (seed + 1, encoder noise of training batches), ``REPLAY`` (seed + 2,
continual replay), ``EVAL_ENCODER`` (10_000 + seed, fixed encoder noise of evaluation),
``EPOCH_SHUFFLE`` (seed * 100_003 + epoch), ``TASK_SHUFFLE`` (seed * 1_000_003 + 1009 * task +
epoch) and ``TEST_SPLIT`` (12345: the fixed test split of datasets without one, independent of
the seed).
"""
from __future__ import annotations

import torch

#: multiplier of the run seed in every rule stream (a prime, so streams of nearby seeds do not collide)
RULE_STRIDE = 10_007

NP_NOISE = 1
LOCO_PROJECTION = 2
FEEDBACK = 3
OPZO_NOISE = 4
SAL_PHASE = 5
SFDFA_FEEDBACK = 5

TRAIN_ENCODER = 1
REPLAY = 2
EVAL_ENCODER = 10_000
EPOCH_SHUFFLE = 100_003
TASK_SHUFFLE = 1_000_003
TASK_SHUFFLE_TASK = 1009
TEST_SPLIT = 12345


def rule_seed(seed: int, stream: int) -> int:
    """The integer seed of a rule's ``stream`` for run seed ``seed``."""
    return RULE_STRIDE * seed + stream


def rule_generator(seed: int, stream: int) -> torch.Generator:
    """A fresh CPU generator for a rule's ``stream`` (see the table above)."""
    return torch.Generator().manual_seed(rule_seed(seed, stream))


def train_encoder_seed(seed: int) -> int:
    return seed + TRAIN_ENCODER


def replay_seed(seed: int) -> int:
    return seed + REPLAY


def eval_encoder_seed(seed: int) -> int:
    return EVAL_ENCODER + seed


def epoch_shuffle_seed(seed: int, epoch: int) -> int:
    return seed * EPOCH_SHUFFLE + epoch


def task_shuffle_seed(seed: int, task: int, epoch: int) -> int:
    return seed * TASK_SHUFFLE + TASK_SHUFFLE_TASK * task + epoch
