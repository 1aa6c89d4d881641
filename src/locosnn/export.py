"""Export a :class:`~locosnn.network.SpikingNetwork` to NIR (the Neuromorphic Intermediate
Representation, https://neuroir.org) and import NIR graphs of the same shape back.

``to_nir(network, dt)`` -> ``nir.NIRGraph``; ``from_nir(graph)`` -> ``SpikingNetwork``;
``export_run(run_dir, path)`` writes a trained run's checkpoint as a ``.nir`` file
(``locosnn export RUN_DIR --to nir [--out FILE.nir] [--dt DT]``).

NIR nodes are continuous-time. A simulator that reads NIR steps them with its own time step
``dt`` by forward Euler (snnTorch's ``import_from_nir``, Norse, ...)::

    v <- v + dt / tau * ((v_leak - v) + r * I)          (LIF, LI)
    v <- v + dt * r * I                                  (IF, I)
    z = H(v - v_threshold); where z = 1: v <- v_reset    (LIF, IF)

so one step of a NIR LIF is ``v[t] = (1 - dt/tau) v[t-1] + (dt r / tau) I[t]`` (+ dt/tau v_leak).
locosnn's discrete LIF ``v[t] = beta v[t-1] + I[t]`` is that step when ``dt/tau = 1 - beta``,
``r dt / tau = 1`` and ``v_leak = 0``. The mapping (``dt`` in the simulator's units, seconds
for snnTorch, whose import fixes ``dt = 1e-4``; pass the same value to :func:`to_nir`):

=======================================  ======================================================
locosnn                                  NIR node
=======================================  ======================================================
input of shape (C, H, W) or (N,)         ``Input``; the graph is fed the encoded x_seq[t] each
                                         step (direct encoding: the sample itself, every step)
``SpikingLinear`` W, b                   ``Affine(weight=W, bias=b)`` (``Linear`` if b is None)
``SpikingConv2d``                        ``Conv2d`` (same weight, bias, stride, padding)
first fc layer after a CxHxW tensor      ``Flatten(start_dim=0)`` before it (NIR shapes have
                                         no batch axis)
hidden LIF, beta < 1, theta              ``LIF(tau = dt / (1 - beta), r = 1 / (1 - beta),
                                         v_leak = 0, v_threshold = theta, v_reset = 0)``
hidden IF (beta = 1)                     ``IF(r = 1 / dt, v_threshold = theta, v_reset = 0)``
membrane readout, out_beta < 1           ``LI(tau = dt / (1 - out_beta), r = 1 / (1 - out_beta),
                                         v_leak = 0)``
membrane readout, out_beta = 1           ``I(r = 1 / dt)``
rate readout                             the output layer's LIF / IF, as for hidden layers
readout (mean over the T steps)          not a node: the readout is the time average of the
                                         graph's output (see the graph's metadata)
=======================================  ======================================================

Where it is exact: with ``reset="zero"`` (``NeuronConfig``) the hard reset to 0 is NIR's
``v_reset = 0``, and under forward Euler with the same ``dt`` every node above reproduces
locosnn's step exactly up to float rounding (the simulator recomputes beta = 1 - dt/tau; tested
against snnTorch: identical hidden spikes, readout equal to ~1e-7), with one convention difference: NIR (and snnTorch) spike when ``v > theta``,
locosnn when ``v >= theta`` -- they differ only when a membrane lands exactly on the threshold.
A simulator that integrates exactly (``exp(-dt/tau)``) instead of by Euler sees a different beta.

Approximations (exported with a ``UserWarning``, never silently):

* ``reset="subtract"`` (soft reset, locosnn's default): NIR's LIF/IF only reset to ``v_reset``;
  the graph uses ``v_reset = 0``, so spikes (and the readout) differ after the first spike.
  Train with ``--reset zero`` for an exact export.
* ``neuron="rate"`` (the stateless clipped-ReLU rate proxy) has no NIR node: its layers are
  exported as ``IF`` neurons, whose firing rate approaches ``clip(I / theta, 0, 1)`` only over
  long windows (and only with a soft reset).

:func:`from_nir` reads graphs of the shape :func:`to_nir` writes: a chain Input -> [Flatten] ->
(Affine | Linear | Conv2d) -> (LIF | IF) -> ... -> (Affine | Linear) -> (LI | I | LIF | IF) ->
Output, one neuron model and threshold shared by the hidden layers, ``v_leak = 0``,
``v_reset = 0``. It infers ``dt`` (``tau / r`` for LIF/LI, ``1 / r`` for IF/I, or the graph's
``metadata["dt"]``), takes ``beta = 1 - dt / tau`` and folds an input gain ``r dt / tau`` other
than 1 into the preceding synapse's weights and bias (exact under forward Euler). The result has
``reset="zero"``.
"""
from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import LocosnnError
from .layers import SpikingConv2d, SpikingLinear
from .network import SpikingNetwork
from .neurons import NeuronConfig

