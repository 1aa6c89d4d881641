"""Perturbation estimators for deep spiking networks: the options NP and LOCO share.

Why: with one loss difference broadcast to every layer and fresh noise at every
time step, NP's estimate for a 10-hidden-layer LIF net is at the noise floor (the
perturbation dimension is sum_l n_l x T, ~20,000 at 784-256x10-10, and the
per-layer gradient norms differ ~1,000x from layer 1 to the readout; see
``docs/deep.md``). Each option below attacks one factor. All are off by default,
so the plain NP/LOCO rules are unchanged; any of them switches the rule onto this
code path (recorded traces; ``online=True`` is not supported here).

Noise
  ``temporal="frozen"``  one draw per neuron per sample, held for all T steps
                         (dimension n_l instead of n_l T; Zuge et al. 2023). The
                         estimate pairs it with the time-mean presynaptic input, so it
                         is unbiased when inputs are constant in time (direct input,
                         rate neurons) and drops only the within-sample temporal
                         covariance of g[t] and x[t] otherwise;
  ``antithetic=True``    the pair (+xi, -xi) replaces (clean, noisy):
                         dL = (L(+xi) - L(-xi)) / 2 cancels the even-order terms;
  ``draws=K``            K independent draws per sample stacked along the batch;
  ``layer_sample=True``  each draw perturbs one layer only, l ~ uniform over the
                         perturbed layers, and the estimate is rescaled by 1/pi_l:
                         unbiased, without the other layers' noise in dL (a
                         one-pass version of Dalm et al.'s iterative NP).
Eligibility
  ``eligibility="noise"``     the injected xi (textbook NP; unbiased);
  ``eligibility="activity"``  ANP (Dalm, van Gerven & Ahmad, arXiv 2310.00965): the
                         measured current change da_l = I_noisy - I_clean, which
                         includes the noise propagated from the layers below, scaled
                         per sample by N / sum ||da||^2 over the layers that share the
                         loss (N their number of elements x T). Biased (a rotated,
                         PSD-preconditioned gradient), lower variance in upper layers.
Loss signal
  ``dl_norm=True``       divide dL by its running RMS (per loss);
  ``dl_clip=c``          clip |dL| at c x that running RMS (0 = off).
  ``local_loss=m``       (beyond the paper) blocks of m hidden layers; block j ends
                         in a local readout H_j (n x classes) on the time-averaged
                         spikes of its last layer, and its layers are scored by the
                         block's own loss difference dL_j (DECOLLE-style; Kaiser et
                         al. 2020). The last block (with the network's readout) uses
                         the global loss. ``local_heads="fixed"`` keeps H_j random;
                         ``"learned"`` trains H_j by its exact local delta rule
                         (softmax - onehot) rbar^T at ``head_lr``.
  ``readout_rule="delta"`` the readout layer learns by its own exact local gradient
                         (the output error times its presynaptic input, through the
                         leaky integrator); no perturbation estimate for it.
  ``train_hidden=False`` the hidden layers get no update: the readout-alone
                         baseline on the same initialisation.
Stabilisers
  ``average=a``          the hidden layers' update is an exponential moving average of
                         their per-batch estimates, G <- a G + (1 - a) G_batch (0 = off):
                         a single batch's estimate is mostly noise (split-half consistency
                         ~0.05 at init, 784-256x10-10), and a normalised step follows the
                         direction of what it is given, so the averaging has to happen
                         before the step (an optimiser's momentum 0.9 averages only ~10
                         batches). The average is rule state (checkpointed).
  ``homeostasis=eta``    hidden biases move towards a target firing rate
                         (b += eta (target_rate - rate) per step, written straight to
                         the parameter: a local, non-gradient plasticity).

What is broadcast, plainly: global loss: one scalar per sample (dL) (ANP adds its
normaliser, one more scalar); local losses: one scalar per block per sample plus
the label (for the heads); ``readout_rule="delta"``: the 10-d output error, at the
readout only. No rule here runs a backward pass through the hidden layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import LocosnnError
from ..losses import output_error
from ..network import SpikingNetwork, Trace, randn_on, repeat_batch, time_factors
from .base import follow

TEMPORAL = ("step", "frozen")
ELIGIBILITY = ("noise", "activity")
READOUT_RULES = ("np", "delta")
HEADS = ("fixed", "learned")


@dataclass
class DeepOptions:
    """The deep-network options of NP/LOCO (see the module docstring)."""

    temporal: str = "step"
    antithetic: bool = False
    draws: int = 1
    layer_sample: bool = False
    eligibility: str = "noise"
    dl_norm: bool = False
    dl_clip: float = 0.0
    local_loss: int = 0
    local_heads: str = "learned"
    head_lr: float = 0.05
    head_gain: float = 1.0
    readout_rule: str = "np"
    train_hidden: bool = True
    homeostasis: float = 0.0
    target_rate: float = 0.15
    average: float = 0.0

    def __post_init__(self) -> None:
        checks = [(self.temporal in TEMPORAL, f"temporal must be one of {', '.join(TEMPORAL)}, got {self.temporal!r}"),
                  (self.eligibility in ELIGIBILITY,
                   f"eligibility must be one of {', '.join(ELIGIBILITY)}, got {self.eligibility!r}"),
                  (self.readout_rule in READOUT_RULES,
                   f"readout_rule must be one of {', '.join(READOUT_RULES)}, got {self.readout_rule!r}"),
                  (self.local_heads in HEADS, f"local_heads must be one of {', '.join(HEADS)}, got {self.local_heads!r}"),
                  (isinstance(self.draws, int) and self.draws >= 1, f"draws must be an integer >= 1, got {self.draws!r}"),
                  (isinstance(self.local_loss, int) and self.local_loss >= 0,
                   f"local_loss must be an integer >= 0 (0 = off), got {self.local_loss!r}"),
                  (self.dl_clip >= 0, f"dl_clip must be >= 0, got {self.dl_clip}"),
                  (self.homeostasis >= 0, f"homeostasis must be >= 0, got {self.homeostasis}"),
                  (0 < self.target_rate < 1, f"target_rate must lie in (0, 1), got {self.target_rate}"),
                  (self.head_lr > 0 and self.head_gain > 0, "head_lr and head_gain must be > 0"),
                  (0 <= self.average < 1, f"average must lie in [0, 1), got {self.average}")]
        for ok, msg in checks:
            if not ok:
                raise LocosnnError(msg)

    @property
    def active(self) -> bool:
        """True when any option leaves plain NP (then the rule uses :class:`DeepEstimator`)."""
        return self != DeepOptions()


class PlannedNoise:
    """Noise for a stacked batch [clean (B) | +xi (K B) | -xi (K B, antithetic only)].

    Drawn per layer (lazily, in the layer's current shape) from the rule's generator:
    fresh at every step (``temporal="step"``) or once per sample (``"frozen"``).
    ``mask[l]`` (K B,) marks the draws that perturb layer l (all of them unless layer-sampled).
    """

    site = "current"
    indexed = True

    def __init__(self, sigma: float, B: int, opts: DeepOptions, perturbed: list[int], n_layers: int,
                 generator: torch.Generator, device: torch.device, dtype: torch.dtype, shard: Any = None) -> None:
        self.sigma, self.B, self.opts, self.generator = sigma, B, opts, generator
        self.shard = shard  # data-parallel: draw for the global batch, keep this process's rows
        self.P = opts.draws * B
        self.perturbed = perturbed
        self.frozen: dict[int, torch.Tensor] = {}
        self.mask: dict[int, torch.Tensor] = {}
        if opts.layer_sample and len(perturbed) > 1:
            draw = lambda shape: torch.randint(0, len(perturbed), shape, generator=generator)  # noqa: E731
            pick = (draw((self.P,)) if shard is None else shard.draw(draw, (self.P,))).to(device)
            self.pi = 1.0 / len(perturbed)
            for j, li in enumerate(perturbed):
                self.mask[li] = (pick == j).to(dtype)
        else:
            self.pi = 1.0
            for li in perturbed:
                self.mask[li] = torch.ones(self.P, dtype=dtype, device=device)
        self.n_layers = n_layers

    def applies_to(self, layer: int) -> bool:
        return layer in self.mask

    def _base(self, like: torch.Tensor, li: int) -> torch.Tensor:
        shape = (self.P,) + tuple(like.shape[1:])
        if self.opts.temporal == "frozen" and li in self.frozen:
            return self.frozen[li]
        if self.shard is None:
            z = randn_on(shape, self.generator, like.dtype, like.device) * self.sigma
        else:
            z = self.shard.draw(lambda s: randn_on(s, self.generator, like.dtype, like.device), shape) * self.sigma
        z = z * self.mask[li].view(-1, *([1] * (z.dim() - 1)))
        if self.opts.temporal == "frozen":
            self.frozen[li] = z
        return z

    def draw(self, like: torch.Tensor, layer: int = 0, step: int = 0) -> torch.Tensor:
        xi = self._base(like, layer)
        parts = [torch.zeros((self.B,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device), xi]
        if self.opts.antithetic:
            parts.append(-xi)
        return torch.cat(parts)


class RunningRMS:
    """Running root-mean-square of the loss differences of one loss (EMA of dL^2)."""

    def __init__(self, decay: float = 0.99) -> None:
        self.decay, self.value = decay, None

    def update(self, dl: torch.Tensor, shard: Any = None) -> float:
        m = (dl ** 2).mean()
        ms = float(m if shard is None else shard.mean(m))  # data-parallel: the global batch's mean
        self.value = ms if self.value is None else self.decay * self.value + (1 - self.decay) * ms
        return math.sqrt(self.value) + 1e-12


class DeepEstimator:
    """Stacked passes and per-layer estimates for the options in :class:`DeepOptions`.

    Owned by an NP/LOCO rule; uses the rule's generator, sigma and loss."""

    def __init__(self, opts: DeepOptions) -> None:
        self.opts = opts
        self.heads: list[torch.Tensor] = []
        self.rms: dict[int, RunningRMS] = {}
        self.avg: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = []

    # -- structure ---------------------------------------------------------------
    def blocks(self, network: SpikingNetwork) -> list[list[int]]:
        """Hidden-layer blocks; the last block holds the remaining hidden layers and the readout."""
        L = network.depth
        m = self.opts.local_loss
        if not m:
            return [list(range(L))]
        hidden = list(range(L - 1))
        out = [hidden[i:i + m] for i in range(0, len(hidden), m)]
        if len(out) > 1 and len(out[-1]) < m:  # keep at least m layers under the global loss
            out[-2].extend(out.pop())
        last = out.pop() if out else []
        return out + [last + [L - 1]]

    def perturbed_layers(self, network: SpikingNetwork) -> list[int]:
        L = network.depth
        hidden = list(range(L - 1)) if self.opts.train_hidden else []
        return hidden + ([L - 1] if self.opts.readout_rule == "np" else [])

    def init_heads(self, network: SpikingNetwork, generator: torch.Generator) -> None:
        n_out = network.n_out
        self.heads = []
        for blk in self.blocks(network)[:-1]:
            n = int(network.layers[blk[-1]].weight.shape[0])
            w = network.layers[blk[-1]].weight
            if w.dim() > 2:
                raise LocosnnError("local_loss supports fully connected layers only")
            # random in both modes (a zero head would give every draw the same loss: no signal)
            self.heads.append(torch.randn(n_out, n, generator=generator).to(w) * self.opts.head_gain / math.sqrt(n))

    # -- the step -----------------------------------------------------------------
    def step(self, rule: Any, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor):
        """Returns (clean trace, per-layer raw (G_W, G_b) or None, report extras)."""
        opts = self.opts
        if network.readout != "membrane" and opts.readout_rule == "delta":
            raise LocosnnError("readout_rule='delta' needs the membrane readout")
        T, B = x_seq.shape[:2]
        K = opts.draws
        L = network.depth
        blocks = self.blocks(network)
        if len(blocks) > 1 and not self.heads:
            self.init_heads(network, rule.generator)
        w0 = network.layers[0].weight
        self.heads = follow(self.heads, w0)
        self.avg = [None if g is None else tuple(follow(list(g), w0)) for g in self.avg]
        perturbed = self.perturbed_layers(network)
        shard = getattr(rule, "shard", None)
        noise = PlannedNoise(rule.sigma, B, opts, perturbed, L, rule.generator, w0.device, w0.dtype, shard=shard)
        reps = 1 + K * (2 if opts.antithetic else 1)
        xx = repeat_batch(x_seq, reps)
        tr = network.run(xx, noise=noise if perturbed else None, record=True)
        P = K * B
        plus = slice(B, B + P)
        minus = slice(B + P, B + 2 * P) if opts.antithetic else None

        clean = tr.rows(slice(0, B))
        l_clean = rule.loss_fn(clean.out, y)
        extras: dict[str, Any] = {}

        # the loss of each block on every row
        def block_loss(j: int) -> torch.Tensor:
            if j == len(blocks) - 1:
                return rule.loss_fn(tr.out, torch.cat([y] * reps))
            last = blocks[j][-1]
            rbar = torch.stack(tr.outputs[last]).mean(0).reshape(tr.out.shape[0], -1)
            return rule.loss_fn(rbar @ self.heads[j].T, torch.cat([y] * reps))

        grads: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * L
        for j, blk in enumerate(blocks):
            layers = [li for li in blk if li in perturbed]
            if not layers:
                continue
            lj = block_loss(j)
            dl = (lj[plus] - lj[minus]) / 2 if minus is not None else lj[plus] - lj[:B].repeat(K)
            if opts.dl_norm or opts.dl_clip:
                rms = self.rms.setdefault(j, RunningRMS()).update(dl, shard)
                if opts.dl_clip:
                    dl = dl.clamp(-opts.dl_clip * rms, opts.dl_clip * rms)
                if opts.dl_norm:
                    dl = dl / rms
            if j == len(blocks) - 1:
                extras["mean_abs_dl"] = float(dl.abs().mean())
            elig = {li: self._eligibility(tr, li, plus, minus, B, K) for li in layers}
            if opts.eligibility == "activity":
                n_el = sum(elig[li][0].numel() // P * len(elig[li]) for li in layers)
                sq = sum(sum((e.flatten(1) ** 2).sum(1) for e in elig[li]) for li in layers)
                scale = dl * n_el / (sq + 1e-12)
            else:
                scale = dl / rule.sigma ** 2
            if opts.temporal == "frozen":
                # one draw held for T steps perturbs all T currents at once: dL ~ xi . sum_t g[t], so the
                # weight gradient sum_t g[t] x[t]^T is estimated with the time-mean input (the ANP
                # normaliser likewise counts n neurons, not n T independent directions)
                scale = scale / T
            for li in layers:
                s = scale * noise.mask[li] / (noise.pi * P)
                e = torch.stack(elig[li])  # (T, P, ...)
                e = e * s.view(1, P, *([1] * (e.dim() - 2)))
                # the clean rows' inputs, once per draw (the first layer's: once, for a time-constant input)
                grads[li] = network.layers[li].outer(*time_factors(e, [a[:B] for a in tr.inputs[li]],
                                                                   li == 0 and tr.static_input, reps=K))
        if opts.average > 0:
            self.average(grads, perturbed, L, shard)
        if opts.readout_rule == "delta":
            grads[L - 1] = self.readout_delta(rule, network, clean, y)
        for li in range(L):
            if grads[li] is None:
                layer = network.layers[li]
                gb = torch.zeros_like(layer.bias) if layer.bias is not None else layer.weight.new_zeros(0)
                grads[li] = (torch.zeros_like(layer.weight).reshape(layer.weight.shape[0], -1), gb)
        if self.heads and opts.local_heads == "learned":
            self.learn_heads(network, clean, y, blocks, shard)
        if opts.homeostasis > 0 and opts.train_hidden:
            extras["rate"] = self.homeostasis(network, clean, shard)
        return clean, grads, l_clean, extras

    def average(self, grads: list, perturbed: list[int], L: int, shard: Any = None) -> None:
        a = self.opts.average
        if not self.avg:
            self.avg = [None] * L
        for li in perturbed:
            g = grads[li]
            if g is None:
                continue
            if shard is not None:  # data-parallel: average the global batch's estimate, so the state agrees
                g = tuple(shard.means(list(g)))
            prev = self.avg[li]
            self.avg[li] = g if prev is None else (a * prev[0] + (1 - a) * g[0], a * prev[1] + (1 - a) * g[1])
            grads[li] = self.avg[li]

    def _eligibility(self, tr: Trace, li: int, plus: slice, minus: Optional[slice], B: int, K: int) -> list[torch.Tensor]:
        if self.opts.eligibility == "noise":
            return [xi[plus] for xi in tr.noise[li]]
        if minus is not None:
            return [(c[plus] - c[minus]) / 2 for c in tr.currents[li]]
        return [c[plus] - c[:B].repeat(K, *([1] * (c.dim() - 1))) for c in tr.currents[li]]

    @staticmethod
    def readout_delta(rule: Any, network: SpikingNetwork, clean: Trace, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The readout's exact gradient of the batch-mean loss: dL/dI[t] = (e / B T) sum_k beta^k."""
        L = network.depth
        T = len(clean.inputs[L - 1])
        B = y.shape[0]
        e = output_error(clean.out, y, rule.loss) / B
        b = network.out_beta
        d = torch.stack([e * sum(b ** k for k in range(T - t)) / T for t in range(T)])
        x = torch.stack(clean.inputs[L - 1])
        return network.layers[L - 1].outer(d.flatten(0, 1), x.flatten(0, 1))

    def learn_heads(self, network: SpikingNetwork, clean: Trace, y: torch.Tensor, blocks: list[list[int]],
                    shard: Any = None) -> None:
        for j, H in enumerate(self.heads):
            rbar = torch.stack(clean.outputs[blocks[j][-1]]).mean(0).reshape(y.shape[0], -1)
            e = output_error(rbar @ H.T, y, "ce")
            if shard is None:
                H -= self.opts.head_lr * e.T @ rbar / y.shape[0]
            else:  # data-parallel: the global batch's update
                H -= self.opts.head_lr * shard.sum(e.T @ rbar) / shard.total

    def homeostasis(self, network: SpikingNetwork, clean: Trace, shard: Any = None) -> float:
        rates = []
        for li in range(network.depth - 1):
            layer = network.layers[li]
            r = torch.stack(clean.outputs[li]).mean(0)  # (B, n) or (B, C, H, W)
            r = r.transpose(0, 1).reshape(r.shape[1], -1).mean(1)
            if shard is not None:  # data-parallel: the global batch's rates (the bias is written directly)
                r = shard.mean(r)
            if layer.bias is not None:
                layer.bias.add_(self.opts.homeostasis * (self.opts.target_rate - r))
            rates.append(float(r.mean()))
        return sum(rates) / max(len(rates), 1)

    def state_dict(self) -> dict[str, Any]:
        return {"heads": [h.clone() for h in self.heads], "rms": {j: r.value for j, r in self.rms.items()},
                "avg": [None if g is None else (g[0].clone(), g[1].clone()) for g in self.avg]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads = [h.clone() for h in state.get("heads", [])]
        self.avg = [None if g is None else (g[0].clone(), g[1].clone()) for g in state.get("avg", [])]
        self.rms = {}
        for j, v in state.get("rms", {}).items():
            self.rms[int(j)] = RunningRMS()
            self.rms[int(j)].value = v
