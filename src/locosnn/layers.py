"""Spiking layers: a synapse (Linear or Conv2d) whose current drives a neuron.

A layer holds only weights; the neuron state lives in ``network.run`` so that
rules can rerun the same step with noise or without a graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpikingLinear(nn.Linear):
    """Fully connected synapse: I[t] = W x[t] + b."""

    kind = "linear"

    def current(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Presynaptic vectors as rows, (N, d_in): the input itself."""
        return x.reshape(x.shape[0], -1)

    def outer(self, e: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local update from postsynaptic errors e (N, n_out) and presynaptic inputs x (N, ...):
        (sum_n e_n x_n^T, sum_n e_n), in the weight's and bias's shapes."""
        return e.T @ x.reshape(x.shape[0], -1), e.sum(0)


class SpikingConv2d(nn.Conv2d):
    """Convolutional synapse: I[t] = W * x[t] + b; im2col patches are its presynaptic vectors."""

    kind = "conv"

    def current(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        return F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """im2col of x: rows are (C_in * kh * kw) patches, one per sample and output position."""
        cols = self._unfold(x)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def outer(self, e: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local update from errors e (N, C_out, H, W) and inputs x (N, C_in, H_in, W_in), through
        im2col patches: ((C_out, C_in*kh*kw), (C_out,))."""
        e = e.flatten(2)
        return torch.einsum("bcp,bdp->cd", e, self._unfold(x)), e.sum((0, 2))
