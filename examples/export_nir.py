"""Train a small spiking network with a hard reset, export it to NIR, and run the NIR graph in snnTorch.

    .venv/bin/python examples/export_nir.py                 # trains 64-32-10 on digits (5 epochs) first
    .venv/bin/python examples/export_nir.py --run runs/mine # or export a run trained with --reset zero

The same from the command line:

    locosnn train --dataset digits --arch 64-32-10 --epochs 5 --lr 1e-2 --reset zero --out runs/digits-nir
    locosnn export runs/digits-nir --to nir --dt 1e-4      # writes runs/digits-nir/model.nir

``--dt 1e-4`` because snnTorch's NIR import steps LIF neurons with dt = 1e-4 s (see locosnn.export).
snnTorch 1.0 has no mapping for NIR's LI node (the membrane readout): the script adds one that maps
it the way snnTorch maps a LIF (beta = 1 - dt/tau, input gain r dt/tau), on snnTorch's own Leaky.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

DT = 1e-4


def run_in_snntorch(graph, x_seq: torch.Tensor) -> torch.Tensor:
    """The graph's output at every step (T, B, n_out), simulated by snnTorch."""
    import nir
    import nirtorch
    import snntorch as snn
    from snntorch.import_nir import import_from_nir

    class LIMembrane(torch.nn.Module):
        def __init__(self, node):
            super().__init__()
            self.gain = float(np.unique(node.r * DT / node.tau)[0])
            self.leaky = snn.Leaky(beta=float(np.unique(1 - DT / node.tau)[0]), threshold=math.inf,
                                   reset_mechanism="none", init_hidden=True, output=True)

        def forward(self, x):
            return self.leaky(self.gain * x)[1]

    orig = nirtorch.nir_to_torch
    nirtorch.nir_to_torch = lambda g, node_map, *a, **k: orig(g, {**node_map, nir.LI: LIMembrane}, *a, **k)
    try:
        module = import_from_nir(graph)
    finally:
        nirtorch.nir_to_torch = orig
    outs, state = [], None
    with torch.no_grad():
        for t in range(x_seq.shape[0]):
            out, state = module(x_seq[t], state)
            outs.append(out)
    return torch.stack(outs)


def main() -> None:
    import nir

    from locosnn.config import TrainConfig
    from locosnn.data import load_dataset
    from locosnn.encoding import encode
    from locosnn.export import export_run, from_nir, load_run_network
    from locosnn.train import Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a run directory trained with --reset zero (default: train one now)")
    args = ap.parse_args()
    tmp = None
    run = args.run
    if run is None:
        tmp = tempfile.TemporaryDirectory(prefix="locosnn-nir-")
        run = str(Path(tmp.name) / "run")
        cfg = TrainConfig(dataset="digits", arch="64-32-10", epochs=5, lr=1e-2, reset="zero", T=8).validate()
        Trainer(cfg, out=run, progress=False).fit()
    path = export_run(run, Path(run) / "model.nir", dt=DT)
    print(f"exported {path}")

    net, cfg = load_run_network(run)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
    x, y = data.test.x[:200].float(), data.test.y[:200]
    x_seq = encode(x, cfg.T, cfg.encoder, torch.Generator().manual_seed(0))
    ours = net.run(x_seq).out
    graph = nir.read(path)
    back = from_nir(graph)
    print(f"NIR -> locosnn: readout identical: {torch.equal(back.run(x_seq).out, ours)}")
    try:
        theirs = run_in_snntorch(graph, x_seq.reshape(cfg.T, len(x), -1)).mean(0)
    except ImportError:
        print("snnTorch not installed: pip install snntorch nirtorch")
        return
    print(f"snnTorch: max |readout difference| {float((theirs - ours).abs().max()):.2e}; "
          f"accuracy locosnn {float((ours.argmax(1) == y).float().mean()):.3f}, "
          f"snnTorch {float((theirs.argmax(1) == y).float().mean()):.3f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
