"""``locosnn sal-demo``: the SAL phase on two reciprocally connected noisy neurons.

The SAL simulator itself (spike-based alignment learning, Gierlich et al., arXiv 2503.02642) lives
beside the rule that uses it, in :mod:`locosnn.rules.sal_sim`; its public names are re-exported here
so ``from locosnn.sal import sal_phase, stdp_kernel, two_neuron_demo`` keeps working.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import LocosnnError
from .provenance import git_sha, versions
from .rules.sal_sim import KERNELS, PAIRINGS, PSPS, sal_phase, stdp_kernel, two_neuron_demo

__all__ = ["KERNELS", "PAIRINGS", "PSPS", "add_parser", "cmd_sal_demo", "sal_phase", "stdp_kernel", "two_neuron_demo"]


# ---------------------------------------------------------------------------------------------
# command line: locosnn sal-demo
# ---------------------------------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sal-demo", help="SAL on two reciprocally connected noisy neurons: weights converge (plot + json)",
        description="Spike-based alignment learning (Gierlich et al., arXiv 2503.02642) on two reciprocally "
                    "connected stochastic spiking neurons. Mode 'both': SAL on both weights, which meet at their "
                    "mean; mode 'one': SAL on w12 only, which converges to the fixed w21. Each mode also runs with "
                    "deterministic neurons (noise removed), the negative control in which the weights stay apart. "
                    "Writes demo.json (trajectories and final weights per seed) and demo.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/sal-demo", help="output directory")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    p.add_argument("--steps", type=int, default=1500, help="time steps per run")
    p.add_argument("--mode", choices=["both", "one", "all"], default="all",
                   help="SAL on both weights, on one weight, or run both modes")
    p.add_argument("--chains", type=int, default=256, help="parallel copies of the pair sharing the weights")
    p.add_argument("--kernel", choices=list(KERNELS), default="triangular", help="STDP kernel")
    p.set_defaults(func=cmd_sal_demo)


def cmd_sal_demo(args: argparse.Namespace) -> int:
    if args.seeds < 1 or args.steps < 1:
        raise LocosnnError(f"--seeds and --steps must be >= 1, got {args.seeds} and {args.steps}")
    modes = ["both", "one"] if args.mode == "all" else [args.mode]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"steps": args.steps, "chains": getattr(args, "chains", 256), "kernel": getattr(args, "kernel", "triangular")}
    runs = [two_neuron_demo(m, seed=s, deterministic=det, **kw)
            for det in (False, True) for m in modes for s in range(args.seeds)]
    summary = {}
    for det in (False, True):
        for m in modes:
            rs = [r for r in runs if r["mode"] == m and r["deterministic"] == det]
            summary[f"{m}{'-deterministic' if det else ''}"] = {
                "initial_gap": rs[0]["initial_gap"],
                "final_gap_mean": sum(r["final"]["gap"] for r in rs) / len(rs),
                "final_gap_max": max(r["final"]["gap"] for r in rs)}
    command = (f"locosnn sal-demo --out {args.out} --seeds {args.seeds} --steps {args.steps} --mode {args.mode} "
               f"--chains {kw['chains']} --kernel {kw['kernel']}")  # from the arguments, as bench's _command_line
    meta = {"command": command, "git_sha": git_sha(), "versions": versions()}
    (out / "demo.json").write_text(json.dumps({**meta, "summary": summary, "runs": runs}, indent=1))
    _plot_demo(runs, modes, out / "demo.png")
    parts = [f"{k}: gap {v['initial_gap']:.2f} -> {v['final_gap_mean']:.3f}" for k, v in summary.items()]
    print(f"sal-demo ({args.seeds} seeds, {args.steps} steps): " + "; ".join(parts) + f"  [{out}/demo.json, demo.png]")
    return 0


def _plot_demo(runs: list[dict], modes: list[str], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is an optional extra
        raise LocosnnError(f"sal-demo wrote demo.json but needs matplotlib for demo.png ({e}); "
                           "install it with: pip install 'locosnn[plot]'") from None
    fig, axes = plt.subplots(1, len(modes) + 1, figsize=(4.2 * (len(modes) + 1), 3.4), squeeze=False)
    titles = {"both": "SAL on both weights", "one": "SAL on w12 only (w21 fixed)"}
    panels = [(m, False, titles[m]) for m in modes] + [(None, True, "deterministic neurons (control)")]
    for ax, (m, det, title) in zip(axes[0], panels):
        for r in runs:
            if r["deterministic"] != det or (m is not None and r["mode"] != m):
                continue
            lab = f"seed {r['seed']}" + ("" if m is not None else f", {r['mode']}")
            line, = ax.plot(r["t"], r["w12"], lw=1.2, label=f"w12 ({lab})")
            ax.plot(r["t"], r["w21"], lw=1.2, ls="--", color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("time step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("weight (solid w12, dashed w21)")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
