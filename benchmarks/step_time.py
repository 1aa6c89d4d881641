"""Step time of every learning rule beside snnTorch's BPTT, on one LIF network (issue 13).

    .venv/bin/python benchmarks/step_time.py                      # CPU, 1 thread -> benchmarks/step_time/cpu.{json,md}
    .venv/bin/python benchmarks/step_time.py --device cuda        # GPU          -> benchmarks/step_time/cuda.{json,md}
    .venv/bin/python benchmarks/step_time.py --repeats 30 --depths 2,10 --only bptt,snntorch-bptt,np,loco

One step = what a training loop does per batch: zero the grads, the rule's ``step`` (forward
pass(es) over T steps, the loss, the rule's update written to ``.grad``) and the optimiser step
(Adam; OWM: SGD with momentum, as it needs). snnTorch's reference is the same network built from
``snntorch.Leaky`` (beta 0.5, threshold 1, ``reset_mechanism="subtract"``, fast-sigmoid surrogate
of slope 5, the same update order as ``locosnn.neurons.lif_step``) and a non-spiking leaky readout
(``reset_mechanism="none"``) read as its mean membrane, cross-entropy, ``loss.backward()``, Adam.
The script checks that both networks give the same readout from the same weights and reports the
relative difference of their gradients (snnTorch detaches the reset term from the graph, locosnn
does not: the only modelling difference, and it makes locosnn's backward pass do slightly more work).

Every network of one depth is timed round-robin: each repeat times one step of every entry, in a
rotated order, so that background load and thermal drift touch all entries alike; the table gives
the median over repeats (and the 25th/75th percentiles), the ratio to NP's median, and LOCO's
projector share (the time ``LOCO.transform`` spends building and applying projectors / step time;
the median projector time / the median step time). LOCO with ``kmeans_every`` or ``projector_every``
> 1 has two kinds of step, periodic ones (re-clustering, rebuilding the basis) and the others: its
step time is the mean over a period, each kind by its own median weighted by its share of the steps
(a plain median would never see a periodic step). LOCO's cluster memories are filled to capacity
before timing (a run's steady state; k-means over a full memory is much of the projector's cost).
With ``projector="fast"`` the projection is fused into the estimate: its projector time is building
the bases only. Networks: 784-500-500-10 (depth 2) and
784-500x10-10 (depth 10), LIF, direct encoding, T = 8, batch 128, real Fashion-MNIST batches when
the data is installed (random pixels otherwise), rule settings of ``benchmarks/sweep.toml``.
SAL's step is FA's (its alignment phase runs once per epoch and is not part of a step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (locosnn rule, rule settings); the settings of benchmarks/sweep.toml
LOCO_SAMPLE = {"variant": "sample", "sigma": 0.5, "drop_mean": True}
LOCO_FAITHFUL = {"variant": "faithful", "sigma": 0.5}
#: LOCO's projector computed fast, k-means every 10 batches (the basis still rebuilt every batch)
FAST = {"projector": "fast", "kmeans_every": 10}
#: ... and the basis rebuilt every 2nd batch (the cheap projector of docs/rules.md)
CHEAP = {**FAST, "projector_every": 2}
#: the tracked input subspace (projector="tracked"), updated every 4th batch, k-means every 10th batch
TRACKED = {"projector": "tracked", "projector_every": 4, "kmeans_every": 10}
ENTRIES: dict[str, tuple[str, dict[str, Any]]] = {
    "bptt": ("bptt", {}),
    "snntorch-bptt": ("snntorch", {}),
    "np": ("np", {"sigma": 0.5}),
    "loco": ("loco", LOCO_SAMPLE),
    "loco-fast": ("loco", {**LOCO_SAMPLE, **FAST}),
    "loco-cheap": ("loco", {**LOCO_SAMPLE, **CHEAP}),
    "loco-faithful": ("loco", LOCO_FAITHFUL),
    "loco-faithful-fast": ("loco", {**LOCO_FAITHFUL, **FAST}),
    "loco-faithful-cheap": ("loco", {**LOCO_FAITHFUL, **CHEAP}),
    "loco-faithful-fast-k1": ("loco", {**LOCO_FAITHFUL, "projector": "fast"}),
    "loco-faithful-cheap-k1": ("loco", {**LOCO_FAITHFUL, "projector": "fast", "projector_every": 2}),
    "loco-faithful-every10": ("loco", {**LOCO_FAITHFUL, "projector_every": 10}),
    "loco-faithful-inc": ("loco", {**LOCO_FAITHFUL, "projector": "fast", "incremental_kmeans": True}),
    "loco-faithful-inc-r64": ("loco", {**LOCO_FAITHFUL, "projector": "fast", "incremental_kmeans": True, "rank": 64}),
    "loco-tracked": ("loco", {**LOCO_SAMPLE, **TRACKED}),
    "loco-faithful-tracked": ("loco", {**LOCO_FAITHFUL, **TRACKED}),
    "loco-faithful-tracked-every1": ("loco", {**LOCO_FAITHFUL, **TRACKED, "projector_every": 1}),
    "fa": ("fa", {}),
    "dfa": ("dfa", {}),
    "opzo": ("opzo", {}),
    "sfdfa": ("sfdfa", {}),
    "sal": ("sal", {}),
    "owm": ("owm", {}),
}
#: the entries timed at depth 10 by default (every rule at depth 2)
DEEP_ENTRIES = ("bptt", "snntorch-bptt", "np", "loco", "loco-fast", "loco-cheap", "loco-faithful", "loco-faithful-fast",
                "loco-faithful-cheap", "loco-faithful-fast-k1", "loco-faithful-cheap-k1", "loco-faithful-inc",
                "loco-faithful-inc-r64", "loco-tracked", "loco-faithful-tracked")
T, BATCH, WIDTH = 8, 128, 500


def arch_for(depth: int) -> str:
    return f"784-{WIDTH}-{WIDTH}-10" if depth == 2 else f"784-{WIDTH}x{depth}-10"


# -- snnTorch's network ---------------------------------------------------------------------------
class SnnTorchNet(torch.nn.Module):
    """784-500x D-10 with snntorch.Leaky hidden layers (subtract reset) and a leaky, non-spiking readout."""

    def __init__(self, sizes: list[int], beta: float = 0.5, theta: float = 1.0, slope: float = 5.0) -> None:
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        grad = surrogate.fast_sigmoid(slope=slope)
        self.fcs = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.lifs = torch.nn.ModuleList(snn.Leaky(beta=beta, threshold=theta, spike_grad=grad, reset_mechanism="subtract")
                                        for _ in sizes[1:-1])
        self.readout = snn.Leaky(beta=beta, threshold=theta, spike_grad=grad, reset_mechanism="none")

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        mems = [lif.init_leaky() for lif in self.lifs]
        mem_out = self.readout.init_leaky()
        acc = None
        for t in range(x_seq.shape[0]):
            x = x_seq[t].reshape(x_seq.shape[1], -1)
            for i, (fc, lif) in enumerate(zip(self.fcs[:-1], self.lifs)):
                x, mems[i] = lif(fc(x), mems[i])
            _, mem_out = self.readout(self.fcs[-1](x), mem_out)
            acc = mem_out if acc is None else acc + mem_out
        return acc / x_seq.shape[0]


def snntorch_copy(net) -> SnnTorchNet:
    """snnTorch's network with the weights of a locosnn SpikingNetwork (fully connected)."""
    sizes = [net.layers[0].weight.shape[1]] + [layer.weight.shape[0] for layer in net.layers]
    ref = SnnTorchNet(sizes, beta=net.neuron.beta, theta=net.neuron.theta, slope=net.neuron.slope)
    with torch.no_grad():
        for fc, layer in zip(ref.fcs, net.layers):
            fc.weight.copy_(layer.weight)
            fc.bias.copy_(layer.bias)
    return ref.to(net.layers[0].weight)


