"""Depth diagnostics any rule can use: what each layer keeps, and how good each layer's update is.

* :func:`layer_features` / :func:`probe_layers`: per-layer linear-probe accuracy of the
  time-averaged hidden spikes (a ridge-regression classifier on one-hot targets, closed
  form, standardised features), on held-out samples. Does class information survive
  the depth of the network (at init, after training)?
* :func:`layer_rates`: per-layer mean firing rate per step.
* :func:`split_half_consistency`: the estimator's own signal-to-noise per layer, without
  any reference gradient: the cosine between the means of two independent halves of K
  draws on one batch. Near 0: the layer's estimate is noise; near 1: it is consistent.
  (Surrogate BPTT gradients disagree among themselves at layer 1 of a deep LIF net, so a
  cosine to BPTT is not a yardstick there.) For an unbiased estimator with per-draw
  signal-to-noise s, the expected value is ~ (K/2) s^2 / (1 + (K/2) s^2).
* :func:`update_ratio`: per-layer ||delta W|| / ||W|| of one optimiser step.

``locosnn probe RUN_DIR`` prints the probes and rates of a run's checkpoint (and, with
``--init``, of the same network at initialisation).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch

from .encoding import encode
from .network import SpikingNetwork


@torch.no_grad()
def layer_features(network: SpikingNetwork, x: torch.Tensor, T: int = 8, encoder: str = "direct",
                   batch_size: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    """Time-averaged outputs of every hidden layer, flattened: a list of (N, n_l) tensors."""
    g = torch.Generator().manual_seed(seed)
    feats: list[list[torch.Tensor]] = [[] for _ in range(network.depth - 1)]
    for i in range(0, len(x), batch_size):
        tr = network.run(encode(x[i:i + batch_size], T, encoder, g), record=True)
        for li in range(network.depth - 1):
            feats[li].append(torch.stack(tr.outputs[li]).mean(0).flatten(1))
    return [torch.cat(f) for f in feats]


def ridge_probe(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor,
                n_classes: int, ridge: float = 1e-2) -> float:
    """Test accuracy of a ridge-regression classifier (one-hot targets, standardised features)."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    A = torch.cat([(f_train - mu) / sd, torch.ones(len(f_train), 1)], 1).double()
    Z = torch.cat([(f_test - mu) / sd, torch.ones(len(f_test), 1)], 1).double()
    Y = torch.nn.functional.one_hot(y_train, n_classes).double()
    W = torch.linalg.solve(A.T @ A + ridge * len(A) * torch.eye(A.shape[1], dtype=A.dtype), A.T @ Y)
    return float(((Z @ W).argmax(1) == y_test).double().mean())


def probe_layers(network: SpikingNetwork, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, T: int = 8, encoder: str = "direct") -> dict[str, Any]:
    """Per-hidden-layer probe accuracy and firing rate, and the probe on the raw input."""
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    ftr = layer_features(network, x_train, T, encoder)
    fte = layer_features(network, x_test, T, encoder)
    probes = [ridge_probe(a, y_train, b, y_test, n_classes) for a, b in zip(ftr, fte)]
    pixels = ridge_probe(x_train.flatten(1).float(), y_train, x_test.flatten(1).float(), y_test, n_classes)
    return {"probe_acc": probes, "rate": [float(f.mean()) for f in fte], "input_probe_acc": pixels}


@torch.no_grad()
def layer_rates(network: SpikingNetwork, x_seq: torch.Tensor) -> list[float]:
    """Mean firing rate per step of every hidden layer on one encoded batch."""
    tr = network.run(x_seq, record=True)
    return [float(torch.stack(o).mean()) for o in tr.outputs[:-1]]


