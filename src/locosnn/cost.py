"""Cost of learning, measured rather than asserted.

:func:`update_stages` counts the sequential update stages a rule needs after its
forward pass(es), from the dependency structure of the code that computes the
update:

* rules that backpropagate (``uses_backprop``): the autograd graph of the loss is
  walked from the loss to each layer's weight; a layer's gradient can only be
  formed after the backward computation of every layer whose weight-op lies on
  a path between the loss and it. Stages = the largest such set of layers
  (BPTT on an L-layer feed-forward net: L).
* perturbation rules (:class:`~locosnn.rules.base.PerturbationRule`: NP, LOCO): each
  layer's update is recomputed with the forward records of *every other layer*
  replaced by NaN (``rule.poison_records``). If the update of every layer stays
  finite and unchanged, no layer waits for another: 1 stage (every layer updates in
  parallel from the broadcast loss differences).
* feedback rules (:class:`~locosnn.rules.base.FeedbackRule`: FA, DFA, OPZO, SAL, SFDFA):
  one feedback hop at a time is poisoned with NaN (``rule.poison_feedback``); a layer
  whose update turns NaN depends on that other layer's backward hop.
  FA: L (like BPTT, spatially); DFA and OPZO: 1.
* any other rule answers itself (``rule.stage_counts``).

The dispatch is on the rule's declared family, so a new rule of a family is measured
without changes here.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from .losses import per_sample_loss
from .network import SpikingNetwork
from .diagnostics import rule_update
from .rules.base import FeedbackRule, LearningRule, PerturbationRule
from .seeds import train_encoder_seed


def _weight_layer(fn: Any, weights: dict[int, int]) -> int | None:
    """Layer index if ``fn`` is a weight-consuming op (its inputs reach a layer's weight within 2 hops)."""
    for nxt, _ in getattr(fn, "next_functions", ()):
        if nxt is None:
            continue
        var = getattr(nxt, "variable", None)
        if var is not None and id(var) in weights:
            return weights[id(var)]
        for nxt2, _ in getattr(nxt, "next_functions", ()):
            var2 = getattr(nxt2, "variable", None) if nxt2 is not None else None
            if var2 is not None and id(var2) in weights and type(nxt).__name__ in ("TBackward0", "PermuteBackward0",
                                                                                   "ViewBackward0", "ReshapeAliasBackward0"):
                return weights[id(var2)]
    return None


def autograd_stages(network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> list[int]:
    """Per layer: how many layers' backward computations its gradient depends on (itself included)."""
    weights = {id(layer.weight): li for li, layer in enumerate(network.layers)}
    out = network.run(x_seq, grad=True).out
    root = per_sample_loss(out, y, loss).mean().grad_fn
    # topological order of the backward graph (Kahn on in-degrees from the root)
    indeg: dict[Any, int] = {}
    stack, seen = [root], {root}
    while stack:
        fn = stack.pop()
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            indeg[nxt] = indeg.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    layers_on_path: dict[Any, frozenset] = {root: frozenset()}
    ready = [root]
    result = [0] * network.depth
    while ready:
        fn = ready.pop()
        here = layers_on_path[fn]
        lab = _weight_layer(fn, weights)
        if lab is not None:
            here = here | {lab}
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in weights:
            result[weights[id(var)]] = max(result[weights[id(var)]], len(here))
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            layers_on_path[nxt] = layers_on_path.get(nxt, frozenset()) | here
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                ready.append(nxt)
    return result


def perturbation_stages(rule: PerturbationRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Per layer: 1 if its update reads only its own forward records and the broadcast dL,
    else L (an upper bound: the update needs records of other layers)."""
    state = copy.deepcopy(rule.state_dict())
    clean, noisy, dl, _ = rule.perturbed_passes(network, x_seq, y)
    est = rule.estimate(network, noisy, dl)
    result = []
    for li in range(network.depth):
        with torch.no_grad():
            rule.load_state_dict(copy.deepcopy(state))
            full = rule.layer_transform(network, clean, li, *est[li])
            rule.load_state_dict(copy.deepcopy(state))
            g = rule.estimate(network, rule.poison_records(noisy, li), dl)[li]
            g = rule.layer_transform(network, rule.poison_records(clean, li), li, *g)
        rule.load_state_dict(copy.deepcopy(state))
        ok = all(torch.isfinite(t).all() for t in g) and all(torch.allclose(a, b) for a, b in zip(g, full))
        if ok:
            result.append(1)
            continue
        result.append(network.depth)  # reads other layers' records: counted as the upper bound, L
    return result


def feedback_stages(rule: FeedbackRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Per layer: 1 + the number of *other* layers' feedback hops (B_k, M_k; W_k for FA with
    feedback="transpose") on which its update depends: each is a sequential backward hop.
    Measured by poisoning one hop at a time (``rule.poison_feedback``) with NaN."""
    hops = len(rule.feedback_tensors(network))
    result = [1] * network.depth
    for k in range(hops):
        with rule.poison_feedback(network, k):
            upd = rule_update(rule, network, x_seq, y)
        for li, u in enumerate(upd):
            # with W poisoned the forward pass itself is NaN everywhere: only count the hop, not layer k
            if li != k and not torch.isfinite(u).all():
                result[li] += 1
    return result


def update_stages(rule: LearningRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> int:
    """Sequential update stages after the forward pass(es), measured (see module docstring)."""
    own = rule.stage_counts(network, x_seq, y)
    if own is not None:
        return max(own)
    if rule.uses_backprop:
        return max(autograd_stages(network, x_seq, y, rule.loss))
    if isinstance(rule, PerturbationRule):
        return max(perturbation_stages(rule, network, x_seq, y))
    if isinstance(rule, FeedbackRule):
        return max(feedback_stages(rule, network, x_seq, y))
    raise NotImplementedError(f"no stage measurement for rule {rule.name!r}: declare its family (FeedbackRule, "
                              "PerturbationRule, uses_backprop) or implement stage_counts")


def state_bytes(obj: Any) -> int:
    """Bytes held in tensors inside a (nested) rule state_dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


# ---------------------------------------------------------------------------------------------
# Cost-of-learning metrics (NeuroBench-style metric objects; no dependency on another SNN library)
# ---------------------------------------------------------------------------------------------

class SynapseCounter:
    """Synaptic operations of the layer calls made while it is installed, counted as NeuroBench's
    ``SynapticOperations`` counts them (neurobench.metrics.workload, 2.x):

    * per layer call, the input is *spiking* when every value is 0, 1 or -1, else *analog*
      (direct-current input to the first layer, rate-proxy outputs, output-site noise);
    * effective operations = the (nonzero input, nonzero weight) pairs the call touches, i.e.
      the sum of the layer applied to its binarised input with binarised weights and no bias
      (linear: sum_j nnz(x_j) * nnz(W[:, j]); conv: exact per output position, padding and
      stride included); they are accumulates (``ac``) for a spiking input and multiply-
      accumulates (``mac``) for an analog one;
    * ``dense``: the same with every input and weight counted (NeuroBench's "Dense").

    ``with SynapseCounter(network) as c: network.run(x)`` counts one pass; totals are for the
    whole batch (NeuroBench reports them per sample: divide by the batch size)."""

    def __init__(self, network: SpikingNetwork) -> None:
        self.network = network
        self.ac = 0.0
        self.mac = 0.0
        self.dense = 0.0
        self._dense_cache: dict[tuple, float] = {}
        self._saved: list[tuple[Any, Any]] = []

    def count(self, layer: Any, x: torch.Tensor) -> None:
        with torch.no_grad():
            x = x.detach()
            nz = x != 0
            spiking = bool(((x == 0) | (x == 1) | (x == -1)).all())
            w = (layer.weight.detach() != 0).to(torch.float64)
            if getattr(layer, "kind", "linear") == "linear":
                n = x.shape[0]
                ops = float(nz.reshape(n, -1).sum(0).to(torch.float64) @ w.sum(0))
                dense = float(x.numel()) * layer.weight.shape[0]
            else:
                ops = float(torch.nn.functional.conv2d(nz.to(torch.float64), w.sum(0, keepdim=True),
                                                       stride=layer.stride, padding=layer.padding,
                                                       dilation=layer.dilation).sum())
                dense = x.shape[0] * self._conv_dense(layer, tuple(x.shape[1:]))
        if spiking:
            self.ac += ops
        else:
            self.mac += ops
        self.dense += dense

    def _conv_dense(self, layer: Any, shape: tuple[int, ...]) -> float:
        """Synapses of one sample's conv call: every in-bounds (input, weight) pair."""
        key = (id(layer), shape, tuple(layer.weight.shape))
        if key not in self._dense_cache:
            ones = torch.ones((1, *shape), dtype=torch.float64)
            k = torch.ones((1, *layer.weight.shape[1:]), dtype=torch.float64)
            per = torch.nn.functional.conv2d(ones, k, stride=layer.stride, padding=layer.padding,
                                             dilation=layer.dilation).sum()
            self._dense_cache[key] = float(per) * layer.weight.shape[0]
        return self._dense_cache[key]

    def __enter__(self) -> "SynapseCounter":
        # one layer call per step, as on hardware, even for a time-constant input (whose first-layer current
        # the network otherwise computes once)
        self._shared = self.network.__dict__.get("share_static_current")
        self.network.share_static_current = False
        for layer in self.network.layers:
            orig = layer.current

            def current(x: torch.Tensor, _layer: Any = layer, _orig: Any = orig) -> torch.Tensor:
                self.count(_layer, x)
                return _orig(x)
            self._saved.append((layer, orig))
            layer.current = current
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, _ in self._saved:
            del layer.current
        self._saved.clear()
        if self._shared is None:
            del self.network.share_static_current  # back to the class default
        else:
            self.network.share_static_current = self._shared


class StepProbe:
    """Runs one training step of ``rule`` on ``network`` and records what it cost.

    Counted while the step runs (the optimiser step included when ``opt`` is given):
    forward passes (calls of ``network.run`` weighted by the rows they carry, divided by the
    batch size: a concatenated clean+noisy pass of 2B rows counts 2), synaptic operations
    of those passes as NeuroBench counts them (:class:`SynapseCounter`: accumulates ``syn_ac``
    for spiking inputs, multiply-accumulates ``syn_mac`` for analog ones such as the first layer
    under direct encoding, and the dense total ``syn_dense``), wall time, and the rule's state
    bytes after the step."""

    def __init__(self, rule: LearningRule, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor,
                 opt: torch.optim.Optimizer | None = None) -> None:
        import time
        self.batch = x_seq.shape[1]
        self.rows = 0
        self.calls = 0
        run = network.run

        def counting_run(xs: torch.Tensor, *a: Any, **k: Any):
            self.calls += 1
            self.rows += xs.shape[1]
            return run(xs, *a, **k)

        network.run = counting_run  # type: ignore[method-assign]
        counter = SynapseCounter(network)
        try:
            with counter:
                t0 = time.perf_counter()
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                self.report = rule.step(network, x_seq, y)
                if opt is not None:
                    opt.step()
                self.wall_s = time.perf_counter() - t0
        finally:
            del network.run
        self.syn_ac, self.syn_mac, self.syn_dense = counter.ac, counter.mac, counter.dense
        self.state_bytes = state_bytes(rule.state_dict())


class CostMetric:
    """A cost-of-learning metric: ``metric(probe, rule, network, x_seq, y) -> number``."""

    name = "metric"
    unit = ""

    def __call__(self, probe: StepProbe, rule: LearningRule, network: SpikingNetwork, x_seq: torch.Tensor,
                 y: torch.Tensor) -> float:
        raise NotImplementedError


class ForwardPasses(CostMetric):
    """Forward passes over the batch per update (measured: rows through ``network.run`` / batch)."""
    name, unit = "forward_passes", "passes"

    def __call__(self, probe, rule, network, x_seq, y):
        return probe.rows / probe.batch


class UpdateStages(CostMetric):
    """Sequential update stages after the forward pass(es) (see :func:`update_stages`)."""
    name, unit = "update_stages", "stages"

    def __call__(self, probe, rule, network, x_seq, y):
        fresh = copy.deepcopy(rule)
        return update_stages(fresh, network, x_seq[:, :16], y[:16])


class SynapticOps(CostMetric):
    """Synaptic operations of every forward pass of one update, per sample: accumulates plus
    multiply-accumulates (NeuroBench's Effective_ACs + Effective_MACs; see :class:`SynapseCounter`)."""
    name, unit = "synops_per_sample", "ops"

    def __call__(self, probe, rule, network, x_seq, y):
        return (probe.syn_ac + probe.syn_mac) / probe.batch


class SynapticACs(CostMetric):
    """Accumulate operations (layer calls with spiking inputs) per sample: NeuroBench's Effective_ACs."""
    name, unit = "synops_ac", "ACs"

    def __call__(self, probe, rule, network, x_seq, y):
        return probe.syn_ac / probe.batch


class SynapticMACs(CostMetric):
    """Multiply-accumulates (layer calls with analog inputs, e.g. the first layer under direct
    encoding) per sample: NeuroBench's Effective_MACs."""
    name, unit = "synops_mac", "MACs"

    def __call__(self, probe, rule, network, x_seq, y):
        return probe.syn_mac / probe.batch


class DenseMACs(CostMetric):
    """Dense multiply-accumulates of the same passes, per sample (what a non-event-driven chip does;
    NeuroBench's Dense)."""
    name, unit = "dense_macs_per_sample", "MACs"

    def __call__(self, probe, rule, network, x_seq, y):
        # rules that push extra dense products outside network.run (SFDFA's forward-mode tangent)
        # report them as ``extra_macs`` (whole batch)
        return (probe.syn_dense + float(probe.report.get("extra_macs", 0.0))) / probe.batch


class RuleStateBytes(CostMetric):
    """Bytes of rule-owned state after the step: feedback matrices, projector memory, momentum."""
    name, unit = "rule_state_bytes", "bytes"

    def __call__(self, probe, rule, network, x_seq, y):
        return probe.state_bytes


class StepWallTime(CostMetric):
    """Wall time of one training step (rule + optimiser), seconds."""
    name, unit = "step_s", "s"

    def __call__(self, probe, rule, network, x_seq, y):
        return probe.wall_s


DEFAULT_METRICS: tuple[type[CostMetric], ...] = (ForwardPasses, UpdateStages, SynapticOps, SynapticACs, SynapticMACs,
                                                   DenseMACs, RuleStateBytes, StepWallTime)


def measure_cell(settings: dict[str, Any], repeats: int = 5, fresh_process: bool = True) -> dict[str, Any]:
    """Measure the cost of learning of one configuration (a sweep "cost" cell).

    settings: TrainConfig fields (rule, rule_args, arch, T, batch_size, dataset, neuron, ...).
    A real batch of ``batch_size`` training samples of ``dataset``, 2 warm-up steps, then
    ``repeats`` timed steps (median wall time), then ``repeats`` more for memory: the peak
    resident memory they add (sampled every 0.5 ms) over the memory after the warm-up, with the
    allocator set to return freed buffers (glibc; NaN elsewhere).

    ``fresh_process`` (default): the batch is loaded here and the steps run in a new Python
    process (same interpreter, same torch thread count) that never held the dataset."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from .config import TrainConfig
    from .data import load_dataset

    cfg = TrainConfig.from_dict({k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__})
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
    x = data.train.x[: cfg.batch_size].float().clone()
    y = data.train.y[: cfg.batch_size].clone()
    del data
    if not fresh_process:
        return _measure_steps(cfg.to_dict(), x, y, repeats)
    with tempfile.TemporaryDirectory(prefix="locosnn-cost-") as tmp:
        job = Path(tmp) / "job.pt"
        torch.save({"config": cfg.to_dict(), "x": x, "y": y, "repeats": repeats,
                    "threads": torch.get_num_threads()}, job)
        code = "import sys; from locosnn.cost import _measure_job; _measure_job(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, str(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"cost measurement process failed (exit {proc.returncode}):\n{tail}")
        return json.loads((Path(tmp) / "result.json").read_text())


def _measure_job(path: str) -> None:
    """Entry point of the fresh measuring process (see :func:`measure_cell`)."""
    import json
    from pathlib import Path

    job = torch.load(path)
    torch.set_num_threads(int(job["threads"]))
    row = _measure_steps(job["config"], job["x"], job["y"], int(job["repeats"]))
    (Path(path).parent / "result.json").write_text(json.dumps(row))


def _return_freed_memory() -> bool:
    """glibc only: fix the mmap threshold at 128 KiB (large buffers are mapped and unmapped, never
    kept) and trim the heap. False where that is not possible (then no peak memory is reported)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _measure_steps(config: dict[str, Any], x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, Any]:
    import resource
    import statistics
    import threading

    from .config import TrainConfig
    from .encoding import encode
    from .rules import make_rule
    from .factory import build_network, build_optimizer

    cfg = TrainConfig.from_dict(config)
    cfg.device = "cpu"  # the cost model measures CPU time and resident memory
    net = build_network(cfg)
    rule = make_rule(cfg.rule, loss=cfg.loss, seed=cfg.seed, **cfg.rule_args)
    opt = build_optimizer(cfg, net)
    x = x.to(next(net.parameters()).dtype)  # the run's dtype (float64 runs)
    xs = encode(x, cfg.T, cfg.encoder, torch.Generator().manual_seed(train_encoder_seed(cfg.seed)))

    def rss_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

    for _ in range(2):  # warm-up: one-time allocations (kernels, thread pools, optimiser state)
        StepProbe(rule, net, xs, y, opt)
    probes = [StepProbe(rule, net, xs, y, opt) for _ in range(repeats)]  # timed, default allocator
    # memory, measured after the timing: with glibc's mmap threshold fixed, every freed tensor buffer
    # goes back to the OS (by default the threshold rises and freed buffers stay in the heap, so a
    # step's peak would read ~0); this costs page faults, which is why the timing came first
    exact = _return_freed_memory()
    StepProbe(rule, net, xs, y, opt)
    exact = exact and _return_freed_memory()  # free-list chunks of that step: resident until trimmed
    base = rss_kb()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb())
            stop.wait(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(repeats):
        StepProbe(rule, net, xs, y, opt)
    stop.set()
    th.join()
    probe = probes[-1]
    row: dict[str, Any] = {}
    for metric_cls in DEFAULT_METRICS:
        m = metric_cls()
        row[m.name] = m(probe, rule, net, xs, y)
    row["step_s"] = statistics.median(p.wall_s for p in probes)
    row["step_peak_mb"] = max(0, peak[0] - base) / 1024 if exact else math.nan
    row["hidden_layers"] = net.depth - 1
    row["n_params"] = sum(p.numel() for p in net.parameters())
    return row
