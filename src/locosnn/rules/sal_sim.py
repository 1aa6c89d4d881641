"""SAL: spike-based alignment learning (Gierlich, Baumbach, Kungl, Max, Petrovici, arXiv 2503.02642;
official code github.com/unibe-cns/sal-code), a discrete-time torch port written for locosnn
(our own code; the official code was read, not copied).

What the authors did
--------------------
* Stochastic neurons ("neural sampling", Buesing et al. 2011): a neuron that is not refractory
  spikes with probability sigma(u - ln tau_ref) per unit of time and is then absolutely
  refractory for tau_ref; u is a bias plus the weighted sum of presynaptic PSPs (rectangular
  PSPs of length tau_ref in their sampling and deep networks, alpha-shaped in others). The
  randomness of the firing is the noise that SAL feeds on.
* Reciprocally connected neurons i, j: w_ij (j -> i) makes i fire shortly after j, w_ji makes
  j fire shortly after i. An antisymmetric STDP window on the synapse j -> i (depression for
  pre-before-post, potentiation for post-before-pre, the same kernel K on both sides)
  therefore measures w_ji - w_ij and drives w_ij towards w_ji. On both weights the pair
  meets at its mean (the two updates are opposite, the sum is conserved); on one weight
  the plastic weight converges to the fixed one.
* Kernels: triangular of width tau_ref (sampling networks) and exponential with tau = tau_ref
  (deep network, microcircuits). Pairing: nearest neighbour in the sampling networks
  (``num_last_spikes = 1``) and in their analysis code (partner spike restricted to the
  current inter-spike interval); all partner spikes within 2 tau_ref in the deep network.
* No weight decay or normalisation term belongs to the SAL update. The sampling experiments
  clip all weights to |w| <= w_max (2.0). The deep experiment (a discrete-time network,
  tau_ref = 10 steps, 16 parallel chains) accumulates the update over a phase of 2000 steps
  and applies it once (lr 0.05, divided by the kernel length), five phases before each
  training epoch, on weights copied unchanged from the trained ANN; its metric is
  angle(B, W^T), which falls over epochs.

What we chose (this module)
---------------------------
* Discrete time, one step = one unit. Neuron i of a population (vectorised over (batch, n)):

      psp_j[t]  = rect (default): spikes of j in steps t-tau_syn .. t-1   (tau_syn = 2)
                  exp:            sum_{s<t} exp(-(t-1-s)/tau_syn) spikes_j[s]
      u_i[t]    = bias + g * sum_j w_ij psp_j[t]                (bias 0.5)
      p_i[t]    = sigmoid(u_i[t] - ln tau_ref)                  (tau_ref = 4)
      spike     = (uniform < p_i[t]) and (steps since i's last spike >= tau_ref)

  so a neuron fires at most every tau_ref steps (rate <= 1/4). A spike at step t acts from
  step t + 1 on (one step of synaptic delay). Every neuron starts at a random point of its
  refractory cycle. ``deterministic=True`` removes the noise: spike iff u > ``threshold``
  (default 0: the zero-temperature limit of the sampling neuron, whose firing state has
  p(z = 1) = sigmoid(u)) and not refractory. That is the negative control: with the default
  bias the deterministic neurons do fire, but like clocks, at the end of each refractory
  period, so their timing reflects the initial phases, not the weights.
* The SAL rule on synapses pre -> post, a matrix M[pre, post] (all sums are matrix products
  over the batch of chains and the steps since the last update):

      dM = sum_t,batch ( s_pre[t]^T X_post[t] - X_pre[t]^T s_post[t] )

  X[t] is a population's STDP trace before step t's spikes count. ``pairing="nearest"``
  (default): X = K(steps since the last spike): each spike pairs with the partner's most
  recent earlier spike (symmetric nearest-spike scheme, the authors' num_last_spikes = 1).
  ``pairing="all"``: X = sum of K(lag) over all earlier spikes. Kernels (lags d >= 1 step,
  equal-step spikes are not paired): ``"triangular"`` K(d) = max(0, 1 - d/tau) (default,
  tau = tau_ref) and ``"exp"`` K(d) = exp(-d/tau). The first term is post-before-pre
  (potentiation, caused by the reciprocal weight), the second pre-before-post (depression,
  caused by the synapse itself), so dM ~ c (w_reciprocal - w_self), c > 0: the synapse moves
  towards its reciprocal. With the triangular kernel of width tau_ref at most one partner
  spike lies in the window (refractoriness), so nearest, all-to-all and the authors'
  interval-restricted nearest pairing are the same rule.
* Update: w += lr / (g * batch) * dM, applied every ``update_every`` steps (1 in the demo, 16
  in the deep phase, where a tall matrix product is much cheaper than 16 thin ones). The 1/g
  makes the speed of alignment independent of the weights' scale. No decay, normalisation
  or clipping (none was needed; see the authors' choices above).
* Two neurons (:func:`two_neuron_demo`): w12 (2 -> 1) is a "feedback" synapse, w21 (1 -> 2)
  a "forward" one, 256 parallel copies of the pair share the two weights (the update is their
  mean, like the authors' batch of chains), lr 0.15, 1500 steps.
* Deep phase (:func:`sal_phase`): the populations are the outputs of network.layers[0..L-1].
  Population k receives g_k W_k psp_{k-1} from below and g_{k+1} B_{k+1}^T psp_{k+1} from
  above (B_k in W_k's shape, as locosnn's FA keeps it); only B_1..B_{L-1} learn. The input
  population and B_0 are left out: FA never uses B_0 (it would carry the error into the
  input). g_k = gain / (rms(W_k) sqrt(n_{k-1})) sets each layer's drive to ~gain whatever the
  trained weights' scale; a common factor on W and B leaves the fixed point B = W alone.
  gain 1.0: from ~1.5 up the loop W_k -> B_k amplifies itself (B overshoots W, the angle first
  falls, then rises again over phases); below, the angle's noise floor rises. The bias is a
  constant for every neuron (the trained LIF biases live on another scale). Defaults: 2000
  steps x 32 chains, lr 0.05. Measured at 784-500-500-10 from FA's random B on one CPU
  thread: angle(B_l, W_l) 90 -> ~46 deg after one phase (3.5-6 s), ~40 deg after three
  (the noise floor at lr 0.05; lower lr: lower floor, slower approach); at 20-30-30-10:
  90 -> ~16 deg in one phase (< 1 s). Deterministic neurons: 64 and 73 deg at 784-500-500-10,
  > 45 deg at 20-30-30-10, and |B| grows to ~4 |W| (timing without noise misleads SAL).

Deviations of this port, all deliberate
---------------------------------------
1. Unit time steps with a one-step synaptic delay and short time constants (tau_ref 4,
   tau_syn 2 steps; the authors' deep network: 10 and 10). Short PSPs sharpen the causal
   timing and make a phase cheap.
2. Nearest pairing is the symmetric nearest-spike scheme, which a matrix product can compute;
   it equals the authors' schemes with the default kernel (see above). With ``kernel="exp"``
   its pairs reach past the refractory period and neurons of different rates then bias the
   update (a rank-one error in B): use ``pairing="all"`` with the exponential kernel.
3. The update is applied every few steps during the phase instead of once at its end, so one
   phase already moves B most of the way from random to aligned.
4. Gain normalisation g_k and a common constant bias in the deep phase (the authors copied
   weights and biases unchanged).
5. The phase runs once after each training epoch (trainer hook ``end_epoch``; the authors ran
   five before each epoch), so the first epoch trains with random B exactly like FA.
6. Fully connected layers only (the authors' SAL network is fully connected too).
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import torch

from ..errors import LocosnnError
from ..network import rand_on, randint_on

KERNELS = ("triangular", "exp")
PAIRINGS = ("nearest", "all")
PSPS = ("rect", "exp")
_NEVER = 1e9  # "steps since the last spike" of a neuron that has not spiked


def stdp_kernel(lag: torch.Tensor, kind: str = "triangular", tau: float = 3.0) -> torch.Tensor:
    """K(lag) >= 0 for lags >= 1 (steps): triangular max(0, 1 - lag/tau) or exp(-lag/tau)."""
    if kind == "triangular":
        return (1.0 - lag / tau).clamp_min(0.0)
    if kind == "exp":
        return torch.exp(-lag / tau)
    raise LocosnnError(f"unknown SAL kernel {kind!r}; choose {' or '.join(KERNELS)}")


def _check(kernel: str, pairing: str, psp: str, tau_ref: int, tau: float, tau_syn: float) -> None:
    if kernel not in KERNELS:
        raise LocosnnError(f"unknown SAL kernel {kernel!r}; choose {' or '.join(KERNELS)}")
    if pairing not in PAIRINGS:
        raise LocosnnError(f"unknown SAL pairing {pairing!r}; choose {' or '.join(PAIRINGS)}")
    if psp not in PSPS:
        raise LocosnnError(f"unknown SAL psp {psp!r}; choose {' or '.join(PSPS)}")
    if int(tau_ref) != tau_ref or tau_ref < 1:
        raise LocosnnError(f"tau_ref must be a whole number of steps >= 1, got {tau_ref}")
    if tau <= 0 or tau_syn <= 0:
        raise LocosnnError(f"tau and tau_syn must be > 0, got tau={tau}, tau_syn={tau_syn}")
    if psp == "rect" and int(tau_syn) != tau_syn:
        raise LocosnnError(f"a rectangular PSP needs a whole number of steps, got tau_syn={tau_syn}")


class _Population:
    """State of one population of stochastic (or deterministic) spiking neurons, (batch, n)."""

    def __init__(self, batch: int, n: int, psp: str, tau_syn: float, kernel: str, tau: float,
                 pairing: str, dtype: torch.dtype, device: torch.device) -> None:
        z = lambda: torch.zeros(batch, n, dtype=dtype, device=device)  # noqa: E731
        self.age = torch.full((batch, n), _NEVER, dtype=dtype, device=device)  # steps since last spike
        self.psp = z()
        self.psp_kind, self.kernel, self.tau, self.pairing = psp, kernel, tau, pairing
        self.spikes = z()
        self.count = torch.zeros(n, dtype=torch.float64, device=device)
        if psp == "rect":
            self.ring = torch.zeros(int(tau_syn), batch, n, dtype=dtype, device=device)
            self.pos = 0
        else:
            self.psp_decay = math.exp(-1.0 / tau_syn)
        if pairing == "all":
            if kernel == "exp":
                self.trace = z()
                self.trace_decay = math.exp(-1.0 / tau)
            else:  # triangular: K(d) > 0 for d < tau, a short spike history suffices
                D = max(1, math.ceil(tau) - 1)
                self.hist = torch.zeros(D, batch, n, dtype=dtype, device=device)
                self.kvals = stdp_kernel(torch.arange(1, D + 1, dtype=dtype, device=device), kernel, tau)

    def stdp_trace(self) -> torch.Tensor:
        """X[t]: the kernel-weighted earlier spikes this population's partners pair with."""
        if self.pairing == "nearest":
            return stdp_kernel(self.age, self.kernel, self.tau)
        if self.kernel == "exp":
            return self.trace
        return torch.einsum("d,dbn->bn", self.kvals, self.hist)

    def advance(self, s: torch.Tensor) -> None:
        """Take in step t's spikes: ages, PSPs (seen from step t + 1 on) and STDP traces."""
        self.spikes = s
        self.count += s.sum(0).double()
        self.age = torch.where(s > 0, torch.zeros_like(self.age), self.age) + 1.0
        if self.psp_kind == "rect":
            self.psp += s - self.ring[self.pos]
            self.ring[self.pos] = s
            self.pos = (self.pos + 1) % self.ring.shape[0]
        else:
            self.psp = self.psp * self.psp_decay + s
        if self.pairing == "all":
            if self.kernel == "exp":
                self.trace = (self.trace + s) * self.trace_decay
            else:
                self.hist = torch.roll(self.hist, 1, 0)
                self.hist[0] = s