def _estimate(rule: Any, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    for p in network.parameters():
        p.grad = None
    rule.step(network, x_seq, y)
    return [torch.cat([p.grad.flatten() for p in layer.parameters() if p.grad is not None]).double()
            for layer in network.layers]


def split_half_consistency(rule: Any, network: SpikingNetwork, x_seq: torch.Tensor, y: torch.Tensor,
                           draws: int = 16) -> list[float]:
    """Per layer: cosine between the mean estimates of two independent halves of ``draws``
    draws on one batch. The network and the rule are copied, so neither changes."""
    if draws < 2 or draws % 2:
        raise ValueError("split_half_consistency needs an even number of draws >= 2")
    net = copy.deepcopy(network)
    r = copy.deepcopy(rule)
    state = copy.deepcopy(net.state_dict())
    halves: list[list[torch.Tensor]] = [[], []]
    for k in range(draws):
        net.load_state_dict(state)  # homeostasis etc. may touch parameters inside step
        halves[k % 2].append(_estimate(r, net, x_seq, y))
    out = []
    for li in range(network.depth):
        a = torch.stack([h[li] for h in halves[0]]).mean(0)
        b = torch.stack([h[li] for h in halves[1]]).mean(0)
        den = float(a.norm() * b.norm())
        out.append(float(a @ b) / den if den > 0 else math.nan)
    return out


def update_ratio(before: list[torch.Tensor], network: SpikingNetwork) -> list[float]:
    """||W_after - W_before|| / ||W_before|| per layer (weights only)."""
    return [float((layer.weight.detach() - w0).norm() / (w0.norm() + 1e-30))
            for w0, layer in zip(before, network.layers)]


def snapshot(network: SpikingNetwork) -> list[torch.Tensor]:
    """Copies of the layers' weights, for :func:`update_ratio`."""
    return [layer.weight.detach().clone() for layer in network.layers]


def probe_run(network: SpikingNetwork, data: Any, T: int, encoder: str, n_train: int = 5000,
              n_test: int = 2000, split: Optional[str] = "val") -> dict[str, Any]:
    """Probes on a dataset: fit on the first ``n_train`` training samples, score on ``split``."""
    ev = getattr(data, split) if split and len(getattr(data, split)) else data.test
    return probe_layers(network, data.train.x[:n_train], data.train.y[:n_train], ev.x[:n_test], ev.y[:n_test],
                        T, encoder)


# -- the command line ---------------------------------------------------------------------------------
def probe_checkpoint(run_dir: str, n_train: int = 5000, n_test: int = 2000, at_init: bool = False) -> dict[str, Any]:
    """Probes and rates of a run directory's checkpoint (and of the same network re-initialised
    with the run's seed, with ``at_init``), scored on the validation split."""
    from .data import load_dataset
    from .factory import build_network, load_run

    # probed on the CPU in float32, however the run was trained
    net, cfg, st = load_run(run_dir, device="cpu", dtype="float32", expect=("epoch", "config", "model"))
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.limit)
    out: dict[str, Any] = {"run": str(run_dir), "epoch": st["epoch"], "arch": cfg.arch}
    if at_init:
        out["init"] = probe_run(build_network(cfg), data, cfg.T, cfg.encoder, n_train, n_test)
    out["trained"] = probe_run(net, data, cfg.T, cfg.encoder, n_train, n_test)
    return out


def add_parser(sub: Any) -> None:
    import argparse

    p = sub.add_parser("probe", help="per-layer linear probes and firing rates of a run's network",
                       description="Linear-probe accuracy (ridge classifier on time-averaged spikes, fit on the "
                                   "first --n-train training samples, scored on the validation split) and mean "
                                   "firing rate of every hidden layer of a run's checkpoint; with --init also of "
                                   "the same network at initialisation. Prints one JSON object.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="run directory written by `locosnn train` (or a `locosnn bench` cell)")
    p.add_argument("--n-train", dest="n_train", type=int, default=5000, help="samples the probes are fit on")
    p.add_argument("--n-test", dest="n_test", type=int, default=2000, help="validation samples they are scored on")
    p.add_argument("--init", dest="at_init", action="store_true", help="also probe the network at initialisation")
    p.set_defaults(func=_cmd_probe)


def _cmd_probe(args: Any) -> int:
    import json

    from .errors import LocosnnError
    if args.n_train < 10 or args.n_test < 1:
        raise LocosnnError("--n-train must be >= 10 and --n-test >= 1")
    print(json.dumps(probe_checkpoint(args.run_dir, args.n_train, args.n_test, args.at_init)))
    return 0
