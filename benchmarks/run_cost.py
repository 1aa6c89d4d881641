"""Cost of a training step versus depth and versus T: BPTT, NP and LOCO (recorded and online modes), FA, DFA, OPZO.

Regenerate: `.venv/bin/python benchmarks/run_cost.py` (about 10 minutes on 2 cores; run it alone,
the timings are only comparable when nothing else runs).

Each cell runs in a fresh process with one torch thread, on a real Fashion-MNIST batch of
128, LIF, direct encoding: 2 warm-up steps, then the median wall time of 5 steps (forward
pass(es) + update + Adam). Peak memory of the step = the highest resident set size sampled
every 0.5 ms during the steps minus the resident set size before the first step (Adam's state,
about 2x the parameters, is included; a fresh process per cell, so earlier cells cannot hide it). The LOCO projector share is the time spent building projectors / step time.
Update stages are measured from the code's dependency structure (locosnn.cost.update_stages).

Grids: depth = 784-256xD-10 for D in 2,4,6,8,10,12 at T = 8; T in 4, 8, 16, 32 at 784-500-500-10.
Writes benchmarks/cost/results.csv, meta.json and cost.png.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "cost"
RULES = {
    "bptt": ("bptt", {}),
    "np": ("np", {}),
    "np-online": ("np", {"online": True}),
    "loco": ("loco", {}),
    "loco-online": ("loco", {"online": True}),
    "loco-faithful": ("loco", {"variant": "faithful"}),
    "fa": ("fa", {}),
    "dfa": ("dfa", {}),
    "opzo": ("opzo", {}),
}
# forward passes per update, read off the code: NP/LOCO one concatenated clean+noisy pass
# (2 passes' worth of samples) plus a replay in online mode; FA/DFA/OPZO forward + replay
PASSES = {"bptt": 1, "np": 2, "np-online": 4, "loco": 2, "loco-online": 4, "loco-faithful": 2,
          "fa": 2, "dfa": 2, "opzo": 2}
DEPTHS = (2, 4, 6, 8, 10, 12)
TS = (4, 8, 16, 32)


def measure(args: tuple[str, str, int, int, str]) -> dict:
    name, arch, T, hidden, batch_file = args
    import resource

    import torch
    torch.set_num_threads(1)
    from locosnn.cost import state_bytes, update_stages
    from locosnn.encoding import encode
    from locosnn.network import SpikingNetwork
    from locosnn.rules import make_rule

    x, y = torch.load(batch_file)  # the real batch, saved by the parent: loading the dataset here would set the peak
    torch.manual_seed(0)
    net = SpikingNetwork(arch)
    rule_name, kw = RULES[name]
    rule = make_rule(rule_name, **kw)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    xs = encode(x, T)

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        rep = rule.step(net, xs, y)
        opt.step()
        return time.perf_counter() - t0, float(rep.get("projector_s", 0.0))

    import threading

    def rss_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

    base = rss_kb()  # before the first step: everything a step allocates counts
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    step()
    step()
    times = [step() for _ in range(5)]
    stop.set()
    th.join()
    stages = update_stages(make_rule(rule_name, **kw), net, xs[:, :16], y[:16])
    t = statistics.median(a for a, _ in times)
    proj = statistics.median(b for _, b in times)
    return {"rule_name": name, "arch": arch, "hidden_layers": hidden, "T": T, "batch": 128,
            "step_s": t, "projector_s": proj, "projector_share": proj / t if t else 0.0,
            "step_peak_mb": (peak[0] - base) / 1024, "rule_state_bytes": state_bytes(rule.state_dict()),
            "update_stages": stages, "forward_passes_per_update": PASSES.get(name, 2)}


def main() -> None:
    import torch

    from locosnn.data import load_dataset
    from locosnn.provenance import git_sha, machine, versions
    HERE.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("fashion-mnist")
    batch_file = str(HERE / "_batch.pt")
    torch.save((ds.train.x[:128].float().clone(), ds.train.y[:128].clone()), batch_file)
    cells = [(n, f"784-256x{d}-10", 8, d, batch_file) for n in RULES for d in DEPTHS]
    cells += [(n, "784-500-500-10", T, 2, batch_file) for n in RULES for T in TS]
    rows = []
    ctx = mp.get_context("spawn")
    for c in cells:  # one at a time: timings must not compete
        with ctx.Pool(1) as pool:
            row = pool.apply(measure, (c,))
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(batch_file).unlink()
    import pandas as pd
    df = pd.DataFrame(rows)
    df.to_csv(HERE / "results.csv", index=False)
    meta = {"command": "python benchmarks/run_cost.py " + " ".join(sys.argv[1:]), "git_sha": git_sha(),
            "versions": versions(), "machine": machine(), "torch_threads": 1}
    (HERE / "meta.json").write_text(json.dumps(meta, indent=2))
    plot(df, meta)


def plot(df, meta) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"bptt": "k", "np": "tab:orange", "np-online": "tab:red", "loco": "tab:blue",
              "loco-online": "tab:cyan", "loco-faithful": "tab:green", "fa": "tab:purple", "dfa": "tab:brown",
              "opzo": "tab:pink"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    dd = df[(df["T"] == 8) & df.arch.str.contains("256x")]
    dt = df[df.arch == "784-500-500-10"]
    for name, g in dd.groupby("rule_name"):
        axes[0].plot(g.hidden_layers, 1000 * g.step_s, marker="o", color=colors[name], label=name)
    for name, g in dt.groupby("rule_name"):
        axes[1].plot(g["T"], 1000 * g.step_s, marker="o", color=colors[name], label=name)
        axes[2].plot(g["T"], g.step_peak_mb, marker="o", color=colors[name], label=name)
    axes[0].set_xlabel("hidden layers (width 256), T = 8"); axes[0].set_ylabel("ms per training step")
    axes[1].set_xlabel("T (784-500-500-10)"); axes[1].set_ylabel("ms per training step")
    axes[2].set_xlabel("T (784-500-500-10)"); axes[2].set_ylabel("peak memory of a step (MB)")
    for ax in axes:
        ax.grid(alpha=0.3); ax.legend(fontsize=7)
    fig.suptitle(f"cost of a training step, batch 128, 1 thread — {meta['command']} @ {meta['git_sha'][:10]}", fontsize=9)
    fig.tight_layout(); fig.savefig(HERE / "cost.png", dpi=110)


if __name__ == "__main__":
    main()
