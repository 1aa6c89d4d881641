"""Node perturbation (NP): one broadcast scalar per sample, a local estimate per layer.

Fiete & Seung (2006); the rate version of the LOCO authors' code (Ma & Yu 2026).
A clean pass and a noisy pass run on the same batch, as one concatenated batch
(the first B rows get no noise). With noise xi_l[t] ~ N(0, sigma^2) injected
into every layer's synaptic current at every step (default site "current"):

    dL_b = L_noisy,b - L_clean,b
    G_l  = (1/B) sum_b (dL_b / sigma^2) sum_t xi_l,b[t] x_{l-1},b[t]^T

(x the presynaptic input of the noisy pass; the bias gets sum_t xi). This is an
unbiased estimate of the gradient of the noise-smoothed loss and needs no
surrogate derivative. Site "output" adds the noise to the layer's output
(spikes or rates) instead, as the authors' rate code does; the estimate of
dL/ds is then carried to the current by the local derivative (surrogate'(v)
for spiking layers, f'(z) for the rate proxy).

Deviation from the authors' rate code (named): their eligibility is the measured
activity change (a - mu) f'(z); we use the injected noise xi itself, which is
the textbook NP estimator and is exact in expectation for both neuron types.

No autograd anywhere: everything runs under torch.no_grad.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import LocosnnError
from ..network import Noise, SpikingNetwork, Trace, repeat_batch, time_factors
from ..seeds import NP_NOISE, rule_generator
from .base import PerturbationRule, StepReport, accumulate
from .perturb import DeepEstimator, DeepOptions


class NodePerturbation(PerturbationRule):
    """NP. Parameters: sigma (noise std), site ("current" | "output"), dist ("gaussian" |
    "rademacher" | "uniform"), concat (clean and noisy pass as one batch), online (memory
    flat in T: replay the noise in a second noisy pass instead of recording the trace).

    Options for deep networks (all off by default; see ``rules/perturb.py``): temporal
    ("step" | "frozen"), antithetic, draws, layer_sample, eligibility ("noise" | "activity"),
    dl_norm, dl_clip, local_loss, local_heads ("learned" | "fixed"), head_lr, head_gain,
    readout_rule ("np" | "delta"), train_hidden, homeostasis, target_rate, average."""

    name = "np"

    def __init__(self, sigma: float = 0.2, site: str = "current", dist: str = "gaussian",
                 concat: bool = True, online: bool = False, temporal: str = "step", antithetic: bool = False,
                 draws: int = 1, layer_sample: bool = False, eligibility: str = "noise", dl_norm: bool = False,
                 dl_clip: float = 0.0, local_loss: int = 0, local_heads: str = "learned", head_lr: float = 0.05,
                 head_gain: float = 1.0, readout_rule: str = "np", train_hidden: bool = True,
                 homeostasis: float = 0.0, target_rate: float = 0.15, average: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.deep = DeepOptions(temporal=temporal, antithetic=bool(antithetic), draws=draws,
                                layer_sample=bool(layer_sample), eligibility=eligibility, dl_norm=bool(dl_norm),
                                dl_clip=float(dl_clip), local_loss=local_loss, local_heads=local_heads,
                                head_lr=float(head_lr), head_gain=float(head_gain), readout_rule=readout_rule,
                                train_hidden=bool(train_hidden), homeostasis=float(homeostasis),
                                target_rate=float(target_rate), average=float(average))
        self.deep_estimator = DeepEstimator(self.deep) if self.deep.active else None
        if self.deep_estimator is not None and (online or site != "current" or dist != "gaussian" or not concat):
            raise LocosnnError("the deep-network options (temporal, antithetic, draws, ...) need the defaults "
                               "online=False, site='current', dist='gaussian', concat=True")
        if sigma <= 0:
            raise LocosnnError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.site, self.dist, self.concat = sigma, site, dist, concat
        self.online = bool(online)
        Noise(sigma, site, dist)  # validates site and dist
        self.generator = rule_generator(self.seed, NP_NOISE)

    # -- forward passes ------------------------------------------------------
    def perturbed_passes(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor):
        """Run the clean and noisy passes; return (clean trace, noisy trace, dL per sample)."""
        B = x_seq.shape[1]
        if self.concat:
            tr = network.run(repeat_batch(x_seq, 2), noise=self._noise(B), record=True)
            clean, noisy = split_trace(tr, B)
        else:
            clean = network.run(x_seq, record=True)
            noisy = network.run(x_seq, noise=self._noise(), record=True)
        l_clean = self.loss_fn(clean.out, y)
        l_noisy = self.loss_fn(noisy.out, y)
        return clean, noisy, l_noisy - l_clean, l_clean

    # -- the local estimate -----------------------------------------------------
    def local_signal(self, network: SpikingNetwork, noisy: Trace, li: int, t: int) -> torch.Tensor:
        """xi_l[t] carried to the synaptic current (current site: xi itself)."""
        return self.signal(network, li, noisy.noise[li][t], noisy.currents[li][t], noisy.membranes[li][t])

    def signal(self, network: SpikingNetwork, li: int, xi: torch.Tensor, cur: torch.Tensor,
               mem: torch.Tensor) -> torch.Tensor:
        if self.site == "current":
            return xi
        return xi * network.local_derivative(li, cur, mem)

    def estimate(self, network: SpikingNetwork, noisy: Trace, dl: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (G_W, G_b) in the parameters' shapes (conv: (C_out, C_in*k*k))."""
        return [network.layers[li].outer(e, x) for li, e, x in self.estimate_factors(network, noisy, dl)]

    def estimate_factors(self, network: SpikingNetwork, noisy: Trace, dl: torch.Tensor):
        """Per layer, (li, e, x) with G_l = layer.outer(e, x): the scaled eligibilities e and the presynaptic
        inputs x of all T steps stacked along the rows (one GEMM per layer); for the first layer of a
        time-constant input (``Trace.static_input``), the eligibilities summed over time and the one input
        (T times fewer rows, equal up to rounding). Lazy: one layer at a time."""
        B = dl.shape[0]
        scale = (dl / (self.sigma ** 2 * B))
        for li, layer in enumerate(network.layers):
            T = len(noisy.noise[li])
            sig = torch.stack([self.local_signal(network, noisy, li, t) for t in range(T)])
            e = sig * scale.view(1, B, *([1] * (sig.dim() - 2)))
            yield (li, *time_factors(e, noisy.inputs[li], li == 0 and noisy.static_input))

    def _noise(self, clean_rows: int = 0) -> Noise:
        return Noise(self.sigma, self.site, self.dist, self.generator, clean_rows=clean_rows, shard=self.shard)

    def online_step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor):
        """Memory flat in T: pass 1 (clean | noisy, one batch) gives dL and the clean
        inputs' time-sum; pass 2 replays the same noise (generator state restored)
        and accumulates sum_t (dL/sigma^2) xi x^T per layer at every step.
        Costs one more noisy forward pass than the recorded mode."""
        B, T = x_seq.shape[1], x_seq.shape[0]
        xx = repeat_batch(x_seq, 2)
        start = self.generator.get_state()
        sums: list[Any] = [None] * network.depth

        def h_clean(li, t, x, cur, mem, out, xi):
            sums[li] = x[:B] if sums[li] is None else sums[li] + x[:B]

        tr = network.run(xx, noise=self._noise(B), hook=h_clean)
        l_clean, l_noisy = self.loss_fn(tr.out[:B], y), self.loss_fn(tr.out[B:], y)
        dl = l_noisy - l_clean
        scale = dl / (self.sigma ** 2 * B)
        grads: list[Any] = [None] * network.depth

        def h_update(li, t, x, cur, mem, out, xi):
            sig = self.signal(network, li, xi[B:], cur[B:], mem[B:])
            accumulate(grads, li, *network.layers[li].outer(sig * scale.view(B, *([1] * (sig.dim() - 1))), x[B:]))

        self.generator.set_state(start)
        network.run(xx, noise=self._noise(B), hook=h_update)
        clean = Trace(out=tr.out[:B], inputs=[[s / T] for s in sums])
        return clean, grads, dl, l_clean

    @torch.no_grad()
    def step(self, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> StepReport:
        if self.deep_estimator is not None:
            clean, raw, l_clean, extras = self.deep_estimator.step(self, network, x_seq, y)
            self.write_grads(network, self.transform(network, clean, raw))
            return {"loss": float(l_clean.mean()), "out": clean.out, **extras}
        if self.online:
            clean, raw, dl, l_clean = self.online_step(network, x_seq, y)
        else:
            clean, noisy, dl, l_clean = self.perturbed_passes(network, x_seq, y)
            raw = self.estimate(network, noisy, dl)
        self.write_grads(network, self.transform(network, clean, raw))
        return {"loss": float(l_clean.mean()), "out": clean.out, "mean_abs_dl": float(dl.abs().mean())}

    def transform(self, network: SpikingNetwork, clean: Trace, grads):
        """Hook for rules built on NP (LOCO projects here). NP: identity."""
        return [self.layer_transform(network, clean, li, gw, gb) for li, (gw, gb) in enumerate(grads)]

    def layer_transform(self, network: SpikingNetwork, clean: Trace, li: int, gw: torch.Tensor,
                        gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer, local post-processing of the estimate (reads only layer li's records). NP: identity."""
        return gw, gb

    def state_dict(self) -> dict[str, Any]:
        s: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.deep_estimator is not None:
            s["deep"] = self.deep_estimator.state_dict()
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if self.deep_estimator is not None and "deep" in state:
            self.deep_estimator.load_state_dict(state["deep"])


def split_trace(tr: Trace, B: int) -> tuple[Trace, Trace]:
    """Split a trace of a concatenated (clean | noisy) batch into two traces."""
    return tr.rows(slice(0, B)), tr.rows(slice(B, None))
