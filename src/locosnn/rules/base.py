"""The learning-rule interface every rule implements.

A rule reads a trace of the forward pass and writes its update into each
parameter's ``.grad`` (the descent direction, as autograd would), so that any
torch optimiser applies it. It never reaches into the trainer.
"""
from __future__ import annotations

from typing import Any

import torch

from ..losses import per_sample_loss
from ..network import SpikingNetwork


class LearningRule:
    """Base class. Subclasses implement :meth:`step`.

    step(network, x_seq, y) -> report dict with at least ``loss`` (float, mean over
    the batch, measured on the clean forward pass) and ``out`` (the clean readout,
    detached) so the trainer can count accuracy without another pass.
    """

    name = "base"
    #: sequential update stages after the forward pass(es): 1 for local rules, L for BPTT
    uses_backprop = False
    #: data-parallel training: this process's rows of the global batch (``locosnn.distributed.Shard``),
    #: set by the trainer before each step; rules that draw per-sample noise or use batch statistics
    #: read it (see ``docs/distributed.md``). None in a single process.
    shard: Any = None

    def __init__(self, loss: str = "ce", seed: int = 0) -> None:
        self.loss = loss
        self.seed = seed

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(out, y, self.loss)

    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Rule-owned state (feedback matrices, projector memory, RNG) for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def end_epoch(self, network: SpikingNetwork) -> dict[str, Any]:
        """Called by the trainer after each training epoch, before evaluation (e.g. SAL's
        feedback-alignment phase). Returns numbers or per-layer lists to log as ``rule_<key>``."""
        return {}

    @staticmethod
    def write_grads(network: SpikingNetwork, grads: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Write per-layer (dW, db) into .grad (replacing any previous value)."""
        for layer, (gw, gb) in zip(network.layers, grads):
            layer.weight.grad = gw.reshape(layer.weight.shape).detach().clone()
            if layer.bias is not None and gb is not None:
                layer.bias.grad = gb.reshape(layer.bias.shape).detach().clone()


def follow(tensors: list[torch.Tensor], ref: torch.Tensor) -> list[torch.Tensor]:
    """Rule state (feedback matrices, heads) on ``ref``'s device with ``ref``'s dtype: a network
    moved with ``.to()`` after the state was made (or loaded) takes its rule state along."""
    return [t if t.dtype == ref.dtype and t.device == ref.device else t.to(ref) for t in tensors]


def accumulate(grads: list, k: int, gw: torch.Tensor, gb: torch.Tensor) -> None:
    """grads[k] += (gw, gb), starting from None (per-step accumulation in online rules)."""
    grads[k] = (gw, gb) if grads[k] is None else (grads[k][0] + gw, grads[k][1] + gb)
