"""Firing rate per hidden layer at initialisation: PyTorch's default init vs the scaled init.

Regenerate: `.venv/bin/python benchmarks/init_rates.py` (seconds). Writes benchmarks/init_rates.json.
784-500x10-10, LIF (beta 0.5, theta 1), T = 8, direct encoding, the first 256 Fashion-MNIST
training images, seed 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from locosnn.data import load_dataset
from locosnn.encoding import encode
from locosnn.network import SpikingNetwork
from locosnn.provenance import git_sha, versions


def main() -> None:
    x = encode(load_dataset("fashion-mnist", limit=256).train.x.float(), 8)
    res = {"command": "python benchmarks/init_rates.py", "git_sha": git_sha(), "versions": versions()}
    for name, kw in (("pytorch", {"init": "pytorch"}), ("scaled_gain1", {"init_gain": 1.0}),
                     ("scaled_gain2", {"init_gain": 2.0}), ("scaled_gain3", {"init_gain": 3.0})):
        torch.manual_seed(0)
        tr = SpikingNetwork("784-500x10-10", **kw).run(x, record=True)
        res[name] = [round(float(torch.stack(o).mean()), 4) for o in tr.outputs[:-1]]
        print(name, res[name])
    (Path(__file__).resolve().parent / "init_rates.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
