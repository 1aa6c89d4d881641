"""A feed-forward spiking network of any depth, built from a short spec.

``SpikingNetwork.run(x_seq, noise=..., record=...)`` returns a :class:`Trace`
with the readout and, per layer and time step, what learning rules need:
presynaptic input, synaptic current, membrane and spikes. Runs under
``torch.no_grad`` unless ``grad=True`` (BPTT).

Architecture spec: tokens joined by '-'.
  * first token: input shape, ``784`` or ``1x28x28`` (C x H x W);
  * ``500`` a fully connected layer of 500 neurons, ``500x10`` ten of them;
  * ``c16k5`` a conv layer, 16 channels, kernel 5 (options ``s2`` stride,
    ``p2`` padding, e.g. ``c32k3s2p1``); conv layers come before fc layers and
    the input is flattened at the first fc layer;
  * the last token is the output layer (fc).
Examples: ``784-500-500-10``, ``784-500x10-10``, ``1x28x28-c16k5s2-c32k3s2-10``.

Initialisation: ``init="scaled"`` (default; N(0, gain^2/fan_in), gain 3, keeps
deep LIF stacks firing), ``init="identity"`` (for deep stacks: every square fully
connected hidden-to-hidden layer starts at 2 I + 0.5 N(0, 1/n), so each LIF layer
relays the spikes it receives and class information survives ten layers; the other
layers as "scaled") or ``init="pytorch"`` (nn.Linear / nn.Conv2d defaults).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .errors import LocosnnError
from .layers import SpikingConv2d, SpikingLinear
from .neurons import (NeuronConfig, leaky_integrator_step, lif_step, rate_proxy, rate_proxy_derivative,
                      surrogate_derivative)

READOUTS = ("membrane", "rate")
INITS = ("scaled", "identity", "pytorch")
NOISE_SITES = ("current", "output")
NOISE_DISTS = ("gaussian", "rademacher", "uniform")

IDENTITY_GAIN, IDENTITY_NOISE = 2.0, 0.5

_CONV = re.compile(r"^c(\d+)k(\d+)(?:s(\d+))?(?:p(\d+))?$")


@dataclass
class LayerSpec:
    kind: str  # "linear" or "conv"
    out: int
    kernel: int = 0
    stride: int = 1
    padding: int = 0


def parse_arch(spec: str) -> tuple[tuple[int, ...], list[LayerSpec]]:
    """Parse an architecture spec into (input shape, layer specs). Raises LocosnnError on bad specs."""
    tokens = [t.strip() for t in str(spec).split("-") if t.strip()]
    if len(tokens) < 2:
        raise LocosnnError(f"bad architecture spec {spec!r}: need at least input and output, e.g. 784-500-10")
    try:
        in_shape = tuple(int(p) for p in tokens[0].split("x"))
    except ValueError:
        raise LocosnnError(f"bad architecture spec {spec!r}: input {tokens[0]!r} must be like 784 or 1x28x28") from None
    if len(in_shape) not in (1, 3) or min(in_shape) < 1:
        raise LocosnnError(f"bad architecture spec {spec!r}: input must be N or CxHxW")
    layers: list[LayerSpec] = []
    for tok in tokens[1:]:
        m = _CONV.match(tok)
        if m:
            if any(layer.kind == "linear" for layer in layers):
                raise LocosnnError(f"bad architecture spec {spec!r}: conv layer {tok!r} after a fc layer")
            if len(in_shape) != 3:
                raise LocosnnError(f"bad architecture spec {spec!r}: conv layers need a CxHxW input")
            c, k, s, p = (int(g) if g else None for g in m.groups())
            layers.append(LayerSpec("conv", c, k, s or 1, p or 0))
            continue
        m = re.match(r"^(\d+)(?:x(\d+))?$", tok)
        if not m:
            raise LocosnnError(f"bad architecture spec {spec!r}: cannot read layer {tok!r} (use 500, 500x10 or c16k5s2)")
        n, rep = int(m.group(1)), int(m.group(2) or 1)
        if n < 1 or rep < 1:
            raise LocosnnError(f"bad architecture spec {spec!r}: layer sizes must be positive")
        layers += [LayerSpec("linear", n) for _ in range(rep)]
    if layers[-1].kind != "linear":
        raise LocosnnError(f"bad architecture spec {spec!r}: the output layer must be fully connected")
    return in_shape, layers


def arch_depth_width(spec: str) -> tuple[int | None, int | None]:
    """(hidden layers, first hidden width) of an arch spec, or (None, None) for a bad spec."""
    try:
        _, layers = parse_arch(spec)
    except LocosnnError:
        return None, None
    hidden = layers[:-1]
    return len(hidden), (hidden[0].out if hidden else None)


def rng_device(generator: Optional[torch.Generator], device: torch.device | str) -> torch.device:
    """Where to draw random numbers for a tensor on ``device``: on the generator's own device
    (torch fills a tensor only from a generator on the same device), then moved to ``device``.
    The rules' generators live on the CPU, so a seed gives the same numbers on every device and
    CPU results are unchanged; a generator created on the tensor's device draws there directly."""
    return torch.device(device) if generator is None else generator.device


