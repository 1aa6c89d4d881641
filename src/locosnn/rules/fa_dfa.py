"""Feedback alignment (FA, Lillicrap et al. 2016) and direct feedback alignment (DFA, Nokland 2016)
on the spiking core, online in time (OTTT-style presynaptic traces, no BPTT through the state).

Both rules run two forward passes and keep nothing per time step (memory flat in T):

1. pass 1 gives the readout and the closed-form output error e = dL/d out (mean-batch loss);
2. pass 2 replays the (deterministic) forward pass; a hook receives each layer's
   input, current and membrane at every step, and once the last layer of step t
   has run, the step's errors are formed top-down (FA) or broadcast (DFA):

   output layer:  delta_L[t] = dL/dv_L[t] = e / T            (membrane readout: mean of v)
                               = sigma'(v_L[t]) e / T         (rate readout)
   sent down:     e_t = dL/dI_L[t] = (e / T) sum_{k=0}^{T-1-t} beta_out^k   (membrane readout;
                  = delta_L[t] for the rate readout)
   FA hidden:     delta_l[t] = sigma'(v_l[t]) * (B_{l+1}^T e_t or B_{l+1}^T delta_{l+1}[t])   (B in place of W)
   DFA hidden:    delta_l[t] = sigma'(v_l[t]) * (B_l e_t)   (one hop, all layers at once)
   update:        G_l += delta_l[t] xhat_{l-1}[t]^T,  xhat[t] = lam xhat[t-1] + x[t]
                  (the bias: its input is 1, its trace sum_k lam^k)

sigma' is the network's surrogate derivative at the membrane (LIF/IF) or the rate
proxy's derivative (rate model). The presynaptic trace decay ``lam`` defaults to the
neuron's own decay (beta for LIF, 1 for IF, 0 for the stateless rate proxy), which makes
``xhat[t]`` equal to d v[t] / d W when resets are ignored (OTTT). With T = 1 both rules
reduce to their textbook non-spiking form; with B := W^T (FA) or B_l := the exact
one-hop Jacobian (DFA on one hidden layer) they equal the spatial gradient (tests).

Feedback matrices are rule state: plain tensors (requires_grad False), never network
parameters, drawn lazily at the first step from the rule's own seeded generator:
FA B_l ~ N(0, 1/fan_in) in W_l's shape; DFA B_l ~ N(0, 1/n_out) of shape (n_l, n_out).
``feedback="transpose"`` (FA) uses the current W^T instead (a test switch).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch

from ..errors import LocosnnError
from ..losses import output_error
from ..network import Noise, SpikingNetwork, repeat_batch, time_constant
from ..seeds import FEEDBACK, OPZO_NOISE, rule_generator
from .alignment import angle_deg
from .base import FeedbackRule, StepReport, accumulate, follow


class _OnlineFeedback(FeedbackRule):
    """Shared two-pass machinery; subclasses implement :meth:`hidden_deltas`."""

    def __init__(self, trace_decay: Optional[float] = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.trace_decay = trace_decay
        self.generator = rule_generator(self.seed, FEEDBACK)
        self.B: list[torch.Tensor] = []

    # -- feedback state ------------------------------------------------------
    def init_feedback(self, network: SpikingNetwork) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "B": [b.clone() for b in self.B]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.B = [b.clone() for b in state["B"]]

    # -- local quantities ----------------------------------------------------
    def _lam(self, network: SpikingNetwork, li: int) -> float:
        if self.trace_decay is not None:
            return self.trace_decay
        last = li == network.depth - 1
        if last and network.readout == "membrane":
            return network.out_beta
        return 0.0 if network.neuron.model == "rate" else network.neuron.decay

    def hidden_deltas(self, network: SpikingNetwork, factors: list[torch.Tensor],
                      delta_out: torch.Tensor) -> list[torch.Tensor]:
        """Errors dL/dv_l[t] of the hidden layers (in the layers' output shapes) for one step."""
        raise NotImplementedError

    # -- hooks for rules that inject noise (OPZO) -------------------------------
    def forward_noise(self, network: SpikingNetwork, clean_rows: int):
        """Noise for both passes (drawn from a generator that :meth:`step` rewinds). None: no noise."""
        return None

    def clean_rows(self, batch: int) -> int:
        """Clean copies of the batch run in front of the (noisy) rows that learn. 0: none."""
        return 0

    def observe(self, network: SpikingNetwork, out_cur: torch.Tensor, ref_cur: Optional[torch.Tensor],
                noises: list[Optional[torch.Tensor]]) -> None:
        """Called once per time step, after the last layer, before the errors are formed."""

    def _rng(self) -> Optional[torch.Generator]:
        return None

    # -- the step ------------------------------------------------------------
    @torch.no_grad()
    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> StepReport:
        if not self.B:
            self.init_feedback(network)
        self.B = follow(self.B, network.layers[0].weight)
        T, B = x_seq.shape[0], x_seq.shape[1]
        L = network.depth
        C = self.clean_rows(B)
        xin = repeat_batch(x_seq, 2) if C else x_seq
        rng = self._rng()
        start = rng.get_state() if rng is not None else None
        out = network.run(xin, noise=self.forward_noise(network, C)).out[C:]
        loss = self.loss_fn(out, y)
        e = output_error(out, y, self.loss) / B  # dL/d out of the batch-mean loss
        traces: list[Optional[torch.Tensor]] = [None] * L
        factors: list[Any] = [None] * L
        noises: list[Optional[torch.Tensor]] = [None] * L
        grads: list[Any] = [None] * L
        lams = [self._lam(network, li) for li in range(L)]
        bias_traces = [0.0] * L  # the bias's presynaptic input is 1: its trace is sum_k lam^k
        membrane = network.readout == "membrane"
        # a time-constant input (direct encoding): the first layer's trace is c_t x with c_t its bias trace, so
        # sum_t delta_t^T (c_t x) = (sum_t c_t delta_t)^T x, one product after the pass instead of one per step
        static = time_constant(xin)
        first: list[Any] = [None, None]  # (sum_t c_t delta_0[t], x)

        def hook(li, t, x, cur, mem, o, xi):
            ref_cur = cur[:C] if C else None
            if C:
                x, cur, mem = x[C:], cur[C:], mem[C:]
                xi = xi[C:] if xi is not None else None
            if li == 0 and static:  # the trace is c_t x (c_t = bias_traces[0]); not formed
                first[1] = x
            else:
                traces[li] = x if traces[li] is None else lams[li] * traces[li] + x
            bias_traces[li] = lams[li] * bias_traces[li] + 1.0
            factors[li] = network.local_derivative(li, cur, mem)
            noises[li] = xi
            if li < L - 1:
                return
            self.observe(network, cur, ref_cur, noises)
            delta_out = factors[L - 1] * e / T  # dL/dv_out[t], paired with the output's input trace
            # what the hidden layers receive: dL/dI_out[t], which for the leaky readout includes how
            # long the output keeps the current (sum_k beta^k over the remaining steps)
            if membrane:
                b = network.out_beta
                to_hidden = delta_out * sum(b ** k for k in range(T - t))
            else:
                to_hidden = delta_out
            deltas = self.hidden_deltas(network, factors, to_hidden) + [delta_out]
            for k, layer in enumerate(network.layers):
                if k == 0 and static:
                    d0 = deltas[0] * bias_traces[0]
                    first[0] = d0 if first[0] is None else first[0] + d0
                    continue
                gw, gb = layer.outer(deltas[k], traces[k])
                accumulate(grads, k, gw, gb * bias_traces[k])

        if rng is not None:
            rng.set_state(start)  # pass 2 sees pass 1's noise
        network.run(xin, noise=self.forward_noise(network, C), hook=hook)
        if static:
            grads[0] = network.layers[0].outer(first[0], first[1])
        self.after_step()
        self.write_grads(network, grads)
        return {"loss": float(loss.mean()), "out": out}

    def after_step(self) -> None:
        pass


class FA(_OnlineFeedback):
    """Feedback alignment through fixed random B_l (W_l's shape) instead of W_l^T.

    feedback: "random" (default) or "transpose" (B_l := current W_l: exact spatial backprop, for tests).
    trace_decay: presynaptic trace decay (default: the neuron's decay)."""

    name = "fa"

    def __init__(self, feedback: str = "random", **kw: Any) -> None:
        super().__init__(**kw)
        if feedback not in ("random", "transpose"):
            raise LocosnnError(f"unknown FA feedback {feedback!r}; choose random or transpose")
        self.feedback = feedback

    def init_feedback(self, network: SpikingNetwork) -> None:
        self.B = []
        for layer in network.layers:
            fan_in = layer.weight[0].numel()
            # drawn on the CPU generator in the default dtype (the same B on every device and dtype)
            self.B.append((torch.randn(layer.weight.shape, generator=self.generator) / fan_in ** 0.5).to(layer.weight))

    def feedback_angles(self, network: SpikingNetwork) -> list[float]:
        """angle(B_l, W_l) in degrees for the layers whose B carries the error down (l >= 1):
        B_l plays W_l^T's role, so this is angle(B_l^T, W_l^T); ~90 for random B, 0 for W^T."""
        if not self.B:
            return []
        self.B = follow(self.B, network.layers[0].weight)
        return [angle_deg(self._matrix(network, k), network.layers[k].weight) for k in range(1, network.depth)]

    def end_epoch(self, network: SpikingNetwork) -> dict[str, Any]:
        return {"angle_deg": self.feedback_angles(network)} if self.B else {}

    @contextlib.contextmanager
    def poison_feedback(self, network: SpikingNetwork, k: int) -> Iterator[None]:
        """feedback="transpose": the hop through layer k is W_k itself, so W_k is poisoned (and with it
        the forward pass; the cost model counts only the other layers' updates)."""
        if self.feedback != "transpose":
            with super().poison_feedback(network, k):
                yield
            return
        w = network.layers[k].weight
        keep = w.data.clone()
        w.data.fill_(math.nan)
        try:
            yield
        finally:
            w.data.copy_(keep)

    def _matrix(self, network: SpikingNetwork, k: int) -> torch.Tensor:
        return network.layers[k].weight.detach() if self.feedback == "transpose" else self.B[k]

    def hidden_deltas(self, network, factors, delta_out):
        L = network.depth
        deltas: list[torch.Tensor] = [delta_out.new_empty(0)] * (L - 1)
        d = delta_out
        for li in range(L - 2, -1, -1):
            nxt = network.layers[li + 1]
            Bm = self._matrix(network, li + 1)
            shape = factors[li].shape
            if nxt.kind == "linear":
                g = (d.reshape(d.shape[0], -1) @ Bm).reshape(shape)
            else:
                g = torch.nn.grad.conv2d_input(shape, Bm, d, stride=nxt.stride, padding=nxt.padding,
                                               dilation=nxt.dilation)
            d = factors[li] * g
            deltas[li] = d
        return deltas


class DFA(_OnlineFeedback):
    """Direct feedback alignment: the output error reaches every hidden layer through a fixed
    random B_l (n_l x n_out), no layer-to-layer backward pass. Conv layers: n_l is the number
    of channels and a channel's feedback is shared by all its positions (our choice; it keeps
    B small and the error spatially uniform, as in DFA for conv nets with global feedback).

    feedback_scale: std of B_l is feedback_scale / sqrt(n_out)."""

    name = "dfa"

    def __init__(self, feedback_scale: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.feedback_scale = feedback_scale

    def init_feedback(self, network: SpikingNetwork) -> None:
        n_out = network.n_out
        self.B = []
        for li in range(network.depth - 1):
            n_l = network.layers[li].weight.shape[0]  # channels for conv: broadcast over positions below
            w = network.layers[li].weight
            self.B.append((torch.randn(n_l, n_out, generator=self.generator) * self.feedback_scale / n_out ** 0.5).to(w))

    def hidden_deltas(self, network, factors, delta_out):
        deltas = []
        for li in range(network.depth - 1):
            g = delta_out @ self.B[li].T  # (B, n_l)
            f = factors[li]
            if f.dim() == 4:  # conv layer: the same feedback to every position of a channel
                g = g[:, :, None, None].expand_as(f)
            deltas.append(f * g.reshape(f.shape))
        return deltas



class OPZO(DFA):
    """Online pseudo-zeroth-order training (Xiao et al. 2024), on the two-pass online core.

    A forward pass with noise xi_l = alpha z_l (z ~ N(0, 1), or Rademacher) added to every
    hidden layer's current; the closed-form output error e = dL/d out; per hidden layer a
    momentum feedback matrix M_l (n_l x n_out) that tracks the transposed Jacobian of the
    output current with respect to the layer's current, at the same time step:

        M_l <- lam M_l + (1 - lam) mean_b xi_l,b[t] (o_b[t] - mean_b o[t])^T / alpha^2

    (o[t]: the output layer's current at step t, read from the noisy pass and centred over
    the batch to cut the variance of the clean part; the 1/alpha^2 makes M estimate J^T
    itself, so the learning rate does not depend on alpha). Top-down signal g_l[t] = M_l e_t
    with e_t = dL/dv_out[t], and the three-factor update
    G_l += (sigma'(v_l[t]) * g_l[t]) xhat_{l-1}[t]^T with OTTT presynaptic traces.
    M starts at zero, so with alpha = 0 (noise off) no hidden layer ever updates (the output
    layer's update is local and exact, as in every rule here). Choices the paper leaves open,
    ours: alpha 0.1, lam 0.99 (per time step), M = 0 at start, o = output current,
    accumulation over T before one optimiser step (``per_step`` is not offered: the
    optimiser steps once per batch for every rule). ``antithetic=True`` uses -z on every
    other batch. Noise replay: pass 2 restores the generator so it sees pass 1's noise.

    ``clean_reference=True`` (ours, behind a flag; default off = the paper's single noisy
    pass): a clean copy of the batch runs beside the noisy one and M correlates the noise
    with o_noisy - o_clean instead of the batch-centred o_noisy. The clean part of o,
    which has nothing to do with the noise, otherwise dominates the estimate by a factor
    ~ (spread of o / alpha)^2; the test shows M reaching the true Jacobian only with it."""

    name = "opzo"

    def __init__(self, alpha: float = 0.1, lam: float = 0.99, dist: str = "gaussian",
                 antithetic: bool = False, clean_reference: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        if alpha < 0 or not 0 <= lam < 1:
            raise LocosnnError(f"OPZO needs alpha >= 0 and 0 <= lam < 1, got alpha={alpha}, lam={lam}")
        if dist not in ("gaussian", "rademacher"):
            raise LocosnnError(f"unknown OPZO noise {dist!r}; choose gaussian or rademacher")
        self.alpha, self.lam, self.dist, self.antithetic = alpha, lam, dist, antithetic
        self.clean_reference = bool(clean_reference)
        self.noise_generator = rule_generator(self.seed, OPZO_NOISE)
        self.steps = 0

    def init_feedback(self, network: SpikingNetwork) -> None:
        self.B = [network.layers[li].weight.new_zeros(network.layers[li].weight.shape[0], network.n_out)
                  for li in range(network.depth - 1)]

    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s.update({"noise_generator": self.noise_generator.get_state(), "steps": self.steps})
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.noise_generator.set_state(state["noise_generator"])
        self.steps = state["steps"]

    def _rng(self) -> Optional[torch.Generator]:
        return self.noise_generator

    def clean_rows(self, batch: int) -> int:
        return batch if self.clean_reference and self.alpha > 0 else 0

    def forward_noise(self, network: SpikingNetwork, clean_rows: int):
        if self.alpha <= 0:
            return None
        sign = -1.0 if self.antithetic and self.steps % 2 == 1 else 1.0
        return Noise(sign * self.alpha, "current", self.dist, self.noise_generator,
                     layers=list(range(network.depth - 1)), clean_rows=clean_rows, shard=self.shard)

    def observe(self, network, out_cur, ref_cur, noises) -> None:
        """M_l <- lam M_l + (1 - lam) mean_b xi_l,b o_b^T / alpha^2, o centred (batch mean or clean copy)."""
        if self.alpha <= 0:
            return
        B = out_cur.shape[0]
        sh = self.shard
        if ref_cur is not None:
            oc = out_cur - ref_cur
        else:  # data-parallel: centred by the global batch mean
            m = out_cur.mean(0, keepdim=True)
            oc = out_cur - (m if sh is None else sh.mean(m))
        zs = []
        for k in range(network.depth - 1):
            z = noises[k]
            zs.append(z.reshape(B, -1) if z.dim() == 2 else z.mean((2, 3)))  # conv: one row of M per channel
        ups = [z.T @ oc for z in zs]
        if sh is not None:  # data-parallel: the global batch's sum, one collective for all layers
            ups, B = sh.sums(ups), sh.total
        for k, up in enumerate(ups):
            self.B[k].mul_(self.lam).add_(up / (B * self.alpha ** 2), alpha=1 - self.lam)

    def after_step(self) -> None:
        self.steps += 1
