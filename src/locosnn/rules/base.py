"""The learning-rule interface every rule implements.

A rule reads a trace of the forward pass and writes its update into each
parameter's ``.grad`` (the descent direction, as autograd would), so that any
torch optimiser applies it. It never reaches into the trainer.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, TypedDict

import torch

from ..losses import per_sample_loss
from ..network import SpikingNetwork, Trace


class _StepReportRequired(TypedDict):
    loss: float
    out: torch.Tensor


class StepReport(_StepReportRequired, total=False):
    """What :meth:`LearningRule.step` returns: ``loss`` (mean over the batch, on the clean pass) and
    ``out`` (the clean readout, detached) always; the extras below when a rule has them (rules may
    add more numbers, which the trainer logs)."""

    mean_abs_dl: float   # perturbation rules: mean |L(noisy) - L(clean)|
    extra_macs: float    # dense products done outside ``network.run`` (SFDFA's forward-mode tangent)


class LearningRule:
    """Base class. Subclasses implement :meth:`step`.

    step(network, x_seq, y) -> report dict with at least ``loss`` (float, mean over
    the batch, measured on the clean forward pass) and ``out`` (the clean readout,
    detached) so the trainer can count accuracy without another pass.
    """

    name = "base"
    #: the update backpropagates through the autograd graph (its stages are measured on that graph)
    uses_backprop = False
    #: the rule trains networks with conv layers (False: it raises on one at the first step)
    supports_conv = True
    #: data-parallel training: this process's rows of the global batch (``locosnn.distributed.Shard``),
    #: set by the trainer before each step; rules that draw per-sample noise or use batch statistics
    #: read it (see ``docs/distributed.md``). None in a single process.
    shard: Any = None

    def __init__(self, loss: str = "ce", seed: int = 0) -> None:
        self.loss = loss
        self.seed = seed

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(out, y, self.loss)

    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> StepReport:
        raise NotImplementedError

    def stage_counts(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> list[int] | None:
        """Per layer, the sequential update stages of this rule, for rules outside the declared families
        (:class:`FeedbackRule`, :class:`PerturbationRule`, ``uses_backprop``) whose cost
        ``locosnn.cost.update_stages`` cannot measure from the family interface. None: measure by family."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Rule-owned state (feedback matrices, projector memory, RNG) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- hooks the training loop's owners call (``locosnn.train.Trainer``, ``locosnn continual``) ----------
    # They are the whole conversation between a caller and a rule: no caller tests a rule's name or
    # probes for methods that are not declared here.
    def setup(self, network: SpikingNetwork, optimizer: Any) -> list[str]:
        """Called once per run (and again on resume) in every entry point, before the first step.
        Returns warning lines about the setting (e.g. an optimiser that undoes the rule's update),
        which the caller prints as ``warning: ...``; never changes the network or the optimiser."""
        return []

    def end_epoch(self, network: SpikingNetwork) -> dict[str, Any]:
        """Called by the trainer after each training epoch, before evaluation (e.g. SAL's
        feedback-alignment phase). Returns numbers or per-layer lists to log as ``rule_<key>``."""
        return {}

    def end_task(self, network: SpikingNetwork) -> dict[str, Any]:
        """Called by ``locosnn continual`` at each task boundary, after the task's last epoch, before
        evaluation (rules with task-boundary state, e.g. OWM ``update=task``). Returns numbers to
        log as ``rule_<key>``. The plain trainer has no tasks and never calls it."""
        return {}

    @staticmethod
    def write_grads(network: SpikingNetwork, grads: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Write per-layer (dW, db) into .grad (replacing any previous value)."""
        for layer, (gw, gb) in zip(network.layers, grads):
            layer.weight.grad = gw.reshape(layer.weight.shape).detach().clone()
            if layer.bias is not None and gb is not None:
                layer.bias.grad = gb.reshape(layer.bias.shape).detach().clone()


class FeedbackRule(LearningRule):
    """Family: the output error reaches the hidden layers through feedback matrices held as rule state
    (FA, DFA, OPZO, SAL, SFDFA). ``self.B`` holds them, drawn by :meth:`init_feedback` at the first step.

    The cost model (``locosnn.cost.feedback_stages``) asks :meth:`feedback_tensors` how many feedback
    hops there are and poisons one at a time with :meth:`poison_feedback`: a layer whose update turns
    NaN depends on that hop."""

    B: list[torch.Tensor]

    def init_feedback(self, network: SpikingNetwork) -> None:
        raise NotImplementedError

    def feedback_tensors(self, network: SpikingNetwork) -> list[torch.Tensor]:
        """The feedback matrices (drawn first if the rule has not stepped yet)."""
        if not self.B:
            self.init_feedback(network)
        return self.B

    @contextlib.contextmanager
    def poison_feedback(self, network: SpikingNetwork, k: int) -> Iterator[None]:
        """Within the block, feedback hop ``k`` carries NaN (default: ``B[k]``); restored after."""
        saved = [b.clone() for b in self.feedback_tensors(network)]
        self.B[k] = torch.full_like(saved[k], math.nan)
        try:
            yield
        finally:
            self.B = [b.clone() for b in saved]


class PerturbationRule(LearningRule):
    """Family: each layer's update is estimated from its own forward records and the broadcast loss
    difference of perturbed passes (NP, LOCO).

    The cost model (``locosnn.cost.perturbation_stages``) runs :meth:`perturbed_passes`, then
    recomputes each layer's :meth:`estimate` and :meth:`layer_transform` from traces in which
    :meth:`poison_records` has replaced every other layer's records by NaN."""

    def perturbed_passes(self, network: SpikingNetwork, x_seq: torch.Tensor,
                         y: torch.Tensor) -> tuple[Trace, Trace, torch.Tensor, torch.Tensor]:
        """(clean trace, noisy trace, dL per sample, clean loss per sample)."""
        raise NotImplementedError

    def estimate(self, network: SpikingNetwork, noisy: Trace,
                 dl: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer raw estimate (G_W, G_b) from the noisy trace and the loss differences."""
        raise NotImplementedError

    def layer_transform(self, network: SpikingNetwork, clean: Trace, li: int, gw: torch.Tensor,
                        gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer, local post-processing of the estimate (reads only layer li's records). Default: identity."""
        return gw, gb

    @staticmethod
    def poison_records(trace: Trace, keep: int) -> Trace:
        """``trace`` with the forward records of every layer but ``keep`` replaced by NaN."""
        nan = lambda lists: [per if li == keep else [torch.full_like(a, math.nan) for a in per]  # noqa: E731
                             for li, per in enumerate(lists)]
        return Trace(out=trace.out, inputs=nan(trace.inputs), currents=nan(trace.currents),
                     membranes=nan(trace.membranes), outputs=nan(trace.outputs), noise=nan(trace.noise),
                     static_input=trace.static_input)


def follow(tensors: list[torch.Tensor], ref: torch.Tensor) -> list[torch.Tensor]:
    """Rule state (feedback matrices, heads) on ``ref``'s device with ``ref``'s dtype: a network
    moved with ``.to()`` after the state was made (or loaded) takes its rule state along."""
    return [t if t.dtype == ref.dtype and t.device == ref.device else t.to(ref) for t in tensors]


def accumulate(grads: list, k: int, gw: torch.Tensor, gb: torch.Tensor) -> None:
    """grads[k] += (gw, gb), starting from None (per-step accumulation in online rules)."""
    grads[k] = (gw, gb) if grads[k] is None else (grads[k][0] + gw, grads[k][1] + gb)