FORMATS = ("nir",)


def _nir() -> Any:
    try:
        import nir
    except ImportError:
        raise LocosnnError("NIR export needs the `nir` package: pip install 'locosnn[nir]' (or pip install nir)") from None
    return nir


def _full(shape: tuple[int, ...], value: float) -> np.ndarray:
    return np.full(shape, value, dtype=np.float64)  # neuron constants in double: beta = 1 - dt/tau round-trips


def _neuron_node(nir: Any, shape: tuple[int, ...], decay: float, theta: float, dt: float,
                 readout_li: bool = False) -> tuple[str, Any]:
    """(name prefix, node) of a spiking LIF/IF (or, for the membrane readout, a LI/I) with
    per-step decay ``decay``, stepped by forward Euler with time step ``dt``."""
    meta = {"locosnn_beta": float(decay)}
    if readout_li:
        if decay >= 1.0:
            return "i", nir.I(r=_full(shape, 1.0 / dt), metadata=meta)
        return "li", nir.LI(tau=_full(shape, dt / (1.0 - decay)), r=_full(shape, 1.0 / (1.0 - decay)),
                            v_leak=_full(shape, 0.0), metadata=meta)
    if decay >= 1.0:
        return "if", nir.IF(r=_full(shape, 1.0 / dt), v_threshold=_full(shape, theta), v_reset=_full(shape, 0.0),
                            metadata=meta)
    return "lif", nir.LIF(tau=_full(shape, dt / (1.0 - decay)), r=_full(shape, 1.0 / (1.0 - decay)),
                          v_leak=_full(shape, 0.0), v_threshold=_full(shape, theta), v_reset=_full(shape, 0.0),
                          metadata=meta)