def check_snntorch(net, xs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Same weights, same batch, locosnn vs snnTorch: readout difference; gradient relative difference
    and cosine as timed (snnTorch detaches its reset) and with snnTorch's reset left in the graph
    (its ``mem_reset`` without the detach, for this check only: then the two networks are one model)."""
    import torch.nn.functional as F

    from locosnn.rules.bptt import bptt_gradients

    g_loc = bptt_gradients(net, xs, y)
    with torch.no_grad():
        out = net.run(xs).out
    res: dict[str, float] = {}
    for tag, attach in (("", False), ("_reset_attached", True)):
        ref = snntorch_copy(net)
        if attach:
            for lif in ref.lifs:
                lif.mem_reset = (lambda m, lif=lif: lif.spike_grad(m - lif.threshold))
        out_ref = ref(xs)
        F.cross_entropy(out_ref, y).backward()
        g_ref = [p for fc in ref.fcs for p in (fc.weight.grad, fc.bias.grad)]
        rel = [float((a - b).norm() / (a.norm() + 1e-30)) for a, b in zip(g_loc, g_ref)]
        cos = [float((a * b).sum() / (a.norm() * b.norm() + 1e-30)) for a, b in zip(g_loc, g_ref)]
        res["readout_max_abs_diff" + tag] = float((out - out_ref.detach()).abs().max())
        res["grad_rel_diff_max" + tag] = max(rel)
        res["grad_cos_min" + tag] = min(cos)
    return res


# -- entries --------------------------------------------------------------------------------------
def prefill(rule, net, data: list) -> None:
    """Fill LOCO's cluster memories to capacity with the network's own layer inputs, as in the steady
    state of a run (the memory is full after ~60 batches in the sample variant, after 1000 batch means
    in the faithful one): k-means over a full memory is a large part of the projector's cost, and a
    timing from a fresh rule would miss it. Sample variant: per-sample inputs; faithful: means of
    random batches of them. Then one re-clustering."""
    from locosnn.encoding import encode  # noqa: F401  (data is already encoded)

    xs0, y0 = data[0]
    rule.step(net, xs0, y0)  # creates the memories
    with torch.no_grad():
        clean = [net.run(xs, record=True) for xs, _ in data]
    g = torch.Generator().manual_seed(0)
    for li, mem in enumerate(rule.memories):
        X = torch.cat([rule.layer_inputs(net, c, li) for c in clean])
        if rule.variant == "faithful":
            rows = torch.stack([X[torch.randperm(len(X), generator=g)[:BATCH].to(X.device)].mean(0)
                                for _ in range(rule.memory_size)])
        else:
            rows = X[torch.randperm(len(X), generator=g).to(X.device)][:rule.memory_size]
        for chunk in rows.split(rule.per_batch):
            mem.push(chunk)
        mem.recluster(rule.proj_generator)


def build(name: str, arch: str, device: torch.device, seed: int = 0,
          prefill_data: list | None = None) -> Callable[[torch.Tensor, torch.Tensor], tuple[float, bool | None]]:
    """A closure that runs one training step of ``name`` and returns (LOCO's projector seconds or 0,
    whether LOCO's cheap projector rebuilt its basis in this step: None for every other entry)."""
    from locosnn.network import SpikingNetwork
    from locosnn.rules import make_rule

    rule_name, kw = ENTRIES[name]
    torch.manual_seed(seed)
    net = SpikingNetwork(arch).to(device)
    if rule_name == "snntorch":
        ref = snntorch_copy(net)
        opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
        import torch.nn.functional as F

        def step_ref(xs: torch.Tensor, y: torch.Tensor) -> tuple[float, bool | None]:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ref(xs), y).backward()
            opt.step()
            return 0.0, None
        return step_ref
    rule = make_rule(rule_name, seed=seed, **kw)
    opt = (torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9) if rule_name == "owm"
           else torch.optim.Adam(net.parameters(), lr=1e-3))
    if rule_name == "loco" and prefill_data:
        prefill(rule, net, prefill_data)

    periods = [p for p in (getattr(rule, "projector_every", 1), getattr(rule, "kmeans_every", 1)) if p > 1]

    def step(xs: torch.Tensor, y: torch.Tensor) -> tuple[float, bool | None]:
        # a periodic step: LOCO rebuilds its basis (projector_every) or re-clusters (kmeans_every) in it
        rebuild = any(rule.proj_step % p == 0 for p in periods) if periods else None
        opt.zero_grad(set_to_none=True)
        rep = rule.step(net, xs, y)
        opt.step()
        return float(rep.get("projector_s", 0.0)), rebuild
    return step


