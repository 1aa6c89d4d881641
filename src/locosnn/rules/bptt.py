"""BPTT reference: surrogate-gradient backpropagation through time.

The accuracy ceiling and the gradient oracle the other rules are compared with.
The surrogate (fast sigmoid or atan, slope k) is a property of the network's
NeuronConfig so that every rule sees the same neuron.
"""
from __future__ import annotations

import torch

from ..network import SpikingNetwork
from .base import LearningRule, StepReport


class BPTT(LearningRule):
    name = "bptt"
    uses_backprop = True

    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> StepReport:
        network.zero_grad(set_to_none=True)
        tr = network.run(x_seq, grad=True)
        loss = self.loss_fn(tr.out, y).mean()
        loss.backward()
        return {"loss": float(loss.detach()), "out": tr.out.detach()}


def bptt_gradients(network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> list[torch.Tensor]:
    """The BPTT gradient of every parameter on one batch, without touching .grad (an oracle)."""
    from ..losses import per_sample_loss

    params = list(network.parameters())
    out = network.run(x_seq, grad=True).out
    return list(torch.autograd.grad(per_sample_loss(out, y, loss).mean(), params))