def _array(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().cpu().to(torch.float32).numpy().copy()


def export_warnings(network: SpikingNetwork) -> list[str]:
    """Why an export of ``network`` would not simulate exactly like locosnn (empty: exact)."""
    cfg = network.neuron
    spiking_layers = network.depth - (1 if network.readout == "membrane" else 0)
    msgs = []
    if spiking_layers and cfg.model == "rate":
        msgs.append("rate-proxy neurons (neuron='rate') have no NIR equivalent: their layers are exported as IF "
                    "spiking neurons (v_reset = 0), whose firing rate only approximates clip(I/theta, 0, 1); "
                    "outputs will differ")
    elif spiking_layers and cfg.reset == "subtract":
        msgs.append("soft reset (reset='subtract') has no NIR equivalent: NIR's LIF/IF reset to v_reset, exported "
                    "as 0 (hard reset), so spikes and outputs will differ from locosnn's after the first spike; "
                    "train with --reset zero for an exact export")
    return msgs


def to_nir(network: SpikingNetwork, dt: float = 1.0) -> Any:
    """The NIR graph of ``network`` (see the module docstring for the mapping and where it is exact).

    dt: the simulator's time step, in its time unit (snnTorch's NIR import uses 1e-4 s).
    Warns (UserWarning) when the network uses something NIR cannot express exactly."""
    nir = _nir()
    if not (dt > 0 and math.isfinite(dt)):
        raise LocosnnError(f"dt must be a positive number, got {dt}")
    for msg in export_warnings(network):
        warnings.warn(msg, UserWarning, stacklevel=2)
    cfg = network.neuron
    decay = 1.0 if cfg.model in ("if", "rate") else cfg.decay
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(network.in_shape)})}
    edges: list[tuple[str, str]] = []
    prev = "input"
    shape: tuple[int, ...] = tuple(network.in_shape)

    def add(name: str, node: Any) -> None:
        nonlocal prev
        nodes[name] = node
        edges.append((prev, name))
        prev = name

    L = network.depth
    for li, layer in enumerate(network.layers):
        if isinstance(layer, SpikingConv2d):
            if layer.groups != 1 or tuple(layer.dilation) != (1, 1):
                raise LocosnnError("NIR export supports conv layers with groups=1 and dilation=1 only")
            add(f"conv{li}", nir.Conv2d(input_shape=tuple(int(s) for s in shape[1:]), weight=_array(layer.weight),
                                        stride=tuple(int(s) for s in layer.stride),
                                        padding=tuple(int(p) for p in layer.padding),
                                        dilation=(1, 1), groups=1,
                                        bias=_array(layer.bias) if layer.bias is not None
                                        else np.zeros(layer.out_channels, dtype=np.float32)))
            h = (shape[1] + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
            w = (shape[2] + 2 * layer.padding[1] - layer.kernel_size[1]) // layer.stride[1] + 1
            shape = (layer.out_channels, h, w)
        elif isinstance(layer, SpikingLinear):
            if len(shape) > 1:
                add("flatten", nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1))
                shape = (math.prod(shape),)
            w = _array(layer.weight)
            add(f"fc{li}", nir.Linear(weight=w) if layer.bias is None else nir.Affine(weight=w, bias=_array(layer.bias)))
            shape = (layer.out_features,)
        else:  # pragma: no cover - SpikingNetwork only builds these two
            raise LocosnnError(f"cannot export layer {li} of type {type(layer).__name__} to NIR")
        last = li == L - 1
        if last and network.readout == "membrane":
            prefix, node = _neuron_node(nir, shape, float(network.out_beta), cfg.theta, dt, readout_li=True)
        else:
            prefix, node = _neuron_node(nir, shape, decay, cfg.theta, dt)
        add(f"{prefix}{li}", node)
    nodes["output"] = nir.Output(output_type={"output": np.array(shape)})
    edges.append((prev, "output"))
    meta = {"producer": "locosnn", "dt": float(dt), "arch": network.arch, "readout": network.readout,
            "reset": cfg.reset, "neuron": cfg.model,
            "readout_rule": "mean over the T steps of the output node's value (membrane readout: LI membrane; "
                            "rate readout: spikes)"}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta)


