"""Build what a run's settings describe: its network, its optimiser, a trained run's network.

One place for the builders that the training loop, the cost measurement, the probes and the export
all use (they are re-exported by :mod:`locosnn.train`, where they used to live).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import load_checkpoint
from .config import TrainConfig, resolve_device, resolve_dtype
from .errors import LocosnnError
from .network import SpikingNetwork
from .neurons import NeuronConfig


def build_network(cfg: TrainConfig, seed: int | None = None) -> SpikingNetwork:
    """The network of ``cfg``, initialised on the CPU (the same weights on every device), then moved to
    ``cfg.device`` and ``cfg.dtype``. An unavailable device is a :class:`LocosnnError`."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed if seed is None else seed)
    neuron = NeuronConfig(model=cfg.neuron, beta=cfg.beta, theta=cfg.theta, surrogate=cfg.surrogate, slope=cfg.slope,
                          reset=cfg.reset)
    net = SpikingNetwork(cfg.arch, neuron=neuron, readout=cfg.readout, init=cfg.init, init_gain=cfg.init_gain)
    return net.to(device=device, dtype=dtype)


def load_run(run_dir: str | Path, device: Optional[str] = "cpu", dtype: Optional[str] = "float32",
             expect: tuple[str, ...] = ("config", "model")) -> tuple[SpikingNetwork, TrainConfig, dict[str, Any]]:
    """The network of a run directory's checkpoint, the run's TrainConfig and the checkpoint itself.

    ``device`` / ``dtype`` replace the run's own (None keeps them): a run trained on a GPU is
    evaluated, probed or exported wherever this runs. Clear errors for a missing checkpoint or one
    that does not fit its own config."""
    run = Path(run_dir)
    ck = run / "checkpoint.pt"
    if not ck.is_file():
        raise LocosnnError(f"{run} holds no checkpoint.pt (is it a run directory written by `locosnn train`?)")
    st = load_checkpoint(ck, expect=expect)
    cfg = TrainConfig.from_dict(st["config"])
    if device is not None:
        cfg.device = device
    if dtype is not None:
        cfg.dtype = dtype
    cfg.validate()
    net = build_network(cfg)
    try:
        net.load_state_dict(st["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise LocosnnError(f"checkpoint {ck} does not fit its own config (arch {cfg.arch}): "
                           f"{str(e).splitlines()[0]}") from None
    return net, cfg, st


def to_net(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch moved to the network's device, x also to its dtype (y stays integer)."""
    p = next(net.parameters(), None)
    if p is None:
        return x, y
    return x.to(device=p.device, dtype=p.dtype), y.to(device=p.device)


def build_optimizer(cfg: TrainConfig, net: SpikingNetwork) -> torch.optim.Optimizer:
    """adam, sgd (momentum 0.9) or nmom (per-tensor normalised momentum + per-neuron weight-norm
    projection, ``locosnn.optim``); the output layer gets ``cfg.readout_lr`` when set."""
    params: list = list(net.parameters())
    if cfg.readout_lr is not None:  # two groups only then, so runs without it keep one group (and resume)
        out_params = list(net.layers[-1].parameters())
        ids = {id(p) for p in out_params}
        params = [{"params": [p for p in params if id(p) not in ids]}, {"params": out_params, "lr": cfg.readout_lr}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "nmom":
        from .optim import NormalizedMomentum
        return NormalizedMomentum(params, lr=cfg.lr, momentum=0.9, row_norm=True, weight_decay=cfg.weight_decay,
                                  bias_step=cfg.bias_step)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
