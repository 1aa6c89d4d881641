import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import requires_fashion
from locosnn.data import batches, load_dataset, read_idx
from locosnn.data.registry import FASHION_DIR
from locosnn.errors import LocosnnError


def write_idx(path, arr, gz):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_on_handmade_file(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("a.idx" + (".gz" if gz else ""))
    write_idx(p, arr, gz)
    assert np.array_equal(read_idx(p), arr)


def test_idx_rejects_bad_and_truncated_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(LocosnnError, match="not an IDX"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(LocosnnError, match="truncated"):
        read_idx(trunc)


@requires_fashion
def test_idx_reader_on_real_fashion_mnist_files():
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert 60 < images.mean() < 90  # real clothing images, not zeros


@requires_fashion
def test_fashion_registry_split_and_checksum():
    d = load_dataset("fashion-mnist", val_size=5000, seed=0)
    assert (len(d.train), len(d.val), len(d.test)) == (55000, 5000, 10000)
    assert d.train.x.shape[1:] == (1, 28, 28) and float(d.train.x.max()) <= 1.0
    assert len(d.checksum) == 16 and d.n_classes == 10
    d2 = load_dataset("fashion-mnist", val_size=5000, seed=1)
    assert not torch.equal(d.val.y, d2.val.y)  # split depends on the seed
    assert torch.equal(d.test.y, d2.test.y)  # test set does not


def test_mnist5k_and_digits_are_real():
    m = load_dataset("mnist-5k", val_size=500)
    assert len(m.train) + len(m.val) + len(m.test) == 5000 and m.shape == (1, 28, 28)
    assert np.bincount(np.concatenate([m.train.y, m.val.y, m.test.y])).tolist() == [500] * 10
    d = load_dataset("digits", val_size=0.1)
    assert d.shape == (1, 8, 8) and len(d.train) + len(d.val) + len(d.test) == 1797


def test_idx_directory_dataset(tmp_path):
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 255, (n, 28, 28)), True)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, False)
    d = load_dataset("kmnist", data_dir=str(tmp_path), val_size=5)
    assert (len(d.train), len(d.val), len(d.test)) == (25, 5, 10)


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(LocosnnError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    with pytest.raises(LocosnnError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(LocosnnError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")


def test_batches_shuffle_is_deterministic_and_complete():
    d = load_dataset("synthetic", val_size=100)
    a = [y for _, y in batches(d.train, 64, True, torch.Generator().manual_seed(5))]
    b = [y for _, y in batches(d.train, 64, True, torch.Generator().manual_seed(5))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == sorted(d.train.y.tolist())