# -- import ---------------------------------------------------------------------------------------
def _text(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.shape == ():
        return _text(v.item())
    if isinstance(v, np.generic):
        return v.item()
    return v


def _uniform(a: Any, what: str) -> float:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0 or not np.allclose(a, a.flat[0], rtol=1e-6, atol=0.0):
        raise LocosnnError(f"cannot import NIR graph: {what} differs between neurons (locosnn needs one value)")
    return float(a.flat[0])


def _chain(graph: Any) -> list[str]:
    """Node names from the Input to the Output of a graph that is a single chain."""
    nir = _nir()
    ins = [k for k, n in graph.nodes.items() if isinstance(n, nir.Input)]
    if len(ins) != 1:
        raise LocosnnError(f"cannot import NIR graph: need exactly one Input node, found {len(ins)}")
    succ: dict[str, list[str]] = {}
    for a, b in graph.edges:
        succ.setdefault(a, []).append(b)
    order, cur = [ins[0]], ins[0]
    while not isinstance(graph.nodes[cur], nir.Output):
        nxt = succ.get(cur, [])
        if len(nxt) != 1 or nxt[0] in order:
            raise LocosnnError("cannot import NIR graph: only feed-forward chains (no branches, no recurrence) "
                               "map to a locosnn SpikingNetwork")
        cur = nxt[0]
        order.append(cur)
    if len(order) != len(graph.nodes):
        raise LocosnnError("cannot import NIR graph: it has nodes off the Input -> Output chain")
    return order


def _neuron_params(node: Any, dt: Optional[float]) -> dict[str, Any]:
    """kind ('lif', 'if', 'li', 'i'), dt (inferred when None), decay, gain, theta of a neuron node."""
    nir = _nir()
    meta = {k: _text(v) for k, v in (getattr(node, "metadata", None) or {}).items()}
    if isinstance(node, (nir.LIF, nir.LI)):
        kind = "lif" if isinstance(node, nir.LIF) else "li"
        tau, r = _uniform(node.tau, "tau"), _uniform(node.r, "r")
        if not np.allclose(node.v_leak, 0.0):
            raise LocosnnError("cannot import NIR graph: v_leak != 0 has no locosnn equivalent")
        step = tau / r if dt is None else dt
        decay, gain = 1.0 - step / tau, r * step / tau
        if not 0.0 <= decay <= 1.0 + 1e-12:
            raise LocosnnError(f"cannot import NIR graph: tau = {tau} with dt = {step} gives a decay of {decay} "
                               "outside [0, 1]")
        if "locosnn_beta" in meta and math.isclose(float(meta["locosnn_beta"]), decay, rel_tol=1e-6, abs_tol=1e-9):
            decay = float(meta["locosnn_beta"])  # the exact value written by to_nir
        if math.isclose(gain, 1.0, rel_tol=1e-6):
            gain = 1.0
    elif isinstance(node, (nir.IF, nir.I)):
        kind = "if" if isinstance(node, nir.IF) else "i"
        r = _uniform(node.r, "r")
        step = 1.0 / r if dt is None else dt
        decay, gain = 1.0, r * step
        if math.isclose(gain, 1.0, rel_tol=1e-6):
            gain = 1.0
    else:
        raise LocosnnError(f"cannot import NIR graph: neuron node {type(node).__name__} has no locosnn equivalent "
                           "(supported: LIF, IF, LI, I)")
    theta = None
    if kind in ("lif", "if"):
        theta = _uniform(node.v_threshold, "v_threshold")
        if node.v_reset is not None and not np.allclose(node.v_reset, 0.0):
            raise LocosnnError("cannot import NIR graph: v_reset != 0 has no locosnn equivalent")
    return {"kind": kind, "dt": step, "decay": min(decay, 1.0), "gain": gain, "theta": theta}


def from_nir(graph: Any, dt: Optional[float] = None) -> SpikingNetwork:
    """A SpikingNetwork (reset='zero') equal to a NIR graph of the shape :func:`to_nir` writes.

    dt: the time step to discretise with; default: the graph's ``metadata["dt"]`` or, failing
    that, the step at which the first neuron node's input gain is 1 (tau / r, or 1 / r)."""
    nir = _nir()
    if isinstance(graph, (str, Path)):
        graph = nir.read(graph)
    order = _chain(graph)
    meta = {k: _text(v) for k, v in (getattr(graph, "metadata", None) or {}).items()}
    if dt is None and "dt" in meta:
        dt = float(meta["dt"])
    in_shape = tuple(int(s) for s in np.asarray(graph.nodes[order[0]].input_type["input"]).ravel())
    tokens = ["x".join(map(str, in_shape))]
    synapses: list[Any] = []
    neurons: list[dict[str, Any]] = []
    pending: Any = None
    for name in order[1:-1]:
        node = graph.nodes[name]
        if isinstance(node, nir.Flatten):
            continue
        if isinstance(node, (nir.Affine, nir.Linear, nir.Conv2d)):
            if pending is not None:
                raise LocosnnError(f"cannot import NIR graph: two synapses in a row (at {name!r})")
            pending = node
            continue
        if pending is None:
            raise LocosnnError(f"cannot import NIR graph: node {name!r} ({type(node).__name__}) does not follow a "
                               "synapse (Affine, Linear or Conv2d)")
        p = _neuron_params(node, dt)
        dt = p["dt"] if dt is None else dt
        synapses.append(pending)
        neurons.append(p)
        pending = None
        if isinstance(synapses[-1], nir.Conv2d):
            c = synapses[-1]
            if isinstance(c.padding, str):
                raise LocosnnError(f"cannot import NIR graph: conv padding {c.padding!r}; locosnn needs an integer")
            k = tuple(int(s) for s in c.weight.shape[-2:])
            st, pd, dl = (tuple(int(v) for v in np.broadcast_to(np.asarray(a), (2,)))
                          for a in (c.stride, c.padding, c.dilation))
            if k[0] != k[1] or st[0] != st[1] or pd[0] != pd[1] or dl != (1, 1) \
                    or int(c.groups) != 1:
                raise LocosnnError("cannot import NIR graph: conv layers need square kernels, equal strides and "
                                   "paddings, dilation 1 and groups 1")
            tokens.append(f"c{c.weight.shape[0]}k{k[0]}" + (f"s{st[0]}" if st[0] != 1 else "")
                          + (f"p{pd[0]}" if pd[0] else ""))
        else:
            tokens.append(str(synapses[-1].weight.shape[0]))
    if pending is not None or not neurons:
        raise LocosnnError("cannot import NIR graph: it must end with a synapse followed by a neuron node")
    hidden, out = neurons[:-1], neurons[-1]
    kinds = {p["kind"] for p in hidden}
    if kinds - {"lif", "if"} or len(kinds) > 1:
        raise LocosnnError(f"cannot import NIR graph: hidden layers must all be LIF or all IF, found {sorted(kinds)}")
    if out["kind"] in ("li", "i"):
        readout, out_beta = "membrane", out["decay"]
    else:
        readout, out_beta = "rate", None
        hidden = neurons
        kinds = {p["kind"] for p in hidden}
        if len(kinds) > 1:
            raise LocosnnError("cannot import NIR graph: spiking layers must all be LIF or all IF")
    model = (kinds.pop() if kinds else "lif")
    betas = {p["decay"] for p in hidden}
    thetas = {p["theta"] for p in hidden}
    if len(thetas) > 1 or (model == "lif" and len(betas) > 1):
        raise LocosnnError("cannot import NIR graph: locosnn needs one tau and one v_threshold for all spiking layers")
    beta = betas.pop() if (model == "lif" and betas) else 0.5
    theta = thetas.pop() if thetas else 1.0
    if model == "lif" and beta >= 1.0:
        model = "if"
    neuron = NeuronConfig(model=model, beta=beta if model == "lif" else 0.5, theta=theta, reset="zero")
    with torch.random.fork_rng(devices=[]):  # the throwaway init leaves the caller's random stream alone
        net = SpikingNetwork("-".join(tokens), neuron=neuron, readout=readout, out_beta=out_beta, init="pytorch")
    with torch.no_grad():
        for layer, syn, p in zip(net.layers, synapses, neurons):
            w = torch.as_tensor(np.asarray(syn.weight), dtype=layer.weight.dtype)
            if tuple(w.shape) != tuple(layer.weight.shape):
                raise LocosnnError(f"cannot import NIR graph: weight of shape {tuple(w.shape)} where the chain's "
                                   f"shapes give {tuple(layer.weight.shape)}")
            b = getattr(syn, "bias", None)
            layer.weight.copy_(w * p["gain"] if p["gain"] != 1.0 else w)
            if layer.bias is not None:
                bt = torch.zeros_like(layer.bias) if b is None else torch.as_tensor(np.asarray(b), dtype=layer.bias.dtype)
                layer.bias.copy_(bt * p["gain"] if p["gain"] != 1.0 else bt)
    return net


# -- runs and the CLI -----------------------------------------------------------------------------
def load_run_network(run_dir: str | Path) -> tuple[SpikingNetwork, Any]:
    """The network of a run directory's checkpoint, and the run's TrainConfig (exported and compared
    on the CPU in float32, whatever device and dtype the run was trained in)."""
    from .factory import load_run

    net, cfg, _ = load_run(run_dir, device="cpu", dtype="float32")
    return net, cfg


def export_run(run_dir: str | Path, path: str | Path | None = None, dt: float = 1.0) -> Path:
    """Write the run's network as a NIR file (default RUN_DIR/model.nir); returns the path."""
    nir = _nir()
    net, cfg = load_run_network(run_dir)
    graph = to_nir(net, dt=dt)
    graph.metadata.update({"T": int(cfg.T), "encoder": cfg.encoder})
    out = Path(path) if path is not None else Path(run_dir) / "model.nir"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        nir.write(out, graph)
    except OSError as e:
        raise LocosnnError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="export a trained run's network (NIR)",
        description="Export the network in a run directory's checkpoint.pt. --to nir writes a NIR graph "
                    "(Affine/Conv2d synapses, LIF/IF neurons, LI readout; see locosnn.export for the mapping). "
                    "Exact for networks trained with --reset zero; soft-reset or rate-proxy networks are exported "
                    "as an approximation, with a warning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="run directory written by `locosnn train`")
    p.add_argument("--to", choices=list(FORMATS), default="nir", help="export format")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/model.nir)")
    p.add_argument("--dt", type=float, default=1.0,
                   help="the simulator's time step, in its time unit (snnTorch's NIR import uses 1e-4)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = export_run(args.run_dir, args.out, dt=args.dt)
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    print(f"wrote {out}")
    return 0