def _simulate(W: list[torch.Tensor], B: list[torch.Tensor], gains: Sequence[float], steps: int, *,
              batch: int, lr: float, learn_B: bool, learn_W: bool, tau_ref: int, tau_syn: float,
              psp: str, kernel: str, tau: float, pairing: str, bias: float, deterministic: bool,
              threshold: float, warmup: int, generator: Optional[torch.Generator], update_every: int = 1,
              on_step=None) -> list[torch.Tensor]:
    """Run a chain of populations 0..L: link k (1..L) carries W[k-1] (n_k x n_{k-1}) bottom-up
    and B[k-1] (same shape; the synapse from unit j of population k to unit i of population
    k-1 has weight B[k-1][j, i]) top-down, both scaled by gains[k-1]. Updates B (and W) in
    place with the SAL rule, every ``update_every`` steps (the pairings of those steps summed in
    one matrix product); returns the spike counts per population (per neuron, summed)."""
    dtype, device = W[0].dtype, W[0].device
    sizes = [W[0].shape[1]] + [w.shape[0] for w in W]
    pops = [_Population(batch, n, psp, tau_syn, kernel, tau, pairing, dtype, device) for n in sizes]
    for pop in pops:  # every neuron starts at a random point of its refractory cycle (1 .. tau_ref steps
        # after a spike); the deterministic network would otherwise fire in lockstep from step 0
        pop.age = randint_on(1, tau_ref + 1, pop.age.shape, generator, device).to(dtype)
    log_tref = math.log(tau_ref)
    L = len(W)
    learn = learn_B or learn_W
    # the spikes and STDP traces of up to ``update_every`` steps, (steps * batch, n) per population
    C = max(1, int(update_every))
    S_buf = [torch.zeros(C * batch, n, dtype=dtype, device=device) for n in sizes]
    X_buf = [torch.zeros(C * batch, n, dtype=dtype, device=device) for n in sizes]
    filled = 0

    def apply() -> None:
        m = filled * batch
        if m == 0:
            return
        S = [b[:m] for b in S_buf]
        X = [b[:m] for b in X_buf]
        for k in range(L):  # link between population k (lower) and k + 1 (upper)
            # feedback synapse upper -> lower, [pre, post] = B's shape:
            # + post(lower)-before-pre(upper), caused by W;  - pre(upper)-before-post(lower), caused by B
            # (the forward synapse lower -> upper measures the opposite asymmetry: sign -1)
            step = lr / (gains[k] * batch)
            targets = ([(B[k], step)] if learn_B else []) + ([(W[k], -step)] if learn_W else [])
            for M, a in targets:
                M.addmm_(S[k + 1].T, X[k], alpha=a)
                M.addmm_(X[k + 1].T, S[k], alpha=-a)

    for t in range(steps):
        spikes = []
        for k, pop in enumerate(pops):
            u = torch.full_like(pop.psp, bias)
            if k > 0:
                u = torch.addmm(u, pops[k - 1].psp, W[k - 1].T, alpha=gains[k - 1])
            if k < L:
                u = torch.addmm(u, pops[k + 1].psp, B[k], alpha=gains[k])
            ready = pop.age >= tau_ref
            if deterministic:
                fire = u > threshold
            else:
                noise = rand_on(u.shape, generator, dtype, device)
                fire = noise < torch.sigmoid(u - log_tref)
            spikes.append((fire & ready).to(dtype))
        if learn and t >= warmup:
            rows = slice(filled * batch, (filled + 1) * batch)
            for k, pop in enumerate(pops):
                S_buf[k][rows] = spikes[k]
                X_buf[k][rows] = pop.stdp_trace()
            filled += 1
            if filled == C:
                apply()
                filled = 0
        for pop, s in zip(pops, spikes):
            pop.advance(s)
        if on_step is not None:
            on_step(t)
    apply()
    return [pop.count for pop in pops]