def batches(device: torch.device, n: int = 8) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    from locosnn.encoding import encode

    try:
        from locosnn.data import load_dataset
        ds = load_dataset("fashion-mnist", limit=n * BATCH)
        x, y = ds.train.x.float().reshape(-1, 784), ds.train.y
        source = "fashion-mnist"
    except Exception:  # noqa: BLE001 - no data installed: random pixels (spike rates differ a little)
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(n * BATCH, 784, generator=g), torch.randint(0, 10, (n * BATCH,), generator=g)
        source = "random"
    out = [(encode(x[i * BATCH:(i + 1) * BATCH], T).to(device), y[i * BATCH:(i + 1) * BATCH].to(device))
           for i in range(n)]
    return out, source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fraction_to_period(kw: dict) -> float:
    """1 / (the share of periodic steps) for LOCO's projector_every and kmeans_every schedules."""
    import math

    n, m = kw.get("projector_every", 1), kw.get("kmeans_every", 1)
    if m == 1 or n == 1:
        return float(max(n, m))
    share = 1 / n + 1 / m - 1 / math.lcm(n, m)
    return 1 / share


def time_group(names: list[str], depth: int, device: torch.device, repeats: int, warmup: int,
               data: list) -> dict[str, dict[str, Any]]:
    arch = arch_for(depth)
    steps = {name: build(name, arch, device, prefill_data=data) for name in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    proj: dict[str, list[float]] = {n: [] for n in names}
    rebuilt: dict[str, list[bool | None]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        xs, y = data[r % len(data)]
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotated order: no entry always runs first or last
            sync(device)
            t0 = time.perf_counter()
            p, rb = steps[name](xs, y)
            sync(device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
                proj[name].append(p)
                rebuilt[name].append(rb)
        print(f"  depth {depth}: repeat {r + 1}/{warmup + repeats}", file=sys.stderr, flush=True)
    rows = {}
    for name in names:
        ts = sorted(times[name])
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        row = {"median_s": statistics.median(ts), "p25_s": q[0], "p75_s": q[2], "mean_s": statistics.mean(ts),
               "projector_s": statistics.median(proj[name]) if ENTRIES[name][0] == "loco" else None,
               "times_s": times[name], "projector_times_s": proj[name], "rebuilt": rebuilt[name]}
        if rebuilt[name] and rebuilt[name][0] is not None:
            # steps of two kinds, periodic (rebuild or re-cluster) and the others: a median over all steps
            # would never see the periodic ones, so the step time is the mean over a period, each kind
            # by its own median, weighted by its share of the steps
            N = fraction_to_period(ENTRIES[name][1])
            kinds = {k: [i for i, rb in enumerate(rebuilt[name]) if rb == k] for k in (True, False)}
            if not kinds[True] or not kinds[False]:
                raise SystemExit(f"{name}: need both periodic and other steps; use --repeats >= {int(N) + 1}")
            med = {k: statistics.median(times[name][i] for i in idx) for k, idx in kinds.items()}
            pmed = {k: statistics.median(proj[name][i] for i in idx) for k, idx in kinds.items()}
            row.update({"median_s": med[True] / N + (1 - 1 / N) * med[False],
                        "projector_s": pmed[True] / N + (1 - 1 / N) * pmed[False],
                        "rebuild_step_s": med[True], "reuse_step_s": med[False], "rebuild_steps": len(kinds[True]),
                        "amortised_over": N})
        row["projector_share"] = row["projector_s"] / row["median_s"] if row["projector_s"] is not None else None
        rows[name] = row
    base = rows.get("np", {}).get("median_s")
    ref = rows.get("snntorch-bptt", {}).get("median_s")
    for name, row in rows.items():
        row["x_np"] = row["median_s"] / base if base else None
        row["x_snntorch"] = row["median_s"] / ref if ref else None
    return rows


# -- provenance -----------------------------------------------------------------------------------
def git_sha() -> str:
    """HEAD's SHA with -dirty for changed code or configs (benchmark outputs do not count: locosnn's rule)."""
    from locosnn.provenance import git_sha as sha

    return sha(ROOT)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def write_md(path: Path, meta: dict, groups: dict[str, dict[str, dict]]) -> None:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    lines = [f"# Step time per rule ({meta['device']})", "",
             f"`{meta['command']}` — git {meta['git']}, torch {meta['torch']}, snntorch {meta['snntorch']}, "
             f"{meta['machine']}, {meta['threads']} thread(s), {meta['date']}.", "",
             f"One step = zero grads + the rule's step (forward pass(es) over T = {T}, loss, update) + optimiser step; "
             f"batch {BATCH}, LIF, direct encoding, {meta['data']} batches. Median of {meta['repeats']} repeats "
             f"(after {meta['warmup']} warm-up), entries interleaved round-robin in a rotated order. LOCO with "
             "`kmeans_every` or `projector_every` > 1 has periodic steps (re-clustering or rebuilding the basis) "
             "and others: its step is the mean over a period, each kind by its own median (last column). "
             f"Load average (1, 5, 15 min) at start {meta['load_start']}, at end {meta['load_end']}."]
    if meta.get("note"):
        lines += ["", meta["note"]]
    for key, rows in groups.items():
        lines += ["", f"## {key}", "", "| entry | median ms | p25–p75 ms | × NP | × snnTorch BPTT | projector share "
                  "| periodic / other step ms |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            share = f"{100 * r['projector_share']:.0f}%" if r["projector_share"] is not None else ""
            xnp = f"{r['x_np']:.2f}" if r["x_np"] else ""
            xs = f"{r['x_snntorch']:.2f}" if r["x_snntorch"] else ""
            split = f"{ms(r['rebuild_step_s'])} / {ms(r['reuse_step_s'])}" if "rebuild_step_s" in r else ""
            lines.append(f"| {name} | {ms(r['median_s'])} | {ms(r['p25_s'])}–{ms(r['p75_s'])} | {xnp} | {xs} | {share} "
                         f"| {split} |")
    chk = meta.get("snntorch_check")
    if chk:
        lines += ["", "snnTorch check (same weights, same batch, depth 2): readout max |difference| "
                  f"{chk['readout_max_abs_diff']:.2e}; gradients: largest relative difference "
                  f"{chk['grad_rel_diff_max']:.2e}, smallest cosine {chk['grad_cos_min']:.6f} (snnTorch detaches "
                  "the reset term from the graph; locosnn does not). With snnTorch's reset left in the graph "
                  f"(for the check only): largest relative difference {chk['grad_rel_diff_max_reset_attached']:.2e}, "
                  f"smallest cosine {chk['grad_cos_min_reset_attached']:.8f}: the same model."]
    lines += ["", "Entries: `loco` = LOCO's sample variant with drop_mean (sweep.toml's `loco`), `loco-faithful` = the "
              "authors' variant (sweep.toml's `loco-faithful`), both with the paper's projector (`projector=\"batch\"`, "
              "rebuilt every batch by the reference code); `-fast` = the same projector computed fast "
              "(`projector=\"fast\", kmeans_every=10`: fast basis, vectorised k-means every 10th batch, projection fused "
              "into the estimate, basis still rebuilt every batch); `-cheap` = `-fast` with `projector_every=2` (the "
              "basis rebuilt every 2nd batch); `-fast-k1` = the fast projector with k-means every batch; `-cheap-k1` = the basis rebuilt every 2nd batch with k-means at every rebuild; `-inc` = the fast projector with k-means every batch computed incrementally (`incremental_kmeans=True`), `-inc-r64` the same at rank 64; `-every10` = the reference projector rebuilt every 10th batch; `-tracked` = the tracked input subspace (`projector=\"tracked\", projector_every=4, kmeans_every=10`: one subspace-iteration step every 4th batch, the protection every batch), `-tracked-every1` the same updated every batch. "
              "LOCO's cluster memories are filled to capacity before timing (the steady state of a run). "
              "Settings of every rule as in benchmarks/sweep.toml; OWM with SGD (momentum 0.9), the others Adam. "
              "SAL's step is FA's (its alignment phase runs once per epoch).", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--depths", default="2,10", help="comma-separated hidden-layer counts (default 2,10)")
    ap.add_argument("--only", default=None, help="comma-separated entries (default: every rule at depth 2, "
                    f"{', '.join(DEEP_ENTRIES)} deeper)")
    ap.add_argument("--out", default=str(HERE / "step_time"), help="output folder")
    ap.add_argument("--note", default="", help="a sentence for the report (e.g. the load the numbers were taken under)")
    ap.add_argument("--rewrite-md", action="store_true", help="only rewrite <device>.md from <device>.json")
    args = ap.parse_args(argv)
    if args.rewrite_md:
        out = Path(args.out)
        saved = json.loads((out / f"{args.device}.json").read_text())
        write_md(out / f"{args.device}.md", saved["meta"], saved["groups"])
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sys.path.insert(0, str(ROOT / "src"))
    import snntorch

    load_start = loadavg()
    data, source = batches(device)
    groups: dict[str, dict] = {}
    for depth in (int(d) for d in args.depths.split(",")):
        names = args.only.split(",") if args.only else (list(ENTRIES) if depth == 2 else list(DEEP_ENTRIES))
        unknown = [n for n in names if n not in ENTRIES]
        if unknown:
            ap.error(f"unknown entries {unknown}; choose from {', '.join(ENTRIES)}")
        groups[f"depth {depth}: {arch_for(depth)}"] = time_group(names, depth, device, args.repeats, args.warmup, data)
    from locosnn.network import SpikingNetwork
    torch.manual_seed(0)
    chk = check_snntorch(SpikingNetwork(arch_for(2)).to(device), *data[0])
    meta = {"device": args.device, "machine": machine(device), "threads": args.threads, "repeats": args.repeats,
            "warmup": args.warmup, "git": git_sha(), "torch": torch.__version__, "snntorch": snntorch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "python benchmarks/step_time.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "load_start": load_start, "load_end": loadavg(), "data": source, "T": T, "batch": BATCH,
            "note": args.note, "snntorch_check": chk}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.device}.json").write_text(json.dumps({"meta": meta, "groups": groups}, indent=1) + "\n")
    write_md(out / f"{args.device}.md", meta, groups)
    print((out / f"{args.device}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
