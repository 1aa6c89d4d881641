"""Reader for the IDX format (MNIST, Fashion-MNIST, KMNIST, EMNIST), gzipped or not."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ..errors import LocosnnError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file: magic (0, 0, dtype code, ndim), ndim big-endian uint32 sizes, data."""
    path = Path(path)
    if not path.exists():
        raise LocosnnError(f"missing data file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise LocosnnError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise LocosnnError(f"{path} is truncated: header says {dims}, found {arr.size} values")
    return arr.reshape(dims)
