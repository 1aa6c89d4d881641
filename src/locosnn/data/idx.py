"""Reader for the IDX format (MNIST, Fashion-MNIST, KMNIST, EMNIST), gzipped or not."""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import LocosnnError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file: magic (0, 0, dtype code, ndim), ndim big-endian uint32 sizes, data.

    A missing, unreadable, corrupt (bad gzip stream) or malformed (bad header, wrong size) file is a
    :class:`LocosnnError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise LocosnnError(f"missing data file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        what = "corrupt or truncated gzip file" if opener is gzip.open else "I/O error"
        raise LocosnnError(f"{path} cannot be read: {what} ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise LocosnnError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    if ndim < 1 or len(data) < 4 + 4 * ndim:
        raise LocosnnError(f"{path} is not an IDX file (bad header: {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    body = len(data) - 4 - 4 * ndim
    want = int(np.prod(dims, dtype=np.int64))
    if body != want * dtype.itemsize:
        raise LocosnnError(f"{path} is truncated or corrupt: header says {dims} ({want} values), "
                           f"found {body // dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    return arr.reshape(dims)