def randn_on(shape, generator: Optional[torch.Generator], dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.randn(shape)`` from ``generator`` with ``dtype`` on ``device`` (see :func:`rng_device`)."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=rng_device(generator, device)).to(device)


def rand_on(shape, generator: Optional[torch.Generator], dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.rand(shape)`` from ``generator`` with ``dtype`` on ``device`` (see :func:`rng_device`)."""
    return torch.rand(shape, generator=generator, dtype=dtype, device=rng_device(generator, device)).to(device)


def randint_on(low: int, high: int, shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """``torch.randint(low, high, shape)`` (int64) from ``generator`` on ``device`` (see :func:`rng_device`)."""
    return torch.randint(low, high, shape, generator=generator, device=rng_device(generator, device)).to(device)


@dataclass
class Noise:
    """Noise injected into hidden (and optionally output) layers, drawn from a seeded generator.

    site: "current" adds xi to the synaptic current I_l[t] (fresh every step);
          "output" adds xi to the layer's output (spikes or rate) before it feeds the next layer.
    dist: "gaussian" N(0, sigma^2), "rademacher" +-sigma, "uniform" U(-sqrt3 sigma, sqrt3 sigma).
    layers: indices of the perturbed layers (None = all, output included).
    """

    sigma: float
    site: str = "current"
    dist: str = "gaussian"
    generator: Optional[torch.Generator] = None
    layers: Optional[list[int]] = None
    clean_rows: int = 0  # the first clean_rows samples of the batch get no noise (clean + noisy in one pass)
    #: data-parallel: this process's rows of the global batch (``locosnn.distributed.Shard``); the noise
    #: is drawn for the global batch and this process keeps its rows, so a sample's noise does not
    #: depend on how the batch is split. None: one process.
    shard: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.site not in NOISE_SITES:
            raise LocosnnError(f"unknown noise site {self.site!r}; choose one of {', '.join(NOISE_SITES)}")
        if self.dist not in NOISE_DISTS:
            raise LocosnnError(f"unknown noise distribution {self.dist!r}; choose one of {', '.join(NOISE_DISTS)}")

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        z = self._sample(like, tuple(like.shape)) if self.shard is None else \
            self.shard.draw(lambda shape: self._sample(like, shape), like.shape)
        z = self.sigma * z
        if self.clean_rows:
            z[: self.clean_rows] = 0
        return z

    def _sample(self, like: torch.Tensor, shape: tuple) -> torch.Tensor:
        g = self.generator
        if self.dist == "gaussian":
            return randn_on(shape, g, like.dtype, like.device)
        if self.dist == "rademacher":
            return randint_on(0, 2, shape, g, like.device).to(like.dtype) * 2 - 1
        return (rand_on(shape, g, like.dtype, like.device) * 2 - 1) * math.sqrt(3.0)

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


def time_constant(x_seq: torch.Tensor) -> bool:
    """Is x_seq (T, B, ...) one tensor repeated over time without copies (a stride-0 time axis, as
    ``encode(..., "direct")`` and :func:`repeat_batch` make it)? Then the first layer's current is the
    same at every step and ``SpikingNetwork.run`` computes it once. (A materialised copy of a constant
    sequence is not detected: it runs the same, at the per-step cost.)"""
    return x_seq.dim() > 0 and x_seq.shape[0] > 1 and x_seq.stride(0) == 0


def repeat_batch(x_seq: torch.Tensor, reps: int) -> torch.Tensor:
    """``torch.cat([x_seq] * reps, 1)`` (the stacked clean | noisy batches of the perturbation rules) that
    keeps a time-constant sequence time-constant: the batch is repeated once, not T times."""
    if time_constant(x_seq):
        return torch.cat([x_seq[0]] * reps, 0).unsqueeze(0).expand(x_seq.shape[0], -1, *x_seq.shape[2:])
    return torch.cat([x_seq] * reps, 1)


def time_factors(e: torch.Tensor, xs: list[torch.Tensor], static: bool, reps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (e, x) of a local update sum_t e[t] x[t]^T computed as one product e^T x, from the
    eligibilities e (T, N, ...) and the inputs xs ([T] of (N / reps, ...), each repeated ``reps`` times
    along the rows): the T steps stacked along the rows, or, when the inputs are one tensor at every step
    (``static``, a :class:`Trace`'s ``static_input`` for its first layer), (sum_t e[t], x): T times fewer
    rows, the same update up to rounding."""
    if static:
        x = xs[0]
        return e.sum(0), (x.repeat(reps, *([1] * (x.dim() - 1))) if reps > 1 else x)
    x = torch.stack(xs)
    if reps > 1:
        x = x.repeat(1, reps, *([1] * (x.dim() - 2)))
    return e.flatten(0, 1), x.flatten(0, 1)


@dataclass
class Trace:
    """What one forward pass produced.

    out: readout (B, n_out). Per layer l (lists indexed [l][t]) when recorded:
    inputs x_{l-1}[t], currents I_l[t] (noise included), membranes v_l[t],
    outputs s_l[t] (spikes, rates, or the readout membrane), noise xi_l[t].
    static_input: the input sequence was the same tensor at every step (``time_constant``, e.g. the
    direct encoder's expanded view): then ``inputs[0][t]`` is one tensor for every t and a local
    update sum_t e[t] x[t]^T of the first layer equals (sum_t e[t]) x^T (``time_factors``).
    """

    out: torch.Tensor
    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    currents: list[list[torch.Tensor]] = field(default_factory=list)
    membranes: list[list[torch.Tensor]] = field(default_factory=list)
    outputs: list[list[torch.Tensor]] = field(default_factory=list)
    noise: list[list[torch.Tensor]] = field(default_factory=list)
    static_input: bool = False

    def rows(self, sl: slice) -> "Trace":
        """The trace of some rows of the batch (e.g. the clean part of a stacked clean | noisy batch)."""
        pick = lambda lists: [[a[sl] for a in per_t] for per_t in lists]  # noqa: E731
        return Trace(out=self.out[sl], inputs=pick(self.inputs), currents=pick(self.currents),
                     membranes=pick(self.membranes), outputs=pick(self.outputs), noise=pick(self.noise),
                     static_input=self.static_input)

    def spike_counts(self) -> list[float]:
        """Total output events per hidden layer (for liveness checks)."""
        return [float(sum(o.sum() for o in outs)) for outs in self.outputs[:-1]]


class SpikingNetwork(nn.Module):
    """Feed-forward SNN: spiking hidden layers and a readout output layer.

    readout: "membrane" (the output layer is a non-spiking leaky integrator and the
    readout is its time-averaged membrane) or "rate" (the output layer spikes and
    the readout is its firing rate per step).
    """

    def __init__(self, arch: str, neuron: NeuronConfig | None = None, readout: str = "membrane",
                 out_beta: float | None = None, init: str = "scaled", init_gain: float = 3.0) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise LocosnnError(f"unknown readout {readout!r}; choose one of {', '.join(READOUTS)}")
        if init not in INITS:
            raise LocosnnError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        self.arch = arch
        self.neuron = neuron or NeuronConfig()
        self.readout = readout
        self.out_beta = self.neuron.beta if out_beta is None else out_beta
        self.in_shape, specs = parse_arch(arch)
        layers: list[nn.Module] = []
        shape: tuple[int, ...] = self.in_shape
        for spec in specs:
            if spec.kind == "conv":
                c, h, w = shape
                layers.append(SpikingConv2d(c, spec.out, spec.kernel, stride=spec.stride, padding=spec.padding))
                h = (h + 2 * spec.padding - spec.kernel) // spec.stride + 1
                w = (w + 2 * spec.padding - spec.kernel) // spec.stride + 1
                if h < 1 or w < 1:
                    raise LocosnnError(f"bad architecture spec {arch!r}: conv layer shrinks the image to nothing")
                shape = (spec.out, h, w)
            else:
                layers.append(SpikingLinear(math.prod(shape), spec.out))
                shape = (spec.out,)
        self.layers = nn.ModuleList(layers)
        self.n_out = shape[0]
        if init in ("scaled", "identity"):
            self.reset_parameters(init_gain)
        if init == "identity":
            self.identity_init()

    @torch.no_grad()
    def reset_parameters(self, gain: float = 3.0) -> None:
        """Weights ~ N(0, gain^2 / fan_in), biases 0.

        PyTorch's default (uniform, std 1/sqrt(3 fan_in)) makes a LIF layer with
        theta = 1 fed by sparse spikes almost silent, and the silence compounds
        with depth: at 10 hidden layers of 500 nothing reaches the output and no
        rule can learn. With gain 3 every layer of ``784-500x10-10`` fires at a
        rate of about 0.2 on Fashion-MNIST at initialisation (see the README).
        """
        for layer in self.layers:
            fan_in = layer.weight[0].numel()
            nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def identity_init(self, gain: float = IDENTITY_GAIN, noise: float = IDENTITY_NOISE) -> None:
        """Square fully connected hidden-to-hidden layers: W = gain I + noise N(0, 1/n), b = 0.

        A random deep LIF stack destroys class information (a linear probe on the last of
        ten random hidden layers of 256 falls below 40% on Fashion-MNIST); near-identity
        layers pass it through, so a rule only has to improve on it (``docs/deep.md``).
        With theta = 1 and beta = 0.5 this keeps every layer of 784-256x10-10 near the first
        layer's rate (0.21) and its probe accuracy (79% at layer 10, 79% at layer 1)."""
        for li, layer in enumerate(self.layers[:-1]):
            if li == 0 or layer.kind != "linear" or layer.weight.shape[0] != layer.weight.shape[1]:
                continue
            n = layer.weight.shape[0]
            # drawn on the CPU from the global RNG (the same initialisation on every device), then copied
            layer.weight.copy_((gain * torch.eye(n, dtype=layer.weight.dtype)
                                + noise * torch.randn(n, n, dtype=layer.weight.dtype) / math.sqrt(n)).to(layer.weight))
            if layer.bias is not None:
                layer.bias.zero_()

    #: compute a time-constant input's first-layer current once (:func:`time_constant`); cost counters
    #: that must see one layer call per step, as hardware makes them (``cost.SynapseCounter``), turn it off
    share_static_current: bool = True

    @property
    def depth(self) -> int:
        return len(self.layers)

    def local_derivative(self, li: int, current: torch.Tensor, membrane: torch.Tensor) -> torch.Tensor:
        """d output / d current of layer li at one step, as local rules use it: 1 for the
        leaky-integrator readout, the rate proxy's derivative, or the surrogate at the membrane."""
        cfg = self.neuron
        if li == self.depth - 1 and self.readout == "membrane":
            return torch.ones_like(membrane)
        if cfg.model == "rate":
            return rate_proxy_derivative(current, cfg.theta)
        return surrogate_derivative(membrane, cfg.theta, cfg.surrogate, cfg.slope)

    def check_input(self, x_seq: torch.Tensor) -> None:
        want = self.in_shape
        got = tuple(x_seq.shape[2:])
        flat_ok = len(want) == 1 and math.prod(got) == want[0]
        if x_seq.dim() < 3 or not (got == want or flat_ok):
            raise LocosnnError(
                f"input shape mismatch: network {self.arch!r} expects (T, B, {'x'.join(map(str, want))}), "
                f"got {tuple(x_seq.shape)}")

    def run(self, x_seq: torch.Tensor, noise: Noise | None = None, record: bool = False,
            grad: bool = False, hook: Optional[Callable[..., None]] = None) -> Trace:
        """Run T steps on x_seq (T, B, *in_shape).

        record: keep every layer's input, current, membrane, output and noise per step (memory O(T)).
        hook: called as hook(layer, t, x, current, membrane, output, noise) at every layer and step,
        for rules that accumulate what they need online (memory flat in T)."""
        self.check_input(x_seq)
        with torch.set_grad_enabled(grad):
            return self._run(x_seq, noise, record, hook)

    def _run(self, x_seq: torch.Tensor, noise: Noise | None, record: bool,
             hook: Optional[Callable[..., None]] = None) -> Trace:
        T, B = x_seq.shape[:2]
        L = self.depth
        cfg = self.neuron
        v: list[Optional[torch.Tensor]] = [None] * L
        s: list[Optional[torch.Tensor]] = [None] * L
        # a time-constant input (direct encoding): the first layer's current W x + b is the same at every
        # step, so it is computed once (bit-identical forward pass; BPTT's gradient sums through one product)
        static = self.share_static_current and time_constant(x_seq)
        cur0: Optional[torch.Tensor] = None
        tr = Trace(out=x_seq.new_empty(0), static_input=static)
        if record:
            tr.inputs, tr.currents, tr.membranes, tr.outputs, tr.noise = ([[] for _ in range(L)] for _ in range(5))
        acc = None
        for t in range(T):
            x = x_seq[t]
            if len(self.in_shape) == 1:
                x = x.reshape(B, -1)
            for li, layer in enumerate(self.layers):
                if isinstance(layer, SpikingLinear) and x.dim() > 2:
                    x = x.reshape(B, -1)
                if li == 0 and static:
                    if cur0 is None:
                        cur0 = layer.current(x)
                    cur = cur0
                else:
                    cur = layer.current(x)
                xi = None
                if noise is not None and noise.applies_to(li):
                    xi = noise.draw(cur, li, t) if getattr(noise, "indexed", False) else noise.draw(cur)
                    if noise.site == "current":
                        cur = cur + xi
                last = li == L - 1
                if last and self.readout == "membrane":
                    mem = leaky_integrator_step(v[li] if v[li] is not None else torch.zeros_like(cur), cur, self.out_beta)
                    v[li] = out = mem
                elif cfg.model == "rate":
                    mem = cur
                    out = rate_proxy(cur, cfg.theta)
                else:
                    v0 = v[li] if v[li] is not None else torch.zeros_like(cur)
                    s0 = s[li] if s[li] is not None else torch.zeros_like(cur)
                    mem, out = lif_step(v0, s0, cur, cfg)
                    v[li], s[li] = mem, out
                if xi is not None and noise.site == "output":
                    out = out + xi
                if hook is not None:
                    hook(li, t, x, cur, mem, out, xi)
                if record:
                    tr.inputs[li].append(x)
                    tr.currents[li].append(cur)
                    tr.membranes[li].append(mem)
                    tr.outputs[li].append(out)
                    tr.noise[li].append(xi if xi is not None else torch.zeros_like(cur))
                x = out
            acc = x if acc is None else acc + x
        tr.out = acc / T
        return tr

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Readout (B, n_out); differentiable (surrogate gradients) when autograd is on."""
        return self.run(x_seq, grad=torch.is_grad_enabled()).out