# ---------------------------------------------------------------------------------------------
# two reciprocally connected neurons
# ---------------------------------------------------------------------------------------------

def two_neuron_demo(mode: str = "both", seed: int = 0, steps: int = 1500, deterministic: bool = False, *,
                    w12: float = 0.0, w21: float = 1.5, lr: float = 0.15, chains: int = 256,
                    tau_ref: int = 4, tau_syn: float = 2, psp: str = "rect",
                    kernel: str = "triangular", tau: Optional[float] = None, pairing: str = "nearest",
                    bias: float = 0.5, threshold: float = 0.0, record_every: Optional[int] = None) -> dict[str, Any]:
    """Two reciprocally connected neurons 1 <-> 2 (w12: 2 -> 1, w21: 1 -> 2) under SAL.

    mode "both": SAL on both weights (they meet at their mean, which SAL conserves);
    mode "one": SAL on w12 only (it converges to the fixed w21).
    ``chains`` independent copies of the pair run in parallel and share the two weights (the
    update is their mean, like the authors' batch of chains: the same statistics as one pair
    observed ``chains`` times longer). Returns the trajectories (``t``, ``w12``, ``w21``),
    the final weights and gap, and each neuron's firing rate (spikes per step)."""
    if mode not in ("both", "one"):
        raise LocosnnError(f"unknown two-neuron mode {mode!r}; choose both or one")
    tau = float(tau_ref) if tau is None else tau
    _check(kernel, pairing, psp, tau_ref, tau, tau_syn)
    if steps < 1 or chains < 1:
        raise LocosnnError(f"steps and chains must be >= 1, got steps={steps}, chains={chains}")
    g = torch.Generator().manual_seed(int(seed))
    W = [torch.tensor([[float(w21)]], dtype=torch.float64)]  # 1 -> 2 ("bottom-up")
    B = [torch.tensor([[float(w12)]], dtype=torch.float64)]  # 2 -> 1 (feedback, plastic in both modes)
    every = record_every or max(1, steps // 200)
    ts, t12, t21 = [0], [float(w12)], [float(w21)]

    def rec(t: int) -> None:
        if (t + 1) % every == 0 or t + 1 == steps:
            ts.append(t + 1)
            t12.append(float(B[0][0, 0]))
            t21.append(float(W[0][0, 0]))

    counts = _simulate(W, B, [1.0], steps, batch=chains, lr=lr, learn_B=True, learn_W=(mode == "both"),
                       tau_ref=tau_ref, tau_syn=tau_syn, psp=psp, kernel=kernel, tau=tau, pairing=pairing,
                       bias=bias, deterministic=deterministic, threshold=threshold, warmup=0,
                       generator=g, on_step=rec)
    rates = [float(c.sum()) / (steps * chains) for c in counts]
    return {"mode": mode, "seed": int(seed), "deterministic": bool(deterministic), "steps": steps,
            "chains": chains, "lr": lr, "tau_ref": tau_ref, "kernel": kernel, "tau": tau, "pairing": pairing,
            "initial": {"w12": float(w12), "w21": float(w21)},
            "t": ts, "w12": t12, "w21": t21,
            "final": {"w12": t12[-1], "w21": t21[-1], "gap": abs(t12[-1] - t21[-1]),
                      "mean": (t12[-1] + t21[-1]) / 2},
            "initial_gap": abs(float(w12) - float(w21)), "rates": rates}


# ---------------------------------------------------------------------------------------------
# deep networks
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sal_phase(network, B: list[torch.Tensor], steps: int = 2000, lr: float = 0.05, *, kernel: str = "triangular",
              tau: Optional[float] = None, pairing: str = "nearest", tau_ref: int = 4, tau_syn: float = 2,
              psp: str = "rect", gain: float = 1.0, bias: float = 0.5, batch: int = 32, warmup: int = 10,
              update_every: int = 16, deterministic: bool = False, threshold: float = 0.0,
              generator: Optional[torch.Generator] = None, record: Optional[dict] = None) -> None:
    """One SAL phase on a fully connected SpikingNetwork: the network carries W_k bottom-up and
    B_k top-down (B_k in W_k's shape, as FA's feedback), fires driven by its own noise for
    ``steps`` steps in ``batch`` parallel chains, and the SAL rule updates B_1..B_{L-1} in place
    so that angle(B_k, W_k) falls (B_0 is not touched: it would feed the input).

    steps, batch: length of the phase and parallel chains; lr: SAL rate (per step, see the module
    docstring); kernel/tau/pairing: the STDP window; tau_ref, tau_syn, psp: the neurons'
    refractory period and PSP; gain: per-layer drive (weights rescaled to ~gain input std);
    bias: constant membrane bias; warmup: first steps without plasticity; update_every: steps
    pooled per update; deterministic/threshold: noise-free neurons (spike iff u > threshold);
    generator: the noise and the initial refractory phases (reproducible phases).
    ``record`` (a dict), if given, receives ``rates`` (mean spikes per neuron and step, one per
    population = layer output) and ``seconds``."""
    layers = list(network.layers)
    if any(getattr(layer, "kind", "linear") != "linear" for layer in layers):
        raise LocosnnError("the SAL phase supports fully connected layers only; this network has conv layers "
                           "(use an fc architecture such as 784-500-500-10 with the sal rule)")
    if len(B) != len(layers):
        raise LocosnnError(f"sal_phase needs one feedback matrix per layer ({len(layers)}), got {len(B)}")
    for k, (b, layer) in enumerate(zip(B, layers)):
        if tuple(b.shape) != tuple(layer.weight.shape):
            raise LocosnnError(f"feedback matrix {k} has shape {tuple(b.shape)}, "
                               f"expected W's {tuple(layer.weight.shape)}")
    tau = float(tau_ref) if tau is None else tau
    _check(kernel, pairing, psp, tau_ref, tau, tau_syn)
    if len(layers) < 2:
        return  # one layer: no feedback matrix carries an error
    t0 = time.perf_counter()
    Ws = [layer.weight.detach() for layer in layers[1:]]
    Bs = B[1:]
    gains = []
    for w in Ws:
        rms = float(w.pow(2).mean().sqrt())
        gains.append(gain / (max(rms, 1e-12) * math.sqrt(w.shape[1])))
    counts = _simulate(Ws, Bs, gains, steps, batch=batch, lr=lr, learn_B=True, learn_W=False, tau_ref=tau_ref,
                       tau_syn=tau_syn, psp=psp, kernel=kernel, tau=tau, pairing=pairing, bias=bias,
                       deterministic=deterministic, threshold=threshold, warmup=warmup, generator=generator,
                       update_every=update_every)
    if record is not None:
        record["rates"] = [float(c.mean()) / (steps * batch) for c in counts]
        record["seconds"] = time.perf_counter() - t0
